"""The Django adapter, black box: real Django handlers and test clients, a real Redis.

Every scenario runs on both of the middleware's paths: ``wsgi`` (Django's test
``Client``, called from a worker thread as a threaded WSGI server would; the sync
gateway) and ``asgi`` (``AsyncClient`` on the test's event loop; the asyncio gateway).
Some tests drive the real handlers instead: ``ASGIHandler`` with raw ASGI messages (a
client that hangs up mid-stream, a chunked body), ``WSGIHandler`` and ``ASGIHandler``
through httpx's transports, and ``manage.py check`` in a subprocess.

These cover the glue; the core's behaviour is tested once, in its own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import django
import httpx
import pytest
import redis
import yaml
from asgiref.sync import iscoroutinefunction, sync_to_async
from conftest import (
    API_KEYS,
    BASE_CONFIG,
    PrefixCommands,
    bearer,
    body_then_disconnect,
)
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client, override_settings
from django.urls import reverse
from django_app import (
    DjangoApps,
    atenant_of_user,
    build_django_apps,
    make_django_app,
    session_cookie,
    tenant_of_user,
)
from replies import CHAT, SSE_WORDS, sse_body

from ai_saas_middleware.bodies import settle_in_background, wait_for_settlements
from ai_saas_middleware.django import AISaaSMiddleware
from ai_saas_middleware.django import middleware as django_middleware
from ai_saas_middleware.django.checks import check_ai_saas
from ai_saas_middleware.gateway import AsyncGateway, Gateway
from ai_saas_middleware.responses import refusal
from ai_saas_middleware.store.redis import AsyncRedisStore, RedisStore
from ai_saas_middleware.types import Outcome, RequestInfo
from ai_saas_middleware.usage import estimate_prompt_tokens, estimate_tokens

ROOT = Path(__file__).resolve().parent.parent
# Django >= 5.0 listens for http.disconnect while it streams, and has request.auser().
DJANGO_5 = django.VERSION >= (5, 0)
needs_django_5 = pytest.mark.skipif(not DJANGO_5, reason="Django >= 5.0 behaviour")
MISSING_KEY = refusal("missing_api_key", "no API key: send 'Authorization: Bearer <key>' or "
                                         "'X-API-Key: <key>'")
TEN_MB = 10 * 1024 * 1024


# ------------------------------------------------------------------ fixtures and drivers


class Via:
    """One of the middleware's two paths, with the same calls for a test to make."""

    def __init__(self, name: str, apps: DjangoApps):
        self.name = name
        self.apps = apps
        self.client: Client | AsyncClient = apps.client if name == "wsgi" else apps.aclient

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        call = getattr(self.client, method)
        if self.name == "wsgi":  # a WSGI server's worker thread
            return await sync_to_async(call, thread_sensitive=False)(path, **kwargs)
        return await call(path, **kwargs)

    async def post(self, path: str, body: Any = CHAT, *, tenant: str | None = "globex",
                   raw: bytes | None = None, content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> Any:
        return await self._call("post", path, data=json.dumps(body) if raw is None else raw,
                                content_type=content_type,
                                headers={**(bearer(tenant) if tenant else {}),
                                         **(headers or {})})

    async def get(self, path: str, *, headers: dict[str, str] | None = None) -> Any:
        return await self._call("get", path, headers=headers or {})

    async def read(self, response: Any, chunks: int | None = None) -> list[bytes]:
        """The streamed body (its first ``chunks`` chunks only, when given)."""
        if self.name == "wsgi":
            def read() -> list[bytes]:
                out = []
                for chunk in response.streaming_content:
                    out.append(chunk)
                    if chunks is not None and len(out) == chunks:
                        break
                return out
            return await sync_to_async(read, thread_sensitive=False)()
        out = []
        async for chunk in response.streaming_content:
            out.append(chunk)
            if chunks is not None and len(out) == chunks:
                break
        return out

    async def close(self, response: Any) -> None:
        """What a server does when it is done with a response (or its client left)."""
        if self.name == "wsgi":
            await sync_to_async(response.close, thread_sensitive=False)()
        else:
            response.close()
        await wait_for_settlements()

    async def settled(self) -> None:
        await wait_for_settlements()


@pytest.fixture
async def make_apps(make_config: Callable[..., dict[str, Any]]) -> AsyncIterator[
        Callable[..., DjangoApps]]:
    """``make_apps(resolver=None, client_kwargs={}, **config)``; gateways closed after."""
    built: list[DjangoApps] = []

    def make(*, resolver: Any = None, client_kwargs: dict[str, Any] | None = None,
             **config: Any) -> DjangoApps:
        apps = build_django_apps(make_config(**config), resolver, **(client_kwargs or {}))
        built.append(apps)
        return apps

    yield make
    await wait_for_settlements()
    for apps in built:
        apps.gateway.close()
        await apps.agateway.close()


@pytest.fixture(params=["wsgi", "asgi"])
def make_via(request: pytest.FixtureRequest, make_apps: Callable[..., DjangoApps]
             ) -> Callable[..., Via]:
    """``make_via(**make_apps_args)``: the test app on this test's path."""
    return lambda **kwargs: Via(request.param, make_apps(**kwargs))


@pytest.fixture
def via(make_via: Callable[..., Via]) -> Via:
    return make_via()


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["content-type"] == "application/json"
    error = json.loads(response.content)["error"]
    assert set(error) == {"type", "code", "message"} and error["code"] == code
    return error  # type: ignore[no-any-return]


def header_set(headers: Any) -> set[tuple[str, str]]:
    return {(k.lower(), v) for k, v in headers.items() if k.lower() not in ("date", "server")}


def http_scope(path: str, headers: dict[str, str], *, method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


# ------------------------------------------------------------------ sync and async


def test_middleware_is_sync_under_wsgi_and_a_coroutine_function_under_asgi(
        make_config: Callable[..., dict[str, Any]]) -> None:
    def get_response(request: Any) -> Any:
        raise AssertionError("not called")

    async def aget_response(request: Any) -> Any:
        raise AssertionError("not called")

    assert AISaaSMiddleware.sync_capable and AISaaSMiddleware.async_capable
    with override_settings(AI_SAAS={"CONFIG": make_config()}):
        sync_mw, async_mw = AISaaSMiddleware(get_response), AISaaSMiddleware(aget_response)
    assert not iscoroutinefunction(sync_mw)
    assert isinstance(sync_mw.gateway, Gateway) and isinstance(sync_mw.gateway.store, RedisStore)
    assert iscoroutinefunction(async_mw)  # Django awaits it: no adapter thread around it
    assert isinstance(async_mw.gateway, AsyncGateway)
    assert isinstance(async_mw.gateway.store, AsyncRedisStore)
    sync_mw.gateway.close()


async def test_admission_and_settlement_run_on_the_event_loop_thread(
        make_apps: Callable[..., DjangoApps], events: Any) -> None:
    apps = make_apps()
    gateway = apps.agateway
    seen: list[tuple[str, int, asyncio.AbstractEventLoop]] = []
    admit, settle = gateway.admit, gateway.settle

    async def spy_admit(*args: Any, **kwargs: Any) -> Any:
        seen.append(("admit", threading.get_ident(), asyncio.get_running_loop()))
        return await admit(*args, **kwargs)

    async def spy_settle(*args: Any, **kwargs: Any) -> Any:
        seen.append(("settle", threading.get_ident(), asyncio.get_running_loop()))
        return await settle(*args, **kwargs)

    gateway.admit, gateway.settle = spy_admit, spy_settle  # type: ignore[method-assign]
    for path in ("/ai/chat", "/ai/stream"):
        response = await apps.aclient.post(path, data=json.dumps(CHAT),
                                           content_type="application/json",
                                           headers=bearer("globex"))
        assert response.status_code == 200
        if response.streaming:
            assert b"".join([c async for c in response.streaming_content]) == \
                b"".join(sse_body())
    await wait_for_settlements()
    loop = asyncio.get_running_loop()
    assert [kind for kind, _, _ in seen] == ["admit", "settle", "admit", "settle"]
    assert all(ident == threading.get_ident() and on is loop for _, ident, on in seen)
    assert len(events()) == 2


# ------------------------------------------------------------------ the request and its context


async def test_request_ai_is_the_context_and_handler_usage_wins(
        via: Via, events: Any, quota_used: Any) -> None:
    response = await via.post("/ai/context", {**CHAT, "answered_by": "model-large"})
    assert response.status_code == 200, response.content
    await via.settled()
    ctx = json.loads(response.content)["ctx"]
    assert ctx["same_object"] is True
    assert ctx["tenant_id"] == "globex" and ctx["tier"] == "pro"
    assert ctx["model"] == "model-small" == response["x-ai-model"]
    assert ctx["request_id"] == response["x-request-id"]
    assert ctx["max_output_tokens"] == 32
    assert ctx["body"] == {**CHAT, "answered_by": "model-large"}
    assert ctx["candidates"] == ["model-small", "model-large", "model-medium"]
    [event] = events()
    assert event["request_id"] == response["x-request-id"]
    assert event["usage_source"] == "handler"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("5", "7")
    assert event["model_id"] == "model-large" and event["fallback_from"] == "model-small"
    assert event["outcome_value"] == "0.25" and event["cost"] == "0.0000825"
    assert quota_used("globex") == 12


async def test_admitted_response_keeps_its_headers_and_gains_ours(
        via: Via, events: Any, quota_used: Any) -> None:
    response = await via.post("/ai/chat")
    assert response.status_code == 200
    assert response["x-ai-model"] == "model-small"
    assert response["ratelimit-limit"] == "100"
    assert response["ratelimit-remaining"] == "99"
    assert 1 <= int(response["ratelimit-reset"]) <= 60
    assert response["ratelimit-policy"] == "100;w=60"
    assert response["content-type"] == "application/json"  # the view's own
    await via.settled()
    [event] = events()
    assert event["request_id"] == response["x-request-id"]
    assert event["usage_source"] == "provider" and event["status"] == "200"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")
    assert event["cost"] == "0.0000222"  # 12 x 0.00000015 + 34 x 0.0000006
    assert quota_used("globex") == 46

    second = await via.post("/ai/fallback")
    assert json.loads(second.content)["tried"] == ["model-small", "model-large"]
    await via.settled()
    assert events()[1]["model_id"] == "model-large"
    assert second["x-request-id"] != response["x-request-id"]


async def test_ai_request_body_reaches_the_view_intact(via: Via, events: Any) -> None:
    raw = ('{"messages": [{"role": "user", "content": "h\\u00e9llo \u2713 caf\u00e9"}],\n'
           '   "max_tokens": 8, "extra": [1, 2.50, null]}  \n').encode()
    response = await via.post("/ai/echo", raw=raw, content_type="application/json; charset=utf-8")
    assert response.status_code == 200
    assert response.content == raw
    await via.settled()
    assert len(events()) == 1


async def test_body_between_djangos_limit_and_ours_is_served_not_400(
        via: Via, make_via: Callable[..., Via], events: Any) -> None:
    """maxBodyBytes governs AI endpoints, not DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB)."""
    big = make_via(http={"maxBodyBytes": 4 * 1024 * 1024})
    body = {**CHAT, "attachment": "a" * (3 * 1024 * 1024)}  # not part of the prompt
    response = await big.post("/ai/echo", body)
    assert response.status_code == 200, response.content[:200]
    assert json.loads(response.content) == body
    await big.settled()
    assert len(events()) == 1


# ------------------------------------------------------------------ refusals


async def test_ten_megabyte_body_is_413_before_it_is_read(
        via: Via, events: Any, prefix_commands: PrefixCommands) -> None:
    before = prefix_commands.count()
    response = await via.post("/ai/chat", raw=b"x" * TEN_MB)
    assert_error(response, 413, "request_too_large")
    assert response.content == via.apps.gateway.too_large().body
    assert prefix_commands.count() == before
    assert events() == []


async def test_chunked_body_over_the_limit_is_413_on_the_asgi_handler(
        make_apps: Callable[..., DjangoApps], events: Any) -> None:
    apps = make_apps()
    sent: list[dict[str, Any]] = []
    chunk = b"x" * (1024 * 1024)
    chunks_left = 10

    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal chunks_left
        if chunks_left == 0:
            await done.wait()
            return {"type": "http.disconnect"}
        chunks_left -= 1
        return {"type": "http.request", "body": chunk, "more_body": chunks_left > 0}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    headers = {**bearer("globex"), "content-type": "application/json"}  # no Content-Length
    await asyncio.wait_for(apps.asgi(http_scope("/ai/chat", headers), receive, send), 10)
    assert sent[0]["status"] == 413
    assert b"".join(m.get("body", b"") for m in sent[1:]) == apps.agateway.too_large().body
    assert events() == []


async def test_refusals_are_the_cores_bytes_and_match_starlette(
        make_apps: Callable[..., DjangoApps], make_config: Callable[..., dict[str, Any]],
        events: Any) -> None:
    from starlette.applications import Starlette

    from ai_saas_middleware.starlette import AISaaSMiddleware as StarletteMiddleware

    apps = make_apps()
    starlette = Starlette()
    starlette.add_middleware(StarletteMiddleware, config=make_config())
    scenarios: list[tuple[str, dict[str, Any], bytes | None]] = [
        ("missing key", {}, None),
        ("invalid key", {"Authorization": "Bearer nope"}, None),
        ("malformed JSON", {**bearer("globex"), "Content-Type": "application/json"}, b"{"),
        ("not JSON", {**bearer("globex"), "Content-Type": "text/plain"}, b"hello"),
        ("no model that good", {**bearer("globex"), "X-AI-Min-Quality": "0.99"}, None),
        ("too large", {**bearer("globex"), "Content-Type": "application/json"},
         b"[" + b" " * TEN_MB + b"]"),
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=starlette),
                                 base_url="http://testserver") as on_starlette, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=apps.asgi),
                              base_url="http://testserver") as on_django_asgi:
        for name, headers, raw in scenarios:
            content = json.dumps(CHAT).encode() if raw is None else raw
            headers = {"Content-Type": "application/json", **headers}
            expected = await on_starlette.post("/ai/chat", content=content, headers=headers)
            assert expected.status_code >= 400, name
            got_asgi = await on_django_asgi.post("/ai/chat", content=content, headers=headers)
            got_wsgi = await sync_to_async(apps.client.post, thread_sensitive=False)(
                "/ai/chat", data=content, content_type=headers.pop("Content-Type"),
                headers=headers)
            for got in (got_asgi, got_wsgi):
                assert got.status_code == expected.status_code, name
                assert got.content == expected.content, name
                assert header_set(got.headers) == header_set(expected.headers), name
        await middleware_gateway(starlette).close()
    assert got_wsgi.content == apps.gateway.too_large().body
    assert events() == []


def middleware_gateway(app: Any) -> AsyncGateway:
    node = app.middleware_stack
    while not hasattr(node, "gateway"):
        node = node.app
    return node.gateway  # type: ignore[no-any-return]


async def test_missing_key_is_the_cores_decision_byte_for_byte(via: Via, events: Any) -> None:
    response = await via.post("/ai/chat", tenant=None)
    assert response.status_code == MISSING_KEY.status == 401
    assert response.content == MISSING_KEY.body
    assert header_set(response.headers) == {*MISSING_KEY.headers,
                                            ("content-length", str(len(MISSING_KEY.body)))}
    assert events() == []


# ------------------------------------------------------------------ non-AI requests


async def test_non_ai_requests_pass_untouched_with_no_redis_call(
        via: Via, prefix_commands: PrefixCommands) -> None:
    assert (await via.post("/ai/chat")).status_code == 200  # pool open, scripts loaded
    await via.settled()
    raw = bytes(range(256)) * (3 * 4096)  # 3 MiB: over the AI limit and Django's 2.5 MB
    before = prefix_commands.count()
    for _ in range(3):
        assert (await via.get("/")).content == b"home"
        assert (await via.get("/aix")).status_code == 200
        echoed = await via.post("/echo", raw=raw, content_type="text/plain")
        assert echoed.status_code == 200 and echoed.content == raw
        assert echoed["x-body-untouched"] == "yes"  # nothing read it before the view
        assert "x-request-id" not in echoed
        assert (await via.get("/nowhere")).status_code == 404
    assert prefix_commands.count() == before
    assert (await via.post("/ai/chat")).status_code == 200
    await via.settled()
    assert prefix_commands.count() > before  # the measure does see our commands


# ------------------------------------------------------------------ streamed responses


@pytest.mark.parametrize("path", ["/ai/stream", "/ai/stream-sync"])
async def test_streamed_response_is_intact_and_settles_with_the_providers_usage(
        path: str, via: Via, events: Any, quota_used: Any) -> None:
    response = await via.post(path)
    assert response.status_code == 200 and response.streaming
    assert response["content-type"] == "text/event-stream"
    assert b"".join(await via.read(response)) == b"".join(sse_body())
    await via.close(response)
    [event] = events()
    assert event["request_id"] == response["x-request-id"]
    assert event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")
    assert event["cost"] == "0.0000222"
    assert event["status"] == "200" and event["client_disconnected"] == "false"
    assert quota_used("globex") == 46


@pytest.mark.parametrize("path", ["/ai/stream", "/ai/stream-sync"])
async def test_client_gone_mid_stream_is_one_event_billing_what_was_produced(
        path: str, via: Via, events: Any, quota_used: Any) -> None:
    response = await via.post(path)
    assert await via.read(response, chunks=2) == sse_body()[:2]
    await via.close(response)  # the server closes the response: its client went away
    gc.collect()  # the abandoned iterators are finalized: still no second settlement
    await wait_for_settlements()
    [event] = events()
    assert event["client_disconnected"] == "true"
    assert event["status"] == "200" and event["usage_source"] == "estimate"
    assert int(event["prompt_tokens"]) == estimate_prompt_tokens(CHAT)
    assert 0 < int(event["completion_tokens"]) <= estimate_tokens(len("".join(SSE_WORDS[:2])))
    assert quota_used("globex") == int(event["prompt_tokens"]) + int(event["completion_tokens"])


@needs_django_5
async def test_client_hanging_up_on_the_asgi_handler_cancels_and_bills_once(
        make_apps: Callable[..., DjangoApps], events: Any, quota_used: Any) -> None:
    """Django >= 5 cancels the response when the server reports http.disconnect."""
    apps = make_apps()
    body = json.dumps(CHAT).encode()
    first_chunk_out = asyncio.Event()
    delivered: list[bytes] = []

    receive = body_then_disconnect(body, first_chunk_out)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            delivered.append(message["body"])
            if len(delivered) == 3:
                first_chunk_out.set()

    headers = {**bearer("globex"), "content-type": "application/json",
               "content-length": str(len(body))}
    await asyncio.wait_for(apps.asgi(http_scope("/ai/stream-stalls", headers), receive, send), 5)
    await wait_for_settlements()
    assert delivered == sse_body()[:3]
    [event] = events()
    assert event["client_disconnected"] == "true"
    assert event["usage_source"] == "estimate" and event["status"] == "200"
    assert 0 < int(event["completion_tokens"]) <= estimate_tokens(len("".join(SSE_WORDS[:3])))
    assert quota_used("globex") == int(event["prompt_tokens"]) + int(event["completion_tokens"])


async def test_whole_response_is_settled_after_its_last_byte_from_the_views_body(
        make_apps: Callable[..., DjangoApps], events: Any, quota_used: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ASGI the body is metered and the settlement started once Django has sent the
    response (the client waits on neither), from the body as the view made it, whatever
    an outer layer did to it afterwards. Outermost here: the test app's session and
    auth middleware run process_response in a thread, during which the loop gets there
    before the sending anyway."""
    apps = make_apps()
    calls: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append("settlement started")
        return settle_in_background(*args, **kwargs)

    monkeypatch.setattr(django_middleware, "settle_in_background", spy)
    ours = apps.asgi._middleware_chain
    while not isinstance(ours, AISaaSMiddleware):  # Django's wrappers, the outer middleware
        ours = getattr(ours, "__wrapped__", None) or ours.get_response

    async def outer(request: Any) -> Any:  # e.g. GZipMiddleware, once ours returned
        response = await ours(request)
        response.content = b"rewritten by an outer middleware"
        return response

    monkeypatch.setattr(apps.asgi, "_middleware_chain", outer)
    body = json.dumps(CHAT).encode()
    done = asyncio.Event()

    receive = body_then_disconnect(body, done)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            calls.append("last byte sent")
            done.set()

    headers = {**bearer("globex"), "content-type": "application/json",
               "content-length": str(len(body))}
    await asyncio.wait_for(apps.asgi(http_scope("/ai/chat", headers), receive, send), 5)
    await wait_for_settlements()
    assert calls == ["last byte sent", "settlement started"]
    [event] = events()
    assert event["usage_source"] == "provider" and event["status"] == "200"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")
    assert quota_used("globex") == 46


async def test_background_settlement_cut_short_is_spooled_not_lost(
        make_apps: Callable[..., DjangoApps], rclient: redis.Redis, events: Any) -> None:
    """A settlement task cancelled half way (the loop shutting down) spools its event."""
    gateway = make_apps(redis={"socketTimeout": "10s"}).agateway
    info = RequestInfo("POST", "/ai/chat", {"authorization": f"Bearer {API_KEYS['globex']}",
                                            "content-type": "application/json"},
                       json.dumps(CHAT).encode())
    first, second = await gateway.admit(info), await gateway.admit(info)
    rclient.client_pause(10_000, all=False)  # writes (and scripts) wait
    try:
        task = settle_in_background(gateway, first.ticket, Outcome(200, (12, 34)), first.context)
        for _ in range(500):  # until the settlement is held at the paused server
            await asyncio.sleep(0.01)
            if any("b" in c["flags"] and c["cmd"] == "evalsha" for c in rclient.client_list()):
                break
        else:
            pytest.fail("the settlement never reached the paused server")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gateway.spool.pending
    finally:
        rclient.client_unpause()
    await gateway.settle(second.ticket, Outcome(200, (1, 2)), second.context)  # replays first
    assert not gateway.spool.pending
    # The held script ran too once the server resumed: settle.lua counts it once.
    assert [e["request_id"] for e in events()] == [first.ticket.request_id,
                                                   second.ticket.request_id]


# ------------------------------------------------------------------ failures


async def test_handler_exception_is_reraised_and_releases_the_reservation(
        via: Via, events: Any, quota_used: Any) -> None:
    with pytest.raises(RuntimeError, match="has a bug"):
        await via.post("/ai/boom")
    await via.settled()
    [failed] = events()
    assert failed["status"] == "500"
    assert (failed["prompt_tokens"], failed["completion_tokens"], failed["cost"]) == \
        ("0", "0", "0")
    assert quota_used("globex") == 0
    assert (await via.post("/ai/chat")).status_code == 200
    await via.settled()
    assert quota_used("globex") == 46


async def test_handler_exception_as_a_500_response_is_settled_as_failed(
        make_via: Callable[..., Via], events: Any, quota_used: Any) -> None:
    via = make_via(client_kwargs={"raise_request_exception": False})
    response = await via.post("/ai/boom")
    assert response.status_code == 500
    await via.settled()
    [failed] = events()
    assert failed["request_id"] == response["x-request-id"] and failed["status"] == "500"
    assert quota_used("globex") == 0


async def test_upstream_error_without_usage_releases_the_reservation(
        via: Via, events: Any, quota_used: Any) -> None:
    response = await via.post("/ai/upstream-down")
    assert response.status_code == 502
    await via.settled()
    [event] = events()
    assert event["status"] == "502"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("0", "0")
    assert quota_used("globex") == 0


# ------------------------------------------------------------------ tenants from request.user


@pytest.mark.parametrize("resolver", [tenant_of_user,
                                      pytest.param(atenant_of_user, marks=needs_django_5)],
                         ids=["sync-resolver", "async-resolver"])
async def test_resolver_maps_the_signed_in_user_to_a_tenant(
        resolver: Any, make_via: Callable[..., Via], events: Any) -> None:
    via = make_via(resolver=resolver)
    cookies = via.client.cookies
    cookies.load(session_cookie(7))  # signed in as a user of initech (enterprise)
    signed_in = await via.post("/ai/chat", tenant=None)
    assert signed_in.status_code == 200, signed_in.content
    assert signed_in["ratelimit-limit"] == "1000"
    cookies.load(session_cookie(8))  # a globex user: the user decides, not the key
    with_key = await via.post("/ai/chat", tenant="acme")
    assert with_key["ratelimit-limit"] == "100"
    cookies.clear()  # nobody signed in: the API key decides
    anonymous = await via.post("/ai/chat", tenant="acme")
    assert anonymous["ratelimit-limit"] == "10"
    assert_error(await via.post("/ai/chat", tenant=None), 401, "missing_api_key")
    await via.settled()
    tenant_of = {e["request_id"]: e["tenant_id"] for e in events()}  # shards: no order
    assert tenant_of == {signed_in["x-request-id"]: "initech",
                         with_key["x-request-id"]: "globex",
                         anonymous["x-request-id"]: "acme"}


# ------------------------------------------------------------------ the usage endpoint


async def test_usage_endpoint_through_include(
        make_config: Callable[..., dict[str, Any]], events: Any) -> None:
    assert reverse("ai_saas:usage") == "/ai-saas/usage/"
    with override_settings(AI_SAAS={"CONFIG": make_config()}):
        from ai_saas_middleware.django.middleware import get_gateway

        client, aclient = Client(), AsyncClient()
        try:
            chat = await sync_to_async(client.post, thread_sensitive=False)(
                "/ai/chat", data=CHAT, content_type="application/json",
                headers=bearer("globex"))
            assert chat.status_code == 200
            wsgi = await sync_to_async(client.get, thread_sensitive=False)(
                "/ai-saas/usage/", headers=bearer("globex"))
            asgi = await aclient.get("/ai-saas/usage/", headers=bearer("globex"))
            for response in (wsgi, asgi):
                assert response.status_code == 200, response.content
                assert response["content-type"] == "application/json"
                usage = json.loads(response.content)
                assert usage["tenant_id"] == "globex" and usage["tier"] == "pro"
                assert usage["tokens_used"] == 46 and usage["monthly_quota"] == 100000
                assert usage["tokens_remaining"] == 100000 - 46
                assert usage["requests_last_minute"] == 1
            assert asgi.content == wsgi.content
            assert_error(await aclient.get("/ai-saas/usage/"), 401, "missing_api_key")
            posted = await aclient.post("/ai-saas/usage/", headers=bearer("globex"))
            assert posted.content == refusal("method_not_allowed", "use GET").body
            assert posted.status_code == 405
        finally:
            get_gateway(False).close()
            await get_gateway(True).close()
    assert len(events()) == 1  # reading usage is not an AI request


# ------------------------------------------------------------------ the real handlers


def test_make_django_app_serves_wsgi_through_httpx(
        make_config: Callable[..., dict[str, Any]], events: Any, quota_used: Any) -> None:
    wsgi, _asgi = make_django_app(make_config())
    with httpx.Client(transport=httpx.WSGITransport(app=wsgi),
                      base_url="http://testserver") as client:
        assert client.post("/ai/chat", json=CHAT, headers=bearer("globex")).status_code == 200
        with client.stream("POST", "/ai/stream", json=CHAT, headers=bearer("globex")) as reply:
            assert b"".join(reply.iter_raw()) == b"".join(sse_body())
        with client.stream("POST", "/ai/stream-sync", json=CHAT,
                           headers=bearer("globex")) as reply:
            next(reply.iter_raw())  # then the client hangs up
    chat, stream, gone = events()
    assert chat["usage_source"] == stream["usage_source"] == "provider"
    assert gone["client_disconnected"] == "true"


async def test_make_django_app_serves_asgi_through_httpx(
        make_config: Callable[..., dict[str, Any]], events: Any) -> None:
    _wsgi, asgi = make_django_app(make_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                 base_url="http://testserver") as client:
        chat = await client.post("/ai/chat", json=CHAT, headers=bearer("globex"))
        stream = await client.post("/ai/stream", json=CHAT, headers=bearer("initech"))
        assert stream.content == b"".join(sse_body())
        page = await client.get("/")
    await wait_for_settlements()
    assert chat.status_code == stream.status_code == page.status_code == 200
    assert {e["request_id"]: e["usage_source"] for e in events()} == {
        chat.headers["x-request-id"]: "provider", stream.headers["x-request-id"]: "provider"}


@needs_django_5
async def test_client_hanging_up_under_uvicorn_is_billed_as_a_disconnect(
        make_apps: Callable[..., DjangoApps], events: Any, quota_used: Any) -> None:
    from ai_saas_middleware.demo import serve_in_thread

    apps = make_apps()
    with serve_in_thread(apps.asgi) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            async with client.stream("POST", "/ai/stream-stalls", json=CHAT,
                                     headers=bearer("globex")) as reply:
                assert reply.status_code == 200
                async for _chunk in reply.aiter_raw():
                    break  # then hang up, with the provider stalled
            for _ in range(500):  # the server's loop settles it, in its own time
                if events():
                    break
                await asyncio.sleep(0.01)
    [event] = events()
    assert event["request_id"] == reply.headers["x-request-id"]
    assert event["client_disconnected"] == "true" and event["usage_source"] == "estimate"
    assert quota_used("globex") == int(event["prompt_tokens"]) + int(event["completion_tokens"])


# ------------------------------------------------------------------ configuration and checks


def check_ids(**ai_saas: Any) -> list[str]:
    with override_settings(**ai_saas):
        return [message.id for message in check_ai_saas()]  # type: ignore[misc]


def broken_config() -> dict[str, Any]:
    config = copy.deepcopy(BASE_CONFIG)
    config["tenant"]["tiers"][1]["rateLimit"] = "ten"
    config["models"][0]["costPerInputToken"] = -1
    config["endpoints"][0]["requiredQuality"] = 3
    return config


def test_checks_report_each_problem_by_id(make_config: Callable[..., dict[str, Any]]) -> None:
    assert check_ids() == ["ai_saas.E002"]  # the test settings have no AI_SAAS
    assert check_ids(AI_SAAS={"CONFIG": make_config()}) == []
    with override_settings(AI_SAAS={"CONFIG": broken_config()}):
        messages = check_ai_saas()
    assert [m.id for m in messages] == ["ai_saas.E001"] * 3
    assert [m.msg.split(":")[0] for m in messages] == [
        "tenant.tiers[1].rateLimit", "models[0].costPerInputToken",
        "endpoints[0].requiredQuality"]
    assert all(m.obj == "AI_SAAS['CONFIG']" and m.is_serious() for m in messages)
    assert check_ids(AI_SAAS="ai-saas-config.yaml") == ["ai_saas.E003"]
    assert check_ids(AI_SAAS={"CONFG": "x.yaml"}) == ["ai_saas.E003", "ai_saas.E003"]
    assert check_ids(AI_SAAS={"CONFIG": make_config(), "RESOLVER": "no.such.thing"}) == [
        "ai_saas.E004"]
    assert check_ids(AI_SAAS={"CONFIG": make_config(), "RESOLVER": 42}) == ["ai_saas.E004"]
    assert check_ids(AI_SAAS={"CONFIG": make_config(), "REDIS_URL": 6379}) == ["ai_saas.E005"]
    assert check_ids(AI_SAAS={"CONFIG": "/nonexistent/ai-saas.yaml"}) == ["ai_saas.E001"]
    assert check_ids(AI_SAAS={"CONFIG": make_config(), "RESOLVER": tenant_of_user},
                     MIDDLEWARE=["ai_saas_middleware.django.AISaaSMiddleware",
                                 "django.contrib.auth.middleware.AuthenticationMiddleware"]
                     ) == ["ai_saas.W001"]
    assert check_ids(AI_SAAS={"CONFIG": make_config(), "RESOLVER": "django_app.tenant_of_user"}
                     ) == []


def test_middleware_refuses_to_start_on_a_bad_config() -> None:
    with override_settings(AI_SAAS={"CONFIG": broken_config()}), \
            pytest.raises(ImproperlyConfigured, match=r"tenant\.tiers\[1\]\.rateLimit"):
        AISaaSMiddleware(lambda request: None)  # type: ignore[arg-type,return-value]
    with override_settings(AI_SAAS={"CONFIG": {}, "RESOLVER": "no.such.thing"}), \
            pytest.raises(ImproperlyConfigured, match="RESOLVER"):
        AISaaSMiddleware(lambda request: None)  # type: ignore[arg-type,return-value]


MANAGE_PY = """\
import os, sys
if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tiny_settings")
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
"""


def manage_check(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ai-saas-config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "manage.py").write_text(MANAGE_PY)
    (tmp_path / "tiny_settings.py").write_text(textwrap.dedent("""\
        from pathlib import Path
        SECRET_KEY = "check-only"
        INSTALLED_APPS = ["ai_saas_middleware.django"]
        MIDDLEWARE = ["ai_saas_middleware.django.AISaaSMiddleware"]
        AI_SAAS = {"CONFIG": Path(__file__).with_name("ai-saas-config.yaml")}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_manage_py_check_prints_every_problem_with_its_path_and_fails(tmp_path: Path) -> None:
    result = manage_check(tmp_path, broken_config())
    assert result.returncode != 0
    out = result.stderr + result.stdout
    assert "SystemCheckError" in out
    assert out.count("(ai_saas.E001)") == 3
    config_file = str(tmp_path / "ai-saas-config.yaml")
    for path in ("tenant.tiers[1].rateLimit", "models[0].costPerInputToken",
                 "endpoints[0].requiredQuality"):
        assert f"{config_file}: (ai_saas.E001) {path}: expected " in out, out


def test_manage_py_check_passes_a_good_config(tmp_path: Path, redis_server_url: str) -> None:
    config = copy.deepcopy(BASE_CONFIG)
    config["redis"] = {"url": redis_server_url}
    result = manage_check(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


# ------------------------------------------------------------------ Django's default MIDDLEWARE

# What ``django-admin startproject`` writes, with ours after authentication (the README's).
DEFAULT_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "ai_saas_middleware.django.AISaaSMiddleware",
]


@pytest.fixture
def make_default_via(make_via: Callable[..., Via]) -> Callable[..., Via]:
    """``make_via`` under the default MIDDLEWARE, with test clients that enforce CSRF as
    a browser's requests meet it (Django's test clients skip CSRF unless told)."""
    def make(**kwargs: Any) -> Via:
        with override_settings(MIDDLEWARE=DEFAULT_MIDDLEWARE):
            return make_via(client_kwargs={"enforce_csrf_checks": True}, **kwargs)

    return make


def rate_limit_log(rclient: redis.Redis, key_prefix: str, tenant: str) -> int:
    """How many admissions the tenant's rate-limit log holds."""
    from ai_saas_middleware.store.keys import KeySchema

    return int(rclient.zcard(KeySchema(key_prefix, 16).tenant(tenant).rate_limit))


@pytest.mark.parametrize("resolver", [None, tenant_of_user], ids=["no-resolver", "resolver"])
async def test_key_authenticated_post_passes_csrf_under_the_default_middleware(
        resolver: Any, make_default_via: Callable[..., Via], events: Any) -> None:
    via = make_default_via(resolver=resolver)
    # CSRF is enforced in this app: a non-AI POST without a token is refused ...
    assert (await via.post("/echo", tenant=None)).status_code == 403
    # ... but an API key in a header is not something a cross-site form can send.
    bearer_post = await via.post("/ai/chat", tenant="globex")
    assert bearer_post.status_code == 200, bearer_post.content
    assert bearer_post["x-ai-model"] == "model-small"
    x_api_key = await via.post("/ai/chat", tenant=None,
                               headers={"X-API-Key": API_KEYS["acme"]})
    assert x_api_key.status_code == 200, x_api_key.content
    await via.settled()
    assert {e["request_id"]: e["tenant_id"] for e in events()} == {
        bearer_post["x-request-id"]: "globex", x_api_key["x-request-id"]: "acme"}


@pytest.mark.parametrize("resolver", [tenant_of_user,
                                      pytest.param(atenant_of_user, marks=needs_django_5)],
                         ids=["sync-resolver", "async-resolver"])
async def test_session_request_needs_its_csrf_token_and_a_forged_one_costs_nothing(
        resolver: Any, make_default_via: Callable[..., Via], events: Any, quota_used: Any,
        rclient: redis.Redis, key_prefix: str) -> None:
    from django.utils.crypto import get_random_string

    via = make_default_via(resolver=resolver)
    cookies = via.client.cookies
    cookies.load(session_cookie(7))  # signed in as a user of initech
    forged = await via.post("/ai/chat", tenant=None)
    assert forged.status_code == 403 and b"CSRF" in forged.content
    # A key beside the session does not exempt it: the session is what decides.
    with_key = await via.post("/ai/chat", tenant="acme")
    assert with_key.status_code == 403
    await via.settled()
    assert events() == []  # not in usage
    assert rate_limit_log(rclient, key_prefix, "initech") == 0  # no slot taken
    assert quota_used("initech") == 0 and quota_used("acme") == 0
    assert "x-request-id" not in forged and "x-ai-model" not in forged  # never admitted

    secret = get_random_string(32)  # the cookie a page of the app would have set
    cookies.load({"csrftoken": secret})
    signed = await via.post("/ai/chat", tenant=None, headers={"X-CSRFToken": secret})
    assert signed.status_code == 200, signed.content
    assert signed["x-ai-model"] == "model-small" and signed["ratelimit-limit"] == "1000"
    await via.settled()
    [event] = events()
    assert event["request_id"] == signed["x-request-id"] and event["tenant_id"] == "initech"
    assert rate_limit_log(rclient, key_prefix, "initech") == 1


@contextlib.contextmanager
def usage_view_setting(config: dict[str, Any], resolver: Any = None) -> Iterator[None]:
    """The ``AI_SAAS`` setting the usage view reads at request time (it is a plain view:
    it uses the process's gateway of the current setting), closed afterwards."""
    with override_settings(AI_SAAS={"CONFIG": config, "RESOLVER": resolver}):
        try:
            yield
        finally:
            django_middleware.get_gateway(False).close()


async def test_csrf_exempt_view_stays_exempt_for_session_requests(
        make_default_via: Callable[..., Via], make_config: Callable[..., dict[str, Any]]
        ) -> None:
    endpoints = [*BASE_CONFIG["endpoints"], {"path": "/ai-saas/*"}]  # the view behind us
    with usage_view_setting(make_config(endpoints=endpoints), tenant_of_user):
        via = make_default_via(resolver=tenant_of_user, endpoints=endpoints)
        via.client.cookies.load(session_cookie(7))
        # The usage view is @csrf_exempt (and made an AI endpoint here): the check made
        # before admission honours that, as Django's own at the view does, so the session's
        # POST reaches the view (the core's JSON 405), not CSRF's 403.
        posted = await via.post("/ai-saas/usage/", tenant=None)
        await via.settled()
    assert_error(posted, 405, "method_not_allowed")


# ------------------------------------------------------------------ usage: both forms of the path


@pytest.mark.parametrize("middleware", ["test-settings", "default"])
async def test_usage_endpoint_answers_with_and_without_the_trailing_slash(
        middleware: str, make_via: Callable[..., Via], make_default_via: Callable[..., Via],
        make_config: Callable[..., dict[str, Any]]) -> None:
    with usage_view_setting(make_config()):
        via = make_via() if middleware == "test-settings" else make_default_via()
        await check_both_usage_paths(via)


async def check_both_usage_paths(via: Via) -> None:
    assert (await via.post("/ai/chat", tenant="globex")).status_code == 200
    await via.settled()
    answers = [await via.get(path, headers=bearer("globex"))
               for path in ("/ai-saas/usage/", "/ai-saas/usage")]
    for answer in answers:  # directly: no redirect (CommonMiddleware's APPEND_SLASH)
        assert answer.status_code == 200, (answer.status_code, answer.content)
        usage = json.loads(answer.content)
        assert usage["tenant_id"] == "globex" and usage["requests_last_minute"] == 1
    assert answers[0].content == answers[1].content
    for path in ("/ai-saas/usage/", "/ai-saas/usage"):  # a POST is not redirected either
        assert_error(await via._call("post", path, headers=bearer("globex")), 405,
                     "method_not_allowed")
        assert_error(await via.get(path), 401, "missing_api_key")
    assert reverse("ai_saas:usage") == "/ai-saas/usage/"


# ------------------------------------------------------------------ every problem in one run


def test_one_check_run_reports_the_settings_and_the_inline_configs_problems() -> None:
    from django.core.checks import run_checks

    setting = {"CONFIG": broken_config(), "RESOLVER": "no.such.thing", "REDIS_URL": 6379,
               "EXTRA": True}
    with override_settings(AI_SAAS=setting):
        ours = [m for m in run_checks() if m.id and m.id.startswith("ai_saas.")]
        with pytest.raises(ImproperlyConfigured) as refused:
            AISaaSMiddleware(lambda request: None)  # type: ignore[arg-type,return-value]
    assert sorted(m.id for m in ours) == ["ai_saas.E001"] * 3 + [
        "ai_saas.E003", "ai_saas.E004", "ai_saas.E005"]
    assert sorted(m.msg.split(":")[0] for m in ours if m.id == "ai_saas.E001") == [
        "endpoints[0].requiredQuality", "models[0].costPerInputToken",
        "tenant.tiers[1].rateLimit"]
    message = str(refused.value)  # start-up names them all too
    for part in ("EXTRA", "RESOLVER", "REDIS_URL", "tenant.tiers[1].rateLimit",
                 "models[0].costPerInputToken", "endpoints[0].requiredQuality"):
        assert part in message, message


# ------------------------------------------------------------------ Redis down: local admission


async def test_locally_admitted_requests_report_what_the_allowance_has_left(
        make_via: Callable[..., Via]) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on: Redis is down
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    via = make_via(redis={"url": url, "onUnavailable": "open"})
    remaining = []
    for _ in range(3):
        reply = await via.post("/ai/chat", tenant="acme")  # free tier: 10 a minute
        assert reply.status_code == 200, reply.content
        assert 1 <= int(reply["ratelimit-reset"]) <= 60
        remaining.append(reply["ratelimit-remaining"])
    await via.settled()
    assert remaining == ["9", "8", "7"]  # not "0" (back off) for an admitted request

