"""The gateway's watch: one daemon thread per process that does the Redis work the
deployment's shared state needs, so that no request ever does it.

It keeps three things current:

- the circuit breakers (:class:`~ai_saas_middleware.breakers.BreakerBoard`): it records
  queued failures and probe results, claims and gives back probes, and reads the
  breakers' state when ``breaker.lua`` announces a transition;
- the price book (:class:`~ai_saas_middleware.pricebook.PriceBook`): it reads the book
  when ``ai-saas models set`` announces a new version;
- the observed statistics (:class:`~ai_saas_middleware.observed.ObservedStats`): it pushes
  what this process's settled requests showed, and reads back the deployment's figures,
  at most once every ``STATS_S`` while there is something to push.

Announcements come by Redis pub/sub on one connection (``<prefix>:{breakers}:changed``,
``<prefix>:{models}:changed``). The thread subscribes, then reads everything, when it
starts and after every reconnection, so that nothing announced in between is missed. An
idle process sends Redis nothing at all; a busy one, a call a second (the statistics).

The thread starts on the first AI request of a process (in a forked worker too), without
holding that request up: requests route by the configuration's prices and with every
breaker closed until the thread's first read, a few milliseconds later (a request sent
meanwhile to a model whose breaker is open elsewhere fails and falls back, as it would
have before the breaker opened). While Redis is unreachable everything stays as last
read; the thread tries again every ``RETRY_S``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .breakers import BreakerBoard
from .errors import StoreError
from .forks import reset_in_children

__all__ = ["Watch"]

log = logging.getLogger("ai_saas_middleware")

Store = Any  # a sync RedisStore (the thread is its only user, or shares a thread-safe one)

LISTEN_S = 0.1  # how often the thread looks for announcements (a report wakes it at once)
RETRY_S = 1.0  # after Redis failed the thread, it tries again this much later
READY_S = 0.5  # the longest start(wait=True) waits for the first read
STATS_S = 1.0  # the statistics are pushed at most this often


class Watch:
    """The thread that keeps a gateway's breakers, price book and statistics current.

    Args:
        store: a callable returning the sync store the thread uses (called on first use).
        owns_store: close that store with the watch.
        breakers: the breakers' view to keep.
        book: the price book to keep (optional).
        stats: the observed statistics to push and read (optional).
    """

    def __init__(self, store: Callable[[], Store], owns_store: bool, breakers: BreakerBoard,
                 book: Any = None, stats: Any = None):
        self._store_factory = store
        self._owns_store = owns_store
        self._store: Store | None = None
        self.breakers = breakers
        self.book = book
        self.stats = stats
        self._channels = {breakers.channel.encode(): self._breakers_changed}
        if book is not None:
            self._channels[book.channel.encode()] = self._book_changed
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._closed = False
        self._failing = False
        self._pushed = 0.0  # monotonic time of the last statistics push
        breakers.attach(self)
        reset_in_children(self)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, wait: bool = True) -> None:
        """Start the thread (no-op when it runs); with ``wait``, wait for its first read,
        at most ``READY_S``."""
        with self._lock:
            if self._thread is None and not self._closed:
                # The thread holds the watch weakly: a gateway dropped without close()
                # takes its watch, and then the thread, with it.
                self._thread = threading.Thread(target=_loop, args=(weakref.ref(self),
                                                                    self._wake),
                                                name="ai-saas-watch", daemon=True)
                self._thread.start()
        if wait:
            self._ready.wait(READY_S)

    def wake(self) -> None:
        """Something waits for the thread (a failure to record, a probe to claim)."""
        if self._thread is None:
            self.start(wait=False)
        self._wake.set()

    def record(self, endpoint_path: str, model_id: str, completion_tokens: int,
               latency_ms: int) -> None:
        """A settled request's figures, for the observed statistics (no I/O)."""
        stats = self.stats
        if stats is not None:
            stats.record(endpoint_path, model_id, completion_tokens, latency_ms)
            if self._thread is None:
                self.start(wait=False)

    # ------------------------------------------------------------ the thread

    def _breakers_changed(self, store: Store) -> None:
        self.breakers.read(store)

    def _book_changed(self, store: Store) -> None:
        self.book.refresh(store)

    def _round(self) -> float:
        """One round of the thread, never raising; how long to pause after it."""
        self._wake.clear()  # before the round: a report made during it wakes the next
        try:
            store = self._sync_store()
            self.breakers.flush(store)
            if self._pubsub is None:
                pubsub = store.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(*self._channels)
                self._pubsub = pubsub
                for changed in self._channels.values():  # after subscribing: none missed
                    changed(store)
                self._ready.set()
            else:
                changed_now: set[bytes] = set()
                message = self._pubsub.get_message(timeout=0)  # (no wait: reports wake us)
                while message is not None:
                    changed_now.add(message["channel"])
                    message = self._pubsub.get_message(timeout=0)
                for channel in changed_now:
                    handler = self._channels.get(channel)
                    if handler is not None:
                        handler(store)
            self.breakers.tend(store)
            stats = self.stats
            if (stats is not None and stats.has_pending
                    and time.monotonic() - self._pushed >= STATS_S):
                self._pushed = time.monotonic()
                stats.flush(store)
            if self._failing:
                log.info("the watch thread: Redis answers again")
            self._failing = False
            return 0.0
        except (StoreError, RedisError, OSError) as exc:
            self._drop_pubsub()
            if not self._failing:  # once per outage
                log.warning("breakers, price book and statistics not read or recorded "
                            "(kept as last read): %s", exc)
            self._failing = True
            self._ready.set()  # a first request does not wait on an unreachable Redis
        except Exception:  # the thread must outlive any surprise
            self._drop_pubsub()
            log.exception("the watch thread's round failed")
        return RETRY_S

    def _sync_store(self) -> Store:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def close(self) -> None:
        """Stop the thread (the shared state stays in Redis for the other processes)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)  # woken: it ends after the round it is in
        self._drop_pubsub()
        store, self._store = self._store, None
        if store is not None and self._owns_store:
            store.close()

    def _after_fork(self) -> None:
        # A forked child has no thread, and its parent's subscription is not its own.
        self._thread = None
        self._pubsub = None
        self._store = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ready = threading.Event()


def _loop(ref: weakref.ReferenceType[Watch], wake: threading.Event) -> None:
    while True:
        watch = ref()
        if watch is None or watch._closed:
            if watch is not None:
                watch._drop_pubsub()
            return
        pause = watch._round()
        del watch
        wake.wait(pause or LISTEN_S)
