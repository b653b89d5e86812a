"""``ai-saas demo``: the demo app, the middleware, real traffic and a summary.

1. Redis: ``--redis-url`` or ``REDIS_URL`` when given, else a private embedded server.
2. The local OpenAI-compatible provider (under uvicorn) and the demo app of the chosen
   framework (see ``DEMO_APPS``: ASGI apps under uvicorn, WSGI apps under Werkzeug's
   threaded server), each on a free loopback port (real HTTP on both hops). Each
   server stops only once its requests in flight are settled (bounded), so the summary
   read afterwards sees every event.
3. Multi-tenant traffic in four steps, each measured once the app has settled all of
   its requests: a stored tenant's first request (alone, so its tier is looked up in
   Redis once); a burst (a free tenant over its 10 req/min, a pro and an enterprise
   tenant, the stored tenant, streamed answers, an unknown key); a stream whose client
   hangs up after a fixed number of chunks (the provider stand-in pauses there until
   the hang-up, so the same text is billed in every run); non-AI pages.
4. What the client got, the per-tenant table read back from the usage stream, and the
   EVALSHA calls Redis counted in each step (``INFO commandstats`` deltas), beside the
   hot path's budget. Every figure is measured; all but the elapsed time are the same
   in every run and on every framework (``tests/test_*demo.py`` and README.md's copy
   of the output check it).

The demo apps live in ``demo_projects/`` of the source checkout (``pip install -e .``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
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

    def settled(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight and the settlements they started in the
        background are written, at most ``timeout`` seconds (``drain_timeout`` by
        default); True if so, else False (and a warning is logged)."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from .bodies import wait_for_settlements

        timeout = self.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not _drained(self.in_flight, timeout, self.port):
            return False
        loop = self._app.loop
        if loop is not None and loop.is_running():
            # Settlements started as tasks of the server's loop: asyncio.run() would
            # cancel them when the server returns (they would be spooled, not written).
            waited = asyncio.run_coroutine_threadsafe(wait_for_settlements(), loop)
            try:
                waited.result(max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                waited.cancel()
                log.warning("the server on port %d has settlements pending after %.1fs",
                            self.port, timeout)
                return False
        return True

    def __exit__(self, *_: object) -> None:
        self.settled()
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

    def settled(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight (each settles in its body's ``close()``),
        at most ``timeout`` seconds (``drain_timeout`` by default); True if so, else
        False (and a warning is logged)."""
        return _drained(self.in_flight, self.drain_timeout if timeout is None else timeout,
                        self.port)

    def __exit__(self, *_: object) -> None:
        self.settled()
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


MESSAGES = [{"role": "user", "content": "Summarize our quarterly numbers in one line."}]
# The stream a client hangs up on stops after this many content chunks and waits for the
# hang-up (the stand-in's "pause_after_chunks"; see demo_projects/provider.py): the client
# reads exactly these, so the same text is billed in every run, whatever the timing.
HANG_UP_AFTER_CHUNKS = 5
CONCURRENCY = 8  # requests of the burst in flight at once
PAGE = "(non-AI page)"
# The hot path's budget of EVALSHA calls per reply to an AI request (DESIGN.md): admitted
# (any status the app answered) 2, admission and settlement; refused by a limit 1; a key
# refused before Redis (not a stored tenant's form) none.
_ADMITTED, _REFUSED_BY_LIMIT, _REFUSED_LOCALLY = 2, 1, 0


@dataclass
class _Step:
    """One step of the demo's traffic: the replies its client got, and the EVALSHA calls
    the Redis server counted from before the step's first request until its last one was
    settled (``INFO commandstats``)."""

    title: str
    replies: Counter[tuple[str, int]] = field(default_factory=Counter)  # (tenant, status)
    round_trips: int = 0
    tier_look_ups: int = 0  # first requests of stored tenants the step sends (the budget's)

    @property
    def budget(self) -> int:
        """The EVALSHA calls the hot path's budget allows for these replies."""
        total = self.tier_look_ups
        for (tenant, status), n in self.replies.items():
            if tenant == PAGE or status == 401:
                total += n * _REFUSED_LOCALLY
            elif status == 429:
                total += n * _REFUSED_BY_LIMIT
            else:
                total += n * _ADMITTED
        return total


@dataclass
class _HangUp:
    """What the client that hung up mid-stream got before it did."""

    request_id: str = ""
    chunks: int = 0
    text: str = ""


async def _traffic(base: str, stored_key: str, checkpoint: Callable[[], int]
                   ) -> tuple[list[_Step], _HangUp]:
    """Send the demo's traffic in steps, each measured on its own (``checkpoint()`` waits
    until the app has settled every request so far and returns Redis's EVALSHA count)."""
    import httpx

    keys = {**DEMO_KEYS, "startup-co": stored_key, "(unknown key)": "not-a-real-key"}

    def auth(tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[tenant]}"}

    chat = {"messages": MESSAGES, "max_tokens": 64}
    burst: list[tuple[str, str, dict[str, Any]]] = []
    for tenant, n in (("free-co", 14), ("pro-co", 12), ("big-co", 8), ("startup-co", 6)):
        # startup-co's first request is step 1: alone, so its tier is looked up once,
        # not by as many of its requests as happen to be admitted before the first reply.
        for i in range(1 if tenant == "startup-co" else 0, n):
            burst.append((tenant, "/ai/chat/stream" if i % 4 == 3 else "/ai/chat", chat))
    burst += [("big-co", "/ai/premium/chat", {"messages": MESSAGES, "max_tokens": 128})] * 2
    burst.append(("(unknown key)", "/ai/chat", {"messages": MESSAGES}))
    first, crowd, hang_up_step, pages = steps = [
        _Step("1. startup-co's first request", tier_look_ups=1),
        _Step(f"2. the burst: 4 tenants, {CONCURRENCY} at a time"),
        _Step(f"3. pro-co's stream, hung up after {HANG_UP_AFTER_CHUNKS} chunks"),
        _Step("4. non-AI pages"),
    ]
    hung = _HangUp()
    limit = asyncio.Semaphore(CONCURRENCY)

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async def post(step: _Step, tenant: str, path: str, body: dict[str, Any]) -> None:
            async with limit:
                reply = await client.post(path, json=body, headers=auth(tenant))
            step.replies[(tenant, reply.status_code)] += 1

        async def hang_up() -> None:
            body = {"messages": MESSAGES, "max_tokens": 40,
                    "pause_after_chunks": HANG_UP_AFTER_CHUNKS}
            async with client.stream("POST", "/ai/chat/stream", json=body,
                                     headers=auth("pro-co")) as reply:
                hung.request_id = reply.headers.get("x-request-id", "")
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue  # keep-alives, blank lines
                    for choice in json.loads(line[len("data: "):]).get("choices") or []:
                        hung.text += (choice.get("delta") or {}).get("content") or ""
                    hung.chunks += 1
                    if hung.chunks == HANG_UP_AFTER_CHUNKS:
                        break  # leaving the block closes the connection: the hang-up
            hang_up_step.replies[("pro-co", reply.status_code)] += 1

        async def pages_of_the_site() -> None:
            for _ in range(5):
                page = await client.get("/")
                pages.replies[(PAGE, page.status_code)] += 1

        async def measured(step: _Step, traffic: Callable[[], Awaitable[Any]]) -> None:
            # ``traffic`` is started only once the count before it is read: an awaitable
            # made earlier may already run (asyncio.gather schedules its tasks at once), and
            # its calls would be counted in the step before, or in none.
            before = await asyncio.to_thread(checkpoint)
            await traffic()
            step.round_trips = await asyncio.to_thread(checkpoint) - before

        await measured(first, lambda: post(first, "startup-co", "/ai/chat", chat))
        await measured(crowd, lambda: asyncio.gather(*(post(crowd, *p) for p in burst)))
        await measured(hang_up_step, hang_up)
        await measured(pages, pages_of_the_site)
    return steps, hung


def _columns(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return text


def _replies(replies: Mapping[tuple[str, int], int]) -> str:
    by_status: Counter[int] = Counter()
    for (_tenant, status), n in replies.items():
        by_status[status] += n
    return ", ".join(f"{status} x{n}" for status, n in sorted(by_status.items()))


def run_demo(framework: str = "starlette", redis_url: str | None = None,
             out: Callable[[str], Any] = print, key_prefix: str | None = None) -> int:
    """Run the demo end to end; returns the exit status.

    Args:
        framework: the demo app's framework, a key of ``DEMO_APPS``.
        redis_url: the Redis to use (else ``REDIS_URL``, else an embedded server).
        out: where each line of the report goes.
        key_prefix: the prefix of the run's Redis keys; a fresh one by default, so that
            runs never see each other's data.
    """
    import os
    import secrets

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
        prefix = key_prefix or f"demo{secrets.token_hex(5)}"
        # A 2 s socket timeout: the demo's app, client and servers share one process, so a
        # pause of that process (a full garbage collection late in a long test session)
        # must not read as a Redis outage, which would serve from the local allowance and
        # spool what the report then reads back from Redis.
        raw["redis"] = {**raw.get("redis", {}), "url": url, "keyPrefix": prefix,
                        "socketTimeout": "2s"}
        config = load_config(raw)
        store = RedisStore(config.redis, url)
        stored_key = TenantAdmin(config, store).add("startup-co", "pro")
        out(f"Stored tenant startup-co (tier pro) in Redis; its key: {stored_key[:12]}...")
        with serve_in_thread(provider.app) as upstream, \
                serve(create_app(config, provider_url=upstream.url)) as app:
            out(f"Provider stand-in on {upstream.url}; demo app ({framework}) on {app.url}")

            def checkpoint() -> int:
                app.settled()
                return _evalsha_calls(store)

            started = time.monotonic()
            steps, hung = asyncio.run(_traffic(app.url, stored_key, checkpoint))
            # Measured, so not the same in every run: on a line of its own.
            elapsed = time.monotonic() - started
        statuses: Counter[tuple[str, int]] = Counter()
        for step in steps:
            statuses.update(step.replies)
        out(f"\nSent {sum(statuses.values())} requests in {elapsed:.2f}s. "
            "Statuses by tenant:")
        for tenant in sorted({t for t, _ in statuses}):
            parts = ", ".join(f"{status} x{n}" for (t, status), n in sorted(statuses.items())
                              if t == tenant)
            out(f"  {tenant:<16} {parts}")

        keys = KeySchema(prefix, config.redis.shards)
        events = list(read_events(store, keys))
        out("")
        for line in _hang_up_line(hung, [e for e in events
                                         if e["request_id"] == hung.request_id]):
            out(line)
        rows = summarize(events)
        refused = {t: n for (t, status), n in statuses.items() if status == 429}
        out("\nUsage read back from the Redis stream (one event per admitted AI request):")
        out(format_table(rows, refused))
        for line in _round_trips(steps, shared=server is None):
            out(line)
        store.close()
        return 0
    finally:
        if server is not None:
            # The apps' gateways still run their watch threads, which would warn that the
            # server they read is gone: true, and no news at the end of a demo.
            package_log = logging.getLogger("ai_saas_middleware")
            level = package_log.level
            package_log.setLevel(logging.ERROR)
            try:
                server.stop()
            finally:
                package_log.setLevel(level)


def _hang_up_line(hung: _HangUp, events: list[dict[str, str]]) -> list[str]:
    said = (f"pro-co's client read {hung.chunks} chunks of a stream ({len(hung.text)} "
            "characters of text) and hung up:")
    if len(events) != 1:
        return [said, f"  the stream holds {len(events)} events of that request."]
    [event] = events
    return [said, f"  billed {event['prompt_tokens']} prompt + {event['completion_tokens']} "
                  f"completion tokens (usage_source={event['usage_source']}, "
                  f"client_disconnected={event['client_disconnected']})."]


def _round_trips(steps: list[_Step], *, shared: bool) -> list[str]:
    lines = [["step", "replies", "EVALSHA"]]
    lines += [[s.title, _replies(s.replies), str(s.round_trips)] for s in steps]
    requests = sum(sum(s.replies.values()) for s in steps)
    lines.append(["total", f"{requests} requests", str(sum(s.round_trips for s in steps))])
    text = ["", "Redis round trips by step (EVALSHA calls, counted by Redis: INFO commandstats):",
            *_columns(lines),
            "The hot path's budget: an admitted AI request costs 2 (admission before the",
            "handler, settlement after), a refusal by a limit (429) 1, a key refused before",
            "Redis (401) and a non-AI page none; a stored tenant's first request 1 more (its",
            "tier, looked up in Redis)."]
    off = [s for s in steps if s.round_trips != s.budget]
    if not off:
        text.append("Each step's count is the budget's.")
    for step in off:
        why = " (Redis counts every client's calls)" if shared else ""
        text.append(f"Step {step.title.split('.')[0]} counted {step.round_trips}, the budget "
                    f"is {step.budget}{why}.")
    return text


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
