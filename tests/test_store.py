"""The Lua scripts through the store, below the gateway: retry idempotence and replies."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis.connection import SSLConnection

import ai_saas_middleware.store.redis as store_module
from ai_saas_middleware.config import load_config
from ai_saas_middleware.embedded import LocalServer, start_server
from ai_saas_middleware.errors import StoreError, StoreRefused
from ai_saas_middleware.store.keys import KeySchema, reservation_member
from ai_saas_middleware.store.redis import AsyncRedisStore, RedisStore


def _admit_args(request_id: str, month: str, reserve: int, *extra: str) -> list[object]:
    from ai_saas_middleware.gateway import _this_month

    this, start, end = _this_month()
    if month != this:  # the bounds of another month: 1999-01
        start, end = 915148800, 917827200
    return [request_id, month, "static", "", "pro", 100, 60_000, 100_000, reserve,
            86400, start, end, 60_000, 0, -1, -1, *extra]  # (no money budget)


def _admit_keys(k: Any, month: str) -> list[str]:
    return [k.rate_limit, k.quota(month), k.record, k.api_keys, k.reservations]


def _settle_keys(k: Any, month: str, request_id: str) -> list[str]:
    return [k.quota(month), k.stream, k.settled(request_id), k.reservations]


def _usage_keys(prefix: str, tenant: str, month: str) -> list[str]:
    k = KeySchema(prefix, 16).tenant(tenant)
    return [k.rate_limit, k.quota(month), k.record, k.api_keys]


def _usage_args(month: str) -> list[object]:
    return ["static", month, "", 60_000]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def password_server() -> Iterator[LocalServer]:
    """A server of its own that wants the password ``s3cret``."""
    server = start_server(args=("--requirepass", "s3cret"))
    yield server
    server.stop()


@pytest.fixture
def own_server() -> Iterator[LocalServer]:
    """A server of its own, for a test that freezes it."""
    server = start_server()
    yield server
    server.stop()


@contextmanager
def frozen(server: LocalServer) -> Iterator[None]:
    """The server stopped (SIGSTOP): it keeps its connections and never answers."""
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_retried_admission_is_not_counted_twice(make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    month = time.strftime("%Y-%m", time.gmtime())
    script_keys = _admit_keys(keys, month)

    first = store.run_script("admit", script_keys, _admit_args("req_a", month, 300))
    again = store.run_script("admit", script_keys, _admit_args("req_a", month, 300, "retry"))
    other = store.run_script("admit", script_keys, _admit_args("req_b", month, 300, "retry"))

    assert first[0] == 0 and again[0] == 0 and other[0] == 0
    assert int(rclient.get(keys.quota(month))) == 600  # req_a once, req_b once
    assert rclient.zcard(keys.rate_limit) == 2
    store.close()


def test_admission_in_another_month_asks_for_the_servers_month(make_config, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    stale = "1999-01"
    reply = store.run_script("admit", _admit_keys(keys, stale), _admit_args("req_c", stale, 10))
    assert reply[0] == 5
    assert reply[2].decode() == time.strftime("%Y-%m", time.gmtime())
    store.close()


def test_settle_writes_all_or_nothing(make_config, rclient, key_prefix) -> None:
    """A counter that cannot move (wrong type) leaves no event, no settled marker, and the
    reservation in flight as it was."""
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.hset(keys.quota("2026-01"), "oops", "1")  # a corrupted counter
    member = reservation_member("req_x", 50, "2026-01")
    rclient.zadd(keys.reservations, {member: 4_000_000_000_000})
    script_keys = _settle_keys(keys, "2026-01", "req_x")
    event = [5, 60, 90, member, "request_id", "req_x", "tenant_id", "globex"]

    with pytest.raises(StoreRefused, match="WRONGTYPE"):
        store.run_script("settle", script_keys, event)
    assert rclient.xlen(keys.stream) == 0
    assert not rclient.exists(keys.settled("req_x"))
    assert rclient.hgetall(keys.quota("2026-01")) == {"oops": "1"}  # left as it was
    assert rclient.zrange(keys.reservations, 0, -1, withscores=True) == [
        (member, 4_000_000_000_000)]

    rclient.set(keys.quota("2026-01"), 50, ex=3000)  # repaired: it held the reservation
    entry_id = store.run_script("settle", script_keys, event)
    assert rclient.get(keys.quota("2026-01")) == "5" and rclient.zcard(keys.reservations) == 0
    assert store.run_script("settle", script_keys, event) is None  # once
    # The reply names the one entry written, whose fields are the event as given.
    assert rclient.xrange(keys.stream) == [(entry_id.decode(),
                                            {"request_id": "req_x", "tenant_id": "globex"})]
    assert rclient.get(keys.quota("2026-01")) == "5"
    assert 90 < rclient.ttl(keys.quota("2026-01")) <= 3000  # its own TTL, kept
    assert 0 < rclient.ttl(keys.settled("req_x")) <= 60  # the marker, ARGV[2]

    # A replay after the month's counter expired makes it anew, with ARGV[3] as its TTL,
    # whether the reservation is still held or was released when its lease ran out.
    for request_id, held in (("req_y", True), ("req_z", False)):
        rclient.delete(keys.quota("2026-01"))
        member = reservation_member(request_id, 50, "2026-01")
        if held:
            rclient.zadd(keys.reservations, {member: 4_000_000_000_000})
        store.run_script("settle", _settle_keys(keys, "2026-01", request_id),
                         [5, 60, 90, member, "request_id", request_id])
        assert rclient.get(keys.quota("2026-01")) == ("-45" if held else "5")
        assert 0 < rclient.ttl(keys.quota("2026-01")) <= 90
    store.close()


# --------------------------------------------------------------------------- the asyncio lane


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
        reply = await store.run_script(
            "usage", [k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
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
        reply = await store.run_script(
            "usage", [k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
        return int(reply[2])

    await used(0)  # connected, scripts loaded
    first = asyncio.ensure_future(used(0))
    second = asyncio.ensure_future(used(1))
    await asyncio.sleep(0)  # both written
    first.cancel()
    assert await second == 2
    assert await used(2) == 3
    await store.close()


async def test_callers_waiting_on_a_connection_lost_as_it_opened_get_a_fresh_one(
        make_config, rclient, key_prefix) -> None:
    """A connection lost in the instant after it opened (seen under a proxy that drops
    replies: its loss was reported before the callers waiting on its connect resumed)
    is an outage like any other: each caller's command goes on a fresh connection (the
    store's one retry), never an AssertionError that a server answers with a 500."""
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    schema = KeySchema(key_prefix, 16)
    for i in range(20):
        rclient.set(schema.tenant(f"w{i}").quota(month), i + 1)

    async def used(i: int) -> int:
        k = schema.tenant(f"w{i}")
        reply = await store.run_script(
            "usage", [k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
        return int(reply[2])

    assert await used(0) == 1  # bound, scripts loaded
    lane = store._lane
    assert lane is not None
    lane._drop(redis_py.ConnectionError("closed by the test"))
    real_open, opened = lane._open, []

    async def open_then_lose(loop: asyncio.AbstractEventLoop) -> None:
        await real_open(loop)
        opened.append(lane._transport)
        if len(opened) == 1:  # lost before the callers waiting on this connect resume
            loop.call_soon(lane._drop, redis_py.ConnectionError("lost as it opened"))

    lane._open = open_then_lose  # type: ignore[method-assign]
    assert await asyncio.gather(*(used(i) for i in range(20))) == list(range(1, 21))
    assert len(opened) == 2  # the lost one, then one fresh connection for all the retries
    await store.close()


async def test_a_dropped_connections_late_loss_leaves_the_next_connection_alone(
        make_config, rclient, key_prefix) -> None:
    """asyncio reports a dropped connection's loss a loop tick or more after the drop; by
    then the lane may be on a new connection with calls in flight, which that late report
    must not fail (nor may the old connection's late bytes reach the new reader)."""
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    k = KeySchema(key_prefix, 16).tenant("late")
    rclient.set(k.quota(month), 7)
    args = ([k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
    await store.run_script("usage", *args)
    lane = store._lane
    assert lane is not None and lane._transport is not None
    old = lane._transport.get_protocol()
    lane._drop(redis_py.ConnectionError("dropped by the test"))
    await store.run_script("usage", *args)  # a new connection
    call = asyncio.ensure_future(store.run_script("usage", *args))
    await asyncio.sleep(0)  # written, in flight on the new connection
    old.data_received(b"+stray\r\n")  # the old connection's last bytes, late
    old.connection_lost(None)  # and its loss, late
    assert int((await call)[2]) == 7
    assert int((await store.run_script("usage", *args))[2]) == 7  # still in step
    await store.close()


async def test_a_reconnect_over_a_closing_connection_never_hands_its_replies_to_old_calls(
        make_config, rclient, key_prefix) -> None:
    """A connection that is closing (its loss not yet reported: asyncio waits for a write
    buffer a stalled peer does not drain) still has calls in flight when the next call
    reconnects. Those calls end with it, as an outage the store retries; they must never
    be paired with the new connection's replies (a caller given another's answer)."""
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    schema = KeySchema(key_prefix, 16)
    for name, value in (("old", 7), ("new", 11)):
        rclient.set(schema.tenant(name).quota(month), value)

    async def used(name: str) -> int:
        k = schema.tenant(name)
        reply = await store.run_script(
            "usage", [k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
        return int(reply[2])

    assert await used("old") == 7  # connected, scripts loaded
    lane = store._lane
    assert lane is not None and lane._transport is not None
    closing = lane._transport
    held: list[Exception | None] = []
    closing.get_protocol().connection_lost = held.append  # type: ignore[method-assign]
    in_flight = asyncio.ensure_future(used("old"))
    await asyncio.sleep(0)  # written on the old connection
    assert len(lane._pending) == 1  # (else the race below would not be run at all)
    closing.close()  # closing, its reply never read, its loss held back
    assert closing.is_closing() and lane._transport is closing
    assert await asyncio.wait_for(used("new"), 5) == 11  # reconnects over it
    assert await asyncio.wait_for(in_flight, 5) == 7  # its own answer, on a retry
    assert await used("new") == 11 and await used("old") == 7  # the new one in step
    await store.close()


async def test_lane_reloads_scripts_after_a_script_flush(make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    k = KeySchema(key_prefix, 16).tenant("f")
    args = ([k.rate_limit, k.quota(month), k.record, k.api_keys], _usage_args(month))
    assert (await store.run_script("usage", *args))[0] == 0
    rclient.script_flush()
    assert (await store.run_script("usage", *args))[0] == 0
    await store.close()


async def test_lane_uses_the_urls_password_and_database(password_server: LocalServer,
                                                        tmp_path: Path) -> None:
    port = password_server.port
    config = load_config({"redis": {"url": f"redis://:s3cret@127.0.0.1:{port}/5",
                                    "keyPrefix": "auth", "spoolDir": str(tmp_path)}})
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    with redis_py.Redis(port=port, password="s3cret", db=5) as direct:
        direct.set(KeySchema("auth", 16).tenant("a").quota(month), 42)
    reply = await store.run_script("usage", _usage_keys("auth", "a", month), _usage_args(month))
    assert int(reply[2]) == 42  # read from db 5, after AUTH
    await store.close()
    wrong = AsyncRedisStore(load_config({"redis": {
        "url": f"redis://:nope@127.0.0.1:{port}/0", "spoolDir": str(tmp_path)}}).redis)
    with pytest.raises(StoreError):
        await wrong.run_script("usage", _usage_keys("auth", "a", month), _usage_args(month))
    await wrong.close()


async def test_lane_gives_up_on_a_hung_server_within_the_timeout(
        own_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config({"redis": {"url": own_server.url, "socketTimeout": "200ms",
                                    "retryInterval": "300ms", "spoolDir": str(tmp_path)}})
    store = AsyncRedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    args = (_usage_keys("aisaas", "h", month), _usage_args(month))
    await store.run_script("usage", *args)
    retried: list[str] = []
    monkeypatch.setattr(store_module, "_retry_args",
                        lambda which, a: retried.append(which) or a)
    with frozen(own_server):
        started = time.monotonic()
        results = await asyncio.gather(*(store.run_script("usage", *args) for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results), results
        assert time.monotonic() - started < 5  # a hang guard, not a benchmark
        assert retried == []  # a timeout is not retried: that would double the wait
        assert store.health.is_down()
        with pytest.raises(StoreError, match=r"not retried for 0\.3s"):
            await store.run_script("usage", *args)  # refused at once, without dialling
    await asyncio.sleep(max(0.0, store.health.down_until - time.monotonic()))  # retryInterval
    assert not store.health.is_down()
    assert (await store.run_script("usage", *args))[0] == 0  # a fresh connection, in step again
    await store.close()


# --------------------------------------------------------------------------- the sync lane


def test_sync_lane_answers_each_of_many_threads_with_its_own_reply(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    assert store._lane is not None  # hiredis is installed in the test environment
    month = time.strftime("%Y-%m", time.gmtime())
    for i in range(20):
        rclient.set(KeySchema(key_prefix, 16).tenant(f"s{i}").quota(month), i * 1000)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            start.wait()
            for j in range(200):
                i = (n * 7 + j) % 20
                reply = store.run_script("usage", _usage_keys(key_prefix, f"s{i}", month),
                                         _usage_args(month))
                assert int(reply[2]) == i * 1000
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert 1 <= len(store._lane._idle) <= 8  # never more connections than callers
    store.close()
    assert len(store._lane._idle) == 0


def test_sync_lane_reloads_scripts_after_a_script_flush(make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    args = (_usage_keys(key_prefix, "f", month), _usage_args(month))
    assert store.run_script("usage", *args)[0] == 0
    rclient.script_flush()
    assert store.run_script("usage", *args)[0] == 0
    assert store.run_script("usage", *args)[0] == 0  # loaded again once, on the lane's connection
    store.close()


def test_sync_lane_puts_a_connection_back_after_an_error_reply(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.hset(keys.quota("2026-01"), "oops", "1")  # settle.lua refuses this counter
    script_keys = _settle_keys(keys, "2026-01", "req_r")
    with pytest.raises(StoreRefused):
        store.run_script("settle", script_keys, [5, 60, 60, "req_r", "request_id", "req_r"])
    assert len(store._lane._idle) == 1  # in step: kept, not dropped
    assert not store.health.is_down()
    month = time.strftime("%Y-%m", time.gmtime())
    reply = store.run_script("usage", _usage_keys(key_prefix, "g", month), _usage_args(month))
    assert reply[0] == 0
    store.close()


def test_sync_lane_retries_once_on_a_connection_the_server_closed(
        make_config, rclient, key_prefix, monkeypatch) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    month = time.strftime("%Y-%m", time.gmtime())
    script_keys = _admit_keys(keys, month)
    assert store.run_script("admit", script_keys, _admit_args("req_1", month, 10))[0] == 0
    retried: list[str] = []
    real = store_module._retry_args

    def spy(which: str, args: list[object]) -> object:
        retried.append(which)
        return real(which, args)

    monkeypatch.setattr(store_module, "_retry_args", spy)
    idle = list(store._lane._idle)
    assert len(idle) == 1
    port = idle[0]._sock.getsockname()[1]
    rclient.client_kill(f"127.0.0.1:{port}")  # as a restart or an idle timeout would
    reply = store.run_script("admit", script_keys, _admit_args("req_2", month, 10))
    assert reply[0] == 0 and retried == ["admit"]
    assert not store.health.is_down()
    assert int(rclient.get(keys.quota(month))) == 20  # each request counted once
    assert rclient.zcard(keys.rate_limit) == 2
    store.close()


def test_sync_lane_does_not_retry_a_fresh_connection_that_cannot_connect(
        tmp_path: Path) -> None:
    config = load_config({"redis": {"url": f"redis://127.0.0.1:{_free_port()}/0",
                                    "spoolDir": str(tmp_path)}})
    store = RedisStore(config.redis)
    store._loaded = True  # straight to the lane
    lane = store._lane
    assert lane is not None
    dialled: list[int] = []
    connect = lane._connect

    def counting_connect() -> object:
        dialled.append(1)
        return connect()

    lane._connect = counting_connect  # type: ignore[method-assign]
    month = time.strftime("%Y-%m", time.gmtime())
    with pytest.raises(StoreError, match="ConnectionError"):
        store.run_script("usage", _usage_keys("x", "a", month), _usage_args(month))
    assert dialled == [1]  # only a connection that had worked is worth a second try
    assert store.health.is_down()
    store.close()


def test_sync_lane_uses_the_urls_password_and_database(password_server: LocalServer,
                                                       tmp_path: Path) -> None:
    port = password_server.port
    config = load_config({"redis": {"url": f"redis://:s3cret@127.0.0.1:{port}/5",
                                    "keyPrefix": "auth", "spoolDir": str(tmp_path)}})
    store = RedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    with redis_py.Redis(port=port, password="s3cret", db=5) as direct:
        direct.set(KeySchema("auth", 16).tenant("a").quota(month), 42)
    reply = store.run_script("usage", _usage_keys("auth", "a", month), _usage_args(month))
    assert int(reply[2]) == 42  # read from db 5, after AUTH
    store.close()
    wrong = RedisStore(load_config({"redis": {
        "url": f"redis://:nope@127.0.0.1:{port}/0", "spoolDir": str(tmp_path)}}).redis)
    wrong._loaded = True  # the lane's own AUTH, not the pooled client's
    with pytest.raises(StoreError):
        wrong.run_script("usage", _usage_keys("auth", "a", month), _usage_args(month))
    wrong.close()


def test_sync_lane_over_a_unix_socket(tmp_path) -> None:
    path = tmp_path / "redis.sock"
    server = start_server(args=("--unixsocket", str(path), "--unixsocketperm", "700"))
    try:
        config = load_config({"redis": {"url": f"unix://{path}?db=3", "keyPrefix": "ux",
                                        "spoolDir": str(tmp_path / "spool")}})
        store = RedisStore(config.redis)
        month = time.strftime("%Y-%m", time.gmtime())
        redis_py.Redis(port=server.port, db=3).set(
            KeySchema("ux", 16).tenant("u").quota(month), 7)
        reply = store.run_script("usage", _usage_keys("ux", "u", month), _usage_args(month))
        assert int(reply[2]) == 7
        assert isinstance(store._lane._idle[0], redis_py.UnixDomainSocketConnection)
        store.close()
    finally:
        server.stop()


def test_sync_lane_over_tls(tmp_path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    tls_port = _free_port()
    try:
        server = start_server(args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                                    "--tls-auth-clients", "no"))
    except RuntimeError:
        pytest.skip("this Redis-compatible server was built without TLS")
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        config = load_config({"redis": {"url": url, "keyPrefix": "tls",
                                        "spoolDir": str(tmp_path / "spool")}})
        store = RedisStore(config.redis)
        month = time.strftime("%Y-%m", time.gmtime())
        redis_py.Redis(port=server.port).set(KeySchema("tls", 16).tenant("t").quota(month), 9)
        reply = store.run_script("usage", _usage_keys("tls", "t", month), _usage_args(month))
        assert int(reply[2]) == 9
        assert isinstance(store._lane._idle[0], SSLConnection)
        store.close()
    finally:
        server.stop()


def test_sync_lane_gives_up_on_a_hung_server_within_the_timeout(
        own_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config({"redis": {"url": own_server.url, "socketTimeout": "200ms",
                                    "retryInterval": "300ms", "spoolDir": str(tmp_path)}})
    store = RedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    args = (_usage_keys("aisaas", "h", month), _usage_args(month))
    store.run_script("usage", *args)
    retried: list[str] = []
    monkeypatch.setattr(store_module, "_retry_args",
                        lambda which, a: retried.append(which) or a)
    with frozen(own_server):
        started = time.monotonic()
        with pytest.raises(StoreError, match="Timeout"):
            store.run_script("usage", *args)
        assert time.monotonic() - started < 5  # a hang guard, not a benchmark
        assert retried == []  # a timeout is not retried: that would double the wait
        assert len(store._lane._idle) == 0  # dropped: its state is unknown
        assert store.health.is_down()
    time.sleep(max(0.0, store.health.down_until - time.monotonic()))  # retryInterval
    assert not store.health.is_down()
    assert store.run_script("usage", *args)[0] == 0  # a fresh connection, in step again
    store.close()


def test_a_forked_child_does_not_use_the_parents_connections(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    args = (_usage_keys(key_prefix, "k", month), _usage_args(month))
    assert store.run_script("usage", *args)[0] == 0
    parents = list(store._lane._idle)
    pid = os.fork()
    if pid == 0:  # the child: a connection of its own, the parent's left alone
        code = 1
        try:
            if len(store._lane._idle) == 0 and store.run_script("usage", *args)[0] == 0 \
                    and store._lane._idle[0] is not parents[0]:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.run_script("usage", *args)[0] == 0  # the parent's connection is still in step
    assert list(store._lane._idle) == parents
    store.close()


def test_the_store_without_hiredis_uses_the_pooled_client(
        make_config, key_prefix, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "_hiredis_pack", None)
    config = load_config(make_config())
    store = RedisStore(config.redis)
    assert store._lane is None
    month = time.strftime("%Y-%m", time.gmtime())
    reply = store.run_script("usage", _usage_keys(key_prefix, "p", month), _usage_args(month))
    assert reply[0] == 0
    store.close()



def test_the_rate_limit_log_outlives_its_newest_admission_by_a_window(
        make_config, rclient, key_prefix) -> None:
    """Most admissions only read the log's TTL; whenever less than a window (+1 s) is left
    it is renewed to two windows, so no admission can expire before it leaves the window."""
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    month = time.strftime("%Y-%m", time.gmtime())
    script_keys = _admit_keys(keys, month)

    def admit(request_id: str) -> None:
        assert store.run_script("admit", script_keys, _admit_args(request_id, month, 1))[0] == 0

    admit("req_t1")
    assert 61_000 < rclient.pttl(keys.rate_limit) <= 121_000  # a new log: two windows
    rclient.pexpire(keys.rate_limit, 90_000)  # as if 30 s had passed
    admit("req_t2")
    assert 61_000 < rclient.pttl(keys.rate_limit) <= 90_000  # enough left: not written
    rclient.pexpire(keys.rate_limit, 60_500)  # less than a window + 1 s left
    admit("req_t3")
    assert 61_000 < rclient.pttl(keys.rate_limit) <= 121_000  # renewed
    store.close()
