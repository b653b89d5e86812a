"""The demo is imported and exercised here, so that it cannot rot.

``demo_projects`` is a folder of the source checkout, not an installed package: the
repository root is put on ``sys.path`` below, so ``pytest`` run from anywhere finds it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ai_saas_middleware.cli import main  # noqa: E402
from ai_saas_middleware.demo import DEMO_KEYS, run_demo, serve_in_thread  # noqa: E402
from demo_projects import provider  # noqa: E402
from demo_projects.starlette_app.app import CONFIG, create_app  # noqa: E402

MESSAGES = [{"role": "user", "content": "Summarize our quarterly numbers in one line."}]


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {DEMO_KEYS[tenant]}"}


@pytest.fixture(scope="module")
def provider_url() -> Iterator[str]:
    with serve_in_thread(provider.app) as server:
        yield server.url


@pytest.fixture
def demo(provider_url: str, redis_server_url: str, key_prefix: str,
         tmp_path: Path) -> Iterator[TestClient]:
    """The demo app on the demo's own config, pointed at the test Redis and prefix."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["redis"] = {**raw["redis"], "url": redis_server_url, "keyPrefix": key_prefix,
                    "spoolDir": str(tmp_path / "spool")}
    with TestClient(create_app(raw, provider_url=provider_url)) as client:
        yield client


def test_demo_home_page_is_not_an_ai_request(demo: TestClient, events: Any) -> None:
    page = demo.get("/")
    assert page.status_code == 200
    assert "Demo SaaS" in page.text
    assert "x-request-id" not in page.headers
    assert events() == []


def test_demo_chat_bills_the_providers_usage(demo: TestClient, events: Any,
                                             quota_used: Any) -> None:
    reply = demo.post("/ai/chat", json={"messages": MESSAGES, "max_tokens": 20},
                      headers=auth("pro-co"))
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
    with demo.stream("POST", "/ai/chat/stream", json={"messages": MESSAGES, "max_tokens": 9},
                     headers=auth("big-co")) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = b"".join(reply.iter_raw()).decode()
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    usage = json.loads(data[-2])["usage"]
    words = "".join(json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-2])
    assert len(words.split()) == usage["completion_tokens"] == 9
    [event] = events()
    assert event["usage_source"] == "provider"
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == \
        (usage["prompt_tokens"], usage["completion_tokens"])
    assert event["client_disconnected"] == "false"


def test_demo_premium_endpoint_requires_quality(demo: TestClient, events: Any) -> None:
    # quality >= 0.8 and p99 <= 3000 ms: enterprise gets model-custom, pro model-medium.
    enterprise = demo.post("/ai/premium/chat", json={"messages": MESSAGES},
                           headers=auth("big-co"))
    pro = demo.post("/ai/premium/chat", json={"messages": MESSAGES}, headers=auth("pro-co"))
    assert (enterprise.status_code, pro.status_code) == (200, 200)
    assert enterprise.headers["x-ai-model"] == "model-custom"
    assert pro.headers["x-ai-model"] == "model-medium"
    # The free tier has no model that good: 422, naming why.
    free = demo.post("/ai/premium/chat", json={"messages": MESSAGES}, headers=auth("free-co"))
    assert free.status_code == 422
    assert free.json()["error"]["code"] == "no_eligible_model"
    assert sorted(e["model_id"] for e in events()) == ["model-custom", "model-medium"]


def test_run_demo_end_to_end(redis_server_url: str) -> None:
    lines: list[str] = []
    assert run_demo(redis_url=redis_server_url, out=lines.append) == 0
    text = "\n".join(lines)

    statuses = {line.split()[0]: line for line in text.splitlines()
                if line.startswith("  ") and " x" in line}
    assert "429 x" in statuses["free-co"]  # over the free tier's 10 req/min
    assert "200 x10" in statuses["free-co"]
    assert "401 x1" in statuses["(unknown"]
    for tenant in ("pro-co", "big-co", "startup-co"):
        assert "429" not in statuses[tenant] and "200 x" in statuses[tenant]

    table = text[text.index("Usage read back"):text.index("total cost:")]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()}
    assert set(rows) == {"free-co", "pro-co", "big-co", "startup-co"}
    assert rows["free-co"][1:4] == ["free", "10", "4"]  # tier, requests, refused
    assert rows["startup-co"][1] == "pro"  # the tenant stored in Redis
    assert "Redis round trips (EVALSHA):" in text
    assert "no Redis call" in text


def test_cli_demo_exits_zero(redis_server_url: str, capsys: pytest.CaptureFixture[str]
                             ) -> None:
    assert main(["demo", "--redis-url", redis_server_url]) == 0
    out = capsys.readouterr().out
    assert "free-co" in out and "Redis round trips" in out
