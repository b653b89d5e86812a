"""The circuit breakers' shared state (breakers.py, breaker.lua) against a real Redis.

Two boards with stores of their own stand for two processes here (the two-process test
with real processes and a provider stand-in is in test_fallback.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faults import wait_until

from ai_saas_middleware.breakers import BreakerBoard
from ai_saas_middleware.config import CircuitBreakerConfig, RedisConfig
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import RedisStore
from ai_saas_middleware.watch import Watch

CFG = CircuitBreakerConfig(error_threshold=3, reset_timeout_s=0.4, window_s=30.0)


@pytest.fixture
def boards(redis_server_url: str, key_prefix: str) -> Iterator[Callable[..., BreakerBoard]]:
    """``boards()``: a board kept by a watch thread of its own, on a store of its own (a
    process, as far as Redis can tell)."""
    made: list[Watch] = []

    def make(cfg: CircuitBreakerConfig = CFG, **kw: Any) -> BreakerBoard:
        board = BreakerBoard(cfg, KeySchema(key_prefix, 16), **kw)
        made.append(Watch(lambda: RedisStore(RedisConfig(), redis_server_url), True, board))
        return board

    yield make
    for watch in made:
        watch.close()


def fail(board: BreakerBoard, model: str, times: int = 1) -> None:
    for _ in range(times):
        probe = board.begin(model)
        assert probe is not None
        board.end(model, probe, failed=True)


def test_a_model_is_healthy_until_threshold_failures_then_open_in_every_process(boards):
    a, b = boards(), boards()
    fail(a, "m1", 2)
    wait_until(lambda: not a._reports)  # both recorded
    assert a.is_healthy("m1") and b.is_healthy("m1")  # 2 < errorThreshold 3
    fail(b, "m1")  # the third failure, seen by another process
    wait_until(lambda: not a.is_healthy("m1") and not b.is_healthy("m1"))
    assert a.is_healthy("m2") and b.is_healthy("m2")  # a breaker is per model
    assert a.any_open and b.any_open
    assert a.begin("m1") is None and b.begin("m1") is None


def test_failures_outside_the_window_do_not_add_up(boards, rclient, key_prefix):
    a = boards(CircuitBreakerConfig(error_threshold=2, reset_timeout_s=30, window_s=0.3))
    fail(a, "m1")
    wait_until(lambda: not a._reports and a.rounds >= 1)
    time.sleep(0.35)  # the first failure leaves the window (server time, 0.3 s)
    fail(a, "m1")
    wait_until(lambda: not a._reports)
    assert a.is_healthy("m1")
    assert rclient.hgetall(KeySchema(key_prefix, 16).breakers) == {}
    assert rclient.zcard(KeySchema(key_prefix, 16).breaker_failures("m1")) == 1


def take_probe(board: BreakerBoard, model: str, deadline_s: float) -> str | None:
    """Ask as a request would, until this board hands out the probe or time runs out."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if board.is_healthy(model):
            probe = board.begin(model)
            if probe:
                return probe
        time.sleep(0.01)
    return None


def test_after_the_reset_timeout_exactly_one_probe_goes_through_across_processes(boards):
    a, b, c = boards(), boards(), boards()
    fail(a, "m1", 3)
    wait_until(lambda: not b.is_healthy("m1") and not c.is_healthy("m1"))
    probes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def want(board: BreakerBoard, name: str) -> None:
        probe = take_probe(board, "m1", 2.0)
        if probe:
            with lock:
                probes.append((name, probe))

    threads = [threading.Thread(target=want, args=(board, name))
               for board in (a, b, c) for name in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(probes) == 1, probes  # the probe is in flight for the whole 2 s: no second


def test_the_probes_success_closes_the_breaker_everywhere(boards):
    a, b = boards(), boards()
    fail(a, "m1", 3)
    wait_until(lambda: not b.is_healthy("m1"))
    probe = take_probe(b, "m1", 5.0)
    assert probe
    assert not a.is_healthy("m1")  # while the probe runs, nobody else calls the model
    b.end("m1", probe, failed=False)
    wait_until(lambda: a.is_healthy("m1") and b.is_healthy("m1") and not a.any_open)
    assert a.begin("m1") == "" and b.begin("m1") == ""


def test_the_probes_failure_opens_the_breaker_for_another_reset_timeout(boards):
    cfg = CircuitBreakerConfig(error_threshold=3, reset_timeout_s=1.0, window_s=30.0)
    a, b = boards(cfg), boards(cfg)
    fail(a, "m1", 3)
    wait_until(lambda: not b.is_healthy("m1"))
    probe = take_probe(b, "m1", 5.0)
    assert probe
    reopened = time.time()
    b.end("m1", probe, failed=True)
    wait_until(lambda: not b._reports)
    # No probe is handed out again until the new reset time has passed.
    assert take_probe(a, "m1", 0.5) is None
    assert b.retry_after_s(["m1"]) >= 1
    again = take_probe(a, "m1", 5.0)
    assert again and time.time() - reopened >= 0.9


def test_a_claimed_probe_no_request_takes_is_given_back_to_a_process_that_wants_it(boards):
    a, b = boards(probe_idle_s=0.2), boards(probe_idle_s=0.2)
    fail(a, "m1", 3)
    wait_until(lambda: not a.is_healthy("m1") and b.any_open)  # b has seen it open
    time.sleep(0.45)  # past the reset time
    # a wants the model once, claims the probe, and then has no more requests for it.
    wait_until(lambda: a.is_healthy("m1"))
    assert b.begin("m1") is None
    assert take_probe(b, "m1", 5.0)  # a gave its idle claim back; b got it


def test_a_failure_of_a_call_begun_before_the_breaker_opened_changes_nothing(boards):
    cfg = CircuitBreakerConfig(error_threshold=2, reset_timeout_s=30.0, window_s=30.0)
    a = boards(cfg)
    late = [a.begin("m1") for _ in range(3)]  # three calls in flight
    for probe in late[:2]:
        a.end("m1", probe or "", failed=True)
    wait_until(lambda: not a.is_healthy("m1"))
    until = a._open["m1"]
    a.end("m1", late[2] or "", failed=True)
    wait_until(lambda: not a._reports)
    assert a._open["m1"] == until  # not pushed further out


def test_failures_wait_while_redis_is_unreachable(key_prefix):
    board = BreakerBoard(CircuitBreakerConfig(error_threshold=1), KeySchema(key_prefix, 16))
    watch = Watch(lambda: RedisStore(RedisConfig(socket_timeout_s=0.05, connect_timeout_s=0.05),
                                     "redis://127.0.0.1:1/0"), True, board)
    try:
        fail(board, "m1")
        time.sleep(0.2)
        assert board.is_healthy("m1") and len(board._reports) == 1  # kept, not lost
    finally:
        watch.close()
