"""The Flask extension's glue: a real Flask app, Flask's real test client, a real Redis.

The WSGI middleware underneath has its own tests (``test_wsgi.py``); these show what
the extension adds: both ways of setting it up and ``app.config``, ``g.ai``, headers
and refusals on a Flask response, ``stream_with_context`` bodies settled with the
provider's usage (when exhausted, and when closed early), views that raise, a resolver
that uses Flask's request and session, the usage blueprint, and the errors of a
missing configuration or a missing Flask.

Werkzeug's test client reads a response body only when asked (``.data``,
``.get_json()``) and closes it only on ``.close()`` (or ``with``); the middleware settles
at whichever comes first, so these tests read every AI response they send (both paths
are tested on their own below).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
import redis
import yaml
from conftest import PrefixCommands, bearer
from flask import Flask, g, session
from flask_app import make_flask_app
from replies import CHAT, SSE_WORDS, sse_body
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette_app import ROUTES

from ai_saas_middleware import ConfigError, load_config
from ai_saas_middleware.flask import (
    AI_SAAS_CONFIG,
    AI_SAAS_REDIS_URL,
    EXTENSION_KEY,
    AISaaS,
    AISaaSState,
    usage_blueprint,
)
from ai_saas_middleware.gateway import Gateway
from ai_saas_middleware.starlette import AISaaSMiddleware as StarletteMiddleware
from ai_saas_middleware.usage import estimate_prompt_tokens, estimate_tokens
from ai_saas_middleware.wsgi import AISaaSMiddleware

VOLATILE = {"request_id", "latency_ms", "ts"}  # differ between any two requests


@pytest.fixture
def make_app(make_config: Callable[..., dict[str, Any]]) -> Iterator[Callable[..., Flask]]:
    """``make_app(resolver=None, app_config=None, **config)``: tests/flask_app.py's app."""
    made: list[Flask] = []

    def make(*, resolver: Any = None, app_config: dict[str, Any] | None = None,
             **config: Any) -> Flask:
        app = make_flask_app(make_config(**config), resolver=resolver, **(app_config or {}))
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions[EXTENSION_KEY].gateway.close()


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> Any:
    return make_app().test_client()


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.headers["content-type"] == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code
    return error  # type: ignore[no-any-return]


# ------------------------------------------------------------------ setting it up


def _plain_app() -> Flask:
    app = Flask(__name__)

    @app.post("/ai/chat")
    def chat() -> Any:
        return {"tenant": g.ai.tenant_id, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    return app


@pytest.mark.parametrize("how", ["constructor", "init_app + app.config dict",
                                 "app.config YAML path", "app.config Config"])
def test_set_up_either_way_with_any_config_source(
        how: str, make_config: Callable[..., dict[str, Any]], tmp_path: Path,
        events: Any) -> None:
    app = _plain_app()
    raw = make_config()
    if how == "constructor":
        ext = AISaaS(app, config=raw)
    else:
        if how == "app.config YAML path":
            path = tmp_path / "ai-saas-config.yaml"
            path.write_text(yaml.safe_dump(raw))
            app.config[AI_SAAS_CONFIG] = str(path)
        elif how == "app.config Config":
            app.config[AI_SAAS_CONFIG] = load_config(raw)
        else:
            app.config[AI_SAAS_CONFIG] = raw
        ext = AISaaS()
        ext.init_app(app)

    state = app.extensions[EXTENSION_KEY]
    assert isinstance(state, AISaaSState) and state.extension is ext
    assert isinstance(app.wsgi_app, AISaaSMiddleware)
    assert app.wsgi_app.gateway is state.gateway
    assert not any(isinstance(value, Flask) for value in vars(ext).values())  # app not kept
    with app.app_context():
        assert ext.gateway is state.gateway

    reply = app.test_client().post("/ai/chat", json=CHAT, headers=bearer("globex"))
    assert reply.status_code == 200 and reply.get_json()["tenant"] == "globex"
    [event] = events()
    assert event["request_id"] == reply.headers["x-request-id"]
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("3", "4")
    state.gateway.close()


def test_one_extension_serves_apps_with_their_own_configs(
        make_config: Callable[..., dict[str, Any]], key_prefix: str, events: Any,
        redis_server_url: str) -> None:
    ext = AISaaS()
    first, second = _plain_app(), _plain_app()
    first.config[AI_SAAS_CONFIG] = make_config()
    second.config[AI_SAAS_CONFIG] = make_config(redis={"keyPrefix": key_prefix + "b",
                                                       "url": "redis://127.0.0.1:1/0"})
    second.config[AI_SAAS_REDIS_URL] = redis_server_url  # app.config overrides redis.url
    ext.init_app(first)
    ext.init_app(second)
    gateways = [app.extensions[EXTENSION_KEY].gateway for app in (first, second)]
    assert gateways[0] is not gateways[1]
    assert gateways[1].redis_url == redis_server_url
    for app, gateway in zip((first, second), gateways, strict=True):
        with app.app_context():
            assert ext.gateway is gateway
        reply = app.test_client().post("/ai/chat", json=CHAT, headers=bearer("globex"))
        assert reply.get_json()["tenant"] == "globex"
    assert len(events()) == 1  # the second app wrote under its own prefix
    for gateway in gateways:
        gateway.close()


def test_constructor_config_and_gateway_take_precedence(
        make_config: Callable[..., dict[str, Any]], events: Any) -> None:
    app = _plain_app()
    app.config[AI_SAAS_CONFIG] = {"not": "a valid config"}  # never read
    gateway = Gateway(make_config())
    AISaaS(app, gateway=gateway)
    assert app.extensions[EXTENSION_KEY].gateway is gateway
    other = _plain_app()
    other.config[AI_SAAS_CONFIG] = {"not": "a valid config"}
    AISaaS(other, config=make_config())
    for flask_app in (app, other):
        reply = flask_app.test_client().post("/ai/chat", json=CHAT, headers=bearer("acme"))
        assert reply.get_json()["tenant"] == "acme"
    assert len(events()) == 2
    gateway.close()
    other.extensions[EXTENSION_KEY].gateway.close()


def test_missing_or_bad_config_fails_at_init_and_names_the_key(
        make_config: Callable[..., dict[str, Any]]) -> None:
    app = _plain_app()
    with pytest.raises(ConfigError) as missing:
        AISaaS(app)
    assert "app.config['AI_SAAS_CONFIG']" in str(missing.value)
    assert "found nothing" in str(missing.value)
    assert EXTENSION_KEY not in app.extensions
    assert not isinstance(app.wsgi_app, AISaaSMiddleware)  # left as it was

    bad = make_config()
    bad["tenant"]["tiers"][1]["rateLimit"] = "lots"
    app.config[AI_SAAS_CONFIG] = bad
    with pytest.raises(ConfigError, match=r"tenant\.tiers\[1\]\.rateLimit"):
        AISaaS().init_app(app)

    app.config[AI_SAAS_CONFIG] = make_config()
    ext = AISaaS(app)
    with pytest.raises(RuntimeError, match="already set up"):
        ext.init_app(app)
    app.extensions[EXTENSION_KEY].gateway.close()


def test_without_flask_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setitem(sys.modules, "flask", None)  # as if Flask were not installed
    monkeypatch.delitem(sys.modules, "ai_saas_middleware.flask")
    with pytest.raises(ImportError, match=r"pip install 'ai-saas-middleware\[flask\]'"):
        importlib.import_module("ai_saas_middleware.flask")


# ------------------------------------------------------------------ the context on g


def test_g_ai_is_the_request_context_for_views_and_the_apps_own_hooks(
        make_config: Callable[..., dict[str, Any]], events: Any) -> None:
    app = _plain_app()
    seen_by_hook: list[Any] = []

    @app.before_request
    def app_hook() -> None:  # registered before the extension: still sees g.ai
        seen_by_hook.append(g.get("ai"))

    @app.get("/page")
    def page() -> str:
        return "g.ai is None" if g.ai is None else "g.ai is set"

    AISaaS(app, config=make_config())
    client = app.test_client()
    assert client.post("/ai/chat", json=CHAT, headers=bearer("globex")).get_json()
    assert client.get("/page").text == "g.ai is None"
    assert seen_by_hook[0].request_id == events()[0]["request_id"]
    assert seen_by_hook[1] is None
    app.extensions[EXTENSION_KEY].gateway.close()


def test_context_endpoint_sees_the_same_context_on_g_and_in_the_environ(
        client: Any, events: Any, quota_used: Any) -> None:
    response = client.post("/ai/context", json={**CHAT, "answered_by": "model-large"},
                           headers=bearer("globex"))
    assert response.status_code == 200
    ctx = response.get_json()["ctx"]
    assert ctx["same_object"] is True
    assert ctx["tenant_id"] == "globex" and ctx["tier"] == "pro"
    assert ctx["request_id"] == response.headers["x-request-id"]
    assert ctx["candidates"] == ["model-small", "model-large", "model-medium"]
    [event] = events()
    assert event["usage_source"] == "handler"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("5", "7")
    assert event["model_id"] == "model-large" and event["fallback_from"] == "model-small"
    assert event["outcome_value"] == "0.25"
    assert quota_used("globex") == 12


# ------------------------------------------------------------------ responses


def test_admitted_response_has_the_apps_headers_and_ours(client: Any, events: Any) -> None:
    response = client.post("/ai/chat", json=CHAT, headers=bearer("globex"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.data)
    assert response.headers["x-ai-model"] == "model-small"
    assert response.headers["ratelimit-limit"] == "100"
    assert response.headers["ratelimit-remaining"] == "99"
    assert response.headers["ratelimit-policy"] == "100;w=60"
    [event] = events()
    assert response.headers["x-request-id"] == event["request_id"]
    assert event["usage_source"] == "provider"


def test_refusals_are_the_asgi_adapters_byte_for_byte(
        client: Any, make_config: Callable[..., dict[str, Any]], key_prefix: str) -> None:
    starlette = Starlette(routes=ROUTES)
    starlette.add_middleware(StarletteMiddleware, config=make_config(
        redis={"keyPrefix": key_prefix + "asgi"}))
    json_headers = {"content-type": "application/json"}
    cases = [
        ({}, json.dumps(CHAT).encode()),
        ({"authorization": "Bearer not-a-real-key"}, json.dumps(CHAT).encode()),
        ({**bearer("globex")}, b"{not json"),
        ({**bearer("globex"), "content-type": "text/plain"}, b"hello"),
        ({**bearer("globex")}, b"x" * (1024 * 1024 + 1)),
        ({**bearer("globex"), "x-ai-min-quality": "0.99"}, json.dumps(CHAT).encode()),
    ]
    with TestClient(starlette) as asgi_client:
        for headers, body in cases:
            headers = {**json_headers, **headers}
            flask_reply = client.post("/ai/chat", data=body, headers=headers)
            asgi_reply = asgi_client.post("/ai/chat", content=body, headers=headers)
            assert flask_reply.status_code == asgi_reply.status_code >= 400
            assert flask_reply.data == asgi_reply.content
            assert [(k.lower(), v) for k, v in flask_reply.headers.items()] == \
                [(k.decode(), v.decode()) for k, v in asgi_reply.headers.raw]


@pytest.mark.parametrize("path", ["/ai/chat", "/ai/stream", "/ai/context", "/ai/fallback",
                                  "/ai/upstream-down", "/ai/echo"])
def test_stream_entries_are_those_the_asgi_adapter_writes(
        path: str, client: Any, make_config: Callable[..., dict[str, Any]],
        key_prefix: str, rclient: redis.Redis, events: Any) -> None:
    starlette = Starlette(routes=ROUTES)
    starlette.add_middleware(StarletteMiddleware, config=make_config(
        redis={"keyPrefix": key_prefix + "asgi"}))
    raw = json.dumps({**CHAT, "answered_by": "model-large"}).encode()
    headers = {**bearer("globex"), "content-type": "application/json"}
    flask_reply = client.post(path, data=raw, headers=headers)
    flask_body = flask_reply.get_data()
    flask_reply.close()  # as a server does after the last byte (settles a stream)
    with TestClient(starlette) as asgi_client:
        asgi_reply = asgi_client.post(path, content=raw, headers=headers)
    assert flask_reply.status_code == asgi_reply.status_code
    assert flask_body == asgi_reply.content or path == "/ai/context"  # ids differ
    [flask_event] = events()
    [stream] = rclient.scan_iter(match=f"{key_prefix}asgi:*:usage")
    [(_, asgi_event)] = rclient.xrange(stream)
    assert {k: v for k, v in flask_event.items() if k not in VOLATILE} == \
        {k: v for k, v in asgi_event.items() if k not in VOLATILE}


def test_stream_with_context_is_settled_with_the_providers_usage_at_close(
        client: Any, events: Any, quota_used: Any) -> None:
    response = client.post("/ai/stream", json=CHAT, headers=bearer("globex"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.get_data() == b"".join(sse_body())  # exhausted, not yet closed
    assert events() == []  # a chunked stream settles when the server closes it
    response.close()
    [event] = events()
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")
    assert event["cost"] == "0.0000222"
    assert event["client_disconnected"] == "false"
    assert quota_used("globex") == 46
    response.close()
    assert len(events()) == 1  # once


def test_stream_with_context_closed_early_is_settled_at_close(client: Any, events: Any,
                                                              quota_used: Any) -> None:
    with client.post("/ai/stream", json=CHAT, headers=bearer("globex"),
                     buffered=False) as response:
        assert response.status_code == 200
        assert next(iter(response.response)) == sse_body()[0]
        assert events() == []  # still streaming
    [event] = events()  # closed by the with block, as a server does for a client gone
    assert event["client_disconnected"] == "true"
    assert event["usage_source"] == "estimate" and event["status"] == "200"
    assert int(event["prompt_tokens"]) == estimate_prompt_tokens(CHAT)
    # The test client read one chunk ahead, at most two were produced.
    assert 0 < int(event["completion_tokens"]) <= estimate_tokens(len("".join(SSE_WORDS[:2])))
    assert quota_used("globex") == int(event["prompt_tokens"]) + int(event["completion_tokens"])


@pytest.mark.parametrize("propagate", [False, True])
def test_view_that_raises_is_recorded_as_500_and_releases_its_reservation(
        propagate: bool, make_app: Callable[..., Flask], events: Any,
        quota_used: Any) -> None:
    client = make_app(app_config={"PROPAGATE_EXCEPTIONS": propagate}).test_client()
    if propagate:  # the exception leaves Flask and passes through the middleware
        with pytest.raises(RuntimeError, match="has a bug"):
            client.post("/ai/boom", json=CHAT, headers=bearer("globex"))
    else:  # Flask turns it into its own 500 page
        page = client.post("/ai/boom", json=CHAT, headers=bearer("globex"), buffered=True)
        assert page.status_code == 500
    ok = client.post("/ai/chat", json=CHAT, headers=bearer("globex"), buffered=True)
    assert ok.status_code == 200
    failed, ok = events()
    assert failed["status"] == "500"
    assert (failed["prompt_tokens"], failed["completion_tokens"], failed["cost"]) == \
        ("0", "0", "0")
    assert ok["status"] == "200"
    assert quota_used("globex") == 46


def test_non_ai_requests_cause_no_redis_command(client: Any,
                                                prefix_commands: PrefixCommands) -> None:
    assert client.post("/ai/chat", json=CHAT, headers=bearer("globex")).get_json()
    before = prefix_commands.count()
    raw = bytes(range(256)) * (3 * 4096)  # over the AI body limit
    for _ in range(3):
        assert client.get("/").text == "home"
        assert client.get("/aix").status_code == 200
        assert client.post("/echo", data=raw, headers=bearer("globex")).data == raw
        assert client.get("/nowhere").status_code == 404
    assert prefix_commands.count() == before
    assert client.post("/ai/chat", json=CHAT, headers=bearer("globex")).status_code == 200
    assert prefix_commands.count() > before


# ------------------------------------------------------------------ resolver and blueprint


def session_resolver(request: flask.Request) -> str | None:
    """The app's signed-in user decides: Flask's request and session are both there."""
    assert isinstance(request, flask.Request)
    assert request is flask.request._get_current_object()  # type: ignore[attr-defined]
    assert flask.current_app.name == "flask_app"
    return session.get("tenant")


def signed_in_app(make_app: Callable[..., Flask]) -> Flask:
    app = make_app(resolver=session_resolver)

    @app.post("/login/<tenant>")
    def login(tenant: str) -> str:
        session["tenant"] = tenant
        return "signed in"

    @app.post("/logout")
    def logout() -> str:
        session.clear()
        return "signed out"

    app.register_blueprint(usage_blueprint, url_prefix="/ai-saas")
    return app


def test_resolver_maps_the_flask_request_and_session_to_a_tenant(
        make_app: Callable[..., Flask], events: Any) -> None:
    client = signed_in_app(make_app).test_client()
    assert client.post("/login/initech").status_code == 200
    signed_in = client.post("/ai/chat", json=CHAT)
    assert signed_in.get_json()["model"] == "model-small"
    assert signed_in.headers["ratelimit-limit"] == "1000"  # initech: enterprise
    with_key = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
    assert with_key.get_json() and with_key.headers["ratelimit-limit"] == "1000"  # the user's
    client.post("/logout")
    anonymous = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
    assert anonymous.get_json() and anonymous.headers["ratelimit-limit"] == "10"
    error_of(client.post("/ai/chat", json=CHAT), 401, "missing_api_key")
    # (sorted: two shards' streams do not order events of the same millisecond)
    assert sorted(e["tenant_id"] for e in events()) == ["acme", "initech", "initech"]


def test_usage_blueprint_reports_the_callers_own_usage(make_app: Callable[..., Flask],
                                                       events: Any) -> None:
    app = signed_in_app(make_app)
    client = app.test_client()
    assert client.post("/ai/chat", json=CHAT, headers=bearer("globex")).get_json()
    with app.test_request_context():
        assert flask.url_for("ai_saas.usage") == "/ai-saas/usage"

    report = client.get("/ai-saas/usage", headers=bearer("globex"))
    assert report.status_code == 200 and report.headers["content-type"] == "application/json"
    usage = report.get_json()
    assert usage["tenant_id"] == "globex" and usage["tier"] == "pro"
    assert usage["tokens_used"] == 46 and usage["requests_last_minute"] == 1
    assert usage["monthly_quota"] == 100000 and usage["tokens_remaining"] == 100000 - 46

    client.post("/login/initech")  # the resolver answers for the blueprint too
    assert client.get("/ai-saas/usage").get_json()["tenant_id"] == "initech"
    client.post("/logout")
    error_of(client.get("/ai-saas/usage"), 401, "missing_api_key")
    error_of(client.post("/ai-saas/usage", headers=bearer("globex")), 405,
             "method_not_allowed")
    assert len(events()) == 1  # reading usage is not usage


def test_usage_blueprint_answers_with_and_without_the_trailing_slash(
        make_app: Callable[..., Flask]) -> None:
    app = signed_in_app(make_app)
    client = app.test_client()
    assert client.post("/ai/chat", json=CHAT, headers=bearer("globex")).get_json()
    answers = [client.get(path, headers=bearer("globex"))
               for path in ("/ai-saas/usage", "/ai-saas/usage/")]
    for answer in answers:  # directly, not a 308 to the other form
        assert answer.status_code == 200, (answer.status_code, answer.data)
        assert answer.get_json()["tenant_id"] == "globex"
    assert answers[0].data == answers[1].data
    client.post("/login/initech")  # the resolver answers on both forms too
    assert client.get("/ai-saas/usage/").get_json()["tenant_id"] == "initech"
    client.post("/logout")
    for path in ("/ai-saas/usage", "/ai-saas/usage/"):  # a POST is not redirected either
        error_of(client.post(path, headers=bearer("globex")), 405, "method_not_allowed")
        error_of(client.get(path), 401, "missing_api_key")
    with app.test_request_context():
        assert flask.url_for("ai_saas.usage") == "/ai-saas/usage"


def test_usage_blueprint_on_an_app_without_the_extension_says_so() -> None:
    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    app.register_blueprint(usage_blueprint, url_prefix="/ai-saas")
    with pytest.raises(RuntimeError, match="AISaaS is not set up"):
        app.test_client().get("/ai-saas/usage")


def test_locally_admitted_requests_report_what_the_allowance_has_left(
        make_app: Callable[..., Flask]) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on: Redis is down
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    client = make_app(redis={"url": url, "onUnavailable": "open"}).test_client()
    remaining = []
    for _ in range(10):  # acme: free tier, 10 requests a minute
        reply = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
        assert reply.status_code == 200 and reply.get_json()  # served from the allowance
        assert reply.headers["ratelimit-limit"] == "10"
        assert 1 <= int(reply.headers["ratelimit-reset"]) <= 60
        remaining.append(int(reply.headers["ratelimit-remaining"]))
    # The first one admitted is not told "0 left" (which says back off): 9, then 8 ...
    assert remaining == list(range(9, -1, -1))
    refused = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
    error_of(refused, 429, "rate_limit_exceeded")
    assert refused.headers["ratelimit-remaining"] == "0"
    # Another tenant's allowance is its own.
    other = client.post("/ai/chat", json=CHAT, headers=bearer("globex"))
    assert other.get_json() and other.headers["ratelimit-remaining"] == "99"

