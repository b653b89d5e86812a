"""The outage allowance is bounded over time, not per outage (issue 7, item 16c).

A process admits a tenant at most a tenth of its monthly quota in tokens in any 30
days while Redis is unreachable, however often Redis goes down and comes back.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import API_KEYS

from ai_saas_middleware import Decision, Gateway, RequestInfo
from ai_saas_middleware.allowance import LocalAllowance
from ai_saas_middleware.config import TierConfig
from ai_saas_middleware.embedded import LocalServer, start_server

DAY_S = 86_400
TIER = TierConfig("pro", 100_000, 1_000, ("model-small",))  # budget: 10,000 tokens


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_spending_counts_for_30_days_and_no_recovery_renews_it() -> None:
    clock = Clock()
    allowance = LocalAllowance(clock)

    assert allowance.take("t", TIER, 9_000, 60_000) is None
    allowance.forget_expired()  # Redis came back ...
    clock.now += 120  # ... and went down again
    refused = allowance.take("t", TIER, 2_000, 60_000)
    assert refused is not None and refused[0] == 2 and refused[2] == 1_000
    assert allowance.take("t", TIER, 1_000, 60_000) is None  # what is left is still there

    clock.now += 29 * DAY_S
    assert allowance.take("t", TIER, 1, 60_000) is not None  # within 30 days: still spent
    clock.now += 2 * DAY_S + 1
    assert allowance.spent("t") == 0  # past 31 days: free again
    assert allowance.take("t", TIER, 10_000, 60_000) is None


def test_no_30_day_window_ever_holds_more_than_the_budget() -> None:
    # A tenant that asks for 700 tokens every 7 hours for 90 days, outages or not.
    clock = Clock()
    allowance = LocalAllowance(clock)
    admitted: list[tuple[float, int]] = []
    for step in range(90 * 24 // 7):
        clock.now = 1_000.0 + step * 7 * 3600
        if step % 5 == 0:
            allowance.forget_expired()  # a recovery now and then changes nothing
        if allowance.take("t", TIER, 700, 60_000) is None:
            admitted.append((clock.now, 700))

    budget = TIER.monthly_quota // LocalAllowance.QUOTA_SHARE  # type: ignore[operator]
    for start, _ in admitted:
        window = sum(t for at, t in admitted if start <= at < start + 30 * DAY_S)
        assert window <= budget
    assert sum(t for _, t in admitted) > 2 * budget  # and it does refill over time


# --------------------------------------------------------------------------- a real Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ai_request(max_tokens: int) -> RequestInfo:
    body = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": max_tokens}
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "authorization": f"Bearer {API_KEYS['globex']}"},
                       json.dumps(body).encode())


@pytest.fixture
def flapping(make_config: Callable[..., dict[str, Any]]
             ) -> Iterator[tuple[Gateway, Callable[[], LocalServer]]]:
    """A gateway aimed at a loopback port where nothing listens yet, and ``start()``:
    a private server on that port."""
    port = free_port()
    started: list[LocalServer] = []

    def start() -> LocalServer:
        server = start_server(port=port)
        started.append(server)
        return server

    gateway = Gateway(make_config(redis={"url": f"redis://127.0.0.1:{port}/0",
                                         "onUnavailable": "open", "retryInterval": "100ms"}))
    yield gateway, start
    gateway.close()
    for server in started:
        server.stop()


def admit_until(gateway: Gateway, local: bool, max_tokens: int) -> Decision:
    """Admit small requests until one is admitted the way ``local`` says (Redis is dialled
    again at most every retryInterval)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        decision = gateway.admit(ai_request(max_tokens))
        assert decision.allowed and decision.ticket is not None, decision.body
        if decision.ticket.local == local:
            return decision
        time.sleep(0.02)
    raise AssertionError(f"no admission with local={local} within 10 s")


def test_a_flapping_redis_does_not_renew_the_outage_allowance(
        flapping: tuple[Gateway, Callable[[], LocalServer]]) -> None:
    gateway, start = flapping
    # pro: 100,000 tokens a month, so 10,000 per process in any 30 days of outages.
    first = gateway.admit(ai_request(9_000))
    assert first.allowed and first.ticket is not None and first.ticket.local

    server = start()  # Redis is back: admissions go through it again
    admit_until(gateway, local=False, max_tokens=1)
    server.stop()  # and down again
    admit_until(gateway, local=True, max_tokens=1)
    again = gateway.admit(ai_request(2_000))

    assert again.status == 429 and again.error_code == "quota_exceeded"
