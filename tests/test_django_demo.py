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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django_app  # noqa: F401 - configures Django for this process
import pytest
import yaml
from django.test import AsyncClient, override_settings

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ai_saas_middleware.bodies import wait_for_settlements  # noqa: E402
from ai_saas_middleware.demo import DEMO_KEYS, run_demo, serve_in_thread  # noqa: E402
from ai_saas_middleware.django.middleware import get_gateway  # noqa: E402
from demo_projects import provider  # noqa: E402
from demo_projects.django_project import views  # noqa: E402
from demo_projects.django_project.app import CONFIG, create_app, demo_settings  # noqa: E402

MESSAGES = [{"role": "user", "content": "Summarize our quarterly numbers in one line."}]


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {DEMO_KEYS[tenant]}"}


def demo_overrides(**extra: Any) -> override_settings:
    values = {k: v for k, v in demo_settings().items()
              if k not in ("INSTALLED_APPS", "DATABASES")}  # the same, and not overridable
    return override_settings(**{**values, **extra})


@pytest.fixture(scope="module")
def provider_url() -> Iterator[str]:
    with serve_in_thread(provider.app) as server:
        yield server.url


@pytest.fixture
def demo_config(redis_server_url: str, key_prefix: str, tmp_path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["redis"] = {**raw["redis"], "url": redis_server_url, "keyPrefix": key_prefix,
                    "spoolDir": str(tmp_path / "spool")}
    return raw


@pytest.fixture
async def demo(provider_url: str, demo_config: dict[str, Any]) -> Any:
    """Django's AsyncClient on the demo (its settings, its urls, its views)."""
    with demo_overrides(AI_SAAS={"CONFIG": demo_config}, PROVIDER_URL=provider_url):
        yield AsyncClient()
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
    reply = await demo.post("/ai/chat", {"messages": MESSAGES, "max_tokens": 20},
                            content_type="application/json", headers=auth("pro-co"))
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
    reply = await demo.post("/ai/chat/stream", {"messages": MESSAGES, "max_tokens": 9},
                            content_type="application/json", headers=auth("big-co"))
    assert reply.status_code == 200 and reply["content-type"] == "text/event-stream"
    text = b"".join([chunk async for chunk in reply.streaming_content]).decode()
    reply.close()
    await wait_for_settlements()
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    usage = json.loads(data[-2])["usage"]
    assert usage["completion_tokens"] == 9
    [event] = events()
    assert event["usage_source"] == "provider" and event["client_disconnected"] == "false"
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == \
        (usage["prompt_tokens"], usage["completion_tokens"])


async def test_demo_premium_endpoint_and_usage_page(demo: AsyncClient, events: Any) -> None:
    enterprise = await demo.post("/ai/premium/chat", {"messages": MESSAGES},
                                 content_type="application/json", headers=auth("big-co"))
    assert enterprise["x-ai-model"] == "model-custom"
    free = await demo.post("/ai/premium/chat", {"messages": MESSAGES},
                           content_type="application/json", headers=auth("free-co"))
    assert free.status_code == 422
    assert json.loads(free.content)["error"]["code"] == "no_eligible_model"
    usage = await demo.get("/ai-saas/usage/", headers=auth("big-co"))
    assert json.loads(usage.content)["tier"] == "enterprise"
    get_gateway(False).close()


def check_summary(text: str) -> None:
    statuses = {line.split()[0]: line for line in text.splitlines()
                if line.startswith("  ") and " x" in line}
    assert "429 x" in statuses["free-co"] and "200 x10" in statuses["free-co"]
    assert "401 x1" in statuses["(unknown"]
    for tenant in ("pro-co", "big-co", "startup-co"):
        assert "429" not in statuses[tenant] and "200 x" in statuses[tenant]
    table = text[text.index("Usage read back"):text.index("total cost:")]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()}
    assert set(rows) == {"free-co", "pro-co", "big-co", "startup-co"}
    assert rows["free-co"][1:4] == ["free", "10", "4"]
    assert "no Redis call" in text


def test_run_demo_django_end_to_end(redis_server_url: str) -> None:
    lines: list[str] = []
    with demo_overrides():
        assert run_demo(framework="django", redis_url=redis_server_url, out=lines.append) == 0
    text = "\n".join(lines)
    assert "demo app (django)" in text
    check_summary(text)


def test_create_app_refuses_foreign_settings() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="its own settings"):
        create_app()


def test_cli_demo_django_in_a_fresh_process(redis_server_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-m", "ai_saas_middleware.cli", "demo",
                             "--framework", "django", "--redis-url", redis_server_url],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check_summary(result.stdout)
