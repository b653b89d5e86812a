"""The Lua scripts through the store, below the gateway: retry idempotence and replies."""

from __future__ import annotations

import time

from ai_saas_middleware.config import load_config
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import RedisStore


def _admit_args(request_id: str, month: str, reserve: int, *extra: str) -> list[object]:
    from ai_saas_middleware.gateway import _this_month

    this, start, end = _this_month()
    if month != this:  # the bounds of another month: 1999-01
        start, end = 915148800, 917827200
    return [request_id, month, "static", "", "pro", 100, 60_000, 100_000, reserve,
            86400, start, end, *extra]


def test_a_retried_admission_is_not_counted_twice(make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    month = time.strftime("%Y-%m", time.gmtime())
    script_keys = [keys.rate_limit, keys.quota(month), keys.record, keys.api_keys]

    first = store.admit(script_keys, _admit_args("req_a", month, 300))
    again = store.admit(script_keys, _admit_args("req_a", month, 300, "retry"))
    other = store.admit(script_keys, _admit_args("req_b", month, 300, "retry"))

    assert first[0] == 0 and again[0] == 0 and other[0] == 0
    assert int(rclient.get(keys.quota(month))) == 600  # req_a once, req_b once
    assert rclient.zcard(keys.rate_limit) == 2
    store.close()


def test_admission_in_another_month_asks_for_the_servers_month(make_config, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    stale = "1999-01"
    reply = store.admit([keys.rate_limit, keys.quota(stale), keys.record, keys.api_keys],
                        _admit_args("req_c", stale, 10))
    assert reply[0] == 5
    assert reply[2].decode() == time.strftime("%Y-%m", time.gmtime())
    store.close()


def test_settle_writes_all_or_nothing(make_config, rclient, key_prefix) -> None:
    """A counter that cannot move (wrong type) leaves no event and no settled marker."""
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.hset(keys.quota("2026-01"), "oops", "1")  # a corrupted counter
    script_keys = [keys.quota("2026-01"), keys.stream, keys.settled("req_x")]
    import pytest

    from ai_saas_middleware.errors import StoreRefused

    with pytest.raises(StoreRefused, match="quota counter not moved"):
        store.settle(script_keys, [5, 60, 60, "request_id", "req_x"])
    assert rclient.xlen(keys.stream) == 0
    assert not rclient.exists(keys.settled("req_x"))

    rclient.delete(keys.quota("2026-01"))
    assert store.settle(script_keys, [5, 60, 60, "request_id", "req_x"]) is not None
    assert store.settle(script_keys, [5, 60, 60, "request_id", "req_x"]) is None  # once
    assert rclient.xlen(keys.stream) == 1 and rclient.get(keys.quota("2026-01")) == "5"
    store.close()


# --------------------------------------------------------------------------- the asyncio lane

import asyncio  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402

from ai_saas_middleware.embedded import start_server  # noqa: E402
from ai_saas_middleware.errors import StoreError  # noqa: E402
from ai_saas_middleware.store.redis import AsyncRedisStore  # noqa: E402


def _usage_args(month: str) -> list[object]:
    return ["static", month, "", 60_000]


async def test_lane_answers_each_of_many_concurrent_calls_with_its_own_reply(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    schema = KeySchema(key_prefix, 16)
    for i in range(50):  # distinct counters so every reply is distinguishable
        rclient.set(schema.tenant(f"t{i}").quota(month), i * 1000)

    async def used(i: int) -> int:
        k = schema.tenant(f"t{i % 50}")
        reply = await store.usage([k.rate_limit, k.quota(month), k.record, k.api_keys],
                                  _usage_args(month))
        return int(reply[2])

    results = await asyncio.gather(*(used(i) for i in range(2000)))
    assert results == [(i % 50) * 1000 for i in range(2000)]
    await store.close()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_others(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    schema = KeySchema(key_prefix, 16)
    for i in range(3):
        rclient.set(schema.tenant(f"c{i}").quota(month), i + 1)

    async def used(i: int) -> int:
        k = schema.tenant(f"c{i}")
        return int((await store.usage([k.rate_limit, k.quota(month), k.record, k.api_keys],
                                      _usage_args(month)))[2])

    await used(0)  # connected, scripts loaded
    first = asyncio.ensure_future(used(0))
    second = asyncio.ensure_future(used(1))
    await asyncio.sleep(0)  # both written
    first.cancel()
    assert await second == 2
    assert await used(2) == 3
    await store.close()


async def test_lane_reloads_scripts_after_a_script_flush(make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    k = KeySchema(key_prefix, 16).tenant("f")
    args = ([k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
    assert (await store.usage(*args))[0] == 0
    rclient.script_flush()
    assert (await store.usage(*args))[0] == 0
    await store.close()


async def test_lane_uses_the_urls_password_and_database(tmp_path) -> None:
    server = start_server(args=("--requirepass", "s3cret"))
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/5"
        config = load_config({"redis": {"url": url, "keyPrefix": "auth",
                                        "spoolDir": str(tmp_path)}})
        store = AsyncRedisStore(config.redis)
        month = time.strftime("%Y-%m", time.gmtime())
        k = KeySchema("auth", 16).tenant("a")
        import redis as redis_py

        direct = redis_py.Redis(port=server.port, password="s3cret", db=5)
        direct.set(k.quota(month), 42)
        reply = await store.usage([k.rate_limit, k.quota(month), k.record, k.api_keys],
                                  _usage_args(month))
        assert int(reply[2]) == 42  # read from db 5, after AUTH
        await store.close()
        direct.close()
        wrong = AsyncRedisStore(load_config({"redis": {
            "url": f"redis://:nope@127.0.0.1:{server.port}/0", "spoolDir": str(tmp_path)}}).redis)
        with pytest.raises(StoreError):
            await wrong.usage([k.rate_limit, k.quota(month), k.record, k.api_keys],
                              _usage_args(month))
    finally:
        server.stop()


async def test_lane_gives_up_on_a_hung_server_within_the_timeout(tmp_path) -> None:
    server = start_server()
    try:
        config = load_config({"redis": {"url": server.url, "socketTimeout": "200ms",
                                        "retryInterval": "1s", "spoolDir": str(tmp_path)}})
        store = AsyncRedisStore(config.redis)
        month = time.strftime("%Y-%m", time.gmtime())
        k = KeySchema("aisaas", 16).tenant("h")
        args = ([k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
        await store.usage(*args)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(store.usage(*args) for _ in range(5)),
                                           return_exceptions=True)
            assert all(isinstance(r, StoreError) for r in results)
            assert time.monotonic() - started < 5  # a hang guard, not a benchmark
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        await asyncio.sleep(1.1)  # past retryInterval
        assert (await store.usage(*args))[0] == 0  # a fresh connection, in step again
        await store.close()
    finally:
        server.stop()
