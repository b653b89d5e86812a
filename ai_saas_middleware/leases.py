"""Leases on the quota reservations of the requests this process is serving.

admit.lua reserves a request's tokens under a lease (``quota.reservationTimeout``, 60 s by
default). A request that settles within it needs nothing more: settle.lua replaces the
reservation by the real usage. A request that runs longer (a long stream, a slow model)
keeps its reservation because :class:`LeaseKeeper` renews it: a daemon thread of the
process wakes every third of the lease and renews, one ``renew.lua`` call per tenant, the
leases of this process's requests that have been in flight for longer than that. Requests
that end sooner, the usual case, cost it nothing, and the hot path only adds and removes a
dict entry.

A process that is killed (the OOM killer, ``kill -9``, a deploy) stops renewing; once
their lease ran out (``reservationTimeout`` after the last renewal) its reservations are
released by a later admission of the tenant: the first the quota would otherwise refuse,
or about one admission in 16 before that (admit.lua looks for expired ones that often).
A reservation is never released while its process still renews it; and should one be
released anyway (Redis unreachable for longer than a lease, a process frozen for as long),
its request is still billed exactly once at settlement, for its real usage (settle.lua
releases only what Redis still holds).

Timeline of a long stream (lease 60 s)::

    t=0    admit.lua: reserve 1,000 tokens, lease until 60
    t=20   keeper: request in flight >= 20 s -> renew.lua: lease until 80
    t=40   keeper: renew -> until 100;  t=60: renew -> until 120
    t=75   settle.lua: the event, counter += real - 1,000, reservation gone

    kill -9 at t=50: the last renewal (t=40) holds it until 100; after t=100, the tenant's
    first admission that would be refused for want of quota (or, sooner, about one
    admission in 16) releases the 1,000 tokens.

The same thread replays a spool left waiting (events spooled during an outage) on each of
its rounds once Redis answers, so spooled events do not wait for the process's next
settlement: a process that gets no more traffic after an outage still delivers them,
within a third of the lease of Redis's return.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import StoreError
from .forks import reset_in_children
from .spool import Spool
from .store.keys import TenantKeys

__all__ = ["LeaseKeeper"]

log = logging.getLogger("ai_saas_middleware")

Store = Any  # a RedisStore (sync: the keeper runs in its own thread)


class LeaseKeeper:
    """Renews the reservation leases of this process's requests in flight.

    Args:
        lease_s: the lease a reservation gets at admission and at each renewal.
        store: a callable returning the sync store to renew with (called on first use:
            an asyncio gateway's keeper gets a sync store of its own, for its thread).
        owns_store: close that store with the keeper.
        spool: the gateway's spool, replayed by the keeper's rounds while it waits.
    """

    def __init__(self, lease_s: float, store: Callable[[], Store], owns_store: bool = False,
                 spool: Spool | None = None):
        self.lease_ms = max(1, int(lease_s * 1000))
        self.period_s = lease_s / 3
        self._store_factory = store
        self._owns_store = owns_store
        self._spool = spool
        self._store: Store | None = None
        # request id -> its tenant's keys, its reservation member, since
        self._held: dict[str, tuple[TenantKeys, str, float]] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        reset_in_children(self)

    def hold(self, request_id: str, keys: TenantKeys, member: str,
             since: float | None = None) -> None:
        """A request was admitted (``member``: its reservation, see
        :func:`~ai_saas_middleware.store.keys.reservation_member`; ``since``: when, by
        ``time.monotonic()``): keep its lease alive until :meth:`drop`."""
        self._held[request_id] = (keys, member, time.monotonic() if since is None else since)
        if self._thread is None:
            self._start()

    def drop(self, request_id: str) -> None:
        """The request is settling: its lease is no longer this process's business."""
        self._held.pop(request_id, None)

    @property
    def held(self) -> int:
        return len(self._held)

    def renew_due(self) -> int:
        """Renew, now, the leases of requests in flight for a third of a lease or more.
        Returns how many Redis renewed (those it still held)."""
        now = time.monotonic()
        due: dict[str, list[str]] = {}
        for keys, member, since in list(self._held.values()):
            if now - since >= self.period_s:
                due.setdefault(keys.reservations, []).append(member)
        renewed = 0
        for key, members in due.items():
            try:
                renewed += int(self._sync_store().run_script("renew", [key],
                                                             [self.lease_ms, *members]))
            except StoreError as exc:
                # Redis is away: the leases may run out; the requests are still billed
                # exactly at settlement (see the module docstring).
                log.warning("reservation leases of %d request(s) not renewed: %s",
                            len(members), exc)
        return renewed

    def _sync_store(self) -> Store:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def replay_spool(self) -> None:
        """Replay what waits in the spool, if Redis answers (one of the keeper's rounds)."""
        spool = self._spool
        if spool is None or not spool.pending:
            return
        store = self._sync_store()
        if store.health.is_down():
            return
        spool.replay(lambda call: store.run_script(*call))

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="ai-saas-leases", daemon=True)
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.period_s)
            if self._closed:
                return
            try:
                if self._held:
                    self.renew_due()
                self.replay_spool()
            except Exception:  # the keeper must outlive any surprise
                log.exception("the lease keeper's round failed")

    def close(self) -> None:
        """Stop the thread (the process's requests keep their current leases)."""
        self._closed = True
        self._wake.set()
        store, self._store = self._store, None
        if store is not None and self._owns_store:
            store.close()

    def _after_fork(self) -> None:
        # A forked child has no thread, and the parent's requests are not its own.
        self._thread = None
        self._held = {}
        self._store = None
        self._wake = threading.Event()
