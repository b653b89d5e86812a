"""What the middleware adds to a Starlette, Flask or Django endpoint, against a real Redis.

One endpoint (POST JSON in, a small OpenAI-style JSON with ``usage`` out) in several
variants, driven in-process through a minimal ASGI harness (scope, receive, send: no
HTTP client in the measurement), interleaved round-robin in blocks so that drift (CPU
frequency, the host, Redis memory growing) hits all of them alike:

- ``bare``        the Starlette endpoint alone;
- ``middleware``  the same app with :class:`ai_saas_middleware.starlette.AISaaSMiddleware`
                  (a static tenant with an API key, limits far above what the run uses),
                  timed two ways: *client-visible*, until the final ``http.response.body``
                  is handed to ``send``, and *whole call*, until the app call returns
                  (settlement included);
- ``slowapi``     the same endpoint with slowapi and Redis storage (the peer);
- ``floor``       one EVALSHA of a trivial script with ``redis.asyncio``, the kind of
                  client the ASGI path uses, made the usual way (a pooled client and its
                  ``register_script``, the middleware's default timeouts);
- ``conn``        for reference, the same EVALSHA on one dedicated ``redis.asyncio``
                  connection (no pool checkout, one timeout around the exchange), which
                  is how the middleware's store sends its scripts.

Redis round trips per AI request are counted server-side, from ``INFO commandstats``
deltas over the measured middleware requests: every command Redis ran, including those
it ran inside the Lua scripts (listed, but not round trips). A non-AI request through
the same app must cause no command at all, and every AI request exactly one stream entry.

Then a served run: each variant under uvicorn (1 worker, no access log) driven by ``wrk``
over loopback for a fixed number of seconds, interleaved and repeated, medians of
requests/s, with the CPU time uvicorn and redis-server spent per request.

Pinning (Linux): this process and the redis-server it starts run on ``--cpu`` (default
0), because loopback round trips here are bimodal (about 30 us when client and server
share a CPU, about 75 us when not). In the served run uvicorn stays on ``--cpu`` and wrk
runs on ``--load-cpu`` (default 1); Redis runs first beside uvicorn, then (full run, our
own redis-server only) beside wrk, the nearer picture of a Redis on another machine.

The same method on the other frameworks (``--framework``), each in the same run as its
own floor:

- ``flask``   a Flask view; + :class:`ai_saas_middleware.flask.AISaaS`; + flask-limiter
              with Redis storage (the peer);
- ``django``  a Django view under ``WSGIHandler``; + ``AISaaSMiddleware``; +
              django-ratelimit on a django-redis cache (the peer);

driven as a WSGI server drives an app (an environ as gunicorn makes it, then the body
iterated, then ``close()``): *client-visible* until the last non-empty body chunk came
out, *whole call* until ``close()`` returned (settlement included). The floor is one
EVALSHA with redis-py's sync client (pooled, ``register_script``, the middleware's
timeouts), the kind of client the WSGI path uses; the reference, the same EVALSHA down
one dedicated socket (hiredis). And

- ``django-asgi``  an async Django view under ``ASGIHandler`` (the ASGI harness above),
                   with and without ``AISaaSMiddleware``; the floor is ``redis.asyncio``'s
                   (django-ratelimit has no async form: no peer). A quarter of the
                   requests: each costs about eight WSGI ones.

Their served runs: gunicorn (1 sync worker) for Flask and Django WSGI, uvicorn for
Django ASGI, on ``--cpu`` with Redis beside it; wrk on ``--load-cpu``.

    python benchmarks/overhead.py                  # everything, about 5 minutes
    python benchmarks/overhead.py --framework starlette        # about 2 minutes
    python benchmarks/overhead.py --framework flask,django     # about 2.5 minutes
    python benchmarks/overhead.py --quick          # smoke run, under a minute
    python benchmarks/overhead.py --redis-url redis://127.0.0.1:6379/0 --json out.json

Needs the ``bench`` extra (slowapi, flask-limiter, django-ratelimit, django-redis,
uvicorn, gunicorn); the served run needs ``wrk`` on PATH (Debian: ``apt-get install
wrk``) and is skipped, with a note, without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from ai_saas_middleware.config import RedisConfig

API_KEY = "bench-key-0123456789"
TENANT = "bench-co"
AI_PATH = "/ai/chat"
PLAIN_PATH = "/health"
REQUEST_BODY = json.dumps({
    "model": "auto",
    "messages": [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 64,
}, separators=(",", ":")).encode()
HUGE = 1_000_000_000  # requests/min and tokens/month: never refused in a run
NON_AI_REQUESTS = 1000
DJANGO_URLCONF = "ai_saas_bench_urls"
Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]
Environ = dict[str, Any]
WSGIApp = Callable[[Environ, Callable[..., Any]], Any]


@dataclass(frozen=True)
class Framework:
    name: str
    ours: str  # our adapter
    peer: str | None  # the framework's usual Redis-backed rate limiter
    # Commands the peer's own Lua script runs (Redis counts them; they are not round trips)
    peer_script_commands: frozenset[str]
    server: str  # the served run's app server
    asgi: bool  # driven as an ASGI app (else as WSGI), floor on redis.asyncio
    reference: str | None  # the label of the dedicated-connection EVALSHA, if measured

    @property
    def variants(self) -> tuple[str, ...]:
        """The apps measured: bare, + our middleware, + the peer if there is one."""
        return ("bare", "middleware", *(("peer",) if self.peer else ()))

    @property
    def floor_client(self) -> str:
        return "redis.asyncio client" if self.asgi else "redis-py sync client"


UVICORN = "uvicorn (1 worker, --no-access-log)"
GUNICORN = "gunicorn (1 sync worker)"
LIMITS_SCRIPT = frozenset({"incrby", "expire"})  # limits' incr_expire.lua (fixed window)
FRAMEWORKS = {
    "starlette": Framework("Starlette", "AISaaSMiddleware", "slowapi", LIMITS_SCRIPT, UVICORN,
                           True, "reference: same EVALSHA, one dedicated redis.asyncio "
                                 "connection"),
    "flask": Framework("Flask", "AISaaS (Flask extension)", "flask-limiter", LIMITS_SCRIPT,
                       GUNICORN, False,
                       "reference: same EVALSHA, one dedicated socket (hiredis)"),
    "django": Framework("Django (WSGI)", "AISaaSMiddleware", "django-ratelimit",
                        frozenset({"exists", "incrby"}),  # django-redis's incr() script
                        GUNICORN, False,
                        "reference: same EVALSHA, one dedicated socket (hiredis)"),
    # django-ratelimit has no async decorator: no peer on the ASGI path
    "django-asgi": Framework("Django (ASGI)", "AISaaSMiddleware", None, frozenset(), UVICORN,
                             True, None),
}


# --------------------------------------------------------------------------- the apps

def bench_config(redis_url: str, prefix: str) -> dict[str, Any]:
    """One tier with limits far above the run, one static tenant, one AI endpoint."""
    return {
        "tenant": {"tiers": [{"name": "bench", "monthlyQuota": HUGE, "rateLimit": HUGE,
                              "allowedModels": ["model-small", "model-medium"]}]},
        "models": [
            {"id": "model-small", "provider": "openai", "costPerInputToken": "0.00000015",
             "costPerOutputToken": "0.0000006", "maxTokens": 128000, "qualityScore": 0.62,
             "latencyP99Ms": 900},
            {"id": "model-medium", "provider": "anthropic", "costPerInputToken": "0.000003",
             "costPerOutputToken": "0.000015", "maxTokens": 200000, "qualityScore": 0.85,
             "latencyP99Ms": 2500},
        ],
        "tenants": [{"id": TENANT, "tier": "bench",
                     "apiKeys": ["sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()]}],
        "endpoints": [{"path": "/ai/*", "defaultMaxOutputTokens": 256}],
        "redis": {"url": redis_url, "keyPrefix": prefix, "spoolDir": spool_dir(prefix)},
    }


def spool_dir(prefix: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"ai-saas-spool-{prefix}")


def chat_reply(model: str) -> dict[str, Any]:
    """What every framework's endpoint answers."""
    return {
        "id": "chatcmpl-bench", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello, benchmark."}}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25},
    }


def build_app(framework: str, variant: str, redis_url: str, prefix: str) -> Any:
    """The app of one framework and variant (``bare``, ``middleware`` or ``peer``)."""
    if variant not in FRAMEWORKS[framework].variants:
        raise ValueError(f"no {framework} app for variant {variant!r}")
    if framework == "starlette":
        return build_starlette_app(variant, redis_url, prefix)
    if framework == "flask":
        return build_flask_app(variant, redis_url, prefix)
    return build_django_app(variant, redis_url, prefix, asynchronous=framework == "django-asgi")


def build_starlette_app(variant: str, redis_url: str, prefix: str) -> Any:
    """The Starlette app of one variant; the endpoint is the same function in all."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(chat_reply(body.get("model", "model-small")))

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    middleware: list[Any] = []
    endpoint: Any = chat
    limiter = None
    if variant == "middleware":
        from ai_saas_middleware.starlette import AISaaSMiddleware
        middleware.append(Middleware(AISaaSMiddleware, config=bench_config(redis_url, prefix)))
    elif variant == "peer":
        from slowapi import Limiter

        def api_key(request: Request) -> str:
            return request.headers.get("authorization", "anonymous")

        limiter = Limiter(key_func=api_key, storage_uri=redis_url, key_prefix=prefix)
        endpoint = limiter.limit(f"{HUGE}/minute")(chat)
    app = Starlette(routes=[Route(AI_PATH, endpoint, methods=["POST"]),
                            Route(PLAIN_PATH, health)],
                    middleware=middleware)
    if limiter is not None:
        from slowapi import _rate_limit_exceeded_handler
        from slowapi.errors import RateLimitExceeded
        app.state.limiter = limiter
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    return app


def build_flask_app(variant: str, redis_url: str, prefix: str) -> Any:
    """The Flask app of one variant; the view is the same function in all."""
    from flask import Flask, request

    app = Flask(__name__)

    def chat() -> Any:
        body = request.get_json()
        return chat_reply(body.get("model", "model-small"))

    def health() -> str:
        return "ok"

    view: Any = chat
    if variant == "middleware":
        from ai_saas_middleware.flask import AISaaS
        AISaaS(app, config=bench_config(redis_url, prefix))
    elif variant == "peer":
        from flask_limiter import Limiter

        def api_key() -> str:
            return request.headers.get("Authorization", "anonymous")

        limiter = Limiter(api_key, app=app, storage_uri=redis_url, key_prefix=prefix)
        view = limiter.limit(f"{HUGE}/minute")(chat)
    app.add_url_rule(AI_PATH, "chat", view, methods=["POST"])
    app.add_url_rule(PLAIN_PATH, "health", health)
    return app


def setup_django(redis_url: str, prefix: str) -> None:
    """Django settings for the benchmark (once per process): no database, no middleware
    but the variant's, the peer's cache on this Redis."""
    import django
    from django.conf import settings
    from django.http import HttpRequest, HttpResponse, JsonResponse
    from django.urls import path
    from django_ratelimit.decorators import ratelimit

    if settings.configured:
        return
    settings.configure(
        DEBUG=False, ALLOWED_HOSTS=["*"], SECRET_KEY="benchmark-only", USE_TZ=True,
        ROOT_URLCONF=DJANGO_URLCONF, MIDDLEWARE=[], INSTALLED_APPS=[], DATABASES={},
        CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache",
                            "LOCATION": redis_url, "KEY_PREFIX": f"{prefix}dj"}},
        RATELIMIT_USE_CACHE="default", LOGGING_CONFIG=None)
    django.setup()

    def chat(request: HttpRequest) -> HttpResponse:
        body = json.loads(request.body)
        return JsonResponse(chat_reply(body.get("model", "model-small")))

    async def chat_async(request: HttpRequest) -> HttpResponse:
        body = json.loads(request.body)
        return JsonResponse(chat_reply(body.get("model", "model-small")))

    def health(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok", content_type="text/plain")

    async def health_async(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok", content_type="text/plain")

    limited = ratelimit(key="header:authorization", rate=f"{HUGE}/m", block=True)(chat)
    # One URLconf per variant, all with the same paths; a handler picks its own (below).
    for name, views in {"": (chat, health), "_peer": (limited, health),
                        "_async": (chat_async, health_async)}.items():
        module = types.ModuleType(DJANGO_URLCONF + name)
        module.urlpatterns = [path(AI_PATH[1:], views[0]),  # type: ignore[attr-defined]
                              path(PLAIN_PATH[1:], views[1])]
        sys.modules[DJANGO_URLCONF + name] = module


def build_django_app(variant: str, redis_url: str, prefix: str, asynchronous: bool) -> Any:
    """The Django WSGI (or ASGI) handler of one variant, with its own middleware list."""
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import override_settings

    setup_django(redis_url, prefix)
    urlconf = DJANGO_URLCONF + ("_async" if asynchronous else
                                "_peer" if variant == "peer" else "")
    middleware = ["ai_saas_middleware.django.AISaaSMiddleware"] if variant == "middleware" else []
    base: Any = ASGIHandler if asynchronous else WSGIHandler

    class Handler(base):  # type: ignore[misc, valid-type]
        def get_response(self, request: Any) -> Any:  # every variant pays this alike
            request.urlconf = urlconf
            return super().get_response(request)

        async def get_response_async(self, request: Any) -> Any:
            request.urlconf = urlconf
            return await super().get_response_async(request)

    with override_settings(MIDDLEWARE=middleware,
                           AI_SAAS={"CONFIG": bench_config(redis_url, prefix)}):
        return Handler()  # the middleware chain (and our gateway) is built now


def find_gateway(app: Any) -> Any:
    """The gateway inside a built app (a Starlette middleware stack, a Flask app's
    extension, a Django handler's middleware chain), if any."""
    ext = getattr(app, "extensions", {}).get("ai_saas")
    if ext is not None:
        return ext.gateway
    node = getattr(app, "middleware_stack", None) or getattr(app, "_middleware_chain", None)
    while node is not None:
        if hasattr(node, "gateway"):
            return node.gateway
        # Starlette: the next app; Django: the wrapped middleware instance, its next one
        node = (getattr(node, "app", None) or getattr(node, "__wrapped__", None)
                or getattr(node, "get_response", None))
    return None


# --------------------------------------------------------------------------- ASGI harness

def ai_scope() -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": AI_PATH, "raw_path": AI_PATH.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"),
                    (b"accept", b"*/*"), (b"content-type", b"application/json"),
                    (b"authorization", f"Bearer {API_KEY}".encode()),
                    (b"content-length", str(len(REQUEST_BODY)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
    }


def plain_scope() -> Scope:
    scope = ai_scope()
    scope.update(method="GET", path=PLAIN_PATH, raw_path=PLAIN_PATH.encode(),
                 headers=[(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench")])
    return scope


class Call:
    """One request driven through an ASGI app: ``receive`` hands over the body, ``send``
    notes when the final body message was handed over."""

    __slots__ = ("_done", "body", "chunks", "ended_ns", "sent_body", "status")

    def __init__(self, body: bytes):
        self.body = body
        self.sent_body = False
        self.ended_ns = 0
        self.status = 0
        self.chunks: list[bytes] = []
        self._done = asyncio.Event()

    async def receive(self) -> Message:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._done.wait()  # like a server: nothing more until the response is out
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.ended_ns = time.perf_counter_ns()
                self._done.set()


@dataclass
class Samples:
    client_ns: list[int] = field(default_factory=list)
    whole_ns: list[int] = field(default_factory=list)


Run = Callable[[str, int, Samples | None], None]  # a block: variant, requests, samples or None


async def drive(app: ASGIApp, make_scope: Callable[[], Scope], body: bytes, count: int,
                samples: Samples | None,
                settle: Callable[[], Awaitable[None]] | None = None) -> None:
    """``count`` requests through an ASGI app: client-visible until the final body message
    was sent, whole call until the app returned and ``settle`` (if any) is done."""
    perf = time.perf_counter_ns
    for _ in range(count):
        scope = make_scope()
        call = Call(body)
        start = perf()
        await app(scope, call.receive, call.send)
        if settle is not None:
            await settle()
        end = perf()
        if call.status != 200:
            raise RuntimeError(f"status {call.status}: {b''.join(call.chunks)[:300]!r}")
        if samples is not None:
            samples.client_ns.append(call.ended_ns - start)
            samples.whole_ns.append(end - start)


async def drive_calls(one: Callable[[], Awaitable[Any]], count: int,
                      samples: Samples | None) -> None:
    perf = time.perf_counter_ns
    for _ in range(count):
        start = perf()
        await one()
        end = perf()
        if samples is not None:
            samples.client_ns.append(end - start)
            samples.whole_ns.append(end - start)


# --------------------------------------------------------------------------- WSGI harness

def wsgi_environ(method: str, path: str, body: bytes, headers: dict[str, str]) -> Environ:
    """A template environ as gunicorn's sync worker makes it (copy it per request)."""
    environ: Environ = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
        "QUERY_STRING": "", "RAW_URI": path, "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000", "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "bench",
        "HTTP_ACCEPT": "*/*", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": False,
        "wsgi.run_once": False, "wsgi.input_terminated": True,
    }
    if body:
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["CONTENT_TYPE"] = "application/json"
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


AI_ENVIRON = wsgi_environ("POST", AI_PATH, REQUEST_BODY, {"authorization": f"Bearer {API_KEY}"})
PLAIN_ENVIRON = wsgi_environ("GET", PLAIN_PATH, b"", {})


def drive_wsgi(app: WSGIApp, template: Environ, body: bytes, count: int,
               samples: Samples | None) -> None:
    """``count`` requests, each as a WSGI server makes it: call the app, iterate the body
    (client-visible: until the last non-empty chunk came out), then ``close()`` it (whole
    call: until that returned, settlement included)."""
    perf = time.perf_counter_ns
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        status.append(line)
        return chunks.append

    for _ in range(count):
        environ = template.copy()
        environ["wsgi.input"] = io.BytesIO(body)
        chunks: list[bytes] = []
        status.clear()
        start = perf()
        result = app(environ, start_response)
        last = perf()
        try:
            for chunk in result:
                if chunk:
                    chunks.append(chunk)
                    last = perf()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        end = perf()
        if not status or not status[0].startswith("200"):
            raise RuntimeError(f"status {status}: {b''.join(chunks)[:300]!r}")
        if samples is not None:
            samples.client_ns.append(last - start)
            samples.whole_ns.append(end - start)


def drive_sync_calls(one: Callable[[], Any], count: int, samples: Samples | None) -> None:
    perf = time.perf_counter_ns
    for _ in range(count):
        start = perf()
        one()
        end = perf()
        if samples is not None:
            samples.client_ns.append(end - start)
            samples.whole_ns.append(end - start)


def wsgi_run(apps: dict[str, WSGIApp], calls: dict[str, Callable[[], Any]]) -> Run:
    """Run a block of one variant: a call of ``calls``, else AI requests to its app."""
    def run(variant: str, count: int, samples: Samples | None) -> None:
        if variant in calls:
            drive_sync_calls(calls[variant], count, samples)
        else:
            drive_wsgi(apps[variant], AI_ENVIRON, REQUEST_BODY, count, samples)
    return run


class DedicatedConnection:
    """The reference: EVALSHA down one socket of its own, packed and parsed by hiredis,
    with the middleware's socket timeout; no pool, no per-call Python packing."""

    def __init__(self, redis_url: str, timeout_s: float):
        import hiredis
        from redis.connection import parse_url
        params = parse_url(redis_url)
        self.sock = socket.create_connection((params.get("host", "127.0.0.1"),
                                              params.get("port", 6379)), timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.pack = hiredis.pack_command

    def call(self, *args: Any) -> Any:
        self.sock.sendall(self.pack(args))
        reader = self.reader
        while True:
            reply = reader.gets()
            if reply is not False:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            reader.feed(data)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- Redis side

def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {name[len("cmdstat_"):]: int(stat["calls"]) for name, stat in info.items()}


def commands_during(admin: redis.Redis, action: Callable[[], Any]) -> dict[str, int]:
    """The commands Redis ran while ``action`` ran (INFO commandstats deltas), but for
    the INFO that took the first snapshot."""
    before = commandstats(admin)
    action()
    after = commandstats(admin)
    out = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    out["info"] = out.get("info", 0) - 1
    return {k: v for k, v in out.items() if v}


def commands_inside_scripts() -> set[str]:
    """Commands the package's Lua scripts run: Redis counts them too, but they are not
    round trips."""
    import ai_saas_middleware.store.redis as store
    names: set[str] = set()
    for path in Path(store.__file__).with_name("lua").glob("*.lua"):
        names |= {m.lower() for m in re.findall(r"redis\.p?call\(\s*'(\w+)'",
                                                path.read_text())}
    return names


def stream_entries(client: redis.Redis, prefix: str) -> int:
    return sum(int(client.xlen(key)) for key in client.scan_iter(match=f"{prefix}:*:usage"))


def delete_keys(client: redis.Redis, pattern: str) -> None:
    batch: list[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def clean_up(admin: redis.Redis, prefix: str) -> list[str]:
    """Delete a run's keys (slowapi's too: LIMITS:LIMITER/<prefix>/...) and spool
    directories; the files spooled, with a warning if any."""
    delete_keys(admin, f"*{prefix}*")
    spooled: list[str] = []
    for path in Path(tempfile.gettempdir()).glob(f"ai-saas-spool-{prefix}*"):
        spooled += [p.name for p in path.iterdir()]
        shutil.rmtree(path, ignore_errors=True)
    if spooled:
        print(f"WARNING: usage events were spooled during the run: {spooled}",
              file=sys.stderr)
    return spooled


@dataclass
class Server:
    url: str
    note: str
    pid: int | None  # ours to pin, or None


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[Server]:
    """The given URL, or a private server on a free loopback port (stopped after)."""
    if url:
        yield Server(url, "given by --redis-url (pin it yourself)", None)
        return
    from ai_saas_middleware.embedded import start_server
    server = start_server()
    try:
        yield Server(server.url, f"{server.name} started by this script",
                     server.process.pid)
    finally:
        server.stop()


def floor_script(client_class: Any, redis_url: str) -> tuple[Any, Any]:
    """The floor's client (pooled, the middleware's default timeouts) and its
    ``return 1`` script (load it before measuring, so that only EVALSHA is sent)."""
    cfg = RedisConfig()
    client = client_class.from_url(
        redis_url, socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s, health_check_interval=0)
    return client, client.register_script("return 1")


# --------------------------------------------------------------------------- statistics

def pct(values: list[int], q: float) -> float:
    """The q-th percentile (nearest rank), in microseconds."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))
    return ordered[int(rank)] / 1000


def med(values: list[Any]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2)


# --------------------------------------------------------------------------- in-process

def asgi_runner(framework: str, apps: dict[str, Any], redis_url: str
                ) -> tuple[Run, Callable[[], None], Callable[[], None]]:
    """Starlette or Django's ASGI handler, on one event loop: how to run a block of a
    variant, the non-AI requests, and the clean-up."""
    from ai_saas_middleware.bodies import wait_for_settlements
    loop = asyncio.new_event_loop()
    client, script = floor_script(redis.asyncio.Redis, redis_url)
    loop.run_until_complete(script())

    async def floor() -> Any:
        return await script(keys=[], args=[])

    calls = {"floor": floor}
    conns = []
    if FRAMEWORKS[framework].reference:
        cfg = RedisConfig()
        pool = redis.asyncio.ConnectionPool.from_url(
            redis_url, socket_timeout=None, socket_connect_timeout=cfg.connect_timeout_s)
        conn = pool.make_connection()
        conns.append(conn)
        loop.run_until_complete(conn.connect())
        evalsha = b"".join(conn.pack_command("EVALSHA", script.sha, 0))
        timeout = getattr(asyncio, "timeout", None)  # Python 3.11+

        async def dedicated() -> Any:
            if timeout is None:
                await conn.send_packed_command(evalsha, check_health=False)
                return await conn.read_response()
            async with timeout(cfg.socket_timeout_s):
                await conn.send_packed_command(evalsha, check_health=False)
                return await conn.read_response()

        calls["conn"] = dedicated
    # Django settles in a task of its own after the response (the client does not wait
    # on it): the whole call waits for it too. Starlette's settles within the call.
    settle = wait_for_settlements if framework == "django-asgi" else None

    def run(variant: str, count: int, samples: Samples | None) -> None:
        if variant in calls:
            loop.run_until_complete(drive_calls(calls[variant], count, samples))
        else:
            loop.run_until_complete(drive(apps[variant], ai_scope, REQUEST_BODY, count,
                                          samples, settle))

    def non_ai() -> None:
        loop.run_until_complete(drive(apps["middleware"], plain_scope, b"", NON_AI_REQUESTS,
                                      None, settle))

    def close() -> None:
        gateway = find_gateway(apps["middleware"])
        if gateway is not None:
            loop.run_until_complete(gateway.close())
        loop.run_until_complete(client.aclose())
        for conn in conns:
            loop.run_until_complete(conn.disconnect())
        loop.close()

    return run, non_ai, close


def wsgi_runner(framework: str, apps: dict[str, Any], redis_url: str
                ) -> tuple[Run, Callable[[], None], Callable[[], None]]:
    """Flask or Django's WSGI handler: how to run a block of a variant, the non-AI
    requests, and the clean-up."""
    client, script = floor_script(redis.Redis, redis_url)
    script()
    conn = DedicatedConnection(redis_url, RedisConfig().socket_timeout_s)

    def floor() -> Any:
        return script(keys=[], args=[])

    def dedicated() -> Any:
        return conn.call("EVALSHA", script.sha, 0)

    def non_ai() -> None:
        drive_wsgi(apps["middleware"], PLAIN_ENVIRON, b"", NON_AI_REQUESTS, None)

    def close() -> None:
        gateway = find_gateway(apps["middleware"])
        if gateway is not None:
            gateway.close()
        client.close()
        conn.close()

    return wsgi_run(apps, {"floor": floor, "conn": dedicated}), non_ai, close


def in_process(framework: str, redis_url: str, prefix: str, requests: int, block: int,
               warmup: int) -> dict[str, Any]:
    """Warm-up, then blocks of each variant round-robin (the first rotating), Redis's
    commandstats around every middleware and peer block; then the non-AI check."""
    fw = FRAMEWORKS[framework]
    apps = {v: build_app(framework, v, redis_url, f"{prefix}{v[:2]}") for v in fw.variants}
    run, non_ai, close = (asgi_runner if fw.asgi else wsgi_runner)(framework, apps, redis_url)
    variants = (*fw.variants, "floor", *(("conn",) if fw.reference else ()))
    admin = redis.Redis.from_url(redis_url)
    admin.ping()
    for variant in variants:  # connections, script loads, caches: all before measuring
        run(variant, warmup, None)
    samples = {v: Samples() for v in variants}
    stats: dict[str, Counter[str]] = {"middleware": Counter(), "peer": Counter()}
    blocks = max(1, requests // block)
    for i in range(blocks):
        k = i % len(variants)
        for variant in variants[k:] + variants[:k]:
            block_run = partial(run, variant, block, samples[variant])
            if variant in stats:  # settlement happens in-call
                stats[variant].update(commands_during(admin, block_run))
            else:
                block_run()
    measured = blocks * block
    non_ai_commands = commands_during(admin, non_ai)

    top_level = {k: v for k, v in stats["middleware"].items()
                 if k not in commands_inside_scripts()}
    entries = stream_entries(admin, f"{prefix}mi")
    close()
    admin.close()
    return {
        "samples": samples,
        "measured_ai_requests": measured,
        "ai_requests_through_middleware": measured + warmup,
        "stream_entries": entries,
        "commandstats": dict(stats["middleware"]),
        "peer_commandstats": dict(stats["peer"]),
        "round_trip_commands": top_level,
        "round_trips_per_request": sum(top_level.values()) / measured,
        "non_ai_commands": non_ai_commands,
    }


# --------------------------------------------------------------------------- served

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_uvicorn(app: Any, port: int) -> None:
    """uvicorn, 1 worker, no access log."""
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, access_log=False,
                log_level="warning", lifespan="off")


def serve(spec: str, port: int, redis_url: str, prefix: str) -> None:
    """``--serve FRAMEWORK/VARIANT``: uvicorn for an ASGI app, gunicorn (1 sync worker)
    for a WSGI one; no access log either way."""
    framework, variant = spec.split("/")
    if FRAMEWORKS[framework].asgi:
        run_uvicorn(build_app(framework, variant, redis_url, prefix), port)
        return
    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {"bind": f"127.0.0.1:{port}", "workers": 1, "worker_class": "sync",
                        "accesslog": None, "loglevel": "warning", "backlog": 2048,
                        # gunicorn >= 25 opens ~/.gunicorn/gunicorn.ctl; three at once clash
                        "control_socket_disable": True}
            for key, value in settings.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self) -> Any:  # in the worker, after the fork
            return build_app(framework, variant, redis_url, prefix)

    Gunicorn().run()


def serve_args(framework: str, prefix: str, variant: str) -> list[str]:
    """How this script serves one app (``--serve``)."""
    return [os.path.abspath(__file__), "--serve", f"{framework}/{variant}",
            "--prefix", f"{prefix}s{variant[:2]}"]


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app server on port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"app server did not listen on port {port} within {timeout_s}s")


def worker_pid(pid: int) -> int:
    """gunicorn's worker (the child of the master ``pid``), else ``pid`` itself."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    return pid


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux), else 0."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class WrkRun:
    rps: float
    requests: int
    app_cpu_us: float  # the app server's CPU time per request
    redis_cpu_us: float  # redis-server's CPU time per request (0 when not ours)


def wrk(port: int, script: str, seconds: int, connections: int, load_cpu: int | None,
        app_pid: int, redis_pid: int | None) -> WrkRun:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script,
           f"http://127.0.0.1:{port}{AI_PATH}"]
    if load_cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(load_cpu), *cmd]
    app0, redis0 = cpu_seconds(app_pid), cpu_seconds(redis_pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    app1, redis1 = cpu_seconds(app_pid), cpu_seconds(redis_pid)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"served run had errors on port {port}:\n{out}")
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n = max(1, int(total.group(1)))
    return WrkRun(float(rps.group(1)), n, (app1 - app0) / n * 1e6,
                  (redis1 - redis0) / n * 1e6)


@dataclass
class Placement:
    name: str
    redis_cpu: int | None  # the CPU to move our redis-server to, or None: leave it


def placements(framework: str, server: Server, cpu: int | None, load_cpu: int | None,
               quick: bool) -> list[Placement]:
    """Where Redis runs in a served run: beside the app server; for Starlette, in a full
    run with our own redis-server, also beside wrk (the nearer picture of a Redis on
    another machine)."""
    if framework != "starlette":
        return [Placement("Redis beside the app server", None)]
    if server.pid is None:
        return [Placement("Redis as given (not pinned here)", None)]
    if cpu is None:
        return [Placement("unpinned", None)]
    return [Placement(f"Redis beside uvicorn (CPU {cpu})", cpu),
            *([Placement(f"Redis beside wrk (CPU {load_cpu})", load_cpu)]
              if not quick and load_cpu is not None else [])]


def served(serve_args: Callable[[str], list[str]], variants: tuple[str, ...], server: Server,
           placements: list[Placement], seconds: int, rounds: int, connections: int,
           load_cpu: int | None, stop: signal.Signals) -> dict[str, Any]:
    """Each variant under its app server (``python *serve_args(variant) --port P
    --redis-url U``, pinned as this process is), wrk on ``load_cpu``: for each Redis
    placement a warm-up, then ``rounds`` interleaved runs; medians. ``stop`` is the
    signal that stops an app server (uvicorn: INT; gunicorn: TERM lets the worker
    finish the request in hand, INT would interrupt it)."""
    workdir = tempfile.mkdtemp(prefix="ai-saas-bench-")
    script = os.path.join(workdir, "post.lua")
    Path(script).write_text(WRK_SCRIPT.format(body=REQUEST_BODY.decode(), key=API_KEY))
    processes: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    counted: dict[str, int] = dict.fromkeys(variants, 0)  # responses wrk saw, per variant
    results: list[dict[str, Any]] = []
    original = (os.sched_getaffinity(server.pid)
                if server.pid is not None and hasattr(os, "sched_getaffinity") else None)
    try:
        for variant in variants:
            port = free_port()
            processes[variant] = (subprocess.Popen(
                [sys.executable, *serve_args(variant), "--port", str(port),
                 "--redis-url", server.url]), port)
        pids = {}
        for variant, (process, port) in processes.items():
            wait_listening(port, process)
            pids[variant] = worker_pid(process.pid)
        for place in placements:
            if place.redis_cpu is not None and server.pid is not None:
                os.sched_setaffinity(server.pid, {place.redis_cpu})
            runs: dict[str, list[WrkRun]] = {v: [] for v in variants}
            for variant, (_process, port) in processes.items():  # warm-up, not counted
                counted[variant] += wrk(port, script, 1, connections, load_cpu,
                                        pids[variant], server.pid).requests
            for i in range(rounds):
                k = i % len(variants)
                for variant in variants[k:] + variants[:k]:
                    run = wrk(processes[variant][1], script, seconds, connections, load_cpu,
                              pids[variant], server.pid)
                    counted[variant] += run.requests
                    runs[variant].append(run)
            results.append({
                "placement": place.name,
                "rps": {v: [r.rps for r in runs[v]] for v in variants},
                "median_rps": {v: med([r.rps for r in runs[v]]) for v in variants},
                "app_cpu_us": {v: med([r.app_cpu_us for r in runs[v]]) for v in variants},
                "redis_cpu_us": {v: med([r.redis_cpu_us for r in runs[v]]) for v in variants},
            })
    finally:
        for process, _port in processes.values():
            process.send_signal(stop)
        for process, _port in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if original is not None and server.pid is not None:
            os.sched_setaffinity(server.pid, original)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"placements": results, "seconds": seconds, "rounds": rounds,
            "connections": connections, "responses": counted}


# --------------------------------------------------------------------------- report

def timing_row(label: str, values: list[int], bare: list[int] | None = None
               ) -> tuple[str, float, float, float | None, float | None]:
    """label, median, p99 (us), and both minus the bare endpoint's (``bare``), if given."""
    m, p = med(values) / 1000, pct(values, 99)
    if bare is None:
        return label, m, p, None, None
    return label, m, p, m - med(bare) / 1000, p - pct(bare, 99)


def signed(x: float | None) -> str:
    return "" if x is None else f"{x:+.1f}"


def ok(good: bool) -> str:
    return "met" if good else "**missed**"


def report(framework: str, res: dict[str, Any], srv: dict[str, Any] | None
           ) -> tuple[list[str], dict[str, Any]]:
    """One framework's tables (markdown lines) and figures. Starlette's keep the layout
    they were first published in (benchmarks/README.md): its bare row and slowapi's are
    whole calls, its served table has a Redis placement column and targets of its own."""
    fw = FRAMEWORKS[framework]
    starlette = framework == "starlette"
    s = res["samples"]
    n = res["measured_ai_requests"]
    bare = s["bare"]
    floor = med(s["floor"].whole_ns) / 1000
    if starlette:
        rows = [timing_row(f"bare {fw.name} endpoint", bare.whole_ns)]
    else:
        rows = [timing_row(f"bare {fw.name} endpoint, client-visible", bare.client_ns),
                timing_row(f"bare {fw.name} endpoint, whole call", bare.whole_ns)]
    rows.append(timing_row(f"+ {fw.ours}, client-visible", s["middleware"].client_ns,
                           bare.client_ns))
    added_client = rows[-1][3] or 0.0
    rows.append(timing_row(f"+ {fw.ours}, whole call (settlement included)",
                           s["middleware"].whole_ns, bare.whole_ns))
    added_peer = None
    if starlette:
        rows.append(timing_row(f"+ {fw.peer}, Redis storage", s["peer"].whole_ns,
                               bare.whole_ns))
    elif fw.peer:
        rows.append(timing_row(f"+ {fw.peer}, Redis storage, client-visible",
                               s["peer"].client_ns, bare.client_ns))
        added_peer = rows[-1][3]
    rows.append(timing_row(f"floor: one EVALSHA `return 1`, {fw.floor_client}",
                           s["floor"].whole_ns))
    if fw.reference:
        rows.append(timing_row(fw.reference, s["conn"].whole_ns))

    stats, peer_stats = res["commandstats"], res["peer_commandstats"]
    inside, peer_inside = commands_inside_scripts(), fw.peer_script_commands
    peer_trips = sum(v for k, v in peer_stats.items() if k not in peer_inside) / n
    targets: dict[str, Any] = {
        "client_visible_added_us": added_client,
        "floor_us": floor,
        "client_visible_added_over_floor": added_client / floor,
        "peer_client_visible_added_us": added_peer,
        "peer_added_over_floor": None if added_peer is None else added_peer / floor,
        "round_trips_per_ai_request": res["round_trips_per_request"],
        "peer_round_trips_per_ai_request": peer_trips if fw.peer else None,
        "non_ai_redis_commands": sum(res["non_ai_commands"].values()),
        "stream_entries_equal_ai_requests":
            res["stream_entries"] == res["ai_requests_through_middleware"],
    }

    out = [f"## In-process: {n} requests per variant, interleaved in blocks (us)\n",
           "| variant | median | p99 | added median | added p99 |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {label} | {m:.1f} | {p:.1f} | {signed(am)} | {signed(ap)} |"
            for label, m, p, am, ap in rows]
    if starlette:
        out.append("\nadded = variant minus the bare endpoint (median minus median, p99 "
                   "minus p99); the bare figure is its whole call (client-visible: "
                   f"{med(bare.client_ns) / 1000:.1f}).")
        out.append(f"\n## Redis commands per AI request (INFO commandstats, {n} measured "
                   "middleware requests)\n")
        out.append("| command | per request | a round trip? |")
        out.append("|---|---:|---|")
        for command, calls in sorted(stats.items(), key=lambda kv: (kv[0] in inside, kv[0])):
            out.append(f"| {command} | {calls / n:.3f} | "
                       f"{'no: run by Redis inside a script' if command in inside else 'yes'} |")
    else:
        out.append("\nadded = variant minus the bare endpoint, client-visible minus "
                   "client-visible, whole call minus whole call (median minus median, p99 "
                   "minus p99).")
        out.append(f"\n## Redis commands per AI request (INFO commandstats, {n} measured "
                   "requests of each)\n")

        def cell(side: dict[str, int], command: str, scripted: frozenset[str] | set[str]
                 ) -> str:
            calls = side.get(command, 0)
            if not calls:
                return ""
            return f"{calls / n:.3f}" + (" (in a script)" if command in scripted else "")

        def is_round_trip(command: str) -> bool:
            return ((command in stats and command not in inside)
                    or (command in peer_stats and command not in peer_inside))

        columns = [f"{fw.ours}, per request"] + ([f"{fw.peer}, per request"] if fw.peer else [])
        out.append(f"| command | {' | '.join(columns)} |")
        out.append("|---|" + "---:|" * len(columns))
        for command in sorted(set(stats) | set(peer_stats),
                              key=lambda c: (not is_round_trip(c), c)):
            cells = [cell(stats, command, inside)]
            if fw.peer:
                cells.append(cell(peer_stats, command, peer_inside))
            out.append(f"| {command} | {' | '.join(cells)} |")
        out.append("\n*(in a script)*: run by Redis inside that side's Lua script, so not "
                   "a round trip of its own.")
    out.append(f"\nRound trips per AI request: {res['round_trips_per_request']:.3f}"
               + (f" ({fw.peer}: {peer_trips:.3f})" if fw.peer and not starlette else "")
               + f". Commands caused by {NON_AI_REQUESTS} non-AI requests through the same "
               f"app: {targets['non_ai_redis_commands']}"
               + (f" {res['non_ai_commands']}" if res["non_ai_commands"] else "")
               + f". Usage events written: {res['stream_entries']} for "
               f"{res['ai_requests_through_middleware']} AI requests (warm-up included).")

    if srv is not None:
        out.append(f"\n## Served: {fw.server}, wrk -t1 -c{srv['connections']}, "
                   f"{srv['seconds']} s x {srv['rounds']} rounds interleaved, medians\n")
        if starlette:
            out.append("| Redis placement | app | req/s | vs bare | runs | uvicorn CPU us/req "
                       "| redis CPU us/req |")
            out.append("|---|---|---:|---:|---|---:|---:|")
            labels = {"bare": "bare", "middleware": "middleware", "peer": fw.peer}
        else:
            out.append("| app | req/s | vs bare | runs | server CPU us/req | redis CPU "
                       "us/req |")
            out.append("|---|---:|---:|---|---:|---:|")
            labels = {"bare": "bare", "middleware": fw.ours, "peer": fw.peer}
        for place in srv["placements"]:
            mr = place["median_rps"]
            for v in fw.variants:
                out.append((f"| {place['placement']} " if starlette else "")
                           + f"| {labels[v]} | {mr[v]:.0f} | {mr[v] / mr['bare']:.2f}x | "
                           f"{', '.join(f'{x:.0f}' for x in place['rps'][v])} | "
                           f"{place['app_cpu_us'][v]:.0f} | {place['redis_cpu_us'][v]:.0f} |")
            suffix = "" if place is srv["placements"][0] else f" ({place['placement']})"
            targets[f"served_middleware_over_bare{suffix}"] = mr["middleware"] / mr["bare"]
            if fw.peer:
                targets[f"served_peer_over_bare{suffix}"] = mr["peer"] / mr["bare"]
        out.append(f"\nUsage events written by the served middleware: "
                   f"{srv['middleware_stream_entries']} for {srv['responses']['middleware']} "
                   "responses wrk counted"
                   + (" (a run's last in-flight requests are served but not counted)."
                      if starlette else "."))
    elif starlette:
        out.append("\n## Served run skipped (--no-served, or wrk not on PATH)")

    out += ["\n## Targets\n", "| target | this run | |", "|---|---:|---|"]
    ratio = targets["client_visible_added_over_floor"]
    out.append(f"| client-visible added median <= 1.5x the floor ({floor:.1f} us) | "
               f"{added_client:.1f} us = {ratio:.2f}x | {ok(ratio <= 1.5)} |")
    if added_peer is not None:
        out.append(f"| client-visible added median below {fw.peer}'s ({added_peer:.1f} us = "
                   f"{targets['peer_added_over_floor']:.2f}x the floor) | "
                   f"{added_client:.1f} us | {ok(added_client < added_peer)} |")
    out.append(f"| <= 2 Redis round trips per AI request | "
               f"{targets['round_trips_per_ai_request']:.3f} | "
               f"{ok(targets['round_trips_per_ai_request'] <= 2)} |")
    out.append(f"| no Redis command for a non-AI request | "
               f"{targets['non_ai_redis_commands']} | "
               f"{ok(targets['non_ai_redis_commands'] == 0)} |")
    out.append(f"| one usage event per AI request | "
               f"{'yes' if targets['stream_entries_equal_ai_requests'] else 'no'} | "
               f"{ok(targets['stream_entries_equal_ai_requests'])} |")
    if starlette and srv is not None:
        for place in srv["placements"]:
            mr = place["median_rps"]
            ratio = mr["middleware"] / mr["bare"]
            out.append(f"| served req/s with the middleware >= 0.7x bare "
                       f"({place['placement']}) | {ratio:.2f}x | {ok(ratio >= 0.7)} |")
            out.append(f"| (peer) {fw.peer} req/s vs bare ({place['placement']}) | "
                       f"{mr['peer'] / mr['bare']:.2f}x | |")
    figures = {
        "in_process_us": {label: {"median": m, "p99": p, "added_median": am,
                                  "added_p99": ap} for label, m, p, am, ap in rows},
        "commandstats_per_request": {k: v / n for k, v in stats.items()},
        "peer_commandstats_per_request": {k: v / n for k, v in peer_stats.items()},
        "round_trip_commands": res["round_trip_commands"],
        "non_ai_commands": res["non_ai_commands"],
        "served": srv,
        "targets": targets,
    }
    return out, figures


def versions(*dists: str) -> dict[str, str]:
    def ver(dist: str) -> str:
        try:
            return version(dist)
        except Exception:
            return "not installed"

    return {dist: ver(dist) for dist in dists}


def machine(server: Server, cpu: int | None, load_cpu: int | None) -> dict[str, Any]:
    import starlette
    import uvicorn
    client = redis.Redis.from_url(server.url)
    info = client.info("server")
    client.close()
    model = platform.processor()
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)

    def has(module: str) -> str:
        try:
            __import__(module)
        except ImportError:
            return "no"
        return "yes"

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "redis": f"{info.get('redis_version')} ({server.note})",
        "redis-py": f"{redis.__version__} (hiredis: {has('hiredis')})",
        "starlette": starlette.__version__,
        "slowapi": version("slowapi"),
        "uvicorn": f"{uvicorn.__version__} (uvloop: {has('uvloop')}, "
                   f"httptools: {has('httptools')})",
        "wrk": (subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
                .split("[")[0].strip() if shutil.which("wrk") else "not installed"),
        "pinning": (f"in-process: this process and redis-server on CPU {cpu}; served: "
                    f"uvicorn on CPU {cpu}, wrk on CPU {load_cpu}"
                    if cpu is not None else "none"),
    }


# --------------------------------------------------------------------------- main

def pin(cpu: int | None, load_cpu: int | None) -> tuple[int | None, int | None]:
    """Pin this process to ``cpu``; the CPUs pinned to: ``cpu`` (None if not pinned) and
    ``load_cpu`` if it is another CPU this process could use."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None, None
    available = os.sched_getaffinity(0)
    if cpu not in available:
        print(f"note: CPU {cpu} is not available to this process; not pinning",
              file=sys.stderr)
        return None, None
    os.sched_setaffinity(0, {cpu})
    return cpu, load_cpu if load_cpu != cpu and load_cpu in available else None


def framework_list(text: str) -> tuple[str, ...]:
    """``--framework``: names in the order of FRAMEWORKS, or all of them."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if "all" in names:
        return tuple(FRAMEWORKS)
    unknown = names - set(FRAMEWORKS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown framework {', '.join(sorted(unknown)) or text!r}: choose from "
            f"{', '.join(FRAMEWORKS)}, all")
    return tuple(name for name in FRAMEWORKS if name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", type=framework_list, default=tuple(FRAMEWORKS),
                        help="which frameworks to measure, comma-separated: "
                             f"{', '.join(FRAMEWORKS)} (Django's ASGI path) or all "
                             "(the default)")
    parser.add_argument("--redis-url", help="use this Redis (default: start a private "
                                            "redis-server on a free loopback port)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few hundred requests, one 1 s served round")
    parser.add_argument("--requests", type=int, default=40_000,
                        help="measured requests per variant in-process (default 40000)")
    parser.add_argument("--block", type=int, default=500,
                        help="requests per variant per interleaved block (default 500)")
    parser.add_argument("--served-seconds", type=int, default=5,
                        help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved served rounds per placement (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--no-served", action="store_true",
                        help="skip the served runs (uvicorn, gunicorn)")
    parser.add_argument("--cpu", type=int, default=0,
                        help="CPU for this process, redis-server and the app servers "
                             "(default 0)")
    parser.add_argument("--load-cpu", type=int, default=1,
                        help="CPU for wrk in the served run (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # FRAMEWORK/VARIANT
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.prefix)
        return 0

    command = " ".join(["python benchmarks/overhead.py",
                        *(argv if argv is not None else sys.argv[1:])])
    if args.quick:
        args.requests, args.block, args.served_seconds, args.rounds = 400, 100, 1, 1
    warmup = 200 if args.quick else 2000
    frameworks: tuple[str, ...] = args.framework
    cpu, load_cpu = pin(None if args.no_pin else args.cpu, args.load_cpu)
    prefix = "bench" + uuid.uuid4().hex[:8]
    started = time.monotonic()
    figures: dict[str, Any] = {}
    served_ok = not args.no_served and shutil.which("wrk") is not None
    if not args.no_served and not served_ok:
        print("wrk not on PATH: served runs skipped (apt-get install wrk)", file=sys.stderr)

    with redis_server(args.redis_url) as server:  # started after pinning: it inherits it
        facts = machine(server, cpu, load_cpu)
        print(f"redis: {server.url} ({server.note}); pinning: {facts['pinning']}",
              file=sys.stderr)
        admin = redis.Redis.from_url(server.url)
        try:
            for framework in frameworks:
                fw = FRAMEWORKS[framework]
                fw_prefix = (prefix if framework == "starlette"
                             else f"{prefix}{framework[0]}{framework[-1]}")
                requests, fw_warmup = args.requests, warmup
                if framework == "django-asgi":
                    # A quarter of the requests: each costs about eight WSGI ones (Django
                    # runs response.close() in a thread of its own per request).
                    requests, fw_warmup = max(args.block, args.requests // 4), warmup // 4
                res = in_process(framework, server.url, fw_prefix, requests, args.block,
                                 fw_warmup)
                print(f"{framework}, in-process part: {time.monotonic() - started:.0f} s",
                      file=sys.stderr)
                srv = None
                if served_ok:
                    srv = served(partial(serve_args, framework, fw_prefix), fw.variants, server,
                                 placements(framework, server, cpu, load_cpu, args.quick),
                                 args.served_seconds, args.rounds,
                                 args.connections, load_cpu,
                                 signal.SIGINT if fw.asgi else signal.SIGTERM)
                    srv["middleware_stream_entries"] = stream_entries(admin, f"{fw_prefix}smi")
                lines, figs = report(framework, res, srv)
                if framework != "starlette" or len(frameworks) > 1:
                    lines.insert(0, f"# {fw.name}\n")
                if framework == "starlette":
                    lines += ["\n## Machine\n", *(f"- {k}: {v}" for k, v in facts.items()),
                              f"\nCommand: `{command}`"]
                    figs.update(machine=facts, command=command)
                print(("" if framework == "starlette" else "\n") + "\n".join(lines))
                figures[framework] = figs
                print(f"{framework}: {time.monotonic() - started:.0f} s", file=sys.stderr)
            if any(f != "starlette" for f in frameworks):
                more = versions("flask", "flask-limiter", "limits", "django",
                                "django-ratelimit", "django-redis", "gunicorn", "hiredis")
                print("\n## Machine (Flask, Django)\n")
                print("\n".join(f"- {k}: {v}" for k, v in {**facts, **more}.items()
                                if k not in ("starlette", "slowapi")))
                print(f"- served: gunicorn {more['gunicorn']} (sync worker) / uvicorn "
                      f"on CPU {cpu}, wrk on CPU {load_cpu}, Redis beside the app server")
                print(f"\nCommand: `{command}`")
        finally:
            spooled = clean_up(admin, prefix)
            admin.close()
    figures = figures["starlette"] if frameworks == ("starlette",) else figures
    figures["spooled_files"] = spooled
    print(f"total: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
