"""The Django demo is imported and exercised here, so that it cannot rot.

The demo's views run in this process through Django's AsyncClient with the demo's
settings in force (``override_settings``: this process's Django settings are the test
app's), and ``run_demo(framework="django")`` serves it under uvicorn the same way;
``ai-saas demo --framework django`` runs once as the one command it is, in a process of
its own, where the demo configures Django itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import django_app  # noqa: F401 - configures Django for this process
import pytest
from conftest import DEMO_MESSAGES, ROOT, demo_auth, read_demo_stream
from demo_report import check_demo_run
from django.test import AsyncClient, override_settings

from ai_saas_middleware.bodies import wait_for_settlements
from ai_saas_middleware.demo import run_demo
from ai_saas_middleware.django.middleware import get_gateway
from demo_projects.django_project import views
from demo_projects.django_project.app import CONFIG, create_app, demo_settings


def demo_overrides(**extra: Any) -> override_settings:
    values = {k: v for k, v in demo_settings().items()
              if k not in ("INSTALLED_APPS", "DATABASES")}  # the same, and not overridable
    return override_settings(**{**values, **extra})


@pytest.fixture
async def demo(demo_provider_url: str, demo_config: Callable[[Path], dict[str, Any]]) -> Any:
    """Django's AsyncClient on the demo (its settings, its urls, its views), checking CSRF
    as a browser's request is checked: the demo keeps CsrfViewMiddleware, and its AI
    views, which have no @csrf_exempt, answer requests authenticated by key."""
    with demo_overrides(AI_SAAS={"CONFIG": demo_config(CONFIG)},
                        PROVIDER_URL=demo_provider_url):
        yield AsyncClient(enforce_csrf_checks=True)
        await wait_for_settlements()
        await get_gateway(True).close()
        await views.provider().aclose()


async def test_demo_home_page_is_not_an_ai_request(demo: AsyncClient, events: Any) -> None:
    page = await demo.get("/")
    assert page.status_code == 200
    assert b"Demo SaaS" in page.content
    assert "x-request-id" not in page
    assert events() == []


async def test_demo_chat_bills_the_providers_usage(demo: AsyncClient, events: Any,
                                                   quota_used: Any) -> None:
    reply = await demo.post("/ai/chat", {"messages": DEMO_MESSAGES, "max_tokens": 20},
                            content_type="application/json", headers=demo_auth("pro-co"))
    assert reply.status_code == 200, reply.content
    body = json.loads(reply.content)
    assert body["model"] == reply["x-ai-model"] == "model-small"
    await wait_for_settlements()
    [event] = events()
    assert event["request_id"] == reply["x-request-id"]
    assert event["usage_source"] == "provider"
    assert int(event["completion_tokens"]) == body["usage"]["completion_tokens"] == 20
    assert quota_used("pro-co") == body["usage"]["total_tokens"]


async def test_demo_stream_relays_sse_and_bills_the_final_usage_chunk(
        demo: AsyncClient, events: Any) -> None:
    reply = await demo.post("/ai/chat/stream", {"messages": DEMO_MESSAGES, "max_tokens": 9},
                            content_type="application/json", headers=demo_auth("big-co"))
    assert reply.status_code == 200 and reply["content-type"] == "text/event-stream"
    text = b"".join([chunk async for chunk in reply.streaming_content]).decode()
    reply.close()
    await wait_for_settlements()
    words, usage = read_demo_stream(text)
    # The provider stand-in streams one word per completion token.
    assert len(words.split()) == usage["completion_tokens"] == 9
    [event] = events()
    assert event["usage_source"] == "provider" and event["client_disconnected"] == "false"
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == \
        (usage["prompt_tokens"], usage["completion_tokens"])


async def test_demo_premium_endpoint_and_usage_page(demo: AsyncClient, events: Any) -> None:
    enterprise = await demo.post("/ai/premium/chat", {"messages": DEMO_MESSAGES},
                                 content_type="application/json", headers=demo_auth("big-co"))
    assert enterprise.status_code == 200, enterprise.content
    assert enterprise["x-ai-model"] == "model-custom"
    free = await demo.post("/ai/premium/chat", {"messages": DEMO_MESSAGES},
                           content_type="application/json", headers=demo_auth("free-co"))
    assert free.status_code == 422
    assert json.loads(free.content)["error"]["code"] == "no_eligible_model"
    await wait_for_settlements()  # the page reads the counter the settlement moved
    [event] = events()
    usage = await demo.get("/ai-saas/usage/", headers=demo_auth("big-co"))
    assert usage.status_code == 200
    page = json.loads(usage.content)
    assert (page["tenant_id"], page["tier"]) == ("big-co", "enterprise")
    assert page["tokens_used"] == int(event["prompt_tokens"]) + int(event["completion_tokens"])
    assert page["requests_last_minute"] == 1  # the refused free-co request is not big-co's
    get_gateway(False).close()


def test_run_demo_django_prints_the_same_figures_every_run(
        redis_server_url: str, key_prefix: str, rclient: Any) -> None:
    reports = []
    for run in "ab":
        lines: list[str] = []
        with demo_overrides():
            assert run_demo(framework="django", redis_url=redis_server_url,
                            out=lines.append, key_prefix=key_prefix + run) == 0
        reports.append(check_demo_run("\n".join(lines), "django", rclient, key_prefix + run))
    assert reports[0] == reports[1]


def test_create_app_refuses_foreign_settings() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="its own settings"):
        create_app()


def test_cli_demo_django_in_a_fresh_process_prints_readmes_report() -> None:
    # The one command, as a user runs it: Django configured by the demo, and its own
    # Redis (no URL), so that its EVALSHA counts are its own.
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "REDIS_URL")}
    result = subprocess.run([sys.executable, "-m", "ai_saas_middleware.cli", "demo",
                             "--framework", "django"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check_demo_run(result.stdout, "django", private_redis=True)
