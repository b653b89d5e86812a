"""Client input read before admission: every number a client sends is checked and bounded.

``max_tokens`` / ``max_completion_tokens`` in any shape, the ``X-AI-*`` requirement
headers, ``Content-Length`` (through every adapter under its real server, over a raw
socket so any header bytes can be sent), and the size of every message built from
what the client sent.
"""

from __future__ import annotations

import asyncio
import decimal
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from conftest import API_KEYS

from ai_saas_middleware import ConfigError, Decision, Gateway, Outcome, RequestInfo, load_config
from ai_saas_middleware.config import ModelProfile, TierConfig
from ai_saas_middleware.inputs import MAX_OUTPUT_TOKENS, declared_length
from ai_saas_middleware.pricing import cost_of
from ai_saas_middleware.routing import Requirements, select_model
from ai_saas_middleware.store.keys import KeySchema, is_valid_tenant_id

MESSAGE_BOUND = 1_000  # bytes: a refusal's body whatever the client sent


def ai_request(body: Any = None, *, headers: dict[str, str] | None = None,
               raw: bytes | None = None, tenant: str = "globex") -> RequestInfo:
    hdrs = {"content-type": "application/json", "authorization": f"Bearer {API_KEYS[tenant]}",
            **{k.lower(): v for k, v in (headers or {}).items()}}
    if raw is None:
        raw = json.dumps({"messages": [{"role": "user", "content": "Hi."}]}
                         if body is None else body).encode()
    return RequestInfo("POST", "/ai/chat", hdrs, raw)


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Summarise this."}], **fields}


def error_of(decision: Decision) -> dict[str, str]:
    assert not decision.allowed
    return json.loads(decision.body)["error"]  # type: ignore[no-any-return]


@pytest.fixture
def gateway(make_config: Callable[..., dict[str, Any]]) -> Iterator[Gateway]:
    gw = Gateway(make_config())
    yield gw
    gw.close()


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("shape", [
    {"max_completion_tokens": None, "max_tokens": 4_000},
    {"max_tokens": 4_000, "max_completion_tokens": None},
    {"max_tokens": 4_000},
    {"max_completion_tokens": 4_000},
    {"max_completion_tokens": 4_000, "max_tokens": 4_000},
], ids=["null-completion-then-max", "max-then-null-completion", "max", "completion", "equal"])
def test_a_stated_max_tokens_is_reserved_whatever_the_other_field_holds(
        gateway: Gateway, quota_used: Any, shape: dict[str, Any]) -> None:
    decision = gateway.admit(ai_request(chat(**shape)))

    assert decision.allowed and decision.context is not None and decision.ticket is not None
    assert decision.context.max_output_tokens == 4_000
    assert quota_used("globex") == decision.ticket.prompt_estimate + 4_000
    gateway.settle(decision.ticket, Outcome(status=200, provider_usage=(1, 1)), decision.context)


@pytest.mark.parametrize("bad", [-1, 0, 1.5, 100.0, "100", True, [], {}, 10 ** 30,
                                 MAX_OUTPUT_TOKENS + 1],
                         ids=["negative", "zero", "fraction", "float", "text", "bool", "list",
                              "object", "10**30", "over-the-maximum"])
@pytest.mark.parametrize(("field", "other"), [
    ("max_tokens", {"max_completion_tokens": None}),
    ("max_tokens", {"max_completion_tokens": 100}),
    ("max_completion_tokens", {"max_tokens": None}),
    ("max_completion_tokens", {"max_tokens": 100}),
    ("max_completion_tokens", {}),
], ids=["beside-null", "beside-valid", "new-beside-null", "new-beside-valid", "alone"])
def test_a_bad_token_limit_in_either_field_is_a_400_naming_it(
        gateway: Gateway, quota_used: Any, field: str, other: dict[str, Any], bad: Any) -> None:
    decision = gateway.admit(ai_request(chat(**{field: bad}, **other)))

    assert decision.status == 400
    error = error_of(decision)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{field} must be a whole number from 1 to ")
    assert quota_used("globex") == 0


def test_the_largest_token_limit_taken_is_served_and_one_more_is_refused(
        make_config: Callable[..., dict[str, Any]]) -> None:
    config = make_config()
    config["models"][0]["maxTokens"] = 2 * MAX_OUTPUT_TOKENS  # a window that holds it
    config["tenant"]["tiers"][1]["monthlyQuota"] = "unlimited"
    gateway = Gateway(config)
    try:
        served = gateway.admit(ai_request(chat(max_tokens=MAX_OUTPUT_TOKENS)))
        refused = gateway.admit(ai_request(chat(max_tokens=MAX_OUTPUT_TOKENS + 1)))
        assert served.allowed and refused.status == 400
        assert served.ticket is not None
        gateway.settle(served.ticket, Outcome(status=200, provider_usage=(1, 1)),
                       served.context)
    finally:
        gateway.close()


def test_when_both_fields_differ_the_larger_is_reserved(gateway: Gateway,
                                                        quota_used: Any) -> None:
    # A provider may honour either name: only the larger covers what it may produce.
    one = gateway.admit(ai_request(chat(max_tokens=300, max_completion_tokens=2_000)))
    other = gateway.admit(ai_request(chat(max_tokens=2_000, max_completion_tokens=300)))

    for decision in (one, other):
        assert decision.allowed and decision.context is not None
        assert decision.context.max_output_tokens == 2_000


# --------------------------------------------------------------------------- item 10


@pytest.mark.parametrize("headers", [
    {"X-AI-Max-Cost": "1e-1000000"},
    {"X-AI-Max-Cost": "1e-100000000"},
    {"X-AI-Max-Cost": "1e999999999999999999"},
    {"X-AI-Max-Cost": "1E+5"},
    {"X-AI-Max-Cost": "0." + "0" * 10_000 + "1"},
    {"X-AI-Max-Cost": "1" * 10_000},
    {"X-AI-Max-Cost": "-0.01"},
    {"X-AI-Max-Cost": "NaN"},
    {"X-AI-Max-Cost": "Infinity"},
    {"X-AI-Max-Cost": "0.01" + " " * 100_000},
    {"X-AI-Min-Quality": "0." + "5" * 100_000},
    {"X-AI-Min-Quality": "nan"},
    {"X-AI-Min-Quality": "1.01"},
    {"X-AI-Max-Latency-Ms": "1" * 5_000},
    {"X-AI-Max-Latency-Ms": "\u0661\u0662\u0663"},  # Arabic-Indic digits: int() reads them
    {"X-AI-Max-Latency-Ms": "1_000"},
    {"X-AI-Max-Latency-Ms": "0"},
], ids=["cost-1e-1000000", "cost-1e-100000000", "cost-huge-exponent", "cost-exponent",
        "cost-10k-decimals", "cost-10k-digits", "cost-negative", "cost-nan", "cost-inf",
        "cost-padded", "quality-100k-digits", "quality-nan", "quality-over-1",
        "latency-5k-digits", "latency-arabic-digits", "latency-underscore", "latency-0"])
def test_a_malformed_or_unbounded_requirement_header_is_a_small_400(
        gateway: Gateway, quota_used: Any, headers: dict[str, str]) -> None:
    decision = gateway.admit(ai_request(chat(max_tokens=10), headers=headers))

    assert decision.status == 400
    assert error_of(decision)["code"] == "invalid_request"
    assert len(decision.body) < MESSAGE_BOUND
    assert quota_used("globex") == 0


@pytest.mark.parametrize(("headers", "served"), [
    ({"X-AI-Max-Cost": "0.05"}, True),
    ({"X-AI-Max-Cost": "5."}, True),
    ({"X-AI-Max-Cost": ".05"}, True),
    ({"X-AI-Max-Cost": "999999999.000000000000000001"}, True),
    ({"X-AI-Max-Cost": "0.000000000000000001"}, False),  # a 422: no model is that cheap
    ({"X-AI-Min-Quality": "0.8"}, True),
    ({"X-AI-Max-Latency-Ms": "999999999"}, True),
])
def test_well_formed_requirement_headers_at_their_bounds_are_taken(
        gateway: Gateway, headers: dict[str, str], served: bool) -> None:
    decision = gateway.admit(ai_request(chat(max_tokens=10), headers=headers))

    if served:
        assert decision.allowed, decision.body
        assert decision.ticket is not None
        gateway.settle(decision.ticket, Outcome(status=200, provider_usage=(1, 1)),
                       decision.context)
    else:
        assert decision.status == 422 and len(decision.body) < MESSAGE_BOUND


def test_a_huge_model_name_is_refused_without_being_echoed(gateway: Gateway) -> None:
    decision = gateway.admit(ai_request(chat(model="m" * 1_000_000, max_tokens=10)))

    assert decision.status == 400
    assert len(decision.body) < MESSAGE_BOUND
    assert "1,000,000 characters" in error_of(decision)["message"]


def test_a_model_name_not_on_the_tier_is_a_422_that_names_it(gateway: Gateway) -> None:
    decision = gateway.admit(ai_request(chat(model="model-fast", max_tokens=10)))

    assert decision.status == 422
    assert "model-fast: not allowed on tier 'pro'" in error_of(decision)["message"]


def test_a_huge_content_type_is_refused_with_a_bounded_message(gateway: Gateway) -> None:
    decision = gateway.admit(ai_request(headers={"content-type": "text/" + "x" * 1_000_000}))

    assert decision.status == 415
    assert len(decision.body) < MESSAGE_BOUND


# --------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "9" * 5_000, "1" * 19, "", "+5",
                                   " 5", "5 ", "0x10", "1_0"])
def test_content_length_is_ascii_digits_of_bounded_length_or_a_400(value: str) -> None:
    decision = declared_length({"content-length": value}, 1_048_576)

    assert isinstance(decision, Decision) and decision.status == 400
    assert len(decision.body) < MESSAGE_BOUND


def test_content_length_at_its_bounds() -> None:
    assert declared_length({"content-length": "000017"}, 100) == 17
    too_large = declared_length({"content-length": "9" * 18}, 100)
    assert isinstance(too_large, Decision) and too_large.status == 413


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is over loopback; the server's whole reply (it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@contextmanager
def real_server(adapter: str, config: dict[str, Any]) -> Iterator[int]:
    """The adapter's test app under its real server: Werkzeug's threaded server for the
    WSGI adapters, uvicorn for the ASGI ones. Yields the port."""
    from ai_saas_middleware.demo import serve_in_thread, serve_wsgi_in_thread

    closers: list[Callable[[], Any]] = []
    if adapter == "flask":
        from flask_app import make_flask_app

        from ai_saas_middleware.flask import EXTENSION_KEY

        flask_app = make_flask_app(config)
        closers.append(flask_app.extensions[EXTENSION_KEY].gateway.close)
        server: Any = serve_wsgi_in_thread(flask_app)
    elif adapter == "wsgi":
        from ai_saas_middleware.wsgi import AISaaSMiddleware as WSGIMiddleware

        def plain(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("200 OK", [("content-type", "application/json")])
            return [b"{}"]

        middleware = WSGIMiddleware(plain, config=config)
        closers.append(middleware.gateway.close)
        server = serve_wsgi_in_thread(middleware)
    elif adapter == "starlette":
        from starlette_app import make_starlette_app, middleware_of

        app = make_starlette_app(config)
        gateway = middleware_of(app).gateway
        closers.append(lambda: asyncio.run(gateway.close()))
        server = serve_in_thread(app)
    elif adapter in ("django-wsgi", "django-asgi"):
        from django_app import build_django_apps

        apps = build_django_apps(config)
        closers += [apps.gateway.close, lambda: asyncio.run(apps.agateway.close())]
        server = (serve_wsgi_in_thread(apps.wsgi) if adapter == "django-wsgi"
                  else serve_in_thread(apps.asgi))
    else:  # pragma: no cover
        raise ValueError(adapter)
    try:
        with server:
            yield server.port
    finally:
        for close in closers:
            close()


ADAPTERS = ["flask", "wsgi", "django-wsgi", "starlette", "django-asgi"]


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5_000, b"\xd9\xa1"],
                         ids=["superscript-two", "5000-digits", "arabic-digit-utf8"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_bad_content_length_under_a_real_server_is_a_400_not_a_500(
        make_config: Callable[..., dict[str, Any]], quota_used: Any, adapter: str,
        length: bytes) -> None:
    body = json.dumps(chat(max_tokens=10)).encode()
    request = (b"POST /ai/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               b"Content-Type: application/json\r\n"
               b"Authorization: Bearer " + API_KEYS["globex"].encode() + b"\r\n"
               b"Content-Length: " + length + b"\r\n\r\n" + body)
    with real_server(adapter, make_config()) as port:
        reply = raw_exchange(port, request)

    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 400"), reply[:300]
    assert quota_used("globex") == 0


async def call_asgi(app: Any, headers: list[tuple[bytes, bytes]], body: bytes
                    ) -> list[dict[str, Any]]:
    """One raw ASGI request, with header bytes no HTTP client library would send."""
    sent: list[dict[str, Any]] = []
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays until the reply is sent
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/ai/chat", "raw_path": b"/ai/chat",
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5_000],
                         ids=["superscript-two", "5000-digits"])
@pytest.mark.parametrize("adapter", ["starlette", "django-asgi"])
async def test_a_bad_content_length_reaching_an_asgi_adapter_is_a_400(
        make_config: Callable[..., dict[str, Any]], quota_used: Any, adapter: str,
        length: bytes) -> None:
    # uvicorn refuses these itself; other ASGI servers pass them on as bytes.
    body = json.dumps(chat(max_tokens=10)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"authorization", b"Bearer " + API_KEYS["globex"].encode()),
               (b"content-length", length)]
    if adapter == "starlette":
        from starlette_app import make_starlette_app, middleware_of

        app: Any = make_starlette_app(make_config())
        close: Any = middleware_of(app).gateway.close
    else:
        from django_app import build_django_apps

        apps = build_django_apps(make_config())
        app, close = apps.asgi, apps.agateway.close
        apps.gateway.close()
    try:
        sent = await call_asgi(app, headers, body)
    finally:
        await close()

    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert quota_used("globex") == 0


# --------------------------------------------------------------------------- item 13


def in_host_context(work: Callable[[], Any]) -> Any:
    """``work()`` run in a thread whose decimal context a host app has changed: four
    significant digits, and a trap on every rounding."""
    result: dict[str, Any] = {}

    def run() -> None:
        context = decimal.getcontext()  # this thread's own: other tests never see it
        context.prec = 4
        context.traps[decimal.Inexact] = context.traps[decimal.Rounded] = True
        try:
            result["value"] = work()
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_money_is_exact_whatever_decimal_context_the_host_app_set(
        gateway: Gateway, events: Any) -> None:
    small = gateway.config.models["model-small"]  # $0.00000015 in, $0.0000006 out

    def admit_and_settle() -> tuple[Decimal, str | None]:
        decision = gateway.admit(ai_request(chat(max_tokens=98_765),
                                            headers={"X-AI-Max-Cost": "0.0777775"}))
        assert decision.allowed and decision.ticket is not None, decision.body
        gateway.settle(decision.ticket, Outcome(status=200, provider_usage=(123_457, 98_765)),
                       decision.context)
        return cost_of(small, 123_457, 98_765), decision.context and decision.context.model.id

    cost, model = in_host_context(admit_and_settle)

    assert cost == Decimal("0.07777755")  # not 0.07778
    assert model == "model-small"
    [event] = events()
    assert event["cost"] == "0.07777755"


def test_routing_ranks_by_exact_cost_in_any_host_context() -> None:
    def profile(model_id: str, price_in: str) -> ModelProfile:
        return ModelProfile(model_id, "openai", Decimal(price_in), Decimal("0.000001"),
                            100_000, 0.5, 500)

    # Equal to four digits, different beyond: only exact arithmetic sees a-cheap cheaper.
    models = {"b-dear": profile("b-dear", "0.0000012346"),
              "a-cheap": profile("a-cheap", "0.0000012344")}
    tier = TierConfig("t", None, None, ("b-dear", "a-cheap"))
    needs = Requirements(1_000, 1, max_cost=Decimal("0.0012354"))

    selection = in_host_context(lambda: select_model(tier, models, needs))

    assert [m.id for m in selection.candidates] == ["a-cheap"]
    assert selection.explain() == "b-dear: expected cost $0.0012356 > $0.0012354"


# --------------------------------------------------------------------------- items 12, 16a


def problem_paths(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    return [p.path for p in caught.value.problems]


@pytest.mark.parametrize("ttl", [0, "0s", 0.5, "500ms", "0.9s"])
def test_a_dedupe_ttl_under_one_second_is_refused_naming_it(
        make_config: Callable[..., dict[str, Any]], ttl: Any) -> None:
    # SET ... EX 0 fails after settle.lua wrote the event and the counter: the replay of
    # the spooled settlement would then write them twice.
    assert problem_paths(make_config(redis={"dedupeTtl": ttl})) == ["redis.dedupeTtl"]


@pytest.mark.parametrize(("ttl", "seconds"), [(1, 1), ("1s", 1), ("36h", 129_600), (None, 86_400)])
def test_a_dedupe_ttl_of_a_second_or_more_is_taken(
        make_config: Callable[..., dict[str, Any]], ttl: Any, seconds: int) -> None:
    redis_section = {} if ttl is None else {"dedupeTtl": ttl}
    assert load_config(make_config(redis=redis_section)).redis.dedupe_ttl_s == seconds


def test_an_id_with_a_trailing_newline_is_not_a_tenant_id() -> None:
    assert is_valid_tenant_id("acme")
    assert not is_valid_tenant_id("acme\n")
    with pytest.raises(ValueError):
        KeySchema("p", 16).tenant("acme\n")


def test_config_values_with_a_trailing_newline_are_refused(
        make_config: Callable[..., dict[str, Any]]) -> None:
    config = make_config(redis={"keyPrefix": "aisaas\n"}, http={"tenantHeader": "X-Tenant\n"})
    config["tenant"]["tiers"][0]["name"] = "free\n"
    config["tenants"][1]["id"] = "globex\n"
    config["tenants"][2]["apiKeys"][0] += "\n"

    assert set(problem_paths(config)) >= {
        "tenant.tiers[0].name", "tenants[1].id", "tenants[2].apiKeys[0]", "redis.keyPrefix",
        "http.tenantHeader"}


def test_a_trusted_tenant_header_with_a_trailing_newline_is_refused(
        make_config: Callable[..., dict[str, Any]], rclient: Any, key_prefix: str) -> None:
    gateway = Gateway(make_config(http={"tenantHeader": "X-Tenant"}))
    try:
        decision = gateway.admit(RequestInfo("POST", "/ai/chat",
                                             {"content-type": "application/json",
                                              "x-tenant": "acme\n"},
                                             json.dumps(chat(max_tokens=10)).encode()))
    finally:
        gateway.close()

    assert decision.status == 401 and error_of(decision)["code"] == "invalid_tenant_id"
    assert list(rclient.scan_iter(match=f"{key_prefix}:*")) == []
