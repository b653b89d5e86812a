"""The Flask demo is imported, served over loopback and exercised here, so it cannot rot.

The demo app runs under Werkzeug's threaded server (``serve_wsgi_in_thread``, what
``ai-saas demo --framework flask`` uses) and calls the provider stand-in over real HTTP.
Werkzeug settles a request in the thread serving it, possibly after the client read its
last byte: the events and counters are read once no request is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    DEMO_MESSAGES,
    check_demo_stream,
    demo_auth,
)
from demo_report import check_demo_run

from ai_saas_middleware.cli import main
from ai_saas_middleware.demo import DEMO_APPS, run_demo, serve_wsgi_in_thread
from ai_saas_middleware.errors import AISaaSError
from ai_saas_middleware.flask import EXTENSION_KEY
from demo_projects.flask_app.app import CONFIG, create_app


@pytest.fixture
def server(demo_provider_url: str, demo_config: Callable[[Path], dict[str, Any]]
           ) -> Iterator[serve_wsgi_in_thread]:
    """The Flask demo on the demo's own config (test Redis and prefix), over loopback."""
    app = create_app(demo_config(CONFIG), provider_url=demo_provider_url)
    with serve_wsgi_in_thread(app) as server:
        yield server
    app.extensions[EXTENSION_KEY].gateway.close()


@pytest.fixture
def demo(server: serve_wsgi_in_thread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
def events(events: Callable[[], list[dict[str, str]]], server: serve_wsgi_in_thread
           ) -> Callable[[], list[dict[str, str]]]:
    """The stream's events once no request is in flight: Werkzeug settles a request in
    its handler thread after the client may have read the last byte (a stream's in the
    body's close(), after the final chunk)."""

    def read() -> list[dict[str, str]]:
        assert server.in_flight.wait_idle(10)
        return events()

    return read


@pytest.fixture
def quota_used(quota_used: Callable[[str], int], server: serve_wsgi_in_thread
               ) -> Callable[[str], int]:
    """The tenant's counter once no request is in flight (see ``events``)."""

    def read(tenant: str) -> int:
        assert server.in_flight.wait_idle(10)
        return quota_used(tenant)

    return read


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
    reply = demo.post("/ai/chat", json={"messages": DEMO_MESSAGES, "max_tokens": 20},
                      headers=demo_auth("pro-co"))
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
    check_demo_stream(demo, events)


def test_flask_demo_premium_endpoint_and_usage_blueprint(demo: httpx.Client,
                                                         events: Any) -> None:
    enterprise = demo.post("/ai/premium/chat", json={"messages": DEMO_MESSAGES},
                           headers=demo_auth("big-co"))
    assert enterprise.status_code == 200
    assert enterprise.headers["x-ai-model"] == "model-custom"
    free = demo.post("/ai/premium/chat", json={"messages": DEMO_MESSAGES},
                     headers=demo_auth("free-co"))
    assert free.status_code == 422
    assert free.json()["error"]["code"] == "no_eligible_model"

    usage = demo.get("/ai-saas/usage", headers=demo_auth("big-co"))
    assert usage.status_code == 200
    [event] = events()  # the enterprise request; the refused one is not recorded
    assert (usage.json()["tenant_id"], usage.json()["tier"]) == ("big-co", "enterprise")
    assert usage.json()["tokens_used"] == \
        int(event["prompt_tokens"]) + int(event["completion_tokens"]) > 0


def test_run_demo_flask_prints_the_same_figures_every_run(
        redis_server_url: str, key_prefix: str, rclient: Any) -> None:
    reports = []
    for run in "ab":
        lines: list[str] = []
        assert run_demo(framework="flask", redis_url=redis_server_url, out=lines.append,
                        key_prefix=key_prefix + run) == 0
        reports.append(check_demo_run("\n".join(lines), "flask", rclient, key_prefix + run))
    assert reports[0] == reports[1]


def test_cli_demo_flask_on_its_own_redis_prints_readmes_report(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["demo", "--framework", "flask"]) == 0
    check_demo_run(capsys.readouterr().out, "flask", private_redis=True)
