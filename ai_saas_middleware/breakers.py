"""Circuit breakers, one per model, shared by every process of a deployment.

A model's breaker opens when ``routing.circuitBreaker.errorThreshold`` of its calls failed
within ``window`` (timeouts, connection errors, 5xx, a provider's 429: see
:func:`~ai_saas_middleware.providers.failures.is_failure`), whichever tenant, shard or
process saw them. Open, the model gets no calls for ``resetTimeout``; then exactly one call,
across all processes, goes through as the probe: its success closes the breaker, its
failure opens it for another ``resetTimeout``.

The state lives in Redis (``<prefix>:{breakers}:*``, one cluster slot; see
:mod:`~ai_saas_middleware.store.keys`) and is written and read by ``breaker.lua`` only,
from one daemon thread per process: never from a request. What a request pays:

- routing asks :meth:`BreakerBoard.is_healthy`, a dict lookup in this process's view (and
  nothing at all while no breaker is open);
- a failed call is queued for the thread, which wakes at once and records it (one round
  trip, off the request; counted within milliseconds of the failure);
- a successful call costs nothing, unless it was the probe.

Every transition (opened, opened again, closed) is announced on a channel
(``<prefix>:{breakers}:changed``, Redis pub/sub); each process's thread listens and reads
the state when told, so a breaker opened by one process is obeyed by every other within
milliseconds, and an idle deployment sends Redis nothing. The thread subscribes, then
reads, at its start and after every reconnection (nothing announced in between is
missed); half-opening needs no message, the view holds each breaker's reset time. The
first AI request of a process waits for that first read (once, at most ``READY_S``).

The probe is claimed only by a process that has a request wanting the model (a request
that found it open
past its reset time): that process's thread claims it (``claim``, atomic across
processes), and its next request for the model is the probe. A claim no request takes
within ``PROBE_IDLE_S`` is given back for another process; one whose process died lapses
after ``PROBE_LEASE_MS``.

While Redis is unreachable the view stays as it was last read, and failures wait in a
bounded queue until Redis answers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import RedisError

from .config import CircuitBreakerConfig
from .errors import StoreError, StoreRefused
from .store.keys import KeySchema

__all__ = ["BreakerBoard"]

log = logging.getLogger("ai_saas_middleware")

Store = Any  # a sync RedisStore (the board's thread is its only user)

LISTEN_S = 0.1  # the longest a queued failure waits for the thread (it listens this long)
RETRY_S = 1.0  # after Redis failed the thread, it tries again this much later
READY_S = 0.5  # the longest a process's first AI request waits for the first read
PROBE_IDLE_S = 5.0  # a probe claim no request took is given back after this
PROBE_LEASE_MS = 120_000  # a claim of a process that died lapses after this
_MAX_QUEUED = 10_000  # failures kept while Redis is unreachable


def _owner_prefix() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"


class BreakerBoard:
    """This process's view of the deployment's breakers, and the thread that keeps it.

    Args:
        cfg: ``routing.circuitBreaker``.
        keys: the deployment's key schema (prefix).
        store: a callable returning the sync store the thread uses (called on first use).
        owns_store: close that store with the board.
        probe_idle_s: how long a probe claim no request took is kept (tests shorten it).
    """

    def __init__(self, cfg: CircuitBreakerConfig, keys: KeySchema,
                 store: Callable[[], Store], owns_store: bool = False, *,
                 probe_idle_s: float = PROBE_IDLE_S):
        self.cfg = cfg
        self._keys = keys
        self._store_factory = store
        self._owns_store = owns_store
        self._store: Store | None = None
        self.probe_idle_s = probe_idle_s
        self._window_ms = max(1, int(cfg.window_s * 1000))
        self._reset_ms = max(1, int(cfg.reset_timeout_s * 1000))
        # Read by requests, replaced whole by the thread (never mutated in place).
        self._open: dict[str, int] = {}  # model -> open until, server ms
        self._offset_ms = 0.0  # server clock minus this one, ms (from the last read)
        self._lock = threading.Lock()
        self._claims: dict[str, tuple[str, float]] = {}  # model -> (owner, when claimed)
        self._probing: dict[str, str] = {}  # model -> owner of the probe call in flight
        self._wanted: set[str] = set()  # open models past reset a request wanted
        self._reports: deque[tuple[str, ...]] = deque(maxlen=_MAX_QUEUED)
        self._owner = _owner_prefix()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._failing = False
        self._pubsub: Any = None  # the thread's subscription to the breaker channel
        self._ready = threading.Event()  # set once the thread has read the state
        self._states: dict[str, tuple[int, str, int]] = {}  # as last read
        self.rounds = 0  # completed reads (tests wait on it)
        _boards.add(self)

    # ------------------------------------------------------------ the request side

    def is_healthy(self, model_id: str) -> bool:
        """May a request be routed to ``model_id`` now? False while its breaker is open,
        except for the one request that will carry the probe this process claimed."""
        if self._thread is None:
            self._start()
        if model_id not in self._open:
            return True
        if model_id in self._claims:
            return True
        if self._server_ms() >= self._open.get(model_id, 0) and model_id not in self._wanted:
            self._wanted.add(model_id)  # past its reset: the thread claims the probe
            self._wake.set()
        return False

    @property
    def any_open(self) -> bool:
        """True when some breaker is open (routing skips the health check otherwise)."""
        if self._thread is None:
            self._start()
        return bool(self._open)

    def retry_after_s(self, model_ids: Iterable[str]) -> int:
        """Seconds until the first of these open breakers may be probed (at least 1)."""
        opened = [self._open[m] for m in model_ids if m in self._open]
        if not opened:
            return 1
        return max(1, math.ceil((min(opened) - self._server_ms()) / 1000))

    def begin(self, model_id: str) -> str | None:
        """Before calling ``model_id``: ``""`` for an ordinary call, the probe's owner when
        this call is the probe, None when the model must not be called (open, and the probe
        is not this call's to make)."""
        if model_id not in self._open:
            return ""
        with self._lock:
            claim = self._claims.pop(model_id, None)
            if claim is None:
                return None
            self._probing[model_id] = claim[0]
        return claim[0]

    def end(self, model_id: str, probe: str, failed: bool) -> None:
        """After a call that :meth:`begin` allowed: ``failed`` per ``is_failure``."""
        if probe:
            self._probing.pop(model_id, None)
        if failed:
            self._report("fail", model_id, probe or "-")
        elif probe:
            self._report("ok", model_id, probe)

    def _report(self, op: str, model_id: str, owner: str) -> None:
        self._reports.append((op, model_id, owner))
        if self._thread is None:
            self._start(wait=False)
        self._wake.set()

    def _server_ms(self) -> float:
        return time.time() * 1000 + self._offset_ms

    # ------------------------------------------------------------ the thread

    def refresh(self) -> None:
        """Now, in the caller's thread: record queued failures and probe results, read
        every breaker, claim wanted probes, give back idle claims."""
        store = self._sync_store()
        self._flush(store)
        self._read(store)
        self._tend_probes(store)

    def _read(self, store: Store) -> None:
        now, flat = store.run_script("breaker", [self._keys.breakers], ["read"])
        self._offset_ms = int(now) - time.time() * 1000
        states: dict[str, tuple[int, str, int]] = {}
        for i in range(0, len(flat) - 1, 2):
            model = _text(flat[i])
            parts = _text(flat[i + 1]).split(" ")
            if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
                states[model] = (int(parts[0]), parts[1], int(parts[2]))
        self._states = states
        self._open = {model: state[0] for model, state in states.items()}
        self.rounds += 1

    def _tend_probes(self, store: Store) -> None:
        if self._wanted:
            self._claim_wanted(store, int(self._server_ms()), self._states)
        if self._claims:
            self._give_back_idle(store, self._states)

    def _flush(self, store: Store) -> None:
        while self._reports:
            op, model, owner = self._reports[0]
            if op == "fail":
                args = ["fail", model, self._window_ms, self.cfg.error_threshold,
                        self._reset_ms, f"{self._owner}:{next(self._seq)}", owner,
                        self._keys.breaker_channel]
            else:
                args = ["ok", model, owner, self._keys.breaker_channel]
            keys = [self._keys.breakers, self._keys.breaker_failures(model)]
            try:
                _now, is_open, until = store.run_script("breaker", keys, args)
            except StoreRefused as exc:  # answered, and will answer so again: drop it
                self._reports.popleft()
                log.error("circuit breaker of model %r: %s not recorded: %s", model, op, exc)
                continue
            self._reports.popleft()
            opened = dict(self._open)
            if int(is_open):
                if model not in opened:
                    log.warning("circuit breaker of model %r opened: %d failures within %gs",
                                model, self.cfg.error_threshold, self.cfg.window_s)
                opened[model] = int(until)
            elif opened.pop(model, None) is not None:
                log.info("circuit breaker of model %r closed: its probe succeeded", model)
            self._open = opened

    def _claim_wanted(self, store: Store, now: int,
                      states: dict[str, tuple[int, str, int]]) -> None:
        for model in list(self._wanted):
            state = states.get(model)
            if state is None or now < state[0]:
                self._wanted.discard(model)
                continue
            if model in self._claims or model in self._probing:
                continue
            if state[1] != "-" and now < state[2]:
                continue  # another process holds the probe
            owner = f"{self._owner}:p{next(self._seq)}"
            _now, won, _until = store.run_script(
                "breaker", [self._keys.breakers], ["claim", model, owner, PROBE_LEASE_MS])
            self._wanted.discard(model)
            if int(won):
                self._claims[model] = (owner, time.monotonic())

    def _give_back_idle(self, store: Store, states: dict[str, tuple[int, str, int]]) -> None:
        now = time.monotonic()
        for model, (owner, since) in list(self._claims.items()):
            if model in states and now - since < self.probe_idle_s:
                continue
            with self._lock:
                if self._claims.get(model, (None,))[0] != owner:
                    continue  # a request took it meanwhile
                del self._claims[model]
            if model in states:
                store.run_script("breaker", [self._keys.breakers], ["release", model, owner])

    def _sync_store(self) -> Store:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def _start(self, wait: bool = True) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            # The thread holds the board weakly: a gateway dropped without close() takes
            # its board, and then the thread, with it.
            thread = threading.Thread(target=_loop, args=(weakref.ref(self), self._wake),
                                      name="ai-saas-breakers", daemon=True)
            self._thread = thread
        thread.start()
        if wait:
            # The first request of a process waits (once, at most READY_S) for the first
            # read, so that it routes by the deployment's breakers, not by none.
            self._ready.wait(READY_S)

    def _round(self) -> float:
        """One round of the thread, never raising; returns how long to wait after it."""
        self._wake.clear()  # before the round: a report made during it wakes the next
        try:
            store = self._sync_store()
            self._flush(store)
            if self._pubsub is None:
                pubsub = store.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self._keys.breaker_channel)
                self._pubsub = pubsub
                self._read(store)  # after subscribing: no change falls between the two
                self._ready.set()
            elif self._pubsub.get_message(timeout=LISTEN_S) is not None:
                while self._pubsub.get_message(timeout=0) is not None:
                    pass  # one read covers every change announced so far
                self._read(store)
            self._tend_probes(store)
            if self._failing:
                log.info("circuit breakers: Redis answers again")
            self._failing = False
            return 0.0
        except (StoreError, RedisError, OSError) as exc:
            self._drop_pubsub()
            if not self._failing:  # once per outage
                log.warning("circuit breakers not read or recorded (kept as last read): %s",
                            exc)
            self._failing = True
            self._ready.set()  # a first request does not wait on an unreachable Redis
        except Exception:  # the thread must outlive any surprise
            self._drop_pubsub()
            log.exception("the circuit breakers' round failed")
        return RETRY_S

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def close(self) -> None:
        """Stop the thread (the breakers' state stays in Redis for the other processes)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(LISTEN_S + 1.0)  # it listens at most LISTEN_S at a time
        self._drop_pubsub()
        store, self._store = self._store, None
        if store is not None and self._owns_store:
            store.close()

    def _after_fork(self) -> None:
        # A forked child has no thread; its claims and probes are its parent's.
        self._thread = None
        self._lock = threading.Lock()
        self._claims = {}
        self._probing = {}
        self._wanted = set()
        self._reports = deque(maxlen=_MAX_QUEUED)
        self._owner = _owner_prefix()
        self._store = None
        self._pubsub = None  # the parent's connection: never read in the child
        self._ready = threading.Event()
        self._wake = threading.Event()


def _loop(ref: weakref.ReferenceType[BreakerBoard], wake: threading.Event) -> None:
    while True:
        board = ref()
        if board is None or board._closed:
            if board is not None:
                board._drop_pubsub()
            return
        pause = board._round()
        del board
        if pause:
            wake.wait(pause)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_boards: weakref.WeakSet[BreakerBoard] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for board in list(_boards):
        board._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
