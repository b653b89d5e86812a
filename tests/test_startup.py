"""Redis down at start-up: one WARNING when a gateway is built, and start-up goes on.

Real parts only: a closed loopback port (nothing listens: the connection is refused at
once) and the test Redis; the gateways are built by the adapters' own set-up (Flask's
``init_app``, Django's middleware) as well as directly.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from conftest import bearer
from django_app import build_django_apps
from flask_app import make_flask_app
from replies import CHAT

from ai_saas_middleware.flask import EXTENSION_KEY
from ai_saas_middleware.gateway import AsyncGateway, Gateway

LOGGER = "ai_saas_middleware"


def closed_port_url(password: str | None = None) -> str:
    """A loopback URL nobody listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{port}/0"


def startup_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING
            and "at start-up" in r.getMessage()]


def our_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_unreachable_redis_is_one_warning_naming_the_url_without_its_password(
        policy: str, make_config: Callable[..., dict[str, Any]],
        caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url(password="S3cretPw")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        gateway = Gateway(make_config(redis={"url": url, "onUnavailable": policy}))
    # The warning is logged before the constructor returns (a refused connection
    # answers at once), so nothing needs waiting for here.
    [warning] = startup_warnings(caplog)
    assert "S3cretPw" not in warning
    assert url.replace(":S3cretPw@", "***@") in warning  # the store's own redaction
    assert f"redis.onUnavailable: {policy}" in warning
    assert ("local allowance" if policy == "open" else "refused with 503") in warning
    gateway.close()


def test_the_warning_names_tiers_that_follow_another_policy(
        make_config: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(redis={"url": closed_port_url(), "onUnavailable": "open"})
    config["tenant"]["tiers"][0]["onUnavailable"] = "closed"  # free: a prepaid hard budget
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        gateway = Gateway(config)
    [warning] = startup_warnings(caplog)
    assert "tiers free: onUnavailable closed" in warning
    gateway.close()


def test_a_reachable_redis_logs_nothing(make_config: Callable[..., dict[str, Any]],
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        gateway = Gateway(make_config())
        agateway = AsyncGateway(make_config())
        for built in (gateway, agateway):
            built._startup_check.join(5)  # finished already (no loop runs here)
            assert not built._startup_check.is_alive()
    assert our_records(caplog) == []
    gateway.close()


async def test_async_gateway_built_on_a_running_loop_warns_before_it_is_returned(
        make_config: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    # As Starlette builds its middleware: on the first request, on the loop.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        down = AsyncGateway(make_config(redis={"url": closed_port_url()}))
        up = AsyncGateway(make_config())
    [warning] = startup_warnings(caplog)
    assert down.redis_url and down.redis_url in warning
    await down.close()
    await up.close()


def test_flask_app_starts_with_redis_down_warns_once_and_serves_locally(
        make_config: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        app = make_flask_app(make_config(redis={"url": url, "onUnavailable": "open"}))
    [warning] = startup_warnings(caplog)
    assert url in warning
    reply = app.test_client().post("/ai/chat", json=CHAT, headers=bearer("globex"))
    assert reply.status_code == 200 and reply.get_json()  # start-up did not fail
    assert len(startup_warnings(caplog)) == 1  # requests do not repeat it
    app.extensions[EXTENSION_KEY].gateway.close()


def test_django_middleware_starts_with_redis_down_and_warns_once_per_gateway(
        make_config: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apps = build_django_apps(make_config(redis={"url": url, "onUnavailable": "closed"}))
    # One WSGI and one ASGI handler were built: one gateway each, one warning each.
    warnings = startup_warnings(caplog)
    assert len(warnings) == 2 and all(url in w and "closed" in w for w in warnings)
    apps.gateway.close()
    asyncio.run(apps.agateway.close())


def _starlette_app(config: dict[str, Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ai_saas_middleware.starlette import AISaaSMiddleware

    async def page(request: Any) -> PlainTextResponse:
        return PlainTextResponse("a page")

    return Starlette(routes=[Route("/page", page)],
                     middleware=[Middleware(AISaaSMiddleware, config=config)])


def test_starlette_checks_at_its_lifespan_start_up_not_on_a_plain_page(
        make_config: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    """Starlette builds its middleware (and so the gateway) on the first request: a plain
    page must not cause a Redis call, so the check waits for the server's start-up."""
    from starlette.testclient import TestClient

    url = closed_port_url()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        client = TestClient(_starlette_app(make_config(redis={"url": url})))
        assert client.get("/page").text == "a page"  # no lifespan: no start-up, no check
        assert startup_warnings(caplog) == []
        with TestClient(_starlette_app(make_config(redis={"url": url}))) as started:
            [warning] = startup_warnings(caplog)  # the lifespan's start-up
            assert url in warning
            assert started.get("/page").text == "a page"
        assert len(startup_warnings(caplog)) == 1
