"""Circuit breakers, one per model, shared by every process of a deployment.

A model's breaker opens when ``routing.circuitBreaker.errorThreshold`` of its calls failed
within ``window`` (timeouts, connection errors, 5xx, a provider's 429: see
:func:`~ai_saas_middleware.providers.failures.is_failure`), whichever tenant, shard or
process saw them. Open, the model gets no calls for ``resetTimeout``; then exactly one call,
across all processes, goes through as the probe: its success closes the breaker, its
failure opens it for another ``resetTimeout``.

The state lives in Redis (``<prefix>:{breakers}:*``, one cluster slot; see
:mod:`~ai_saas_middleware.store.keys`) and is written and read by ``breaker.lua`` only,
from the gateway's watch thread (:mod:`~ai_saas_middleware.watch`): never from a
request. What a request pays:

- routing asks :meth:`BreakerBoard.is_healthy`, a dict lookup in this process's view (and
  nothing at all while no breaker is open);
- a failed call is queued for the thread, which records it within ``LISTEN_S`` (one round
  trip, off the request);
- a successful call costs nothing, unless it was the probe.

Every transition (opened, opened again, closed) is announced on a channel
(``<prefix>:{breakers}:changed``, Redis pub/sub); each process's watch thread listens and
reads the state when told, so a breaker opened by one process is obeyed by every other
within milliseconds, and an idle deployment sends Redis nothing. Half-opening needs no
message: the view holds each breaker's reset time.

The probe is claimed only by a process that has a request wanting the model (a request
that found it open
past its reset time): that process's thread claims it (``claim``, atomic across
processes), and its next request for the model is the probe. A claim no request takes
within ``PROBE_IDLE_S`` is given back for another process; one whose process died lapses
after ``PROBE_LEASE_MS``.

While Redis is unreachable the view stays as it was last read, and failures wait in a
bounded queue until Redis answers.

Without a watch attached (:meth:`BreakerBoard.attach`), nothing is recorded or read but
by :meth:`BreakerBoard.refresh`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .config import CircuitBreakerConfig
from .errors import StoreRefused
from .forks import reset_in_children
from .store.keys import KeySchema

__all__ = ["BreakerBoard"]

log = logging.getLogger("ai_saas_middleware")

Store = Any  # a sync RedisStore (the board's thread is its only user)

PROBE_IDLE_S = 5.0  # a probe claim no request took is given back after this
PROBE_LEASE_MS = 120_000  # a claim of a process that died lapses after this
_MAX_QUEUED = 10_000  # failures kept while Redis is unreachable


def _owner_prefix() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"


class BreakerBoard:
    """This process's view of the deployment's breakers (kept by a :class:`Watch`).

    Args:
        cfg: ``routing.circuitBreaker``.
        keys: the deployment's key schema (prefix).
        probe_idle_s: how long a probe claim no request took is kept (tests shorten it).
    """

    def __init__(self, cfg: CircuitBreakerConfig, keys: KeySchema, *,
                 probe_idle_s: float = PROBE_IDLE_S):
        self.cfg = cfg
        self._keys = keys
        self.channel = keys.breaker_channel
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
        self._watch: Any = None  # the Watch that keeps this board
        self._states: dict[str, tuple[int, str, int]] = {}  # as last read
        self.rounds = 0  # completed reads (tests wait on it)
        reset_in_children(self)

    def attach(self, watch: Any) -> None:
        """The :class:`~ai_saas_middleware.watch.Watch` whose thread records and reads."""
        self._watch = watch

    def _started(self) -> None:
        watch = self._watch
        if watch is not None and not watch.started:
            watch.start(wait=False)

    def _wake(self) -> None:
        watch = self._watch
        if watch is not None:
            watch.wake()

    # ------------------------------------------------------------ the request side

    def is_healthy(self, model_id: str) -> bool:
        """May a request be routed to ``model_id`` now? False while its breaker is open,
        except for the one request that will carry the probe this process claimed."""
        self._started()
        if model_id not in self._open:
            return True
        if model_id in self._claims:
            return True
        if self._server_ms() >= self._open.get(model_id, 0) and model_id not in self._wanted:
            self._wanted.add(model_id)  # past its reset: the thread claims the probe
            self._wake()
        return False

    @property
    def any_open(self) -> bool:
        """True when some breaker is open (routing skips the health check otherwise)."""
        self._started()
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
        self._wake()

    def _server_ms(self) -> float:
        return time.time() * 1000 + self._offset_ms

    # ------------------------------------------------------------ the watch's side

    def refresh(self, store: Store) -> None:
        """Now, in the caller's thread: record queued failures and probe results, read
        every breaker, claim wanted probes, give back idle claims."""
        self.flush(store)
        self.read(store)
        self.tend(store)

    def read(self, store: Store) -> None:
        """Read every breaker's state, and the server's clock (plain commands, not a
        script: a deployment's count of scripts run is its requests' alone)."""
        flat = store.call("HGETALL", self._keys.breakers)
        seconds, micros = store.call("TIME")
        self._offset_ms = int(seconds) * 1000 + int(micros) // 1000 - time.time() * 1000
        states: dict[str, tuple[int, str, int]] = {}
        # (redis-py answers HGETALL with a dict; a flat list where no callback applies)
        pairs = (flat.items() if isinstance(flat, dict)
                 else zip(flat[::2], flat[1::2], strict=False))
        for raw_model, raw_state in pairs:
            parts = _text(raw_state).split(" ")
            if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
                states[_text(raw_model)] = (int(parts[0]), parts[1], int(parts[2]))
        self._states = states
        self._open = {model: state[0] for model, state in states.items()}
        self.rounds += 1

    def tend(self, store: Store) -> None:
        """Claim the probes requests want; give back claims no request took."""
        if self._wanted:
            self._claim_wanted(store, int(self._server_ms()), self._states)
        if self._claims:
            self._give_back_idle(store, self._states)

    def flush(self, store: Store) -> None:
        """Record the queued failures and probe results (a call each)."""
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

    def _after_fork(self) -> None:
        # A forked child's claims and probes are its parent's, not its own.
        self._lock = threading.Lock()
        self._claims = {}
        self._probing = {}
        self._wanted = set()
        self._reports = deque(maxlen=_MAX_QUEUED)
        self._owner = _owner_prefix()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
