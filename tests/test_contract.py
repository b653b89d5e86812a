"""The contract table: one set of black-box scenarios, run through every adapter.

Starlette, Flask, Django under WSGI and Django under ASGI must answer each scenario with
the same status codes, the same headers of ours, the same JSON error bodies (byte for
byte), the same stream entries and the same quota counters.

How it runs
-----------
A scenario is a function of a :class:`Run`: the adapter's test app (``starlette_app``,
``flask_app``, ``django_app``) behind a *driver*, under a key prefix of its own, and
readers of what Redis recorded. Each (scenario, adapter) pair is a test of its own: it
asserts what the scenario means (statuses, error codes, event fields, quota) and keeps
what it saw in ``OBSERVED``. ``test_adapters_agree[scenario]`` then asserts the four
observations are equal, running any pair not yet run (so ``-k`` and reordering work).

The table: an admitted JSON request; the key in ``X-API-Key`` with requirement headers
choosing another model; the 11th request in a minute on the free tier (429); the
monthly quota exhausted (429); an unknown key and a missing one (401); a 10 MB body
(413); malformed JSON (400); a form body (415); requirements no model meets (422); an
SSE stream billed with the usage of its final chunk; a client that hangs up mid-stream
(billed as an estimate, ``client_disconnected``); usage reported by the view; a
provider call that falls back to the next model; the app's own 502; a view that raises
(500, reservation released); non-AI requests (no Redis command, no entry).

The drivers play the server, the same way for every adapter, so that a difference can
only come from the adapter:

- ASGI (the Starlette app, Django's ``ASGIHandler``): ``app(scope, receive, send)`` on an
  event loop in a thread that lives as long as the run (the async gateway's Redis
  connection belongs to one loop). ``receive`` gives the body, then waits like a client
  that keeps its connection open, or answers ``http.disconnect`` once the client hung
  up; what is sent after that is dropped (ASGI 2.3).
- WSGI (the Flask app, Django's ``WSGIHandler``): a PEP 3333 environ, the body iterated
  as a server does, ``close()`` at the end, or after N chunks when the client hangs up.

Test clients are not used: each has habits of its own (Starlette's and httpx's ASGI
transports buffer the whole response; Django's ``Client`` is not a WSGI server), and
none can hang up mid-stream the same way as the others.

What is compared
----------------
- Refusals (our JSON errors): status, every header, the body byte for byte.
- The app's responses: status, our headers (``X-Request-ID``, ``X-AI-Model``,
  ``RateLimit-*``, ``Retry-After``) by name and value, and the body (as JSON when it
  is JSON). A request id is replaced by a link to the stream entry it names (the one
  ``/ai/context`` echoes in its body is masked).
- Stream entries, as a multiset (entries of different shards written in the same
  millisecond have no order): every field but ``request_id``, ``ts`` and
  ``latency_ms``, and which response's ``X-Request-ID`` names the entry.
- The month's token counter of every tenant, and facts a scenario records (the Redis
  commands non-AI requests caused).

Differences between the adapters (the frameworks', not ours), where only our part is
compared:

1. A handler that raises: Starlette's 500 is made by ``ServerErrorMiddleware``, which
   Starlette always puts outside user middleware, so it carries no ``X-Request-ID`` or
   RateLimit headers, and the exception goes on to the server. Flask and Django turn
   the exception into a 500 response inside, which passes through our middleware and
   gets our headers. The error pages are the frameworks' own. Compared: the status,
   the stream entry (status 500, nothing billed) and the released reservation.
2. The frameworks' own pages (404 for an unknown path): their status only.
3. The app's own headers are its framework's: a stream's ``Content-Type`` is
   ``text/event-stream`` on Django and ``text/event-stream; charset=utf-8`` on
   Starlette and Flask; Django sends its responses without ``Content-Length`` (a server
   would add it, or chunk); Django's non-AI echo adds ``X-Body-Untouched``. Not
   compared on the app's responses (they are not ours). Our refusals carry the same
   ``Content-Type`` and ``Content-Length`` everywhere, and those are compared.
4. The test apps render JSON their framework's way (Django's ``JsonResponse`` with
   ``", "`` and ``": "`` separators, the others compact): the app's JSON bodies are
   compared parsed.
5. ``Retry-After`` and ``RateLimit-Reset`` of a quota refusal are the seconds to the
   end of the month, so they tick between runs: each run checks them against the
   clock, then they are masked. Those of a rate-limit refusal depend only on how long
   the burst took and are compared exactly.
6. Django < 5.0 under ASGI does not listen for ``http.disconnect`` while it streams, so
   a client that leaves while the provider stalls goes unnoticed until the stream
   resumes (the middleware sees no ``receive`` under Django): that pair is skipped there
   (``UNSUPPORTED``), and the other three adapters are compared.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import io
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar
from wsgiref.util import setup_testing_defaults

import django
import pytest
import redis
from conftest import API_KEYS, BASE_CONFIG, PATIENT_REDIS, PrefixCommands, body_then_disconnect
from django_app import build_django_apps
from flask_app import make_flask_app
from replies import CHAT, SSE_WORDS, completion, sse_body
from starlette_app import make_starlette_app, middleware_of

from ai_saas_middleware.bodies import wait_for_settlements
from ai_saas_middleware.flask import EXTENSION_KEY
from ai_saas_middleware.responses import refusal
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.usage import estimate_prompt_tokens, estimate_tokens

ADAPTERS = ("starlette", "flask", "django-wsgi", "django-asgi")
TENANTS = ("acme", "globex", "initech")  # free (10 req/min, 10000 tokens), pro, enterprise
OURS = frozenset({"x-request-id", "x-ai-model", "ratelimit-limit", "ratelimit-remaining",
                  "ratelimit-reset", "ratelimit-policy", "retry-after"})
VOLATILE = frozenset({"request_id", "ts", "latency_ms"})  # differ between any two requests
MASKED = "<masked>"
T = TypeVar("T")
APP_TIMEOUT_S = 5.0
UNSUPPORTED: dict[tuple[str, str], str] = {} if django.VERSION >= (5, 0) else {
    ("client_hangs_up", "django-asgi"): "Django < 5.0 does not notice a client leaving "
                                        "mid-stream under ASGI"}
REPLY = completion("model-small", "Hello there, my good friend!", 12, 34)  # /ai/chat, globex


# ------------------------------------------------------------------ what a client receives


@dataclass(frozen=True)
class Reply:
    """A response as the client got it; header names in lower case, in the order sent."""

    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...]  # the body's non-empty chunks, as they arrived
    raised: bool = False  # the app raised to the server (which then sends a 500)
    page: bool = False  # the framework's own page: only its status is in the contract

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {self.headers}"
        return values[0] if values else None

    def ours(self) -> dict[str, str]:
        return {k: v for k, v in self.headers if k in OURS}

    def error(self) -> dict[str, str]:
        """Our JSON error, checked for its shape."""
        assert self.header("content-type") == "application/json", self.headers
        assert self.header("content-length") == str(len(self.body))
        payload = json.loads(self.body)
        assert set(payload) == {"error"} and set(payload["error"]) == {"type", "code", "message"}
        error: dict[str, str] = payload["error"]
        return error

    def masked(self, *names: str) -> Reply:
        return replace(self, headers=tuple((k, MASKED if k in names else v)
                                           for k, v in self.headers))


# ------------------------------------------------------------------ drivers (the server side)


class Driver(Protocol):
    def call(self, method: str, path: str, headers: dict[str, str], body: bytes,
             hang_up_after: int | None) -> Reply:
        """Send one request; with ``hang_up_after``, leave after that many body chunks."""

    def settled(self) -> None:
        """Return once every settlement the adapter started has ended."""


def request_headers(method: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
    """What a client sends: a Host, the given headers, a Content-Length for a body."""
    out = {"host": "testserver", **{k.lower(): v for k, v in headers.items()}}
    if body or method not in ("GET", "HEAD"):
        out["content-length"] = str(len(body))
    return out


class WSGIDriver:
    """A WSGI server, as far as the app can tell (PEP 3333)."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app

    def call(self, method: str, path: str, headers: dict[str, str], body: bytes,
             hang_up_after: int | None) -> Reply:
        environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path,
                                   "QUERY_STRING": "", "SERVER_NAME": "testserver",
                                   "SERVER_PORT": "80", "wsgi.input": io.BytesIO(body)}
        for name, value in request_headers(method, headers, body).items():
            key = name.upper().replace("-", "_")
            environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
        setup_testing_defaults(environ)
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(status: str, response_headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], Any]:
            started["status"] = int(status.split(" ", 1)[0])
            started["headers"] = tuple((k.lower(), v) for k, v in response_headers)
            return lambda data: chunks.append(data) if data else None

        try:
            result = self.app(environ, start_response)
        except Exception:
            return Reply(500, (), (), raised=True)  # what the server answers then
        try:
            for chunk in result:
                if chunk:
                    chunks.append(chunk)
                if hang_up_after is not None and len(chunks) >= hang_up_after:
                    break  # the client is gone: the server stops asking for more
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return Reply(started["status"], started["headers"], tuple(chunks))

    def settled(self) -> None:
        pass  # WSGI settles before close() returns


class ASGIDriver:
    """An ASGI server with an event loop of its own, in a thread, for the whole run."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="asgi-driver",
                                       daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the driver's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(APP_TIMEOUT_S * 2)

    def call(self, method: str, path: str, headers: dict[str, str], body: bytes,
             hang_up_after: int | None) -> Reply:
        return self.run(self._call(method, path, headers, body, hang_up_after))

    async def _call(self, method: str, path: str, headers: dict[str, str], body: bytes,
                    hang_up_after: int | None) -> Reply:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": method, "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                             for k, v in request_headers(method, headers, body).items()],
                 "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
        hung_up = asyncio.Event()
        # The body, then a client that keeps its connection open until it hangs up.
        receive = body_then_disconnect(body, hung_up)
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if hung_up.is_set():
                return  # nobody is listening any more
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                started["headers"] = tuple((k.decode("latin-1").lower(), v.decode("latin-1"))
                                           for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if hang_up_after is not None and len(chunks) >= hang_up_after:
                    hung_up.set()

        raised = False
        try:
            await asyncio.wait_for(self.app(scope, receive, send), APP_TIMEOUT_S)
        except asyncio.TimeoutError:  # not yet the built-in TimeoutError on Python 3.10
            raise AssertionError(f"{method} {path}: the app did not finish in "
                                 f"{APP_TIMEOUT_S}s") from None
        except Exception:
            raised = True
        if not started:
            return Reply(500, (), (), raised=raised)  # the server's own 500
        return Reply(started["status"], started["headers"], tuple(chunks), raised=raised)

    def settled(self) -> None:
        self.run(wait_for_settlements())

    def shut_down(self, *closers: Callable[[], Awaitable[None]]) -> None:
        async def close_all() -> None:
            await wait_for_settlements()
            for close in closers:
                await close()

        try:
            self.run(close_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(APP_TIMEOUT_S)
            self.loop.close()


@contextmanager
def serve(adapter: str, config: dict[str, Any]) -> Iterator[Driver]:
    """The adapter's test app, configured with ``config``, behind its driver."""
    if adapter == "starlette":
        app = make_starlette_app(config)
        asgi = ASGIDriver(app)
        try:
            yield asgi
        finally:
            asgi.shut_down(middleware_of(app).gateway.close)
    elif adapter == "flask":
        flask_app = make_flask_app(config)
        try:
            yield WSGIDriver(flask_app)
        finally:
            flask_app.extensions[EXTENSION_KEY].gateway.close()
    elif adapter == "django-wsgi":
        apps = build_django_apps(config)
        try:
            yield WSGIDriver(apps.wsgi)
        finally:
            apps.gateway.close()
            asyncio.run(apps.agateway.close())
    elif adapter == "django-asgi":
        apps = build_django_apps(config)
        asgi = ASGIDriver(apps.asgi)
        try:
            yield asgi
        finally:
            apps.gateway.close()
            asgi.shut_down(apps.agateway.close)
    else:  # pragma: no cover
        raise ValueError(adapter)


# ------------------------------------------------------------------ one run of a scenario


@dataclass
class Observation:
    """What one scenario did on one adapter."""

    replies: list[Reply]
    events: list[dict[str, str]]
    quota: dict[str, int]
    facts: dict[str, Any]


@dataclass
class Run:
    """One scenario on one adapter, under a key prefix of its own."""

    adapter: str
    server: Driver
    rclient: redis.Redis
    prefix: str
    replies: list[Reply] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    _commands: PrefixCommands | None = None

    def send(self, method: str, path: str, *, tenant: str | None = "globex",
             body: Any = CHAT, raw: bytes | None = None,
             content_type: str | None = "application/json",
             headers: dict[str, str] | None = None, hang_up_after: int | None = None,
             page: bool = False) -> Reply:
        """A request as a client sends it: ``tenant``'s API key, ``body`` as JSON (or
        ``raw`` bytes), more ``headers``. ``page``: the framework answers with a page of
        its own, whose status alone is compared."""
        if method == "GET":
            raw, content_type = b"", None
        elif raw is None:
            raw = json.dumps(body).encode()
        sent = {"Authorization": f"Bearer {API_KEYS[tenant]}"} if tenant else {}
        if content_type is not None:
            sent["Content-Type"] = content_type
        reply = self.server.call(method, path, {**sent, **(headers or {})}, raw, hang_up_after)
        reply = replace(reply, page=page)
        self.replies.append(reply)
        return reply

    def post(self, path: str, **kwargs: Any) -> Reply:
        return self.send("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.send("GET", path, **kwargs)

    def mask(self, reply: Reply, *names: str, json_body: Any = None) -> None:
        """Mask headers ``names`` of a reply already kept (values that tick with the
        clock), or put ``json_body`` in place of its JSON body (with values masked)."""
        masked = reply.masked(*names)
        if json_body is not None:
            masked = replace(masked, chunks=(json.dumps(json_body).encode(),))
        self.replies[self.replies.index(reply)] = masked

    def events(self) -> list[dict[str, str]]:
        """Every stream entry under this run's prefix, once settled (no order)."""
        self.server.settled()
        out: list[dict[str, str]] = []
        for stream in self.rclient.scan_iter(match=f"{self.prefix}:*:usage", count=1000):
            entries: Any = self.rclient.xrange(stream)
            out += [fields for _, fields in entries]
        return out

    def quota_used(self, tenant: str) -> int:
        """The tenant's token counter of the current month, once settled."""
        self.server.settled()
        key = KeySchema(self.prefix, 16).tenant(tenant).quota(time.strftime("%Y-%m",
                                                                            time.gmtime()))
        return int(self.rclient.get(key) or 0)

    def redis_commands(self) -> int:
        """Commands Redis has run on this run's keys so far (conftest.PrefixCommands: other
        tests' background work cannot enter the count)."""
        if self._commands is None:
            url = "redis://{host}:{port}/{db}".format(
                **self.rclient.connection_pool.connection_kwargs)
            self._commands = PrefixCommands(url, self.prefix)
        return self._commands.count()

    def close(self) -> None:
        if self._commands is not None:
            self._commands.close()

    def observation(self) -> Observation:
        return Observation(list(self.replies), self.events(),
                           {tenant: self.quota_used(tenant) for tenant in TENANTS},
                           dict(self.facts))


def contract_config(redis_url: str, prefix: str, spool_dir: Path) -> dict[str, Any]:
    config = copy.deepcopy(BASE_CONFIG)
    config["redis"] = {"url": redis_url, "keyPrefix": prefix, "spoolDir": str(spool_dir),
                       **PATIENT_REDIS}
    return config


def event_has(event: dict[str, str], **expected: Any) -> None:
    """``event``'s fields named in ``expected`` have those values (compared as text)."""
    assert {k: event.get(k) for k in expected} == {k: str(v) for k, v in expected.items()}


# Every admitted request of the scenarios below, unless they say otherwise.
GLOBEX_CHAT = dict(tenant_id="globex", tier="pro", model_id="model-small", provider="openai",
                   prompt_tokens=12, completion_tokens=34, usage_source="provider",
                   cost="0.0000222", status=200, cache="miss", fallback_from="",
                   outcome_value="", endpoint="/ai/*", client_disconnected="false")


# ------------------------------------------------------------------ the scenarios

Scenario = Callable[[Run], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def admitted_json(run: Run) -> None:
    reply = run.post("/ai/chat")
    assert reply.status == 200, reply.body
    assert json.loads(reply.body) == REPLY
    ours = reply.ours()
    assert ours.pop("x-request-id").startswith("req_")
    assert ours == {"x-ai-model": "model-small", "ratelimit-limit": "100",
                    "ratelimit-remaining": "99", "ratelimit-reset": "60",
                    "ratelimit-policy": "100;w=60"}
    [event] = run.events()
    assert event["request_id"] == reply.header("x-request-id")
    event_has(event, **GLOBEX_CHAT)
    assert run.quota_used("globex") == 46


@scenario
def requirement_headers(run: Run) -> None:
    """The key in X-API-Key, and requirement headers that make another model the
    cheapest eligible one (the adapters hand the core every header, by its name)."""
    reply = run.post("/ai/chat", tenant=None, headers={
        "X-API-Key": API_KEYS["globex"], "X-AI-Min-Quality": "0.8", "X-AI-Max-Latency-Ms": "3000"})
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["model"] == reply.header("x-ai-model") == "model-medium"
    [event] = run.events()
    assert event["request_id"] == reply.header("x-request-id")
    event_has(event, **{**GLOBEX_CHAT, "model_id": "model-medium", "provider": "anthropic",
                        "cost": "0.000546"})  # 12 x 0.000003 + 34 x 0.000015
    assert run.quota_used("globex") == 46


@scenario
def rate_limited(run: Run) -> None:
    """The 11th request within a minute on the free tier (10 requests a minute)."""
    started = time.monotonic()
    admitted = [run.post("/ai/chat", tenant="acme") for _ in range(10)]
    refused = run.post("/ai/chat", tenant="acme")
    burst_s = time.monotonic() - started
    assert [r.status for r in admitted] == [200] * 10
    assert [r.header("ratelimit-remaining") for r in admitted] == \
        [str(n) for n in range(9, -1, -1)]
    # The window frees its first slot 60 s after the first request; the seconds below are
    # exact because the burst took less than one.
    assert burst_s < 1, f"11 requests took {burst_s:.2f}s: the seconds below would be 59"
    assert refused.status == 429
    error = refused.error()
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert refused.ours() == {"retry-after": "60", "ratelimit-limit": "10",
                              "ratelimit-remaining": "0", "ratelimit-reset": "60",
                              "ratelimit-policy": "10;w=60"}
    events = run.events()
    assert sorted(e["request_id"] for e in events) == \
        sorted(r.header("x-request-id") or "" for r in admitted)  # the refusal is not recorded
    for event in events:
        event_has(event, tenant_id="acme", tier="free", model_id="model-fast", status=200,
                  usage_source="provider")
    assert run.quota_used("acme") == 10 * 46


@scenario
def quota_exhausted(run: Run) -> None:
    """Three requests of 3012 tokens fill most of the free tier's 10000; the fourth,
    reserving 3013 (prompt estimate + max_tokens), cannot fit."""
    big = {**CHAT, "max_tokens": 3000, "reply_usage": [12, 3000]}
    admitted = [run.post("/ai/chat", tenant="acme", body=big) for _ in range(3)]
    assert [r.status for r in admitted] == [200] * 3
    refused = run.post("/ai/chat", tenant="acme", body=big)
    assert refused.status == 429
    error = refused.error()
    assert (error["type"], error["code"]) == ("insufficient_quota", "quota_exceeded")
    ours = refused.ours()
    retry_after = int(ours.pop("retry-after"))
    assert abs(retry_after - seconds_to_next_month()) <= 2
    assert ours == {"ratelimit-limit": "10000", "ratelimit-remaining": str(10000 - 3 * 3012),
                    "ratelimit-reset": str(retry_after),
                    "ratelimit-policy": '10000;w=2592000;name="tokens"'}
    run.mask(refused, "retry-after", "ratelimit-reset")
    events = run.events()
    assert len(events) == 3
    for event in events:
        event_has(event, tenant_id="acme", prompt_tokens=12, completion_tokens=3000,
                  usage_source="provider")
    assert run.quota_used("acme") == 3 * 3012  # settled to the provider's figures


def refused_with(reply: Reply, status: int, code: str, message: str | None = None) -> str:
    """Assert a refusal; returns its message. With ``message``, the body is the core's
    exact bytes for it."""
    assert reply.status == status, reply.body
    error = reply.error()
    assert error["code"] == code
    assert reply.ours() == {}
    if message is not None:
        assert reply.body == refusal(code, message).body
    return error["message"]


def nothing_recorded(run: Run) -> None:
    assert run.events() == []
    assert {tenant: run.quota_used(tenant) for tenant in TENANTS} == dict.fromkeys(TENANTS, 0)


@scenario
def unknown_key(run: Run) -> None:
    reply = run.post("/ai/chat", tenant=None, headers={"Authorization": "Bearer not-a-key"})
    refused_with(reply, 401, "invalid_api_key", "the API key is not valid")
    nothing_recorded(run)


@scenario
def missing_key(run: Run) -> None:
    reply = run.post("/ai/chat", tenant=None)
    refused_with(reply, 401, "missing_api_key",
                 "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    nothing_recorded(run)


@scenario
def body_too_large(run: Run) -> None:
    reply = run.post("/ai/chat", raw=b"x" * (10 * 1024 * 1024))
    refused_with(reply, 413, "request_too_large",
                 "request body is larger than the limit of 1048576 bytes")
    nothing_recorded(run)


@scenario
def malformed_json(run: Run) -> None:
    message = refused_with(run.post("/ai/chat", raw=b'{"messages": [{"role"'), 400,
                           "invalid_json")
    assert message.startswith("request body is not valid JSON")
    nothing_recorded(run)


@scenario
def wrong_content_type(run: Run) -> None:
    reply = run.post("/ai/chat", raw=b"hello=there",
                     content_type="application/x-www-form-urlencoded")
    refused_with(reply, 415, "unsupported_media_type",
                 "this endpoint takes application/json, not application/x-www-form-urlencoded")
    nothing_recorded(run)


@scenario
def impossible_requirements(run: Run) -> None:
    reply = run.post("/ai/chat", headers={"X-AI-Min-Quality": "0.99"})
    message = refused_with(reply, 422, "no_eligible_model")
    assert "quality" in message and "model-large" in message
    nothing_recorded(run)


@scenario
def streamed(run: Run) -> None:
    reply = run.post("/ai/stream")
    assert reply.status == 200
    assert (reply.header("content-type") or "").startswith("text/event-stream")
    assert reply.chunks == tuple(sse_body())  # passed on chunk by chunk, intact
    assert reply.ours()["x-ai-model"] == "model-small"
    [event] = run.events()
    assert event["request_id"] == reply.header("x-request-id")
    event_has(event, **GLOBEX_CHAT)  # the usage of the final chunk
    assert run.quota_used("globex") == 46


@scenario
def client_hangs_up(run: Run) -> None:
    """Three content chunks, the provider stalls, the client leaves: what was produced
    is billed, as an estimate."""
    reply = run.post("/ai/stream-stalls", hang_up_after=3)
    assert reply.status == 200
    assert reply.chunks == tuple(sse_body()[:3])
    [event] = run.events()
    assert event["request_id"] == reply.header("x-request-id")
    prompt = estimate_prompt_tokens(CHAT)
    produced = estimate_tokens(len("".join(SSE_WORDS[:3])))
    event_has(event, client_disconnected="true", usage_source="estimate", status=200,
              prompt_tokens=prompt, completion_tokens=produced, model_id="model-small")
    assert Decimal(event["cost"]) == prompt * Decimal("0.00000015") + \
        produced * Decimal("0.0000006")
    assert run.quota_used("globex") == prompt + produced


@scenario
def handler_reports_usage(run: Run) -> None:
    """The view reports usage (5 + 7) and the model that answered: that wins over the
    provider's figures in the body, and is priced on the answering model."""
    asked = {**CHAT, "answered_by": "model-large"}
    reply = run.post("/ai/context", body=asked)
    assert reply.status == 200, reply.body
    payload = json.loads(reply.body)
    assert payload["ctx"].pop("request_id") == reply.header("x-request-id")
    assert payload["ctx"] == {"same_object": True, "tenant_id": "globex", "tier": "pro",
                              "model": "model-small", "max_output_tokens": 32, "body": asked,
                              "candidates": ["model-small", "model-large", "model-medium"]}
    run.mask(reply, json_body=payload)
    [event] = run.events()
    event_has(event, **{**GLOBEX_CHAT, "usage_source": "handler", "prompt_tokens": 5,
                        "completion_tokens": 7, "model_id": "model-large",
                        "fallback_from": "model-small", "outcome_value": "0.25",
                        "cost": "0.0000825"})  # 5 x 0.0000025 + 7 x 0.00001
    assert run.quota_used("globex") == 12


@scenario
def fallback(run: Run) -> None:
    """ctx.execute (ctx.aexecute on Starlette): the first candidate fails, the next one
    answers, and is the one billed."""
    reply = run.post("/ai/fallback")
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["tried"] == ["model-small", "model-large"]
    assert reply.header("x-ai-model") == "model-small"  # chosen at admission
    [event] = run.events()
    event_has(event, **{**GLOBEX_CHAT, "model_id": "model-large",
                        "fallback_from": "model-small",
                        "cost": "0.00037"})  # 12 x 0.0000025 + 34 x 0.00001
    assert run.quota_used("globex") == 46


@scenario
def every_model_down(run: Run) -> None:
    """ctx.execute runs out of models (each one's provider call fails): the handler lets
    NoHealthyModel out, and every adapter answers its 503, never a 500."""
    reply = run.post("/ai/all-down")
    assert reply.status == 503, reply.body
    assert json.loads(reply.body)["error"]["code"] == "no_healthy_model"
    assert reply.header("retry-after") is not None
    [event] = run.events()
    assert event["request_id"] == reply.header("x-request-id")
    event_has(event, status=503, prompt_tokens=0, completion_tokens=0, cost=0)
    assert run.quota_used("globex") == 0


@scenario
def upstream_error(run: Run) -> None:
    """The app's own 502 (no usage in it) passes intact; nothing is billed."""
    reply = run.post("/ai/upstream-down")
    assert reply.status == 502
    assert json.loads(reply.body) == {"error": {"type": "upstream_error",
                                                "message": "provider is down"}}
    [event] = run.events()
    assert event["request_id"] == reply.header("x-request-id")
    event_has(event, status=502, prompt_tokens=0, completion_tokens=0, cost=0,
              usage_source="estimate", client_disconnected="false")
    assert run.quota_used("globex") == 0


@scenario
def handler_raises(run: Run) -> None:
    reply = run.post("/ai/boom", page=True)
    assert reply.status == 500
    assert reply.raised == (run.adapter == "starlette")  # Starlette re-raises to the server
    [event] = run.events()
    event_has(event, status=500, prompt_tokens=0, completion_tokens=0, cost=0,
              usage_source="estimate", client_disconnected="false")
    if reply.header("x-request-id") is not None:  # not on Starlette (see the docstring)
        assert event["request_id"] == reply.header("x-request-id")
    assert run.quota_used("globex") == 0  # the reservation was released


@scenario
def non_ai_requests(run: Run) -> None:
    before = run.redis_commands()
    home = run.get("/")
    other = run.get("/aix")  # only starts like an AI path
    echo = run.post("/echo", content_type="application/octet-stream")  # a key, a body
    missing = run.get("/nowhere", page=True)
    run.facts["redis_commands"] = run.redis_commands() - before
    assert run.facts["redis_commands"] == 0
    assert (home.status, home.body) == (other.status, other.body) == (200, b"home")
    assert (echo.status, echo.body) == (200, json.dumps(CHAT).encode())
    assert missing.status == 404
    for reply in (home, other, echo, missing):
        assert reply.ours() == {}
    assert run.events() == []
    # The measure does see the middleware: an AI request moves it.
    assert run.post("/ai/chat").status == 200
    assert run.redis_commands() > before
    assert len(run.events()) == 1


def seconds_to_next_month() -> int:
    now = time.time()
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) - int(now)


# ------------------------------------------------------------------ comparing observations


def contract(observation: Observation) -> dict[str, Any]:
    """The part of an observation that must be the same on every adapter."""
    answered_by: dict[str, int] = {}  # request id -> the reply that carries it
    replies: list[dict[str, Any]] = []
    for index, reply in enumerate(observation.replies):
        view: dict[str, Any] = {"status": reply.status}
        request_id = reply.header("x-request-id")
        if reply.page:
            pass
        elif request_id is None and reply.status >= 400:  # our refusal: all of it is ours
            view["headers"] = sorted(reply.headers)
            view["body"] = reply.body
        else:  # the app's response: our headers, and the app's body as it sent it
            if request_id is not None:
                answered_by[request_id] = index
            view["headers"] = sorted((k, "<request id>" if k == "x-request-id" else v)
                                     for k, v in reply.ours().items())
            content_type = reply.header("content-type") or ""
            view["body"] = (json.loads(reply.body) if content_type.startswith("application/json")
                            else reply.body)
        replies.append(view)
    events = [{**{k: v for k, v in event.items() if k not in VOLATILE},
               "answers": answered_by.get(event["request_id"])}
              for event in observation.events]
    return {"replies": replies,
            "events": sorted(events, key=lambda e: json.dumps(e, sort_keys=True)),
            "quota": observation.quota, "facts": observation.facts}


def check_request_ids(observation: Observation) -> None:
    """Each X-Request-ID names one stream entry; entries have distinct request ids."""
    ids = [event["request_id"] for event in observation.events]
    assert len(set(ids)) == len(ids)
    for reply in observation.replies:
        request_id = reply.header("x-request-id")
        assert request_id is None or ids.count(request_id) == 1, (request_id, ids)


OBSERVED: dict[tuple[str, str], Observation] = {}


@pytest.fixture
def observe(redis_server_url: str, rclient: redis.Redis,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Observation]:
    """``observe(scenario, adapter)``: run it once (fresh key prefix), then remember it."""

    def observe(name: str, adapter: str) -> Observation:
        if (name, adapter) not in OBSERVED:
            prefix = "c" + uuid.uuid4().hex[:12]
            config = contract_config(redis_server_url, prefix, tmp_path_factory.mktemp("spool"))
            with serve(adapter, config) as server:
                run = Run(adapter, server, rclient, prefix)
                try:
                    SCENARIOS[name](run)
                    observation = run.observation()
                finally:
                    run.close()
            check_request_ids(observation)
            OBSERVED[name, adapter] = observation
        return OBSERVED[name, adapter]

    return observe


@pytest.mark.parametrize(("name", "adapter"),
                         [(name, adapter) for name in SCENARIOS for adapter in ADAPTERS],
                         ids=[f"{name}-{adapter}" for name in SCENARIOS for adapter in ADAPTERS])
def test_scenario(name: str, adapter: str, observe: Callable[[str, str], Observation]) -> None:
    if (name, adapter) in UNSUPPORTED:
        pytest.skip(UNSUPPORTED[name, adapter])
    observe(name, adapter)


@pytest.mark.parametrize("name", SCENARIOS)
def test_adapters_agree(name: str, observe: Callable[[str, str], Observation]) -> None:
    first, *others = [adapter for adapter in ADAPTERS if (name, adapter) not in UNSUPPORTED]
    expected = contract(observe(name, first))
    for adapter in others:
        assert contract(observe(name, adapter)) == expected, \
            f"{name}: {adapter} differs from {first}"
