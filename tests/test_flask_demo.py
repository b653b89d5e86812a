"""The Flask demo is imported, served over loopback and exercised here, so it cannot rot.

The demo app runs under Werkzeug's threaded server (``serve_wsgi_in_thread``, what
``ai-saas demo --framework flask`` uses) and calls the provider stand-in over real HTTP.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ai_saas_middleware.cli import main  # noqa: E402
from ai_saas_middleware.demo import (  # noqa: E402
    DEMO_APPS,
    DEMO_KEYS,
    run_demo,
    serve_in_thread,
    serve_wsgi_in_thread,
)
from ai_saas_middleware.errors import AISaaSError  # noqa: E402
from ai_saas_middleware.flask import EXTENSION_KEY  # noqa: E402
from demo_projects import provider  # noqa: E402
from demo_projects.flask_app.app import CONFIG, create_app  # noqa: E402

MESSAGES = [{"role": "user", "content": "Summarize our quarterly numbers in one line."}]


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {DEMO_KEYS[tenant]}"}


@pytest.fixture(scope="module")
def provider_url() -> Iterator[str]:
    with serve_in_thread(provider.app) as server:
        yield server.url


@pytest.fixture
def demo(provider_url: str, redis_server_url: str, key_prefix: str,
         tmp_path: Path) -> Iterator[httpx.Client]:
    """The Flask demo on the demo's own config (test Redis and prefix), over loopback."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["redis"] = {**raw["redis"], "url": redis_server_url, "keyPrefix": key_prefix,
                    "spoolDir": str(tmp_path / "spool")}
    app = create_app(raw, provider_url=provider_url)
    with serve_wsgi_in_thread(app) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    app.extensions[EXTENSION_KEY].gateway.close()


def test_flask_demo_is_registered_for_the_cli() -> None:
    assert DEMO_APPS["flask"] == ("demo_projects.flask_app.app", serve_wsgi_in_thread)
    with pytest.raises(AISaaSError, match="no demo for 'cobol'"):
        run_demo(framework="cobol")


def test_flask_demo_home_page_is_not_an_ai_request(demo: httpx.Client, events: Any) -> None:
    page = demo.get("/")
    assert page.status_code == 200 and "Demo SaaS" in page.text
    assert "x-request-id" not in page.headers
    assert events() == []


def test_flask_demo_chat_bills_the_providers_usage(demo: httpx.Client, events: Any,
                                                   quota_used: Any) -> None:
    reply = demo.post("/ai/chat", json={"messages": MESSAGES, "max_tokens": 20},
                      headers=auth("pro-co"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == reply.headers["x-ai-model"] == "model-small"
    [event] = events()
    assert event["request_id"] == reply.headers["x-request-id"]
    assert event["usage_source"] == "provider"
    assert int(event["completion_tokens"]) == body["usage"]["completion_tokens"] == 20
    assert quota_used("pro-co") == body["usage"]["total_tokens"]


def test_flask_demo_stream_relays_sse_and_bills_the_final_usage_chunk(
        demo: httpx.Client, events: Any) -> None:
    with demo.stream("POST", "/ai/chat/stream", json={"messages": MESSAGES, "max_tokens": 9},
                     headers=auth("big-co")) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = b"".join(reply.iter_raw()).decode()
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    usage = json.loads(data[-2])["usage"]
    assert usage["completion_tokens"] == 9
    [event] = events()
    assert event["usage_source"] == "provider"
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == \
        (usage["prompt_tokens"], usage["completion_tokens"])
    assert event["client_disconnected"] == "false"


def test_flask_demo_premium_endpoint_and_usage_blueprint(demo: httpx.Client,
                                                         events: Any) -> None:
    enterprise = demo.post("/ai/premium/chat", json={"messages": MESSAGES},
                           headers=auth("big-co"))
    assert enterprise.status_code == 200
    assert enterprise.headers["x-ai-model"] == "model-custom"
    free = demo.post("/ai/premium/chat", json={"messages": MESSAGES}, headers=auth("free-co"))
    assert free.status_code == 422
    assert free.json()["error"]["code"] == "no_eligible_model"

    usage = demo.get("/ai-saas/usage", headers=auth("big-co"))
    assert usage.status_code == 200
    assert usage.json()["tenant_id"] == "big-co"
    assert usage.json()["tokens_used"] == sum(int(e["prompt_tokens"])
                                              + int(e["completion_tokens"]) for e in events())


def test_run_demo_flask_end_to_end(redis_server_url: str) -> None:
    lines: list[str] = []
    assert run_demo(framework="flask", redis_url=redis_server_url, out=lines.append) == 0
    text = "\n".join(lines)
    assert "demo app (flask)" in text
    statuses = {line.split()[0]: line for line in text.splitlines()
                if line.startswith("  ") and " x" in line}
    assert "200 x10" in statuses["free-co"] and "429 x" in statuses["free-co"]
    assert "401 x1" in statuses["(unknown"]
    for tenant in ("pro-co", "big-co", "startup-co"):
        assert "429" not in statuses[tenant] and "200 x" in statuses[tenant]
    table = text[text.index("Usage read back"):text.index("total cost:")]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()}
    assert set(rows) == {"free-co", "pro-co", "big-co", "startup-co"}
    assert rows["free-co"][1:4] == ["free", "10", "4"]
    assert "no Redis call" in text


def test_cli_demo_flask_exits_zero(redis_server_url: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "flask", "--redis-url", redis_server_url]) == 0
    out = capsys.readouterr().out
    assert "demo app (flask)" in out and "Redis round trips" in out
