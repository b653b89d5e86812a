"""Fault injection for ``tests/test_faults.py``: private servers, a loopback TCP proxy,
concurrent client load, and the ledger check every fault test ends with.

- :class:`PrivateRedis`: a redis-server (or the embedded Valkey) of the test's own, on a
  fixed port, whose dataset survives a restart (``SHUTDOWN SAVE`` then a new process on
  the same port and directory), so a restart loses nothing the ledger counts.
- :class:`Proxy`: a threaded loopback TCP proxy between the app and Redis, with modes
  ``forward``, ``hold`` (commands reach Redis, replies are kept back until the mode
  changes), ``drop`` (commands reach Redis, replies are lost) and ``stall`` (nothing
  moves either way until the mode changes). It counts the script calls it saw, so a
  test can wait until a request is parked in a known round trip.
- :class:`Load`: several asyncio tasks in a thread of their own sending AI requests to a
  served app, each result recorded (status, request id, latency).
- :func:`check_ledger`: for every admitted request exactly one usage event, none for a
  refused one, and each tenant's monthly counter equal to its events' tokens plus the
  reservations still in flight (``res``), polled until true or a deadline.
"""

from __future__ import annotations

import asyncio
import copy
import faulthandler
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from conftest import API_KEYS, BASE_CONFIG

from ai_saas_middleware.embedded import LocalServer, find_server_binary, start_server

SHARDS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0,
               what: str | Callable[[], str] = "condition", interval_s: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail after
    ``timeout_s`` naming ``what`` (a text, or a function giving one then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            faulthandler.dump_traceback(all_threads=True)  # where whatever it waits on is
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval_s)


# ------------------------------------------------------------------ servers


def server_binaries() -> list[tuple[str, str | None]]:
    """(id, binary) of the servers the fault tests run against: Debian's redis-server and
    the embedded Valkey (None when not installed: that parameter is skipped)."""
    embedded = find_server_binary(prefer="embedded")
    if embedded is not None and "valkey" not in os.path.basename(embedded):
        embedded = None
    import shutil

    return [("redis", shutil.which("redis-server")), ("valkey", embedded)]


class PrivateRedis:
    """A private server on a port of its own, with its dataset in ``data_dir`` (RDB), so
    :meth:`stop` (``SHUTDOWN SAVE``) and :meth:`start` on the same port keep every key."""

    def __init__(self, binary: str, data_dir: Path):
        self.binary = binary
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.server: LocalServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, **kwargs)

    def start(self, *extra: str) -> None:
        self.server = start_server(binary=self.binary, port=self.port, args=(
            "--dir", str(self.data_dir), "--dbfilename", "dump.rdb", *extra))

    def stop(self) -> None:
        """Save the dataset and exit, as an operator's restart does; waits for the exit."""
        assert self.server is not None
        client = self.client(socket_timeout=10)
        try:
            client.shutdown(save=True)
        except (redis.ConnectionError, redis.ResponseError):
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        self.server.process.wait(10)
        self.server.stop()
        self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# ------------------------------------------------------------------ the proxy

MODES = ("forward", "hold", "drop", "stall")


class _Pair:
    """One proxied connection: the app's socket and ours to Redis, with what is held."""

    def __init__(self, app: socket.socket, upstream: socket.socket):
        self.app = app
        self.upstream = upstream
        self.lock = threading.Lock()
        self.held_up: list[bytes] = []    # commands not yet passed to Redis
        self.held_down: list[bytes] = []  # replies not yet passed to the app
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.held_up.clear()
            self.held_down.clear()
        for sock in (self.app, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Proxy:
    """A loopback TCP proxy to ``127.0.0.1:target_port`` (see the module docstring).

    ``url`` is what the app is configured with. ``commands(word)`` counts the commands
    whose name is ``word`` (e.g. ``EVALSHA``) that reached the proxy from the app.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.mode = "forward"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._seen = bytearray()  # every byte the app sent (commands are small)
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def commands(self, word: bytes = b"EVALSHA") -> int:
        with self._lock:
            return bytes(self._seen).upper().count(b"\r\n" + word.upper() + b"\r\n")

    def wait_commands(self, at_least: int, word: bytes = b"EVALSHA",
                      timeout_s: float = 5.0) -> None:
        wait_until(lambda: self.commands(word) >= at_least, timeout_s,
                   f"{at_least} {word.decode()} commands through the proxy")

    def set_mode(self, mode: str) -> None:
        """Switch mode; leaving ``hold``/``stall`` for ``forward`` delivers what was held,
        in order."""
        assert mode in MODES, mode
        with self._lock:
            leaving_drop = self.mode == "drop" and mode != "drop"
            self.mode = mode
            pairs = list(self._pairs)
        if leaving_drop:
            # Bytes were lost: as on a real network, such a connection cannot go on (TCP
            # never delivers later bytes after lost ones); its client reconnects.
            self.cut()
            return
        for pair in pairs:
            with pair.lock:
                if pair.closed:
                    continue
                try:
                    if mode in ("forward", "hold", "drop"):
                        for data in pair.held_up:
                            pair.upstream.sendall(data)
                        pair.held_up.clear()
                    if mode == "forward":
                        for data in pair.held_down:
                            pair.app.sendall(data)
                        pair.held_down.clear()
                    elif mode == "drop":
                        pair.held_down.clear()
                except OSError:
                    pass

    def cut(self) -> None:
        """Close every proxied connection, discarding what was held (a network cut)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def close(self) -> None:
        self._running = False
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while self._running:
            try:
                app, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), 2)
                upstream.settimeout(None)
            except OSError:
                app.close()  # Redis is down: so is the proxy's far side
                continue
            pair = _Pair(app, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _pump(self, pair: _Pair, up: bool) -> None:
        source, target = (pair.app, pair.upstream) if up else (pair.upstream, pair.app)
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                pair.close()
                with self._lock:
                    if pair in self._pairs:
                        self._pairs.remove(pair)
                return
            with self._lock:
                mode = self.mode
                if up:
                    self._seen += data
            with pair.lock:
                if pair.closed:
                    return
                try:
                    if up:
                        if mode == "stall":
                            pair.held_up.append(data)
                        else:
                            target.sendall(data)
                    elif mode == "forward":
                        target.sendall(data)
                    elif mode in ("hold", "stall"):
                        pair.held_down.append(data)
                    # "drop": the reply is lost
                except OSError:
                    pass


# ------------------------------------------------------------------ configuration


def lease_configurable() -> bool:
    """Whether this package accepts ``quota.reservationTimeout`` (short leases in tests)."""
    from ai_saas_middleware import load_config
    from ai_saas_middleware.errors import ConfigError

    config = copy.deepcopy(BASE_CONFIG)
    config["quota"] = {"reservationTimeout": "2s"}
    try:
        load_config(config)
    except ConfigError:
        return False
    return True


LEASE_S = 2.0
LEASES = lease_configurable()


def fault_config(url: str, prefix: str, spool_dir: Path, on_unavailable: str = "open",
                 **redis_section: Any) -> dict[str, Any]:
    """The tests' base configuration on ``url``, with short timeouts and retry interval
    (and a 2 s reservation lease where the package accepts one)."""
    config = copy.deepcopy(BASE_CONFIG)
    config["redis"] = {"url": url, "keyPrefix": prefix, "spoolDir": str(spool_dir),
                       "onUnavailable": on_unavailable, "socketTimeout": "250ms",
                       "connectTimeout": "250ms", "retryInterval": "100ms", **redis_section}
    if LEASES:
        config["quota"] = {"reservationTimeout": f"{LEASE_S:g}s"}
    return config


def chat_body(prompt: int = 12, completion: int = 34, max_tokens: int = 40) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Say hello in five words."}],
            "max_tokens": max_tokens, "reply_usage": [prompt, completion]}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[tenant]}"}


# ------------------------------------------------------------------ client load


@dataclass(frozen=True)
class Result:
    """What one client saw of one request."""

    tenant: str
    status: int              # 0: no response (connection error, client timeout)
    request_id: str | None
    error_code: str | None
    started: float           # time.monotonic()
    latency_s: float

    @property
    def admitted(self) -> bool:
        return 200 <= self.status < 300 and self.request_id is not None


def _result(tenant: str, started: float, reply: httpx.Response | None) -> Result:
    latency = time.monotonic() - started
    if reply is None:
        return Result(tenant, 0, None, None, started, latency)
    code = None
    if reply.status_code >= 400:
        try:
            code = reply.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
    return Result(tenant, reply.status_code, reply.headers.get("x-request-id"), code,
                  started, latency)


class Load:
    """``workers`` concurrent clients (asyncio tasks of one thread) sending ``POST path``
    for the tenants in turn until :meth:`stop`; every result kept in ``results``.

    Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, base_url: str, tenants: Iterable[str] = ("initech", "globex"), *,
                 workers: int = 4, path: str = "/ai/chat", pause_s: float = 0.01,
                 timeout_s: float = 10.0):
        self.base_url = base_url
        self.tenants = list(tenants)
        self.workers = workers
        self.path = path
        self.pause_s = pause_s
        self.timeout_s = timeout_s
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serial = 0

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
            assert not self._thread.is_alive(), "the load did not stop"
            self._thread = None

    def count(self, predicate: Callable[[Result], bool] = lambda r: True) -> int:
        with self._lock:
            return sum(1 for r in self.results if predicate(r))

    def wait_for(self, predicate: Callable[[Result], bool], n: int, timeout_s: float = 10.0,
                 what: str = "results") -> None:
        wait_until(lambda: self.count(predicate) >= n, timeout_s, f"{n} {what}")

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.workers)))

    async def _worker(self, client: httpx.AsyncClient, worker: int) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._serial += 1
                n = self._serial
            tenant = self.tenants[n % len(self.tenants)]
            started = time.monotonic()
            try:
                reply: httpx.Response | None = await client.post(
                    self.path, json=chat_body(prompt=10 + n % 7, completion=20 + n % 11),
                    headers=auth(tenant))
            except httpx.HTTPError:
                reply = None
            result = _result(tenant, started, reply)
            with self._lock:
                self.results.append(result)
            await asyncio.sleep(self.pause_s)  # pacing, not a wait for anything


def one_request(base_url: str, tenant: str = "initech", **body: Any) -> Result:
    """One request through the app, from the test's thread."""
    started = time.monotonic()
    reply = httpx.post(base_url + "/ai/chat", json=chat_body(**body), headers=auth(tenant),
                       timeout=10)
    return _result(tenant, started, reply)


# ------------------------------------------------------------------ the ledger


def spool_files(spool_dir: Path) -> list[Path]:
    """Spooled settlements not yet replayed (pending files and claims)."""
    if not spool_dir.exists():
        return []
    return sorted([*spool_dir.glob("spool-*.jsonl"), *spool_dir.glob("*.replaying")])


def spooled_ids(spool_dir: Path) -> list[str]:
    """Request ids of the settlements waiting in the spool, in file order."""
    ids = []
    for path in spool_files(spool_dir):
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:  # a replay moved it since the listing: read again
            return spooled_ids(spool_dir)
        for line in text.splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            args = entry[2] if isinstance(entry, list) else entry.get("args", [])
            ids.append(str(args[args.index("request_id") + 1]))
    return ids


def set_aside(spool_dir: Path) -> list[str]:
    """Lines of the spool's set-aside file(s): settlements given up as never possible."""
    if not spool_dir.exists():
        return []
    lines: list[str] = []
    for path in [spool_dir / "rejected.jsonl", *spool_dir.glob("rejected-*.retrying")]:
        if path.exists():
            lines += [x for x in path.read_text("utf-8").splitlines() if x.strip()]
    return lines


@dataclass
class Ledger:
    """What Redis holds under a prefix: events, counters, reservations in flight."""

    events: list[dict[str, str]]
    counters: dict[tuple[str, str], int]              # (tenant, month) -> counter
    in_flight: dict[tuple[str, str], dict[str, int]]  # (tenant, month) -> {request: tokens}
    problems: list[str] = field(default_factory=list)

    @property
    def ids(self) -> Counter[str]:
        return Counter(e["request_id"] for e in self.events)

    def event_tokens(self, tenant: str, month: str) -> int:
        return sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in self.events
                   if e["tenant_id"] == tenant and e["ts"][:7] == month)


def read_ledger(client: redis.Redis, prefix: str) -> Ledger:
    events: list[dict[str, str]] = []
    for stream in client.scan_iter(match=f"{prefix}:*:usage", count=1000):
        events += [fields for _, fields in client.xrange(stream)]
    counters: dict[tuple[str, str], int] = {}
    for key in client.scan_iter(match=f"{prefix}:*:t:*:q:*", count=1000):
        tenant, month = key.split(":t:", 1)[1].split(":q:")
        counters[(tenant, month)] = int(client.get(key) or 0)
    in_flight: dict[tuple[str, str], dict[str, int]] = {}
    for key in client.scan_iter(match=f"{prefix}:*:t:*:res", count=1000):
        tenant = key.split(":t:", 1)[1].rsplit(":", 1)[0]
        for member in client.zrange(key, 0, -1):
            request_id, tokens, month = member.rsplit(" ", 2)
            in_flight.setdefault((tenant, month), {})[request_id] = int(tokens)
    return Ledger(events, counters, in_flight)


def _problems(ledger: Ledger, admitted: set[str], refused: set[str], exact: bool,
              allowed_extra: set[str]) -> list[str]:
    problems = []
    ids = ledger.ids
    twice = sorted(i for i, n in ids.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} requests with more than one event: {twice[:5]}")
    missing = sorted(admitted - set(ids))
    if missing:
        problems.append(f"{len(missing)} admitted requests without an event: {missing[:5]}")
    billed_refused = sorted(refused & set(ids))
    if billed_refused:
        problems.append(f"events for refused requests: {billed_refused[:5]}")
    if exact:
        unknown = sorted(set(ids) - admitted - allowed_extra)
        if unknown:
            problems.append(f"events for requests no client saw admitted: {unknown[:5]}")
    months = set(ledger.counters) | set(ledger.in_flight) | {
        (e["tenant_id"], e["ts"][:7]) for e in ledger.events}
    for tenant, month in sorted(months):
        counter = ledger.counters.get((tenant, month), 0)
        events = ledger.event_tokens(tenant, month)
        held = sum(ledger.in_flight.get((tenant, month), {}).values())
        if counter != events + held:
            problems.append(f"{tenant} {month}: counter {counter} != events {events} + "
                            f"reservations in flight {held}")
    return problems


def check_ledger(client: redis.Redis, prefix: str, results: Iterable[Result] = (), *,
                 admitted: Iterable[str] = (), refused: Iterable[str] = (),
                 exact: bool = True, allowed_extra: Iterable[str] = (),
                 spool_dir: Path | None = None, timeout_s: float = 10.0) -> Ledger:
    """Check the ledger under ``prefix``, polling until it holds or ``timeout_s``.

    For every admitted request (a 2xx with ``X-Request-ID`` among ``results``, and the
    ids in ``admitted``) exactly one usage event; none for a refused one; with ``exact``,
    no event for a request that no client saw admitted (but ``allowed_extra``); no event
    twice; for each tenant and month, counter == its events' prompt + completion tokens
    + its reservations still in flight. With ``spool_dir``, also that nothing is waiting
    in the spool or set aside. Returns the ledger read last.
    """
    results = list(results)
    admitted_ids = {r.request_id for r in results if r.admitted} | set(admitted)
    refused_ids = {r.request_id for r in results
                   if not r.admitted and r.request_id is not None} | set(refused)
    extra = set(allowed_extra)
    deadline = time.monotonic() + timeout_s
    while True:
        ledger = read_ledger(client, prefix)
        ledger.problems = _problems(ledger, {i for i in admitted_ids if i}, refused_ids,
                                    exact, extra)
        if spool_dir is not None:
            if spool_files(spool_dir):
                ledger.problems.append(f"spool not replayed: {spool_files(spool_dir)}")
            if set_aside(spool_dir):
                ledger.problems.append(f"settlements set aside: {set_aside(spool_dir)[:3]}")
        if not ledger.problems:
            return ledger
        if time.monotonic() > deadline:
            raise AssertionError("ledger not exact:\n  " + "\n  ".join(ledger.problems))
        time.sleep(0.05)


# ------------------------------------------------------------------ app subprocess


APP_MODULE = '''\
"""A small Starlette app behind the middleware, for a test that SIGKILLs it."""
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ai_saas_middleware.starlette import AISaaSMiddleware


async def chat(request):
    if (await request.json()).get("block"):
        await asyncio.Event().wait()  # a slow upstream that never answers
    return JSONResponse({"usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                   "total_tokens": 7}, "choices": []})


async def home(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/ai/chat", chat, methods=["POST"]), Route("/", home)])
app.add_middleware(AISaaSMiddleware, config=os.environ["AI_SAAS_FAULT_CONFIG"])
'''


def start_app_process(tmp_path: Path, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes],
                                                                      str]:
    """Run :data:`APP_MODULE` under uvicorn in a subprocess with ``config`` (written as a
    YAML file); returns the process and its base URL once it answers."""
    import sys

    import yaml

    (tmp_path / "fault_app.py").write_text(APP_MODULE)
    config_path = tmp_path / "fault-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "AI_SAAS_FAULT_CONFIG": str(config_path),
           "PYTHONPATH": str(tmp_path)}
    log = open(tmp_path / "app.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fault_app:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--lifespan", "off"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError("the app process exited:\n" +
                                 (tmp_path / "app.log").read_text(errors="replace"))
        try:
            return httpx.get(url + "/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, 20, "the app process to answer")
    return process, url
