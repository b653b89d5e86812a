"""The Starlette adapter, black box: a real Starlette app, its real TestClient, a real Redis.

These tests cover the glue (body read and replay, headers, streamed responses, the
context on ``request.state.ai``, resolvers, websocket and lifespan scopes, asyncio)
and the HTTP behaviour a client sees. The core's own logic (config, routing,
concurrency across processes, Redis outages) is tested in its own files.

Some tests drive the ASGI app directly (``await app(scope, receive, send)``) where a
test client cannot say what is needed: a chunked body without Content-Length, a client
that hangs up half way through a stream.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from conftest import API_KEYS, PrefixCommands, bearer, body_then_disconnect
from replies import CHAT, SSE_WORDS, sse_body
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Message
from starlette.websockets import WebSocket
from starlette_app import DEEP_JSON, make_starlette_app, middleware_of

from ai_saas_middleware import load_config
from ai_saas_middleware.gateway import AsyncGateway
from ai_saas_middleware.starlette import AISaaSMiddleware
from ai_saas_middleware.store.keys import is_valid_tenant_id
from ai_saas_middleware.store.redis import AsyncRedisStore, RedisStore
from ai_saas_middleware.tenants import TenantAdmin
from ai_saas_middleware.usage import estimate_prompt_tokens, estimate_tokens

# ------------------------------------------------------------------ the app under test
# (in tests/starlette_app.py)


@pytest.fixture
def make_app(make_config: Callable[..., dict[str, Any]]) -> Callable[..., Starlette]:
    """``make_app(resolver=None, **config)``: the test app behind the middleware."""

    def make(*, resolver: Any = None, **config: Any) -> Starlette:
        return make_starlette_app(make_config(**config), resolver=resolver)

    return make


@pytest.fixture
def client(make_app: Callable[..., Starlette]) -> Iterator[TestClient]:
    with TestClient(make_app()) as test_client:
        yield test_client


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message"}
    assert error["code"] == code
    assert error["message"]
    return error  # type: ignore[no-any-return]


def assert_still_serving(client: TestClient, tenant: str = "globex") -> None:
    response = client.post("/ai/chat", json=CHAT, headers=bearer(tenant))
    assert response.status_code == 200, response.text


def http_scope(path: str, headers: dict[str, str], *, method: str = "POST",
               spec_version: str = "2.3") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


# ------------------------------------------------------------------ limits


def test_eleventh_request_in_a_minute_on_the_free_tier_is_refused(client: TestClient,
                                                                  events: Any) -> None:
    remaining = []
    for _ in range(10):
        response = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
        assert response.status_code == 200, response.text
        assert response.headers["ratelimit-limit"] == "10"
        remaining.append(int(response.headers["ratelimit-remaining"]))
    assert remaining == list(range(9, -1, -1))

    refused = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-limit"] == "10"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["ratelimit-reset"]) <= 60
    assert "x-request-id" not in refused.headers

    # Other tenants are served, and the refusal was not recorded as usage.
    assert_still_serving(client, "globex")
    tenants = [e["tenant_id"] for e in events()]
    assert tenants.count("acme") == 10 and tenants.count("globex") == 1


def test_exhausted_monthly_quota_is_refused_with_its_own_code(client: TestClient,
                                                              quota_used: Any) -> None:
    big = {**CHAT, "max_tokens": 3000, "reply_usage": [12, 3000]}
    for _ in range(3):
        assert client.post("/ai/chat", json=big, headers=bearer("acme")).status_code == 200
    assert quota_used("acme") == 3 * 3012  # settled to the provider's figures

    refused = client.post("/ai/chat", json=big, headers=bearer("acme"))
    error = assert_error(refused, 429, "quota_exceeded")
    assert error["type"] == "insufficient_quota"
    assert int(refused.headers["retry-after"]) >= 1
    assert any(name.startswith("ratelimit-") for name in refused.headers)
    assert quota_used("acme") == 3 * 3012  # a refusal reserves nothing
    assert_still_serving(client, "globex")


# ------------------------------------------------------------------ bad client input


def test_malformed_json_is_400(client: TestClient) -> None:
    for body in (b"{not json", b'{"messages": [', b"[1, 2, 3]", b"\xff\xfe{}", DEEP_JSON):
        response = client.post("/ai/chat", content=body, headers={
            **bearer("globex"), "content-type": "application/json"})
        assert_error(response, 400, "invalid_json")
        assert_still_serving(client)


def test_wrong_content_type_is_415(client: TestClient) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = client.post("/ai/chat", content=b"hello=there", headers={
            **bearer("globex"), "content-type": content_type})
        assert_error(response, 415, "unsupported_media_type")
        assert_still_serving(client)


def test_ten_megabyte_body_with_content_length_is_413(client: TestClient) -> None:
    response = client.post("/ai/chat", content=b"x" * (10 * 1024 * 1024), headers={
        **bearer("globex"), "content-type": "application/json"})
    assert_error(response, 413, "request_too_large")
    assert_still_serving(client)


async def test_ten_megabyte_chunked_body_is_413_without_reading_it_all(
        make_app: Callable[..., Starlette], events: Any) -> None:
    app = make_app()
    chunk, chunks = b"x" * 65536, 160  # 10 MiB, no Content-Length
    received = 0
    sent: list[Message] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": chunk, "more_body": received < chunks}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = {**bearer("globex"), "content-type": "application/json"}
    await app(http_scope("/ai/chat", headers), receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert received <= 1_048_576 // len(chunk) + 1  # stopped at the 1 MiB limit
    assert events() == []

    # The same app serves the next request; a body in several messages is replayed whole.
    raw = json.dumps({**CHAT, "note": "spread over three messages"}).encode()
    parts = [raw[:10], raw[10:20], raw[20:]]
    sent.clear()

    async def receive_parts() -> dict[str, Any]:
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    await app(http_scope("/ai/echo", headers), receive_parts, send)
    assert sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == raw
    await middleware_of(app).gateway.close()


def test_missing_unknown_and_revoked_keys_are_401(client: TestClient, make_config: Any,
                                                  redis_server_url: str) -> None:
    assert_error(client.post("/ai/chat", json=CHAT), 401, "missing_api_key")
    assert_still_serving(client)
    assert_error(client.post("/ai/chat", json=CHAT, headers={"Authorization": "Bearer "}),
                 401, "missing_api_key")
    assert_error(client.post("/ai/chat", json=CHAT, headers={"Authorization": "Basic eDp5"}),
                 401, "missing_api_key")
    for key in ("not-a-real-key", "ais_" + "0" * 32 + "_ghost", "ais_" + "0" * 32 + "_acme",
                API_KEYS["acme"] + "x"):
        response = client.post("/ai/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert_error(response, 401, "invalid_api_key")
        assert_still_serving(client)

    config = load_config(make_config())
    store = RedisStore(config.redis, redis_server_url)
    admin = TenantAdmin(config, store)
    key = admin.add("startup", "pro")
    assert client.post("/ai/chat", json=CHAT, headers={"X-API-Key": key}).status_code == 200
    admin.revoke_key(key)
    response = client.post("/ai/chat", json=CHAT, headers={"X-API-Key": key})
    assert_error(response, 401, "revoked_api_key")
    assert_still_serving(client)
    store.close()


# Each names "evil" (but for the bare "*", the empty and the over-long id), so that a
# key built from any of them would be easy to find.
BAD_TENANT_IDS = ["evil:{s0}:*", "{s3}evil", "*", "evil:b", "t:evil:rl", "x" * 65, "",
                  "evil }*{", "ev il", "evil\u00e9".encode().decode("latin-1")]


def test_tenant_ids_full_of_key_syntax_never_reach_redis(
        make_app: Callable[..., Starlette], rclient: redis.Redis, key_prefix: str,
        events: Any) -> None:
    def resolver(request: Request) -> str | None:
        return request.headers.get("x-app-user")

    header_app = make_app(http={"tenantHeader": "X-Tenant-ID"})
    resolver_app = make_app(resolver=resolver)
    with TestClient(header_app) as by_header, TestClient(resolver_app) as by_resolver:
        # The trusted header and the resolver do work for a good id ...
        assert by_header.post("/ai/chat", json=CHAT,
                              headers={"X-Tenant-ID": "globex"}).status_code == 200
        assert by_resolver.post("/ai/chat", json=CHAT,
                                headers={"X-App-User": "globex"}).status_code == 200
        for bad in BAD_TENANT_IDS:
            for test_client, header in ((by_header, "X-Tenant-ID"), (by_resolver, "X-App-User")):
                response = test_client.post("/ai/chat", json=CHAT,
                                            headers={header: bad.encode("latin-1")})
                assert_error(response, 401, "invalid_tenant_id")
                assert_still_serving(test_client)
        # ... and a stored-tenant key naming a bad tenant is just an invalid key.
        for bad in BAD_TENANT_IDS[:5]:
            response = by_header.post("/ai/chat", json=CHAT, headers={
                "X-API-Key": f"ais_{'0' * 32}_{bad}"})
            assert_error(response, 401, "invalid_api_key")

    keys = list(rclient.scan_iter(count=1000))
    assert keys, "the good requests wrote keys; the check below must see them"
    for key in keys:
        assert "evil" not in key and "ev il" not in key and "*" not in key
        assert "x" * 65 not in key
    # Tenant keys carry a valid tenant id; the deployment's own (breakers, price book,
    # observed statistics) carry none, and no client input either.
    pattern = re.compile(rf"^{key_prefix}:(\{{s\d+\}}:(t:(?P<tenant>[^:]+):.+|usage|tenants)"
                         r"|\{stats\}:(completions|lat:\d+)|\{breakers\}:\S+|\{models\}:\S+)$")
    for key in keys:
        if key.startswith(key_prefix + ":"):
            match = pattern.match(key)
            assert match is not None, key
            assert match["tenant"] is None or is_valid_tenant_id(match["tenant"]), key
    assert {e["tenant_id"] for e in events()} == {"globex"}


# ------------------------------------------------------------------ admitted responses


def test_admitted_response_headers_name_the_request_and_model(client: TestClient,
                                                              events: Any) -> None:
    response = client.post("/ai/chat", json=CHAT, headers=bearer("globex"))
    assert response.status_code == 200
    assert response.headers["x-ai-model"] == "model-small"
    assert response.headers["ratelimit-limit"] == "100"
    assert response.headers["ratelimit-remaining"] == "99"
    assert 1 <= int(response.headers["ratelimit-reset"]) <= 60
    assert response.headers["ratelimit-policy"] == "100;w=60"
    # the app's own headers are kept
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    [event] = events()
    assert response.headers["x-request-id"] == event["request_id"]
    assert event["model_id"] == "model-small" and event["tenant_id"] == "globex"

    second = client.post("/ai/chat", json=CHAT, headers=bearer("globex"))
    assert second.headers["x-request-id"] != response.headers["x-request-id"]


def test_every_admitted_ai_request_yields_exactly_one_stream_entry(
        make_app: Callable[..., Starlette], events: Any) -> None:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        admitted_ids = []
        for path in ("/ai/chat", "/ai/stream", "/ai/context", "/ai/upstream-down",
                     "/ai/fallback", "/ai/echo", "/ai/premium/chat"):
            response = client.post(path, json=CHAT, headers=bearer("globex"))
            assert response.status_code in (200, 502), (path, response.text)
            admitted_ids.append(response.headers["x-request-id"])
        assert client.post("/ai/boom", json=CHAT, headers=bearer("globex")).status_code == 500
        # refused requests leave no entry
        assert client.post("/ai/chat", json=CHAT).status_code == 401
        assert client.post("/ai/chat", content=b"{", headers={
            **bearer("globex"), "content-type": "application/json"}).status_code == 400
        # nor do non-AI requests
        assert client.get("/").status_code == 200

    recorded = events()
    assert len(recorded) == len(admitted_ids) + 1  # + the handler that raised
    ids = [e["request_id"] for e in recorded]
    assert len(set(ids)) == len(ids)
    assert set(admitted_ids) < set(ids)


def test_non_ai_requests_cause_no_redis_command(client: TestClient,
                                                prefix_commands: PrefixCommands) -> None:
    # One AI request first: the middleware's pool is open and its scripts loaded.
    assert_still_serving(client)
    before = prefix_commands.count()
    for _ in range(5):
        assert client.get("/").text == "home"
        assert client.get("/aix").status_code == 200
        assert client.post("/echo", json=CHAT, headers=bearer("globex")).status_code == 200
        assert client.get("/nowhere").status_code == 404
    assert prefix_commands.count() == before

    # The measure does see the middleware's commands: an AI request moves it.
    assert_still_serving(client)
    assert prefix_commands.count() > before


# ------------------------------------------------------------------ bodies pass intact


def test_ai_request_body_is_replayed_to_the_app_intact(client: TestClient,
                                                       events: Any) -> None:
    raw = ('{"messages": [{"role": "user", "content": "h\\u00e9llo \u2713 caf\u00e9"}],\n'
           '   "max_tokens": 8, "extra": [1, 2.50, null]}  \n').encode()
    response = client.post("/ai/echo", content=raw, headers={
        **bearer("globex"), "content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200
    assert response.content == raw
    assert len(events()) == 1


def test_non_ai_bodies_pass_through_untouched_and_unbounded(client: TestClient) -> None:
    raw = bytes(range(256)) * (3 * 4096)  # 3 MiB: above the AI body limit of 1 MiB
    response = client.post("/echo", content=raw, headers={"content-type": "text/plain"})
    assert response.status_code == 200
    assert response.content == raw
    assert "x-request-id" not in response.headers


def test_streamed_response_is_byte_identical_and_settles_with_provider_usage(
        client: TestClient, events: Any, quota_used: Any) -> None:
    with client.stream("POST", "/ai/stream", json=CHAT, headers=bearer("globex")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_raw())
    assert body == b"".join(sse_body())
    [event] = events()
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")
    assert event["cost"] == "0.0000222"  # 12 x 0.00000015 + 34 x 0.0000006, exactly
    assert event["status"] == "200" and event["client_disconnected"] == "false"
    assert quota_used("globex") == 46


@pytest.mark.parametrize(("media_type", "content"), [
    ("application/json", DEEP_JSON),
    ("application/json", b'{"usage": {"prompt_tokens": 1'),
    ("text/event-stream", b"data: " + DEEP_JSON + b"\n\ndata: {oops\n\ndata: [DONE]\n\n"),
])
def test_responses_the_meter_cannot_read_pass_intact_and_are_recorded(
        media_type: str, content: bytes, make_config: Callable[..., dict[str, Any]],
        events: Any) -> None:
    async def reply(request: Request) -> Response:
        return Response(content, media_type=media_type)

    app = Starlette(routes=[Route("/ai/reply", reply, methods=["POST"])])
    app.add_middleware(AISaaSMiddleware, config=make_config())
    with TestClient(app) as client:
        response = client.post("/ai/reply", json=CHAT, headers=bearer("globex"))
        assert response.status_code == 200
        assert response.content == content
    [event] = events()
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["usage_source"] == "estimate" and event["status"] == "200"


# ------------------------------------------------------------------ settlement


def test_handler_reported_usage_wins_and_records_the_answering_model(
        client: TestClient, events: Any, quota_used: Any) -> None:
    response = client.post("/ai/context", json={**CHAT, "answered_by": "model-large"},
                           headers=bearer("globex"))
    assert response.status_code == 200
    ctx = response.json()["ctx"]
    assert ctx["same_object"] is True
    assert ctx["tenant_id"] == "globex" and ctx["tier"] == "pro"
    assert ctx["model"] == "model-small" == response.headers["x-ai-model"]
    assert ctx["request_id"] == response.headers["x-request-id"]
    assert ctx["max_output_tokens"] == 32
    assert ctx["body"] == {**CHAT, "answered_by": "model-large"}
    assert ctx["candidates"] == ["model-small", "model-large", "model-medium"]

    [event] = events()
    assert event["usage_source"] == "handler"  # not the provider's 12/34 in the body
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("5", "7")
    assert event["model_id"] == "model-large" and event["provider"] == "openai"
    assert event["fallback_from"] == "model-small"
    assert event["outcome_value"] == "0.25"
    assert event["cost"] == "0.0000825"  # 5 x 0.0000025 + 7 x 0.00001
    assert quota_used("globex") == 12


def test_handler_that_raises_is_recorded_as_500_and_releases_its_reservation(
        make_app: Callable[..., Starlette], events: Any, quota_used: Any) -> None:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        assert client.post("/ai/boom", json=CHAT, headers=bearer("globex")).status_code == 500
        assert_still_serving(client)
    failed, ok = events()
    assert failed["status"] == "500"
    assert (failed["prompt_tokens"], failed["completion_tokens"], failed["cost"]) == \
        ("0", "0", "0")
    assert ok["status"] == "200"
    assert quota_used("globex") == 46  # only the good request's 12 + 34

    with TestClient(make_app()) as client, pytest.raises(RuntimeError, match="has a bug"):
        client.post("/ai/boom", json=CHAT, headers=bearer("globex"))
    assert len(events()) == 3
    assert quota_used("globex") == 46


def test_upstream_error_without_usage_releases_the_reservation(
        client: TestClient, events: Any, quota_used: Any) -> None:
    response = client.post("/ai/upstream-down", json=CHAT, headers=bearer("globex"))
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "provider is down"  # the app's own body
    [event] = events()
    assert event["status"] == "502" and event["request_id"] == response.headers["x-request-id"]
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("0", "0")
    assert quota_used("globex") == 0


@pytest.mark.parametrize("how", ["disconnect-message", "send-raises-oserror"])
async def test_client_gone_mid_stream_bills_what_was_produced(
        how: str, make_app: Callable[..., Starlette], events: Any, quota_used: Any) -> None:
    app = make_app()
    body = json.dumps(CHAT).encode()
    first_chunk_out = asyncio.Event()
    delivered: list[bytes] = []

    receive = body_then_disconnect(body, first_chunk_out)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if how == "send-raises-oserror" and delivered:
                raise ConnectionResetError("client went away")
            delivered.append(message["body"])
            first_chunk_out.set()

    headers = {**bearer("globex"), "content-type": "application/json"}
    if how == "disconnect-message":  # the server tells the app the client left
        await asyncio.wait_for(app(http_scope("/ai/stream-stalls", headers), receive, send), 5)
        assert delivered == sse_body()[:3]
    else:  # the server's write fails (ASGI spec 2.4: the app sees OSError from send)
        # What leaves the app is Starlette's business and differs by version (1.x:
        # ClientDisconnect; 0.37: the OSError in an ExceptionGroup); the billing is ours.
        group = getattr(builtins, "BaseExceptionGroup", OSError)  # Python >= 3.11
        with pytest.raises((ClientDisconnect, OSError, group)):
            await asyncio.wait_for(app(http_scope("/ai/stream-stalls", headers,
                                                  spec_version="2.4"), receive, send), 5)
        assert delivered == sse_body()[:1]
    await middleware_of(app).gateway.close()

    [event] = events()
    assert event["client_disconnected"] == "true"
    assert event["usage_source"] == "estimate"
    assert event["status"] == "200"
    assert int(event["prompt_tokens"]) == estimate_prompt_tokens(CHAT)
    produced_at_most = estimate_tokens(len("".join(SSE_WORDS[:3])))
    assert 0 < int(event["completion_tokens"]) <= produced_at_most
    assert quota_used("globex") == int(event["prompt_tokens"]) + int(event["completion_tokens"])


# ------------------------------------------------------------------ tenants and models


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_resolver_maps_the_request_to_a_tenant_instead_of_the_key(
        kind: str, make_app: Callable[..., Starlette], events: Any) -> None:
    sessions = {"s-globex": "globex", "s-initech": "initech"}

    def sync_resolver(request: Request) -> str | None:
        return sessions.get(request.cookies.get("session", ""))

    async def async_resolver(request: Request) -> str | None:
        await asyncio.sleep(0)
        return sync_resolver(request)

    app = make_app(resolver=sync_resolver if kind == "sync" else async_resolver)
    with TestClient(app) as client:
        client.cookies.set("session", "s-initech")
        signed_in = client.post("/ai/chat", json=CHAT)
        assert signed_in.status_code == 200
        # the app's user decides, whatever key the request carries
        client.cookies.set("session", "s-globex")
        with_key = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
        assert with_key.status_code == 200
        assert with_key.headers["ratelimit-limit"] == "100"  # globex's tier, not acme's
        # no user: the API key decides
        client.cookies.clear()
        anonymous = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
        assert anonymous.headers["ratelimit-limit"] == "10"
        assert_error(client.post("/ai/chat", json=CHAT), 401, "missing_api_key")
    # (different shards: entries of one millisecond have no order between them)
    assert sorted(e["tenant_id"] for e in events()) == ["acme", "globex", "initech"]


def test_aexecute_falls_back_to_the_next_candidate(client: TestClient, events: Any) -> None:
    response = client.post("/ai/fallback", json=CHAT, headers=bearer("globex"))
    assert response.status_code == 200
    assert response.json()["tried"] == ["model-small", "model-large"]
    assert response.headers["x-ai-model"] == "model-small"
    [event] = events()
    assert event["model_id"] == "model-large"
    assert event["fallback_from"] == "model-small"
    # priced on the model that answered: 12 x 0.0000025 + 34 x 0.00001
    assert event["cost"] == "0.00037"


@pytest.mark.parametrize(("path", "headers", "model"), [
    ("/ai/chat", {}, "model-small"),
    ("/ai/chat", {"X-AI-Min-Quality": "0.8"}, "model-large"),
    ("/ai/chat", {"X-AI-Min-Quality": "0.8", "X-AI-Max-Latency-Ms": "3000"}, "model-medium"),
    ("/ai/chat", {"X-AI-Min-Quality": "0.8", "X-AI-Max-Cost": "0.0004"}, "model-large"),
    ("/ai/chat", {"X-AI-Max-Latency-Ms": "1000", "X-AI-Max-Cost": "1"}, "model-small"),
    ("/ai/premium/chat", {}, "model-large"),
    ("/ai/premium/chat", {"X-AI-Min-Quality": "0.1"}, "model-large"),  # never loosens
])
def test_requirement_headers_tighten_the_model_choice(
        path: str, headers: dict[str, str], model: str, client: TestClient,
        events: Any) -> None:
    response = client.post(path, json=CHAT, headers={**bearer("globex"), **headers})
    assert response.status_code == 200, response.text
    assert response.headers["x-ai-model"] == model
    assert events()[0]["model_id"] == model


@pytest.mark.parametrize(("headers", "named"), [
    ({"X-AI-Min-Quality": "0.99"}, "quality"),
    ({"X-AI-Max-Latency-Ms": "100"}, "latency"),
    ({"X-AI-Min-Quality": "0.8", "X-AI-Max-Cost": "0.0003"}, "expected cost"),
    ({"X-AI-Max-Cost": "0"}, "expected cost"),
])
def test_impossible_requirements_are_422_naming_the_requirement(
        headers: dict[str, str], named: str, client: TestClient, events: Any) -> None:
    response = client.post("/ai/chat", json=CHAT, headers={**bearer("globex"), **headers})
    error = assert_error(response, 422, "no_eligible_model")
    assert named in error["message"]
    assert "model-small" in error["message"]
    assert events() == []
    assert_still_serving(client)


@pytest.mark.parametrize("headers", [
    {"X-AI-Min-Quality": "high"}, {"X-AI-Min-Quality": "1.5"}, {"X-AI-Min-Quality": "nan"},
    {"X-AI-Max-Latency-Ms": "fast"}, {"X-AI-Max-Latency-Ms": "0"},
    {"X-AI-Max-Latency-Ms": "1.5"}, {"X-AI-Max-Cost": "cheap"}, {"X-AI-Max-Cost": "-1"},
    {"X-AI-Max-Cost": "NaN"}, {"X-AI-Max-Cost": "Infinity"},
])
def test_bad_requirement_values_are_400(headers: dict[str, str], client: TestClient) -> None:
    response = client.post("/ai/chat", json=CHAT, headers={**bearer("globex"), **headers})
    error = assert_error(response, 400, "invalid_request")
    assert next(iter(headers)) in error["message"]
    assert_still_serving(client)


# ------------------------------------------------------------------ other scopes, asyncio


def test_websocket_and_lifespan_scopes_pass_straight_through(
        make_config: Callable[..., dict[str, Any]], events: Any) -> None:
    phases: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        phases.append("startup")
        yield
        phases.append("shutdown")

    async def reverse(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text((await websocket.receive_text())[::-1])
        await websocket.close()

    # /ai/ws matches the AI endpoint /ai/*: only HTTP requests there are AI requests.
    app = Starlette(routes=[WebSocketRoute("/ai/ws", reverse)], lifespan=lifespan)
    app.add_middleware(AISaaSMiddleware, config=make_config())
    with TestClient(app) as client:
        assert phases == ["startup"]
        with client.websocket_connect("/ai/ws") as websocket:
            websocket.send_text("hello")
            assert websocket.receive_text() == "olleh"
    assert phases == ["startup", "shutdown"]
    assert events() == []


async def test_redis_calls_on_the_asgi_path_are_asyncio(make_app: Callable[..., Starlette]
                                                        ) -> None:
    app = make_app()
    gateway = middleware_of(app).gateway
    assert isinstance(gateway, AsyncGateway)
    assert isinstance(gateway.store, AsyncRedisStore)
    assert isinstance(gateway.store.client, redis.asyncio.Redis)
    await gateway.close()


async def test_two_ai_requests_are_in_their_handlers_at_once(
        make_app: Callable[..., Starlette], events: Any) -> None:
    app = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver") as client:
        first, second = await asyncio.gather(
            *(client.post("/ai/rendezvous", json=CHAT, headers=bearer(tenant))
              for tenant in ("globex", "initech")))
    assert first.status_code == second.status_code == 200
    assert len(events()) == 2
    await middleware_of(app).gateway.close()


async def test_event_loop_keeps_serving_while_admission_waits_on_redis(
        make_app: Callable[..., Starlette], rclient: redis.Redis, events: Any) -> None:
    """With Redis holding an admission, the loop still runs: a sync client would block it."""
    app = make_app(redis={"socketTimeout": "10s"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver") as client:
        warm = await client.post("/ai/chat", json=CHAT, headers=bearer("globex"))
        assert warm.status_code == 200  # pool open, scripts loaded
        rclient.client_pause(10_000, all=False)  # writes (and scripts) wait
        try:
            held = asyncio.create_task(client.post("/ai/chat", json=CHAT,
                                                   headers=bearer("globex")))
            for _ in range(500):  # until the admission script is held at the server
                await asyncio.sleep(0.01)
                if any("b" in c["flags"] and c["cmd"] == "evalsha"
                       for c in rclient.client_list()):
                    break
            else:
                pytest.fail("the admission never reached the paused server")
            page = await client.get("/")
            assert page.status_code == 200
            assert not held.done()
        finally:
            rclient.client_unpause()
        response = await held
    assert response.status_code == 200
    assert [e["request_id"] for e in events()] == [warm.headers["x-request-id"],
                                                   response.headers["x-request-id"]]
    await middleware_of(app).gateway.close()
