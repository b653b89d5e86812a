"""``ai-saas demo``: the demo app, the middleware, real traffic and a summary.

1. Redis: ``--redis-url`` or ``REDIS_URL`` when given, else a private embedded server.
2. The local OpenAI-compatible provider (under uvicorn) and the demo app of the chosen
   framework (see ``DEMO_APPS``: ASGI apps under uvicorn, WSGI apps under Werkzeug's
   threaded server), each on a free loopback port (real HTTP on both hops). Each
   server stops only once its requests in flight are settled (bounded), so the summary
   read afterwards sees every event.
3. A short burst of multi-tenant traffic: a free tenant over its 10 req/min, a pro and
   an enterprise tenant, a tenant stored in Redis with a fresh key, streamed answers
   (one of them abandoned half way by its client), an unknown key, non-AI pages.
4. A per-tenant table read back from the usage stream, and what Redis was asked.

The demo apps live in ``demo_projects/`` of the source checkout (``pip install -e .``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import AISaaSError

__all__ = ["DEMO_APPS", "InFlight", "run_demo", "serve_in_thread", "serve_wsgi_in_thread"]

log = logging.getLogger("ai_saas_middleware")

DEMO_KEYS = {"free-co": "demo-key-free", "pro-co": "demo-key-pro", "big-co": "demo-key-enterprise"}


def _demo_root() -> Path:
    here = Path(__file__).resolve().parent.parent
    for root in (here, Path.cwd()):
        if (root / "demo_projects" / "provider.py").exists():
            return root
    raise AISaaSError("the demo apps are in demo_projects/ of the source checkout: run "
                      "'pip install -e .' in a clone, or run this from the clone's folder")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InFlight:
    """The requests a server is in the middle of, and a bounded wait until there are none.

    A request counts from the moment the server calls the app until the app is done
    with it: for WSGI when the body's ``close()`` returned (the middleware settles in
    it), for ASGI when the app's coroutine returned.
    """

    __slots__ = ("_changed", "_count")

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @property
    def count(self) -> int:
        """How many requests are in flight now."""
        with self._changed:
            return self._count

    def enter(self) -> None:
        """A request began."""
        with self._changed:
            self._count += 1

    def leave(self) -> None:
        """A request ended."""
        with self._changed:
            self._count -= 1
            if not self._count:
                self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for no request in flight; True if none is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


def _drained(in_flight: InFlight, timeout: float, port: int) -> bool:
    if in_flight.wait_idle(timeout):
        return True
    log.warning("the server on port %d stops with %d request(s) still in flight after "
                "%.1fs", port, in_flight.count, timeout)
    return False


class _TrackedASGI:
    """An ASGI app counted in ``in_flight`` while it runs; remembers the server's loop."""

    def __init__(self, app: Any, in_flight: InFlight):
        self.app = app
        self.in_flight = in_flight
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.in_flight.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.leave()


class serve_in_thread:
    """Serve an ASGI app with uvicorn on a free loopback port in a daemon thread.

    Leaving the block stops the server only once the requests in flight are done and
    the settlements they started in the background (Django's ASGI adapter) are written,
    at most ``drain_timeout`` seconds: a summary read afterwards sees every event.
    """

    def __init__(self, app: Any, port: int | None = None, drain_timeout: float = 10.0):
        import uvicorn

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.drain_timeout = drain_timeout
        self.in_flight = InFlight()
        self._app = _TrackedASGI(app, self.in_flight)
        self.server = uvicorn.Server(uvicorn.Config(self._app, host="127.0.0.1",
                                                    port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> serve_in_thread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AISaaSError(f"the demo server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        from concurrent.futures import TimeoutError as FutureTimeout

        from .bodies import wait_for_settlements

        deadline = time.monotonic() + self.drain_timeout
        _drained(self.in_flight, self.drain_timeout, self.port)
        loop = self._app.loop
        if loop is not None and loop.is_running():
            # Settlements started as tasks of the server's loop: asyncio.run() would
            # cancel them when the server returns (they would be spooled, not written).
            waited = asyncio.run_coroutine_threadsafe(wait_for_settlements(), loop)
            try:
                waited.result(max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                waited.cancel()
                log.warning("the server on port %d stops with settlements pending",
                            self.port)
        self.server.should_exit = True
        self.thread.join(5)


_BODY_KEY = "ai_saas.demo.body"  # the environ key of a request's _TrackedBody


class _TrackedBody:
    """A WSGI body whose request leaves ``in_flight`` when its ``close()`` returned."""

    __slots__ = ("_body", "_in_flight", "_open")

    def __init__(self, body: Iterable[bytes], in_flight: InFlight):
        self._body = body
        self._in_flight = in_flight
        self._open = True

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        # Once: the handler calls it again in case the server skipped it. One request's
        # body is closed by the one thread serving that request, so no lock.
        if not self._open:
            return
        self._open = False
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._in_flight.leave()


def _tracked_wsgi(app: Any, in_flight: InFlight) -> Any:
    """``app`` counted in ``in_flight`` from its call until its body's ``close()``."""

    def tracked(environ: dict[str, Any], start_response: Any) -> _TrackedBody:
        in_flight.enter()
        try:
            body = app(environ, start_response)
        except BaseException:
            in_flight.leave()
            raise
        environ[_BODY_KEY] = tracked_body = _TrackedBody(body, in_flight)
        return tracked_body

    return tracked


class serve_wsgi_in_thread:
    """Serve a WSGI app with Werkzeug's threaded server on a free loopback port.

    Leaving the block stops the server only once the requests in flight are done (their
    bodies closed, so settled), at most ``drain_timeout`` seconds: Werkzeug serves each
    request in a daemon thread that ``server_close()`` does not join.

    Each body is closed, as PEP 3333 requires, even when Werkzeug skips it: its
    ``run_wsgi`` calls ``close()`` in a ``finally`` only after draining the socket, and a
    client that hung up with response bytes unread resets the connection, so that read
    raises ``ConnectionResetError`` and the body (and the request's settlement) was left
    to the garbage collector.
    """

    def __init__(self, app: Any, port: int | None = None, drain_timeout: float = 10.0):
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Handler(WSGIRequestHandler):
            def log_request(self, *args: Any) -> None:  # errors are still logged
                pass

            def run_wsgi(self) -> None:
                try:
                    super().run_wsgi()
                finally:
                    environ = getattr(self, "environ", None)
                    body = environ.pop(_BODY_KEY, None) if environ is not None else None
                    if body is not None:
                        body.close()  # a no-op when Werkzeug did close it

        self.drain_timeout = drain_timeout
        self.in_flight = InFlight()
        self.server = make_server("127.0.0.1", port or 0, _tracked_wsgi(app, self.in_flight),
                                  threaded=True, request_handler=Handler)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        # Polled often, so that leaving the block (shutdown) does not wait half a second.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self) -> serve_wsgi_in_thread:
        self.thread.start()  # the socket listens already: no wait for a start-up
        return self

    def __exit__(self, *_: object) -> None:
        _drained(self.in_flight, self.drain_timeout, self.port)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# framework -> (module of demo_projects with CONFIG and create_app(config, provider_url=...),
#               the server that serves its app)
DEMO_APPS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "starlette": ("demo_projects.starlette_app.app", serve_in_thread),
    "flask": ("demo_projects.flask_app.app", serve_wsgi_in_thread),
    "django": ("demo_projects.django_project.app", serve_in_thread),
}


async def _traffic(base: str, stored_key: str) -> tuple[Counter[tuple[str, int]], int]:
    """Send the burst; returns (tenant, status) counts and the number of AI requests."""
    import httpx

    statuses: Counter[tuple[str, int]] = Counter()
    messages = [{"role": "user", "content": "Summarize our quarterly numbers in one line."}]
    plan: list[tuple[str, str, str, dict[str, Any]]] = []
    for tenant, key, n in (("free-co", DEMO_KEYS["free-co"], 14),
                           ("pro-co", DEMO_KEYS["pro-co"], 12),
                           ("big-co", DEMO_KEYS["big-co"], 8),
                           ("startup-co", stored_key, 6)):
        for i in range(n):
            path = "/ai/chat/stream" if i % 4 == 3 else "/ai/chat"
            plan.append((tenant, key, path, {"messages": messages, "max_tokens": 64}))
    plan += [("big-co", DEMO_KEYS["big-co"], "/ai/premium/chat",
              {"messages": messages, "max_tokens": 128})] * 2
    plan.append(("(unknown key)", "not-a-real-key", "/ai/chat", {"messages": messages}))
    limit = asyncio.Semaphore(8)

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async def one(tenant: str, key: str, path: str, body: dict[str, Any]) -> None:
            async with limit:
                reply = await client.post(path, json=body,
                                          headers={"Authorization": f"Bearer {key}"})
                statuses[(tenant, reply.status_code)] += 1

        await asyncio.gather(*(one(*p) for p in plan))

        # A client that reads a little of a stream, then hangs up.
        async with client.stream("POST", "/ai/chat/stream",
                                 json={"messages": messages, "max_tokens": 40},
                                 headers={"Authorization": f"Bearer {DEMO_KEYS['pro-co']}"}
                                 ) as reply:
            async for _chunk in reply.aiter_raw():
                break
        statuses[("pro-co", reply.status_code)] += 1
        for _ in range(5):
            page = await client.get("/")
            statuses[("(non-AI page)", page.status_code)] += 1
    return statuses, len(plan) + 1


def run_demo(framework: str = "starlette", redis_url: str | None = None,
             out: Callable[[str], Any] = print) -> int:
    """Run the demo end to end; returns the exit status."""
    import os

    import yaml

    from .config import _DecimalLoader, load_config
    from .embedded import start_server
    from .report import format_table, read_events, summarize
    from .store.keys import KeySchema
    from .store.redis import RedisStore
    from .tenants import TenantAdmin

    # A client that hangs up mid-stream is part of the show; asyncio's note about
    # writing to its closed socket is not.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    root = _demo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from demo_projects import provider

    if framework not in DEMO_APPS:
        raise AISaaSError(f"no demo for {framework!r}; there is one for "
                          + ", ".join(sorted(DEMO_APPS)))
    demo_module, serve = DEMO_APPS[framework]
    demo = importlib.import_module(demo_module)
    CONFIG, create_app = demo.CONFIG, demo.create_app

    url = redis_url or os.environ.get("REDIS_URL")
    server = None
    if not url:
        server = start_server(prefer="embedded")
        url = server.url
        out(f"Redis: started {server.name} on {url}")
    else:
        out(f"Redis: {url.split('@')[-1]}")
    try:
        raw = yaml.load(CONFIG.read_text(), Loader=_DecimalLoader)
        prefix = f"demo{int(time.time() * 1000) % 10**10}"
        raw["redis"] = {**raw.get("redis", {}), "url": url, "keyPrefix": prefix}
        config = load_config(raw)
        store = RedisStore(config.redis, url)
        stored_key = TenantAdmin(config, store).add("startup-co", "pro")
        out(f"Stored tenant startup-co (tier pro) in Redis; its key: {stored_key[:12]}...")
        before = _evalsha_calls(store)
        with serve_in_thread(provider.app) as upstream, \
                serve(create_app(config, provider_url=upstream.url)) as app:
            out(f"Provider stand-in on {upstream.url}; demo app ({framework}) on {app.url}")
            started = time.monotonic()
            statuses, _ai_requests = asyncio.run(_traffic(app.url, stored_key))
            elapsed = time.monotonic() - started
        round_trips = _evalsha_calls(store) - before
        out(f"\nSent {sum(statuses.values())} requests in {elapsed:.2f}s. Statuses by tenant:")
        for tenant in sorted({t for t, _ in statuses}):
            parts = ", ".join(f"{status} x{n}" for (t, status), n in sorted(statuses.items())
                              if t == tenant)
            out(f"  {tenant:<16} {parts}")
        keys = KeySchema(prefix, config.redis.shards)
        rows = summarize(read_events(store, keys))
        refused = {t: n for (t, status), n in statuses.items() if status == 429}
        out("\nUsage read back from the Redis stream (one event per admitted AI request):")
        out(format_table(rows, refused))
        admitted = sum(r.requests for r in rows.values())
        limited = sum(refused.values())
        extra = round_trips - 2 * admitted - limited
        out(f"\nRedis round trips (EVALSHA): {round_trips} = {admitted} admitted x 2 (admission "
            f"+ settlement) + {limited} refused at admission + {extra} tier look-up(s) of a "
            f"stored tenant seen for the first time. Non-AI pages: "
            f"{statuses[('(non-AI page)', 200)]}, no Redis call.")
        store.close()
        return 0
    finally:
        if server is not None:
            server.stop()


def _evalsha_calls(store: Any) -> int:
    stats = store.call("INFO", "commandstats")
    if isinstance(stats, bytes):
        stats = stats.decode()
    if isinstance(stats, str):
        for line in stats.splitlines():
            if line.startswith("cmdstat_evalsha:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0
    entry = stats.get("cmdstat_evalsha") if isinstance(stats, dict) else None
    return int(entry["calls"]) if entry else 0
