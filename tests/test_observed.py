"""Observed statistics (observed.py, stats.lua) against a real Redis: completions per
endpoint and model and p99 latency per model, merged across processes (several recorders
with stores of their own stand for several processes), and what an outage does."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import PrivateRedis, wait_until

from ai_saas_middleware.breakers import BreakerBoard
from ai_saas_middleware.config import CircuitBreakerConfig, RedisConfig
from ai_saas_middleware.errors import StoreError
from ai_saas_middleware.observed import (
    MIN_LATENCY_SAMPLES,
    ObservedStats,
    bucket_upper_ms,
    latency_bucket,
    p99_ms,
)
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import RedisStore
from ai_saas_middleware.watch import Watch

EP = "/ai/*"


class Recorder(ObservedStats):
    """A process's recorder as a gateway has it, kept by a watch thread of its own (one
    store), plus a store of its own for the test's explicit rounds (``flush()``)."""

    def __init__(self, keys: KeySchema, url: str, cfg: RedisConfig, watched: bool,
                 **kw: Any):
        super().__init__(keys, **kw)
        self.store = RedisStore(cfg, url)
        self.watch = (Watch(lambda: RedisStore(cfg, url), True,
                            BreakerBoard(CircuitBreakerConfig(), keys), stats=self)
                      if watched else None)
        if self.watch is not None:
            self.watch.start(wait=False)

    def flush(self, store: Any = None) -> None:
        super().flush(store if store is not None else self.store)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.store.close()


@pytest.fixture
def recorders(redis_server_url: str, key_prefix: str) -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(url: str = redis_server_url, watched: bool = False, **kw: Any) -> Recorder:
        stats = Recorder(KeySchema(key_prefix, 16), url, RedisConfig(retry_interval_s=0.05),
                         watched, **kw)
        made.append(stats)
        return stats

    yield make
    for stats in made:
        stats.close()


def test_buckets_hold_every_latency_below_their_upper_bound_within_9_percent() -> None:
    for ms in (1, 2, 3, 10, 99, 100, 101, 900, 1000, 4096, 30_000, 600_000):
        upper = bucket_upper_ms(latency_bucket(ms))
        assert ms <= upper <= max(ms + 1, ms * 1.091), (ms, upper)
    assert p99_ms({latency_bucket(100): 99, latency_bucket(5000): 1}) == \
        bucket_upper_ms(latency_bucket(100))
    assert p99_ms({latency_bucket(100): 98, latency_bucket(5000): 2}) == \
        bucket_upper_ms(latency_bucket(5000))


def test_averages_and_p99_from_several_processes_merge_deployment_wide(recorders):
    a, b, reader = recorders(watched=True), recorders(watched=True), recorders()
    for _ in range(49):
        a.record(EP, "m1", 100, 100)
        b.record(EP, "m1", 200, 100)
    b.record(EP, "m1", 200, 5000)
    b.record(EP, "m1", 200, 5000)
    a.record("/ai/other", "m1", 7, 100)
    # The watch threads push on their own; each process reads the deployment's figures
    # with its next round (a busy process has one a second; here: flush()), and a third
    # process that recorded nothing sees the same.
    wait_until(lambda: not a.has_pending and not b.has_pending, 10, "a and b pushed")
    for stats in (a, b, reader):
        stats.flush()
        wait_until(lambda stats=stats: stats.flush() is None
                   and stats.latencies().get("m1") is not None, 10, "an observed p99 for m1")
        wait_until(lambda stats=stats: 149 <= stats.averages(EP).get("m1", 0) <= 151)
        # 100 samples: the 99th is one of the two at 5000 ms (reported as its bucket's bound)
        assert stats.latencies()["m1"] == bucket_upper_ms(latency_bucket(5000))
        assert stats.averages("/ai/other") == {}  # 1 completion < MIN_COMPLETION_SAMPLES
        assert stats.averages("/ai/nothing") == {}


def test_a_model_below_the_minimum_samples_has_no_observed_latency(recorders):
    a, b = recorders(), recorders()
    for _ in range(MIN_LATENCY_SAMPLES - 1):
        a.record(EP, "m-rare", 10, 300)
    a.flush()
    b.flush()
    assert "m-rare" not in a.latencies() and "m-rare" not in b.latencies()
    b.record(EP, "m-rare", 10, 300)
    b.flush()
    a.flush()
    assert a.latencies()["m-rare"] == bucket_upper_ms(latency_bucket(300))


def test_no_sample_is_lost_while_redis_is_unreachable(recorders, tmp_path: Path, key_prefix):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server on PATH (a server of its own, stopped and started)")
    server = PrivateRedis(binary, tmp_path / "data")
    try:
        stats = recorders(server.url)
        for _ in range(20):
            stats.record(EP, "m1", 50, 200)
        stats.flush()
        server.stop()
        for _ in range(30):
            stats.record(EP, "m1", 150, 200)
        with pytest.raises(StoreError):
            stats.flush()
        assert stats.pending == 30  # folded, waiting
        stats.record(EP, "m1", 150, 200)
        with pytest.raises(StoreError):
            stats.flush()
        server.start()

        def pushed() -> bool:
            try:
                stats.flush()
            except StoreError:
                return False
            return True

        wait_until(pushed, 10, "a round once Redis is back")
        client = server.client()
        value = client.hget(KeySchema(key_prefix, 16).stats_completions, f"{EP}\x1fm1")
        tokens, _weight, count = value.split(" ")
        assert int(count) == 51  # every sample, the 31 of the outage included
        # The sum is decayed (half-life 10 minutes): only the first 20 are seconds old.
        assert 20 * 50 * 0.95 + 31 * 150 < float(tokens) <= 20 * 50 + 31 * 150
        assert stats.latencies()["m1"] == bucket_upper_ms(latency_bucket(200))
        assert stats.pending == 0
        client.close()
    finally:
        server.close()


def test_the_thread_survives_an_outage_and_pushes_after_it(recorders, tmp_path: Path, caplog):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server on PATH")
    server = PrivateRedis(binary, tmp_path / "data")
    try:
        stats = recorders(server.url, watched=True, min_latency_samples=5)
        server.stop()
        for _ in range(5):
            stats.record(EP, "m1", 10, 40)
        wait_until(lambda: "breakers, price book and statistics not read" in caplog.text)
        server.start()
        wait_until(lambda: stats.latencies().get("m1") == bucket_upper_ms(latency_bucket(40)),
                   10, "the samples recorded during the outage, pushed")
    finally:
        server.close()


def test_a_forked_child_does_not_push_its_parents_samples(recorders):
    stats = recorders()  # no watch: nothing pushes in the meantime
    stats.record(EP, "m1", 10, 40)
    stats._after_fork()  # what os.register_at_fork runs in the child (forks.py)
    assert stats.pending == 0 and not stats.has_pending
