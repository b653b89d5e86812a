"""What settled requests showed, deployment-wide: the completion tokens a model gives on
an endpoint, and each model's p99 latency. Routing uses the first to price the expected
completion of a request that states no ``max_tokens``, and the second, as an option,
instead of the profiles' ``latencyP99Ms``.

The request side only records (:meth:`ObservedStats.record`: one ``deque.append``, no
I/O, no lock; safe from threads and from an event loop). The gateway's watch thread
(:mod:`~ai_saas_middleware.watch`) does every Redis call, at most once a second while
samples wait (an idle process sends nothing): it folds what was recorded into local sums,
pushes them and reads back the deployment's figures in one EVAL (stats.lua), and
replaces the views the request side reads (:meth:`~ObservedStats.averages`,
:meth:`~ObservedStats.latencies`) whole. (So a process learns the other processes'
figures when it pushes its own: one that serves no AI request has no use for them.)

**Completions** (``<prefix>:{stats}:completions``, one hash): per endpoint and model, an
*exponentially decayed* average: each sample's weight halves every
:data:`COMPLETION_HALF_LIFE_S` (10 minutes), so the average follows a change within
tens of minutes, and an endpoint gone quiet keeps its last average (sums and weights
decay alike) until its weight is negligible (hours). A pair has an average once
:data:`MIN_COMPLETION_SAMPLES` completions were seen. ``endpoint_path`` should be the
endpoint's configured pattern (``endpoints[].path``), not the request's path: the
patterns are few, request paths are not (this process tracks at most
:data:`MAX_PAIRS` pairs).

**Latency** (``<prefix>:{stats}:lat:<minute>``, a histogram per minute, expiring): per
model, log-spaced buckets (8 per doubling: a bucket is about 9% wide; the p99 reported is
its bucket's upper bound, so it errs high by at most that), summed over the last
:data:`WINDOW_MINUTES` minutes (the current one included). A model has an observed p99
only with at least :data:`MIN_LATENCY_SAMPLES` (50) samples in that window: fewer say
little about a 99th percentile.

**Outages.** While Redis is unreachable the views stay as last read and the samples wait,
folded into sums (per pair) and counts (per model, bucket and 10-second slot), so memory
stays bounded however long it lasts; they are pushed when Redis answers, each latency in
the minute it was recorded. The bound: latencies older than the window when Redis
returns are dropped (they would not count any more), and a pair beyond :data:`MAX_PAIRS`
is not tracked. A forked child starts with nothing to push (its parent pushes its own).
A round whose reply was lost after Redis ran it (a timeout) is pushed again: its samples
then count twice. The figures are advisory (routing's estimates; billing never uses
them), so the round is not made idempotent for that rare case.

The keys are the deployment's, not a tenant's: no tenant id in them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .forks import reset_in_children
from .store.keys import KeySchema
from .store.redis import load_script

__all__ = [
    "COMPLETION_HALF_LIFE_S",
    "MIN_COMPLETION_SAMPLES",
    "MIN_LATENCY_SAMPLES",
    "WINDOW_MINUTES",
    "ObservedStats",
    "bucket_upper_ms",
    "latency_bucket",
]

log = logging.getLogger("ai_saas_middleware")

Store = Any  # a sync RedisStore (the thread is its only user)

WINDOW_MINUTES = 10  # the latency window (minutes, the current one included)
MIN_LATENCY_SAMPLES = 50  # samples in the window before a model has an observed p99
MIN_COMPLETION_SAMPLES = 10  # completions seen before a pair has an average
COMPLETION_HALF_LIFE_S = 600.0  # a completion sample's weight halves in this time
MAX_PAIRS = 1_000  # endpoint and model pairs this process tracks
_MAX_QUEUED = 200_000  # samples recorded between two rounds (the oldest go beyond)
_SLOT_S = 10  # waiting latencies are counted per slot of this many seconds
_BUCKETS_PER_DOUBLING = 8
_MAX_BUCKET = 255  # about 3.9e9 ms: beyond any timeout
_SEP = "\x1f"  # between endpoint and model, model and bucket in a field name
_AT = _SEP + "at"
_EMPTY: Mapping[str, int] = MappingProxyType({})
_BUCKETS: dict[int, int] = {}  # latency ms -> bucket, for the latencies seen (a cache)
_MAX_CACHED_BUCKETS = 100_000


def latency_bucket(latency_ms: int) -> int:
    """The histogram bucket of a latency: 0 for up to 1 ms, else
    ``ceil(8 * log2(latency_ms))`` (bucket b holds (2**((b-1)/8), 2**(b/8)] ms)."""
    if latency_ms <= 1:
        return 0
    return min(_MAX_BUCKET, math.ceil(_BUCKETS_PER_DOUBLING * math.log2(latency_ms)))


def bucket_upper_ms(bucket: int) -> int:
    """The largest latency (ms, whole) bucket ``bucket`` holds."""
    return max(1, math.floor(2 ** (bucket / _BUCKETS_PER_DOUBLING) + 1e-9))


def p99_ms(counts: Mapping[int, int]) -> int:
    """The 99th percentile of a histogram (bucket -> samples), as its bucket's upper bound."""
    total = sum(counts.values())
    rank = math.ceil(total * 0.99)
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return bucket_upper_ms(bucket)
    return bucket_upper_ms(max(counts))


class ObservedStats:
    """This process's recorder of settled requests, and its view of the deployment's
    observed completions and latencies.

    Kept by the gateway's :class:`~ai_saas_middleware.watch.Watch`, which calls
    :meth:`flush` at most once a second while samples wait (an idle process sends nothing).

    Args:
        keys: the deployment's key schema (prefix).
        min_latency_samples: samples in the window before a model has an observed p99.
        min_completion_samples: completions seen before a pair has an average.
    """

    def __init__(self, keys: KeySchema, min_latency_samples: int = MIN_LATENCY_SAMPLES,
                 min_completion_samples: int = MIN_COMPLETION_SAMPLES):
        self._keys = keys
        self.min_latency_samples = min_latency_samples
        self.min_completion_samples = min_completion_samples
        self._samples: deque[tuple[str, str, int, int]] = deque(maxlen=_MAX_QUEUED)
        # Owned by the round (under _round_lock): what waits to be pushed.
        self._completions: dict[tuple[str, str], list[int]] = {}  # -> [tokens, samples]
        self._latency: dict[tuple[int, str, int], int] = {}  # (slot, model, bucket) -> n
        self._pairs_warned = False
        # Read by requests, replaced whole by the round (never mutated in place).
        self._averages: Mapping[str, Mapping[str, int]] = MappingProxyType({})
        self._latencies: Mapping[str, int] = _EMPTY
        self._round_lock = threading.Lock()
        self.rounds = 0  # completed pushes (tests wait on it)
        reset_in_children(self)

    # ------------------------------------------------------------ the request side

    def record(self, endpoint_path: str, model_id: str, completion_tokens: int,
               latency_ms: int) -> None:
        """Record one settled request that got an answer: the endpoint's pattern, the
        model that answered, its completion tokens and the request's latency (ms)."""
        self._samples.append((endpoint_path, model_id, completion_tokens, latency_ms))

    def averages(self, endpoint_path: str) -> Mapping[str, int]:
        """Model id -> the average completion tokens observed on this endpoint (decayed,
        deployment-wide), for the pairs with enough samples."""
        return self._averages.get(endpoint_path, _EMPTY)

    def latencies(self) -> Mapping[str, int]:
        """Model id -> the p99 latency (ms) observed over the window, deployment-wide,
        for the models with at least ``min_latency_samples`` samples in it."""
        return self._latencies

    @property
    def has_pending(self) -> bool:
        """Something waits to be pushed (no lock: the watch thread asks every round)."""
        return bool(self._samples or self._latency or self._completions)

    @property
    def pending(self) -> int:
        """Samples recorded in this process and not pushed yet (those recorded and those
        folded into the latency counts; tests and the outage warning read it)."""
        queued = len(self._samples)
        with self._round_lock:
            return queued + sum(self._latency.values())

    # ------------------------------------------------------------ the round

    def flush(self, store: Store) -> None:
        """One round, now: fold the recorded samples, push them and read back the
        deployment's figures (one EVAL).

        Raises:
            StoreError: Redis did not answer (the samples wait for the next round).
        """
        with self._round_lock:
            self._fold()
            args: list[Any] = [int(COMPLETION_HALF_LIFE_S * 1000), WINDOW_MINUTES,
                               (WINDOW_MINUTES + 1) * 60, len(self._completions)]
            # Names with the separator in them could not be read back apart: left out.
            pairs = [(endpoint + _SEP + model, sums)
                     for (endpoint, model), sums in self._completions.items()
                     if model and _SEP not in endpoint and _SEP not in model]
            args[-1] = len(pairs)
            for field, (tokens, samples) in pairs:
                args += [field, tokens, samples]
            now = time.monotonic()
            for (slot, model, bucket), samples in self._latency.items():
                if model and _SEP not in model:
                    args += [max(0, int(now - slot)), f"{model}{_SEP}{bucket}", samples]
            _now, completions, latency = store.call(
                "EVAL", load_script("stats"), 2, self._keys.stats_completions,
                self._keys.stats_latency_base, *args)
            self._completions = {}
            self._latency = {}
            self._read(completions, latency)
            self.rounds += 1

    def _fold(self) -> None:
        """Move the recorded samples into the sums waiting to be pushed (no I/O). Keyed by
        tuples: the field names are built once per key, at the push, not per sample."""
        now = time.monotonic()
        slot = int(now // _SLOT_S * _SLOT_S)
        completions, latency, samples = self._completions, self._latency, self._samples
        buckets = _BUCKETS
        popleft = samples.popleft
        while samples:
            endpoint, model, tokens, latency_ms = popleft()
            if tokens >= 0:
                pair = completions.get((endpoint, model))
                if pair is not None:
                    pair[0] += tokens
                    pair[1] += 1
                elif len(completions) < MAX_PAIRS:
                    completions[(endpoint, model)] = [tokens, 1]
                elif not self._pairs_warned:
                    self._pairs_warned = True
                    log.warning("observed completions: more than %d endpoint and model "
                                "pairs; the others are not tracked (pass the endpoint's "
                                "pattern, not the request path)", MAX_PAIRS)
            if latency_ms >= 0:
                bucket = buckets.get(latency_ms)
                if bucket is None:
                    bucket = latency_bucket(latency_ms)
                    if len(buckets) < _MAX_CACHED_BUCKETS:
                        buckets[latency_ms] = bucket
                key = (slot, model, bucket)
                latency[key] = latency.get(key, 0) + 1
        # The bound of an outage: latencies older than the window could not count.
        oldest = now - WINDOW_MINUTES * 60
        if latency and min(k[0] for k in latency) < oldest:
            self._latency = {k: v for k, v in latency.items() if k[0] >= oldest}

    def _read(self, completions: list[Any], latency: list[Any]) -> None:
        averages: dict[str, dict[str, int]] = {}
        for i in range(0, len(completions) - 1, 2):
            field = _text(completions[i])
            if field == _AT or _SEP not in field:
                continue
            endpoint, model = field.rsplit(_SEP, 1)
            parts = _text(completions[i + 1]).split(" ")
            try:
                tokens, weight, count = float(parts[0]), float(parts[1]), int(parts[2])
            except (IndexError, ValueError):
                continue
            if count >= self.min_completion_samples and weight > 0:
                averages.setdefault(endpoint, {})[model] = max(0, round(tokens / weight))
        histograms: dict[str, dict[int, int]] = {}
        for i in range(0, len(latency) - 1, 2):
            model, _sep, bucket = _text(latency[i]).rpartition(_SEP)
            if bucket.isdigit():
                histograms.setdefault(model, {})[int(bucket)] = int(latency[i + 1])
        self._averages = MappingProxyType({endpoint: MappingProxyType(models)
                                           for endpoint, models in averages.items()})
        self._latencies = MappingProxyType({
            model: p99_ms(counts) for model, counts in histograms.items()
            if sum(counts.values()) >= self.min_latency_samples})

    def _after_fork(self) -> None:
        # The parent's samples are the parent's to push.
        self._round_lock = threading.Lock()
        self._samples = deque(maxlen=_MAX_QUEUED)
        self._completions = {}
        self._latency = {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
