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


# --------------------------------------------------------------------------- the sync lane

import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

import redis as redis_py  # noqa: E402
from redis.connection import SSLConnection  # noqa: E402

import ai_saas_middleware.store.redis as store_module  # noqa: E402


def _usage_keys(prefix: str, tenant: str, month: str) -> list[str]:
    k = KeySchema(prefix, 16).tenant(tenant)
    return [k.rate_limit, k.quota(month), k.record, k.api_keys]


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
                reply = store.usage(_usage_keys(key_prefix, f"s{i}", month), _usage_args(month))
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
    assert store.usage(*args)[0] == 0
    rclient.script_flush()
    assert store.usage(*args)[0] == 0
    assert store.usage(*args)[0] == 0  # loaded again once, on the lane's connection
    store.close()


def test_sync_lane_puts_a_connection_back_after_an_error_reply(
        make_config, rclient, key_prefix) -> None:
    from ai_saas_middleware.errors import StoreRefused

    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.hset(keys.quota("2026-01"), "oops", "1")  # settle.lua refuses this counter
    script_keys = [keys.quota("2026-01"), keys.stream, keys.settled("req_r")]
    with pytest.raises(StoreRefused):
        store.settle(script_keys, [5, 60, 60, "request_id", "req_r"])
    assert len(store._lane._idle) == 1  # in step: kept, not dropped
    assert not store.health.is_down()
    month = time.strftime("%Y-%m", time.gmtime())
    assert store.usage(_usage_keys(key_prefix, "g", month), _usage_args(month))[0] == 0
    store.close()


def test_sync_lane_retries_once_on_a_connection_the_server_closed(
        make_config, rclient, key_prefix, monkeypatch) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    month = time.strftime("%Y-%m", time.gmtime())
    script_keys = [keys.rate_limit, keys.quota(month), keys.record, keys.api_keys]
    assert store.admit(script_keys, _admit_args("req_1", month, 10))[0] == 0
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
    reply = store.admit(script_keys, _admit_args("req_2", month, 10))
    assert reply[0] == 0 and retried == ["admit"]
    assert not store.health.is_down()
    assert int(rclient.get(keys.quota(month))) == 20  # each request counted once
    assert rclient.zcard(keys.rate_limit) == 2
    store.close()


def test_sync_lane_does_not_retry_a_fresh_connection_that_cannot_connect(tmp_path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = load_config({"redis": {"url": f"redis://127.0.0.1:{port}/0",
                                    "spoolDir": str(tmp_path)}})
    store = RedisStore(config.redis)
    store._loaded = True  # straight to the lane
    month = time.strftime("%Y-%m", time.gmtime())
    started = time.monotonic()
    with pytest.raises(StoreError):
        store.usage(_usage_keys("x", "a", month), _usage_args(month))
    assert time.monotonic() - started < 2
    assert store.health.is_down()
    store.close()


def test_sync_lane_uses_the_urls_password_and_database(tmp_path) -> None:
    server = start_server(args=("--requirepass", "s3cret"))
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/5"
        config = load_config({"redis": {"url": url, "keyPrefix": "auth",
                                        "spoolDir": str(tmp_path)}})
        store = RedisStore(config.redis)
        month = time.strftime("%Y-%m", time.gmtime())
        direct = redis_py.Redis(port=server.port, password="s3cret", db=5)
        direct.set(KeySchema("auth", 16).tenant("a").quota(month), 42)
        reply = store.usage(_usage_keys("auth", "a", month), _usage_args(month))
        assert int(reply[2]) == 42  # read from db 5, after AUTH
        store.close()
        direct.close()
        wrong = RedisStore(load_config({"redis": {
            "url": f"redis://:nope@127.0.0.1:{server.port}/0",
            "spoolDir": str(tmp_path)}}).redis)
        wrong._loaded = True  # the lane's own AUTH, not the pooled client's
        with pytest.raises(StoreError):
            wrong.usage(_usage_keys("auth", "a", month), _usage_args(month))
        wrong.close()
    finally:
        server.stop()


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
        assert int(store.usage(_usage_keys("ux", "u", month), _usage_args(month))[2]) == 7
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
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        tls_port = sock.getsockname()[1]
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
        assert int(store.usage(_usage_keys("tls", "t", month), _usage_args(month))[2]) == 9
        assert isinstance(store._lane._idle[0], SSLConnection)
        store.close()
    finally:
        server.stop()


def test_sync_lane_gives_up_on_a_hung_server_within_the_timeout(tmp_path) -> None:
    server = start_server()
    try:
        config = load_config({"redis": {"url": server.url, "socketTimeout": "200ms",
                                        "retryInterval": "1s", "spoolDir": str(tmp_path)}})
        store = RedisStore(config.redis)
        month = time.strftime("%Y-%m", time.gmtime())
        args = (_usage_keys("aisaas", "h", month), _usage_args(month))
        store.usage(*args)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError):
                store.usage(*args)
            assert time.monotonic() - started < 1  # one timeout, not retried
            assert len(store._lane._idle) == 0  # dropped: its state is unknown
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        time.sleep(1.1)  # past retryInterval
        assert store.usage(*args)[0] == 0  # a fresh connection, in step again
        store.close()
    finally:
        server.stop()


def test_a_forked_child_does_not_use_the_parents_connections(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    month = time.strftime("%Y-%m", time.gmtime())
    args = (_usage_keys(key_prefix, "k", month), _usage_args(month))
    assert store.usage(*args)[0] == 0
    parents = list(store._lane._idle)
    pid = os.fork()
    if pid == 0:  # the child: a connection of its own, the parent's left alone
        code = 1
        try:
            if len(store._lane._idle) == 0 and store.usage(*args)[0] == 0 \
                    and store._lane._idle[0] is not parents[0]:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.usage(*args)[0] == 0  # the parent's connection is still in step
    assert list(store._lane._idle) == parents
    store.close()


def test_the_store_without_hiredis_uses_the_pooled_client(
        make_config, key_prefix, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "_hiredis_pack", None)
    config = load_config(make_config())
    store = RedisStore(config.redis)
    assert store._lane is None
    month = time.strftime("%Y-%m", time.gmtime())
    assert store.usage(_usage_keys(key_prefix, "p", month), _usage_args(month))[0] == 0
    store.close()

