"""The demo is imported and exercised here, so that it cannot rot.

``demo_projects`` is a folder of the source checkout, not an installed package:
``conftest.py`` puts the repository root on ``sys.path``, so ``pytest`` run from anywhere
finds it, and shares the provider stand-in, the demo config and the summary check with
the Flask and Django demos' tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEMO_MESSAGES,
    check_demo_stream,
    demo_auth,
)
from demo_report import check_demo_run
from starlette.testclient import TestClient

from ai_saas_middleware.cli import main
from ai_saas_middleware.demo import run_demo
from demo_projects.starlette_app.app import CONFIG, create_app


@pytest.fixture
def demo(demo_provider_url: str, demo_config: Callable[[Path], dict[str, Any]]
         ) -> Iterator[TestClient]:
    """The demo app on the demo's own config, pointed at the test Redis and prefix."""
    with TestClient(create_app(demo_config(CONFIG), provider_url=demo_provider_url)) as client:
        yield client


def test_demo_home_page_is_not_an_ai_request(demo: TestClient, events: Any) -> None:
    page = demo.get("/")
    assert page.status_code == 200
    assert "Demo SaaS" in page.text
    assert "x-request-id" not in page.headers
    assert events() == []


def test_demo_chat_bills_the_providers_usage(demo: TestClient, events: Any,
                                             quota_used: Any) -> None:
    reply = demo.post("/ai/chat", json={"messages": DEMO_MESSAGES, "max_tokens": 20},
                      headers=demo_auth("pro-co"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == reply.headers["x-ai-model"] == "model-small"
    usage = body["usage"]
    [event] = events()
    assert event["request_id"] == reply.headers["x-request-id"]
    assert event["tenant_id"] == "pro-co" and event["model_id"] == "model-small"
    assert event["usage_source"] == "provider"
    assert int(event["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(event["completion_tokens"]) == usage["completion_tokens"] == 20
    assert quota_used("pro-co") == usage["total_tokens"]


def test_demo_stream_relays_sse_and_bills_the_final_usage_chunk(demo: TestClient,
                                                                events: Any) -> None:
    check_demo_stream(demo, events)


def test_demo_premium_endpoint_requires_quality(demo: TestClient, events: Any) -> None:
    # quality >= 0.8 and p99 <= 3000 ms: enterprise gets model-custom, pro model-medium.
    enterprise = demo.post("/ai/premium/chat", json={"messages": DEMO_MESSAGES},
                           headers=demo_auth("big-co"))
    pro = demo.post("/ai/premium/chat", json={"messages": DEMO_MESSAGES},
                    headers=demo_auth("pro-co"))
    assert (enterprise.status_code, pro.status_code) == (200, 200)
    assert enterprise.headers["x-ai-model"] == "model-custom"
    assert pro.headers["x-ai-model"] == "model-medium"
    # The free tier has no model that good: 422, naming why.
    free = demo.post("/ai/premium/chat", json={"messages": DEMO_MESSAGES},
                     headers=demo_auth("free-co"))
    assert free.status_code == 422
    assert free.json()["error"]["code"] == "no_eligible_model"
    assert sorted(e["model_id"] for e in events()) == ["model-custom", "model-medium"]


def test_run_demo_prints_the_same_figures_every_run(redis_server_url: str, key_prefix: str,
                                                    rclient: Any) -> None:
    # Two runs on the test Redis, each under a prefix of its own: every figure of the
    # table is what Redis holds for that run, and both print the same report.
    reports = []
    for run in "ab":
        lines: list[str] = []
        assert run_demo(redis_url=redis_server_url, out=lines.append,
                        key_prefix=key_prefix + run) == 0
        reports.append(check_demo_run("\n".join(lines), "starlette", rclient, key_prefix + run))
    assert reports[0] == reports[1]


def test_cli_demo_on_its_own_redis_prints_readmes_report(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # As a user runs it: no Redis URL, so the demo starts its own server, and its EVALSHA
    # counts are its own: each step's is the hot path's budget, as README.md shows.
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["demo"]) == 0
    check_demo_run(capsys.readouterr().out, "starlette", private_redis=True)


def test_each_steps_count_is_its_own_when_reading_the_count_is_slow(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A step's traffic starts only once the count before it is read. Reading it slowly
    # (a busy machine) must not let the step's requests be counted in the step before, or
    # in none: the burst's tasks were once scheduled before that count, and CI saw a step
    # counted 77 (one call landed before it) and another 0 (the whole burst did).
    import time

    from ai_saas_middleware import demo as demo_module

    count = demo_module._evalsha_calls

    def slow_count(store: Any) -> int:
        time.sleep(0.3)
        return count(store)

    monkeypatch.setattr(demo_module, "_evalsha_calls", slow_count)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["demo"]) == 0
    check_demo_run(capsys.readouterr().out, "starlette", private_redis=True)
