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
    check_demo_summary,
    demo_auth,
)
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


def test_run_demo_end_to_end(redis_server_url: str) -> None:
    lines: list[str] = []
    assert run_demo(redis_url=redis_server_url, out=lines.append) == 0
    check_demo_summary("\n".join(lines), "starlette")


def test_cli_demo_exits_zero(redis_server_url: str, capsys: pytest.CaptureFixture[str]
                             ) -> None:
    assert main(["demo", "--redis-url", redis_server_url]) == 0
    check_demo_summary(capsys.readouterr().out, "starlette")
