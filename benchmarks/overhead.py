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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
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

VARIANTS = ("bare", "middleware", "slowapi", "floor", "conn")
SERVED = ("bare", "middleware", "slowapi")
Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


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


def build_app(variant: str, redis_url: str, prefix: str) -> Any:
    """The Starlette app of one variant; the endpoint is the same function in all."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({
            "id": "chatcmpl-bench", "object": "chat.completion",
            "model": body.get("model", "model-small"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello, benchmark."}}],
            "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25},
        })

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    middleware: list[Any] = []
    endpoint: Any = chat
    limiter = None
    if variant == "middleware":
        from ai_saas_middleware.starlette import AISaaSMiddleware
        middleware.append(Middleware(AISaaSMiddleware, config=bench_config(redis_url, prefix)))
    elif variant == "slowapi":
        from slowapi import Limiter

        def api_key(request: Request) -> str:
            return request.headers.get("authorization", "anonymous")

        limiter = Limiter(key_func=api_key, storage_uri=redis_url, key_prefix=prefix)
        endpoint = limiter.limit(f"{HUGE}/minute")(chat)
    elif variant != "bare":
        raise ValueError(f"no app for variant {variant!r}")
    app = Starlette(routes=[Route(AI_PATH, endpoint, methods=["POST"]),
                            Route(PLAIN_PATH, health)],
                    middleware=middleware)
    if limiter is not None:
        from slowapi import _rate_limit_exceeded_handler
        from slowapi.errors import RateLimitExceeded
        app.state.limiter = limiter
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    return app


# --------------------------------------------------------------------------- harness

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


async def drive(app: ASGIApp, make_scope: Callable[[], Scope], body: bytes,
                count: int, samples: Samples | None) -> None:
    perf = time.perf_counter_ns
    for _ in range(count):
        scope = make_scope()
        call = Call(body)
        start = perf()
        await app(scope, call.receive, call.send)
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


# --------------------------------------------------------------------------- Redis side

def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {name[len("cmdstat_"):]: int(stat["calls"]) for name, stat in info.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
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

async def in_process(redis_url: str, prefix: str, requests: int, block: int,
                     warmup: int) -> dict[str, Any]:
    apps = {v: build_app(v, redis_url, f"{prefix}{v[:2]}") for v in SERVED}
    cfg = RedisConfig()  # the middleware's default timeouts
    floor_client = redis.asyncio.Redis.from_url(
        redis_url, socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s, health_check_interval=0)
    floor_script = floor_client.register_script("return 1")
    conn_pool = redis.asyncio.ConnectionPool.from_url(
        redis_url, socket_timeout=None, socket_connect_timeout=cfg.connect_timeout_s)
    conn = conn_pool.make_connection()
    await conn.connect()
    await floor_script()  # loaded, so both send EVALSHA only
    evalsha = b"".join(conn.pack_command("EVALSHA", floor_script.sha, 0))
    timeout = getattr(asyncio, "timeout", None)  # Python 3.11+

    async def floor() -> Any:
        return await floor_script(keys=[], args=[])

    async def dedicated() -> Any:
        if timeout is None:
            await conn.send_packed_command(evalsha, check_health=False)
            return await conn.read_response()
        async with timeout(cfg.socket_timeout_s):
            await conn.send_packed_command(evalsha, check_health=False)
            return await conn.read_response()

    calls = {"floor": floor, "conn": dedicated}
    admin = redis.Redis.from_url(redis_url)
    admin.ping()

    async def run(variant: str, count: int, samples: Samples | None) -> None:
        if variant in calls:
            await drive_calls(calls[variant], count, samples)
        else:
            await drive(apps[variant], ai_scope, REQUEST_BODY, count, samples)

    for variant in VARIANTS:  # connections, script loads, caches: all before measuring
        await run(variant, warmup, None)

    samples = {v: Samples() for v in VARIANTS}
    stats: dict[str, int] = {}
    snapshots = 0
    blocks = max(1, requests // block)
    for i in range(blocks):
        k = i % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:  # rotate who goes first
            if variant != "middleware":
                await run(variant, block, samples[variant])
                continue
            before = commandstats(admin)
            await run(variant, block, samples[variant])  # settlement is awaited in-call
            after = commandstats(admin)
            snapshots += 1
            for name, calls_made in delta(before, after).items():
                stats[name] = stats.get(name, 0) + calls_made
    stats["info"] = stats.get("info", 0) - snapshots  # our own INFO calls
    stats = {k: v for k, v in stats.items() if v}
    measured = blocks * block

    # A non-AI request through the middleware app: no Redis command at all.
    before = commandstats(admin)
    await drive(apps["middleware"], plain_scope, b"", NON_AI_REQUESTS, None)
    after = commandstats(admin)
    non_ai = delta(before, after)
    non_ai["info"] = non_ai.get("info", 0) - 1
    non_ai = {k: v for k, v in non_ai.items() if v}

    inside = commands_inside_scripts()
    top_level = {k: v for k, v in stats.items() if k not in inside}
    entries = stream_entries(admin, f"{prefix}mi")
    gateway = find_gateway(apps["middleware"])
    if gateway is not None:
        await gateway.close()
    await floor_client.aclose()
    await conn.disconnect()
    admin.close()
    return {
        "samples": samples,
        "measured_ai_requests": measured,
        "ai_requests_through_middleware": measured + warmup,
        "stream_entries": entries,
        "commandstats": stats,
        "round_trip_commands": top_level,
        "round_trips_per_request": sum(top_level.values()) / measured,
        "non_ai_commands": non_ai,
    }


def find_gateway(app: Any) -> Any:
    """The AsyncGateway inside a built Starlette middleware stack, if any."""
    node = getattr(app, "middleware_stack", None)
    while node is not None:
        if hasattr(node, "gateway"):
            return node.gateway
        node = getattr(node, "app", None)
    return None


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


def serve(variant: str, port: int, redis_url: str, prefix: str) -> None:
    """``--serve``: one variant under uvicorn, 1 worker, no access log."""
    import uvicorn
    uvicorn.run(build_app(variant, redis_url, prefix), host="127.0.0.1", port=port,
                workers=1, access_log=False, log_level="warning")


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn on port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"uvicorn did not listen on port {port} within {timeout_s}s")


def stop_servers(processes: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    """Signal every app server, then wait for each (killed after 10 s)."""
    for process in processes:
        process.send_signal(sig)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    app_cpu_us: float  # uvicorn's CPU time per request
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
    redis_cpu: int | None


def served(server: Server, prefix: str, placements: list[Placement], seconds: int,
           rounds: int, connections: int, load_cpu: int | None) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="ai-saas-bench-")
    script = os.path.join(workdir, "post.lua")
    Path(script).write_text(WRK_SCRIPT.format(body=REQUEST_BODY.decode(), key=API_KEY))
    processes: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    counted: dict[str, int] = dict.fromkeys(SERVED, 0)  # responses wrk saw, per variant
    results: list[dict[str, Any]] = []
    original = (os.sched_getaffinity(server.pid)
                if server.pid is not None and hasattr(os, "sched_getaffinity") else None)
    try:
        for variant in SERVED:
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", variant,
                 "--port", str(port), "--redis-url", server.url,
                 "--prefix", f"{prefix}s{variant[:2]}"])
            processes[variant] = (process, port)
        for place in placements:
            if place.redis_cpu is not None and server.pid is not None:
                os.sched_setaffinity(server.pid, {place.redis_cpu})
            runs: dict[str, list[WrkRun]] = {v: [] for v in SERVED}
            for variant, (process, port) in processes.items():  # warm-up, not counted
                wait_listening(port, process)
                counted[variant] += wrk(port, script, 1, connections, load_cpu, process.pid,
                                        server.pid).requests
            for i in range(rounds):
                k = i % len(SERVED)
                for variant in SERVED[k:] + SERVED[:k]:
                    process, port = processes[variant]
                    run = wrk(port, script, seconds, connections, load_cpu, process.pid,
                              server.pid)
                    counted[variant] += run.requests
                    runs[variant].append(run)
            results.append({
                "placement": place.name,
                "rps": {v: [r.rps for r in runs[v]] for v in SERVED},
                "median_rps": {v: med([r.rps for r in runs[v]]) for v in SERVED},
                "app_cpu_us": {v: med([r.app_cpu_us for r in runs[v]]) for v in SERVED},
                "redis_cpu_us": {v: med([r.redis_cpu_us for r in runs[v]]) for v in SERVED},
            })
    finally:
        stop_servers([process for process, _port in processes.values()], signal.SIGINT)
        if original is not None and server.pid is not None:
            os.sched_setaffinity(server.pid, original)
        shutil.rmtree(workdir, ignore_errors=True)
    client = redis.Redis.from_url(server.url)
    entries = stream_entries(client, f"{prefix}smi")
    client.close()
    return {"placements": results, "seconds": seconds, "rounds": rounds,
            "connections": connections, "middleware_responses": counted["middleware"],
            "middleware_stream_entries": entries}


# =========================================================================== Flask, Django
#
# The same endpoint, the same method, on the WSGI frameworks (and Django's ASGI path):
# bare, + our middleware, + the framework's usual Redis-backed rate limiter (the peer),
# and the floor: one EVALSHA with the client of that path (redis-py's sync client on
# WSGI; redis.asyncio on Django's ASGI path), in the same interleaved run.

FRAMEWORKS = ("starlette", "flask", "django", "django-asgi")
PEERS = {"flask": "flask-limiter", "django": "django-ratelimit"}
# Commands the peers' own Lua scripts run (Redis counts them; they are not round trips):
# limits' incr_expire.lua (flask-limiter's fixed window) and django-redis's incr() script.
PEER_SCRIPT_COMMANDS = {"flask": {"incrby", "expire"}, "django": {"exists", "incrby"}}
APP_VARIANTS = {"flask": ("bare", "middleware", "peer"),
                "django": ("bare", "middleware", "peer"),
                # django-ratelimit has no async decorator: no peer on the ASGI path
                "django-asgi": ("bare", "middleware")}
DJANGO_URLCONF = "ai_saas_bench_urls"
Environ = dict[str, Any]
WSGIApp = Callable[[Environ, Callable[..., Any]], Any]


def chat_reply(model: str) -> dict[str, Any]:
    """What every framework's endpoint answers (the Starlette one's JSON)."""
    return {
        "id": "chatcmpl-bench", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello, benchmark."}}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25},
    }


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
    elif variant != "bare":
        raise ValueError(f"no Flask app for variant {variant!r}")
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


def build_django_app(variant: str, redis_url: str, prefix: str,
                     asynchronous: bool = False) -> Any:
    """The Django WSGI (or ASGI) handler of one variant, with its own middleware list."""
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import override_settings

    setup_django(redis_url, prefix)
    urlconf = DJANGO_URLCONF + ("_async" if asynchronous else
                                "_peer" if variant == "peer" else "")
    middleware = []
    if variant == "middleware":
        middleware = ["ai_saas_middleware.django.AISaaSMiddleware"]
    elif variant not in ("bare", "peer") or (asynchronous and variant == "peer"):
        raise ValueError(f"no Django app for variant {variant!r}")
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


def build_framework_app(framework: str, variant: str, redis_url: str, prefix: str) -> Any:
    if framework == "flask":
        return build_flask_app(variant, redis_url, prefix)
    if framework == "django":
        return build_django_app(variant, redis_url, prefix)
    if framework == "django-asgi":
        return build_django_app(variant, redis_url, prefix, asynchronous=True)
    raise ValueError(f"unknown framework {framework!r}")


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


# --------------------------------------------------------------------------- in-process

def find_wsgi_gateway(app: Any) -> Any:
    """The gateway inside a built Flask app or Django handler, if any."""
    ext = getattr(app, "extensions", {}).get("ai_saas")
    if ext is not None:
        return ext.gateway
    node = getattr(app, "_middleware_chain", None)  # Django: wrapped middleware instances
    while node is not None:
        if hasattr(node, "gateway"):
            return node.gateway
        node = getattr(node, "__wrapped__", None) or getattr(node, "get_response", None)
    return None


def in_process_wsgi(framework: str, redis_url: str, prefix: str, requests: int, block: int,
                    warmup: int) -> dict[str, Any]:
    """Flask or Django (WSGI) in-process; the same interleaving as the Starlette part."""
    served_variants = APP_VARIANTS[framework]
    apps = {v: build_framework_app(framework, v, redis_url, f"{prefix}{v[:2]}")
            for v in served_variants}
    cfg = RedisConfig()  # the middleware's default timeouts
    floor_client = redis.Redis.from_url(
        redis_url, socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s, health_check_interval=0)
    floor_script = floor_client.register_script("return 1")
    floor_script()  # loaded, so both send EVALSHA only
    conn = DedicatedConnection(redis_url, cfg.socket_timeout_s)

    def floor() -> Any:
        return floor_script(keys=[], args=[])

    def dedicated() -> Any:
        return conn.call("EVALSHA", floor_script.sha, 0)

    calls = {"floor": floor, "conn": dedicated}
    variants = (*served_variants, "floor", "conn")
    admin = redis.Redis.from_url(redis_url)
    admin.ping()

    def run(variant: str, count: int, samples: Samples | None) -> None:
        if variant in calls:
            drive_sync_calls(calls[variant], count, samples)
        else:
            drive_wsgi(apps[variant], AI_ENVIRON, REQUEST_BODY, count, samples)

    return interleave(variants, run, admin, apps, requests, block, warmup,
                      lambda app: drive_wsgi(app, PLAIN_ENVIRON, b"", NON_AI_REQUESTS, None),
                      prefix, cleanup=lambda: (floor_client.close(), conn.close()))


def in_process_asgi_django(redis_url: str, prefix: str, requests: int, block: int,
                           warmup: int) -> dict[str, Any]:
    """Django's ASGI path in-process: the ASGI harness of the Starlette part."""
    apps = {v: build_framework_app("django-asgi", v, redis_url, f"{prefix}{v[:2]}")
            for v in APP_VARIANTS["django-asgi"]}
    from ai_saas_middleware.bodies import wait_for_settlements
    loop = asyncio.new_event_loop()
    cfg = RedisConfig()
    floor_client = redis.asyncio.Redis.from_url(
        redis_url, socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s, health_check_interval=0)
    floor_script = floor_client.register_script("return 1")
    loop.run_until_complete(floor_script())

    async def drive_django(app: ASGIApp, make_scope: Callable[[], Scope], body: bytes,
                           count: int, samples: Samples | None) -> None:
        # Django settles in a task of its own after the response (the client does not
        # wait on it): the whole call waits for it too.
        perf = time.perf_counter_ns
        for _ in range(count):
            call = Call(body)
            start = perf()
            await app(make_scope(), call.receive, call.send)
            await wait_for_settlements()
            end = perf()
            if call.status != 200:
                raise RuntimeError(f"status {call.status}: {b''.join(call.chunks)[:300]!r}")
            if samples is not None:
                samples.client_ns.append(call.ended_ns - start)
                samples.whole_ns.append(end - start)

    async def floor() -> Any:
        return await floor_script(keys=[], args=[])

    variants = (*APP_VARIANTS["django-asgi"], "floor")
    admin = redis.Redis.from_url(redis_url)
    admin.ping()

    def run(variant: str, count: int, samples: Samples | None) -> None:
        if variant == "floor":
            loop.run_until_complete(drive_calls(floor, count, samples))
        else:
            loop.run_until_complete(drive_django(apps[variant], ai_scope, REQUEST_BODY,
                                                 count, samples))

    def non_ai(app: Any) -> None:
        loop.run_until_complete(drive_django(app, plain_scope, b"", NON_AI_REQUESTS, None))

    def cleanup() -> None:
        gateway = find_wsgi_gateway(apps["middleware"])
        if gateway is not None:
            loop.run_until_complete(gateway.close())
        loop.run_until_complete(floor_client.aclose())
        loop.close()

    return interleave(variants, run, admin, apps, requests, block, warmup, non_ai, prefix,
                      cleanup=cleanup, close_gateway=False)


def interleave(variants: tuple[str, ...], run: Callable[[str, int, Samples | None], None],
               admin: redis.Redis, apps: dict[str, Any], requests: int, block: int,
               warmup: int, non_ai: Callable[[Any], None], prefix: str,
               cleanup: Callable[[], Any], close_gateway: bool = True) -> dict[str, Any]:
    """Warm-up, then blocks of each variant round-robin (the first rotating), Redis's
    commandstats around every middleware and peer block; then the non-AI check."""
    for variant in variants:  # connections, script loads, caches: all before measuring
        run(variant, warmup, None)
    samples = {v: Samples() for v in variants}
    stats: dict[str, dict[str, int]] = {"middleware": {}, "peer": {}}
    snapshots = dict.fromkeys(stats, 0)
    blocks = max(1, requests // block)
    for i in range(blocks):
        k = i % len(variants)
        for variant in variants[k:] + variants[:k]:
            if variant not in stats:
                run(variant, block, samples[variant])
                continue
            before = commandstats(admin)
            run(variant, block, samples[variant])  # settlement happens in-call
            after = commandstats(admin)
            snapshots[variant] += 1
            for name, calls_made in delta(before, after).items():
                stats[variant][name] = stats[variant].get(name, 0) + calls_made
    for variant in stats:
        stats[variant]["info"] = stats[variant].get("info", 0) - snapshots[variant]
        stats[variant] = {k: v for k, v in stats[variant].items() if v}
    measured = blocks * block

    before = commandstats(admin)
    non_ai(apps["middleware"])
    after = commandstats(admin)
    non_ai_commands = delta(before, after)
    non_ai_commands["info"] = non_ai_commands.get("info", 0) - 1
    non_ai_commands = {k: v for k, v in non_ai_commands.items() if v}

    inside = commands_inside_scripts()
    top_level = {k: v for k, v in stats["middleware"].items() if k not in inside}
    entries = stream_entries(admin, f"{prefix}mi")
    if close_gateway:
        gateway = find_wsgi_gateway(apps["middleware"])
        if gateway is not None:
            gateway.close()
    cleanup()
    admin.close()
    return {
        "samples": samples,
        "measured_ai_requests": measured,
        "ai_requests_through_middleware": measured + warmup,
        "stream_entries": entries,
        "commandstats": stats["middleware"],
        "peer_commandstats": stats["peer"],
        "round_trip_commands": top_level,
        "round_trips_per_request": sum(top_level.values()) / measured,
        "non_ai_commands": non_ai_commands,
    }


# --------------------------------------------------------------------------- served

def serve_app(spec: str, port: int, redis_url: str, prefix: str) -> None:
    """``--serve-app FRAMEWORK/VARIANT``: gunicorn (1 sync worker) for a WSGI app,
    uvicorn (1 worker) for Django's ASGI handler; no access log either way."""
    framework, variant = spec.split("/")
    if framework == "django-asgi":
        import uvicorn
        uvicorn.run(build_framework_app(framework, variant, redis_url, prefix),
                    host="127.0.0.1", port=port, workers=1, access_log=False,
                    log_level="warning", lifespan="off")
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
            return build_framework_app(framework, variant, redis_url, prefix)

    Gunicorn().run()


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


def served_framework(framework: str, server: Server, prefix: str, seconds: int, rounds: int,
                     connections: int, load_cpu: int | None) -> dict[str, Any]:
    """Each variant under its real server (pinned as this process is), wrk on
    ``load_cpu``, Redis beside the app server; the Starlette part's rounds and medians."""
    variants = APP_VARIANTS[framework]
    workdir = tempfile.mkdtemp(prefix="ai-saas-bench-")
    script = os.path.join(workdir, "post.lua")
    Path(script).write_text(WRK_SCRIPT.format(body=REQUEST_BODY.decode(), key=API_KEY))
    processes: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    counted: dict[str, int] = dict.fromkeys(variants, 0)
    try:
        for variant in variants:
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve-app",
                 f"{framework}/{variant}", "--port", str(port), "--redis-url", server.url,
                 "--prefix", f"{prefix}s{variant[:2]}"])
            processes[variant] = (process, port, process.pid)
        for variant, (process, port, _) in list(processes.items()):
            wait_listening(port, process, timeout_s=60)
            processes[variant] = (process, port, worker_pid(process.pid))
        runs: dict[str, list[WrkRun]] = {v: [] for v in variants}
        for variant, (_process, port, pid) in processes.items():  # warm-up, not counted
            counted[variant] += wrk(port, script, 1, connections, load_cpu, pid,
                                    server.pid).requests
        for i in range(rounds):
            k = i % len(variants)
            for variant in variants[k:] + variants[:k]:
                process, port, pid = processes[variant]
                run = wrk(port, script, seconds, connections, load_cpu, pid, server.pid)
                counted[variant] += run.requests
                runs[variant].append(run)
    finally:
        # gunicorn: TERM lets the worker finish the request in hand (INT would interrupt
        # it); uvicorn: INT, as in the Starlette part.
        stop_servers([process for process, _port, _pid in processes.values()],
                     signal.SIGINT if framework == "django-asgi" else signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)
    client = redis.Redis.from_url(server.url)
    entries = stream_entries(client, f"{prefix}smi")
    client.close()
    return {"variants": variants, "seconds": seconds, "rounds": rounds,
            "connections": connections,
            "rps": {v: [r.rps for r in runs[v]] for v in variants},
            "median_rps": {v: med([r.rps for r in runs[v]]) for v in variants},
            "app_cpu_us": {v: med([r.app_cpu_us for r in runs[v]]) for v in variants},
            "redis_cpu_us": {v: med([r.redis_cpu_us for r in runs[v]]) for v in variants},
            "middleware_responses": counted["middleware"],
            "middleware_stream_entries": entries}


# --------------------------------------------------------------------------- report

FRAMEWORK_NAMES = {"flask": "Flask", "django": "Django (WSGI)",
                   "django-asgi": "Django (ASGI)"}
MIDDLEWARE_NAMES = {"flask": "AISaaS (Flask extension)", "django": "AISaaSMiddleware",
                    "django-asgi": "AISaaSMiddleware"}
SERVERS = {"flask": "gunicorn (1 sync worker)", "django": "gunicorn (1 sync worker)",
           "django-asgi": "uvicorn (1 worker, --no-access-log)"}
FLOORS = {"flask": "redis-py sync client", "django": "redis-py sync client",
          "django-asgi": "redis.asyncio client"}


def report_framework(framework: str, res: dict[str, Any], srv: dict[str, Any] | None
                     ) -> tuple[list[str], dict[str, Any]]:
    """One framework's tables (markdown lines) and figures."""
    s = res["samples"]
    n = res["measured_ai_requests"]
    name, ours = FRAMEWORK_NAMES[framework], MIDDLEWARE_NAMES[framework]
    peer = PEERS.get(framework)
    bare_c, bare_w = med(s["bare"].client_ns) / 1000, med(s["bare"].whole_ns) / 1000
    bare_c99, bare_w99 = pct(s["bare"].client_ns, 99), pct(s["bare"].whole_ns, 99)
    floor = med(s["floor"].whole_ns) / 1000
    rows: list[tuple[str, float, float, float | None, float | None]] = []

    def row(label: str, values: list[int], base: float | None = None,
            base99: float | None = None) -> None:
        m, p = med(values) / 1000, pct(values, 99)
        rows.append((label, m, p, None if base is None else m - base,
                     None if base99 is None else p - base99))

    row(f"bare {name} endpoint, client-visible", s["bare"].client_ns)
    row(f"bare {name} endpoint, whole call", s["bare"].whole_ns)
    row(f"+ {ours}, client-visible", s["middleware"].client_ns, bare_c, bare_c99)
    row(f"+ {ours}, whole call (settlement included)", s["middleware"].whole_ns,
        bare_w, bare_w99)
    if peer:
        row(f"+ {peer}, Redis storage, client-visible", s["peer"].client_ns, bare_c,
            bare_c99)
    row(f"floor: one EVALSHA `return 1`, {FLOORS[framework]}", s["floor"].whole_ns)
    if "conn" in s:
        row("reference: same EVALSHA, one dedicated socket (hiredis)", s["conn"].whole_ns)
    added_client = rows[2][3] or 0.0
    added_peer = rows[4][3] if peer else None
    targets: dict[str, Any] = {
        "client_visible_added_us": added_client,
        "floor_us": floor,
        "client_visible_added_over_floor": added_client / floor,
        "peer_client_visible_added_us": added_peer,
        "peer_added_over_floor": None if added_peer is None else added_peer / floor,
        "round_trips_per_ai_request": res["round_trips_per_request"],
        "non_ai_redis_commands": sum(res["non_ai_commands"].values()),
        "stream_entries_equal_ai_requests":
            res["stream_entries"] == res["ai_requests_through_middleware"],
    }
    out = [f"# {name}\n",
           f"## In-process: {n} requests per variant, interleaved in blocks (us)\n",
           "| variant | median | p99 | added median | added p99 |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {label} | {m:.1f} | {p:.1f} | {fmt(am, True)} | {fmt(ap, True)} |"
            for label, m, p, am, ap in rows]
    out.append("\nadded = variant minus the bare endpoint, client-visible minus "
               "client-visible, whole call minus whole call (median minus median, p99 "
               "minus p99).")
    out.append(f"\n## Redis commands per AI request (INFO commandstats, {n} measured "
               "requests of each)\n")
    inside = commands_inside_scripts()
    peer_stats = res["peer_commandstats"]
    peer_inside = PEER_SCRIPT_COMMANDS.get(framework, set())

    def cell(stats: dict[str, int], command: str, scripted: set[str]) -> str:
        calls = stats.get(command, 0)
        if not calls:
            return ""
        return f"{calls / n:.3f}" + (" (in a script)" if command in scripted else "")

    columns = [f"{ours}, per request"] + ([f"{peer}, per request"] if peer else [])
    out.append(f"| command | {' | '.join(columns)} |")
    out.append("|---|" + "---:|" * len(columns))
    def is_round_trip(command: str) -> bool:
        return ((command in res["commandstats"] and command not in inside)
                or (command in peer_stats and command not in peer_inside))

    for command in sorted(set(res["commandstats"]) | set(peer_stats),
                          key=lambda c: (not is_round_trip(c), c)):
        cells = [cell(res["commandstats"], command, inside)]
        if peer:
            cells.append(cell(peer_stats, command, peer_inside))
        out.append(f"| {command} | {' | '.join(cells)} |")
    peer_trips = sum(v for k, v in peer_stats.items() if k not in peer_inside) / n
    targets["peer_round_trips_per_ai_request"] = peer_trips if peer else None
    out.append("\n*(in a script)*: run by Redis inside that side's Lua script, so not a "
               "round trip of its own.")
    out.append(f"\nRound trips per AI request: {res['round_trips_per_request']:.3f}"
               + (f" ({peer}: {peer_trips:.3f})" if peer else "") + ". "
               f"Commands caused by {NON_AI_REQUESTS} non-AI requests through the same app: "
               f"{targets['non_ai_redis_commands']}"
               + (f" {res['non_ai_commands']}" if res["non_ai_commands"] else "")
               + f". Usage events written: {res['stream_entries']} for "
               f"{res['ai_requests_through_middleware']} AI requests (warm-up included).")
    if srv is not None:
        variants = srv["variants"]
        mr = srv["median_rps"]
        out.append(f"\n## Served: {SERVERS[framework]}, wrk -t1 -c{srv['connections']}, "
                   f"{srv['seconds']} s x {srv['rounds']} rounds interleaved, medians\n")
        out.append("| app | req/s | vs bare | runs | server CPU us/req | redis CPU us/req |")
        out.append("|---|---:|---:|---|---:|---:|")
        labels = {"bare": "bare", "middleware": ours, "peer": peer or "peer"}
        for v in variants:
            out.append(f"| {labels[v]} | {mr[v]:.0f} | {mr[v] / mr['bare']:.2f}x | "
                       f"{', '.join(f'{x:.0f}' for x in srv['rps'][v])} | "
                       f"{srv['app_cpu_us'][v]:.0f} | {srv['redis_cpu_us'][v]:.0f} |")
        out.append(f"\nUsage events written by the served middleware: "
                   f"{srv['middleware_stream_entries']} for {srv['middleware_responses']} "
                   "responses wrk counted.")
        targets["served_middleware_over_bare"] = mr["middleware"] / mr["bare"]
        if "peer" in mr:
            targets["served_peer_over_bare"] = mr["peer"] / mr["bare"]

    def ok(good: bool) -> str:
        return "met" if good else "**missed**"

    out += ["\n## Targets\n", "| target | this run | |", "|---|---:|---|"]
    ratio = targets["client_visible_added_over_floor"]
    out.append(f"| client-visible added median <= 1.5x the floor ({floor:.1f} us) | "
               f"{added_client:.1f} us = {ratio:.2f}x | {ok(ratio <= 1.5)} |")
    if added_peer is not None:
        out.append(f"| client-visible added median below {peer}'s ({added_peer:.1f} us = "
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
    figures = {
        "in_process_us": {label: {"median": m, "p99": p, "added_median": am,
                                  "added_p99": ap} for label, m, p, am, ap in rows},
        "commandstats_per_request": {k: v / n for k, v in res["commandstats"].items()},
        "peer_commandstats_per_request": {k: v / n for k, v in peer_stats.items()},
        "round_trip_commands": res["round_trip_commands"],
        "non_ai_commands": res["non_ai_commands"],
        "served": srv,
        "targets": targets,
    }
    return out, figures


def framework_facts() -> dict[str, str]:
    def ver(dist: str) -> str:
        try:
            return version(dist)
        except Exception:
            return "not installed"

    return {name: ver(name) for name in ("flask", "flask-limiter", "limits", "django",
                                         "django-ratelimit", "django-redis", "gunicorn",
                                         "hiredis")}


# --------------------------------------------------------------------------- report

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


def fmt(x: float | None, sign: bool = False) -> str:
    return "" if x is None else (f"{x:+.1f}" if sign else f"{x:.1f}")


def report(res: dict[str, Any], srv: dict[str, Any] | None, facts: dict[str, Any],
           command: str) -> dict[str, Any]:
    s = res["samples"]
    n = res["measured_ai_requests"]
    bare_c, bare_w = med(s["bare"].client_ns) / 1000, med(s["bare"].whole_ns) / 1000
    bare_c99, bare_w99 = pct(s["bare"].client_ns, 99), pct(s["bare"].whole_ns, 99)
    floor = med(s["floor"].whole_ns) / 1000
    rows: list[tuple[str, float, float, float | None, float | None]] = []

    def row(name: str, values: list[int], base: float | None = None,
            base99: float | None = None) -> None:
        m, p = med(values) / 1000, pct(values, 99)
        rows.append((name, m, p, None if base is None else m - base,
                     None if base99 is None else p - base99))

    row("bare Starlette endpoint", s["bare"].whole_ns)
    row("+ AISaaSMiddleware, client-visible", s["middleware"].client_ns, bare_c, bare_c99)
    row("+ AISaaSMiddleware, whole call (settlement included)", s["middleware"].whole_ns,
        bare_w, bare_w99)
    row("+ slowapi, Redis storage", s["slowapi"].whole_ns, bare_w, bare_w99)
    row("floor: one EVALSHA `return 1`, redis.asyncio client", s["floor"].whole_ns)
    row("reference: same EVALSHA, one dedicated redis.asyncio connection",
        s["conn"].whole_ns)
    added_client = rows[1][3] or 0.0

    targets: dict[str, Any] = {
        "client_visible_added_us": added_client,
        "floor_us": floor,
        "client_visible_added_over_floor": added_client / floor,
        "round_trips_per_ai_request": res["round_trips_per_request"],
        "non_ai_redis_commands": sum(res["non_ai_commands"].values()),
        "stream_entries_equal_ai_requests":
            res["stream_entries"] == res["ai_requests_through_middleware"],
    }
    out = [f"## In-process: {n} requests per variant, interleaved in blocks (us)\n",
           "| variant | median | p99 | added median | added p99 |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {name} | {m:.1f} | {p:.1f} | {fmt(am, True)} | {fmt(ap, True)} |"
            for name, m, p, am, ap in rows]
    out.append("\nadded = variant minus the bare endpoint (median minus median, p99 minus "
               "p99); the bare figure is its whole call (client-visible: "
               f"{bare_c:.1f}).")
    out.append(f"\n## Redis commands per AI request (INFO commandstats, {n} measured "
               "middleware requests)\n")
    out.append("| command | per request | a round trip? |")
    out.append("|---|---:|---|")
    inside = commands_inside_scripts()
    for name, calls in sorted(res["commandstats"].items(),
                              key=lambda kv: (kv[0] in inside, kv[0])):
        out.append(f"| {name} | {calls / n:.3f} | "
                   f"{'no: run by Redis inside a script' if name in inside else 'yes'} |")
    out.append(f"\nRound trips per AI request: {res['round_trips_per_request']:.3f}. "
               f"Commands caused by {NON_AI_REQUESTS} non-AI requests through the same app: "
               f"{targets['non_ai_redis_commands']}"
               + (f" {res['non_ai_commands']}" if res["non_ai_commands"] else "")
               + f". Usage events written: {res['stream_entries']} for "
               f"{res['ai_requests_through_middleware']} AI requests (warm-up included).")
    if srv is not None:
        out.append(f"\n## Served: uvicorn (1 worker, --no-access-log), wrk -t1 "
                   f"-c{srv['connections']}, {srv['seconds']} s x {srv['rounds']} rounds "
                   "interleaved, medians\n")
        out.append("| Redis placement | app | req/s | vs bare | runs | uvicorn CPU us/req "
                   "| redis CPU us/req |")
        out.append("|---|---|---:|---:|---|---:|---:|")
        for place in srv["placements"]:
            mr = place["median_rps"]
            for v in SERVED:
                out.append(f"| {place['placement']} | {v} | {mr[v]:.0f} | "
                           f"{mr[v] / mr['bare']:.2f}x | "
                           f"{', '.join(f'{x:.0f}' for x in place['rps'][v])} | "
                           f"{place['app_cpu_us'][v]:.0f} | {place['redis_cpu_us'][v]:.0f} |")
        out.append(f"\nUsage events written by the served middleware: "
                   f"{srv['middleware_stream_entries']} for {srv['middleware_responses']} "
                   "responses wrk counted (a run's last in-flight requests are served but "
                   "not counted).")
        first = srv["placements"][0]["median_rps"]
        targets["served_middleware_over_bare"] = first["middleware"] / first["bare"]
        targets["served_slowapi_over_bare"] = first["slowapi"] / first["bare"]
        for place in srv["placements"][1:]:
            mr = place["median_rps"]
            targets[f"served_middleware_over_bare ({place['placement']})"] = \
                mr["middleware"] / mr["bare"]
    else:
        out.append("\n## Served run skipped (--no-served, or wrk not on PATH)")

    def ok(good: bool) -> str:
        return "met" if good else "**missed**"

    out += ["\n## Targets\n", "| target | this run | |", "|---|---:|---|"]
    out.append(f"| client-visible added median <= 1.5x the floor ({floor:.1f} us) | "
               f"{added_client:.1f} us = {targets['client_visible_added_over_floor']:.2f}x | "
               f"{ok(targets['client_visible_added_over_floor'] <= 1.5)} |")
    out.append(f"| <= 2 Redis round trips per AI request | "
               f"{targets['round_trips_per_ai_request']:.3f} | "
               f"{ok(targets['round_trips_per_ai_request'] <= 2)} |")
    out.append(f"| no Redis command for a non-AI request | "
               f"{targets['non_ai_redis_commands']} | "
               f"{ok(targets['non_ai_redis_commands'] == 0)} |")
    out.append(f"| one usage event per AI request | "
               f"{'yes' if targets['stream_entries_equal_ai_requests'] else 'no'} | "
               f"{ok(targets['stream_entries_equal_ai_requests'])} |")
    if srv is not None:
        placements = srv["placements"]
        for place in placements:
            mr = place["median_rps"]
            ratio = mr["middleware"] / mr["bare"]
            out.append(f"| served req/s with the middleware >= 0.7x bare "
                       f"({place['placement']}) | {ratio:.2f}x | {ok(ratio >= 0.7)} |")
            out.append(f"| (peer) slowapi req/s vs bare ({place['placement']}) | "
                       f"{mr['slowapi'] / mr['bare']:.2f}x | |")
    out += ["\n## Machine\n", *(f"- {k}: {v}" for k, v in facts.items())]
    out.append(f"\nCommand: `{command}`")
    print("\n".join(out))
    return {
        "in_process_us": {name: {"median": m, "p99": p, "added_median": am, "added_p99": ap}
                          for name, m, p, am, ap in rows},
        "commandstats_per_request": {k: v / n for k, v in res["commandstats"].items()},
        "round_trip_commands": res["round_trip_commands"],
        "non_ai_commands": res["non_ai_commands"],
        "served": srv,
        "targets": targets,
        "machine": facts,
        "command": command,
    }


# --------------------------------------------------------------------------- main

def pin(cpu: int | None) -> int | None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    if cpu not in os.sched_getaffinity(0):
        print(f"note: CPU {cpu} is not available to this process; not pinning",
              file=sys.stderr)
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def framework_list(text: str) -> tuple[str, ...]:
    """``--framework``: names in the order of FRAMEWORKS, or all of them."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if "all" in names:
        return FRAMEWORKS
    unknown = names - set(FRAMEWORKS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown framework {', '.join(sorted(unknown)) or text!r}: choose from "
            f"{', '.join(FRAMEWORKS)}, all")
    return tuple(name for name in FRAMEWORKS if name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", type=framework_list, default=FRAMEWORKS,
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
    parser.add_argument("--serve", choices=SERVED, help=argparse.SUPPRESS)
    parser.add_argument("--serve-app", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.prefix)
        return 0
    if args.serve_app:
        serve_app(args.serve_app, args.port, args.redis_url, args.prefix)
        return 0

    command = " ".join(["python benchmarks/overhead.py",
                        *(argv if argv is not None else sys.argv[1:])])
    if args.quick:
        args.requests, args.block, args.served_seconds, args.rounds = 400, 100, 1, 1
    warmup = 200 if args.quick else 2000
    frameworks: tuple[str, ...] = args.framework
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    cpu = None if args.no_pin else pin(args.cpu)
    load_cpu = (args.load_cpu if cpu is not None and args.load_cpu != cpu
                and args.load_cpu in available else None)
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
            if "starlette" in frameworks:
                if len(frameworks) > 1:
                    print("# Starlette\n")
                res = asyncio.run(in_process(server.url, prefix, args.requests, args.block,
                                             warmup))
                print(f"in-process part: {time.monotonic() - started:.0f} s", file=sys.stderr)
                srv = None
                if served_ok:
                    if server.pid is None:
                        placements = [Placement("Redis as given (not pinned here)", None)]
                    elif cpu is None:
                        placements = [Placement("unpinned", None)]
                    else:
                        placements = [Placement(f"Redis beside uvicorn (CPU {cpu})", cpu)]
                    if not args.quick and server.pid is not None and load_cpu is not None:
                        placements.append(Placement(f"Redis beside wrk (CPU {load_cpu})",
                                                    load_cpu))
                    srv = served(server, prefix, placements, args.served_seconds,
                                 args.rounds, args.connections, load_cpu)
                figures["starlette"] = report(res, srv, facts, command)
                print(f"starlette: {time.monotonic() - started:.0f} s", file=sys.stderr)
            for framework in frameworks:
                if framework == "starlette":
                    continue
                fw_prefix = f"{prefix}{framework[0]}{framework[-1]}"
                if framework == "django-asgi":
                    # A quarter of the requests: each costs about eight WSGI ones (Django
                    # runs response.close() in a thread of its own per request).
                    res = in_process_asgi_django(server.url, fw_prefix,
                                                 max(args.block, args.requests // 4),
                                                 args.block, warmup // 4)
                else:
                    res = in_process_wsgi(framework, server.url, fw_prefix, args.requests,
                                          args.block, warmup)
                srv = (served_framework(framework, server, fw_prefix, args.served_seconds,
                                        args.rounds, args.connections, load_cpu)
                       if served_ok else None)
                lines, figures[framework] = report_framework(framework, res, srv)
                print(("\n" if figures else "") + "\n".join(lines))
                print(f"{framework}: {time.monotonic() - started:.0f} s", file=sys.stderr)
            if any(f != "starlette" for f in frameworks):
                versions = framework_facts()
                facts = {**facts, **versions}
                print("\n## Machine (Flask, Django)\n")
                print("\n".join(f"- {k}: {v}" for k, v in facts.items()
                                if k not in ("starlette", "slowapi")))
                print(f"- served: gunicorn {versions['gunicorn']} (sync worker) / uvicorn "
                      f"on CPU {cpu}, wrk on CPU {load_cpu}, Redis beside the app server")
                print(f"\nCommand: `{command}`")
        finally:
            delete_keys(admin, f"{prefix}*")
            delete_keys(admin, f"*{prefix}*")  # slowapi's keys: LIMITS:LIMITER/<prefix>/...
            admin.close()
            spooled = []
            for path in Path(tempfile.gettempdir()).glob(f"ai-saas-spool-{prefix}*"):
                spooled += [p.name for p in path.iterdir()]
                shutil.rmtree(path, ignore_errors=True)
            if spooled:
                print(f"WARNING: usage events were spooled during the run: {spooled}",
                      file=sys.stderr)
    figures = figures["starlette"] if frameworks == ("starlette",) else figures
    figures["spooled_files"] = spooled
    print(f"total: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
