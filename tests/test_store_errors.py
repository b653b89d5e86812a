"""Redis error replies, classified once for both stores (store/replies.py), against real
private redis-servers put in each state: a reply that means "not now" (READONLY, OOM,
BUSY, LOADING, refused credentials) is an outage (the store is marked down, admission
follows onUnavailable, settlement is spooled and replayed later); only a reply that can
never succeed (WRONGTYPE) is StoreRefused, and a settlement that meets it is set aside,
loudly. The session's test Redis is never touched.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from conftest import API_KEYS

from ai_saas_middleware import AsyncGateway, Gateway, RequestInfo
from ai_saas_middleware.embedded import LocalServer, start_server
from ai_saas_middleware.store.replies import ReplyKind, classify_reply
from ai_saas_middleware.types import Outcome


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _info(tenant: str = "globex") -> RequestInfo:
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "x-api-key": API_KEYS[tenant]},
                       b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":8}')


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """A private server, for a test that puts it in a failure state."""
    s = start_server()
    yield s
    s.stop()


def _spooled(spool: Path) -> list[Any]:
    return [json.loads(line) for p in sorted(spool.glob("spool-*.jsonl"))
            for line in p.read_text().splitlines()]


def _stream_ids(url: str, prefix: str) -> list[str]:
    client = redis_py.Redis.from_url(url, decode_responses=True)
    out: list[tuple[str, dict[str, str]]] = []
    for stream in client.scan_iter(match=f"{prefix}:*:usage"):
        out += client.xrange(stream)
    client.close()
    out.sort(key=lambda e: tuple(map(int, e[0].split("-"))))
    return [fields["request_id"] for _, fields in out]


# ------------------------------------------------------------------ the classification

@pytest.mark.parametrize("reply, kind", [
    ("READONLY You can't write against a read only replica.", ReplyKind.OUTAGE),
    ("OOM command not allowed when used memory > 'maxmemory'.", ReplyKind.OUTAGE),
    ("LOADING Redis is loading the dataset in memory", ReplyKind.OUTAGE),
    ("BUSY Redis is busy running a script.", ReplyKind.OUTAGE),
    ("MASTERDOWN Link with MASTER is down", ReplyKind.OUTAGE),
    ("TRYAGAIN Multiple keys request during rehashing of slot", ReplyKind.OUTAGE),
    ("CLUSTERDOWN The cluster is down", ReplyKind.OUTAGE),
    ("NOREPLICAS Not enough good replicas to write.", ReplyKind.OUTAGE),
    ("MISCONF Redis is configured to save RDB snapshots", ReplyKind.OUTAGE),
    ("NOAUTH Authentication required.", ReplyKind.AUTH),
    ("WRONGPASS invalid username-password pair", ReplyKind.AUTH),
    ("NOPERM this user has no permissions to run the 'evalsha' command", ReplyKind.AUTH),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", ReplyKind.PERMANENT),
    ("ERR user_script:1: Script attempted to access nonexistent global", ReplyKind.PERMANENT),
    ("usage event not written: OOM ...", ReplyKind.PERMANENT),  # the first word decides
])
def test_an_error_reply_is_classified_by_its_first_word(reply: str, kind: ReplyKind) -> None:
    assert classify_reply(reply) is kind
    assert classify_reply(redis_py.ResponseError(reply)) is kind  # hiredis's form


def test_redis_pys_own_classes_are_read_as_the_code_they_stand_for() -> None:
    from redis import exceptions as e

    # redis-py drops the first word of these and raises a class of its own instead.
    for cls in (e.ReadOnlyError, e.OutOfMemoryError, e.BusyLoadingError, e.TryAgainError,
                e.ClusterDownError, e.MasterDownError):
        assert classify_reply(cls("You can't write")) is ReplyKind.OUTAGE, cls
    for cls in (e.AuthenticationError, e.NoPermissionError):
        assert classify_reply(cls("invalid username-password pair")) is ReplyKind.AUTH, cls


# ------------------------------------------------------------------ faults on a real server

@contextmanager
def readonly(server: LocalServer) -> Iterator[None]:
    """The server becomes a replica of another (a failover seen from a stale address)."""
    primary = start_server(args=("--repl-diskless-sync-delay", "0"))
    client = redis_py.Redis(port=server.port, decode_responses=True)
    try:
        client.replicaof("127.0.0.1", primary.port)
        _wait(lambda: client.info("replication").get("master_link_status") == "up",
              "the replica's link")
        yield
    finally:
        client.replicaof("NO", "ONE")
        client.close()
        primary.stop()


@contextmanager
def out_of_memory(server: LocalServer) -> Iterator[None]:
    """maxmemory reached under noeviction: every write is refused with OOM."""
    client = redis_py.Redis(port=server.port)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        client.config_set("maxmemory", 0)
        client.close()


@contextmanager
def busy(server: LocalServer) -> Iterator[None]:
    """A long-running script holds the server; others are answered BUSY."""
    client = redis_py.Redis(port=server.port)
    client.config_set("busy-reply-threshold", 10)
    runner = redis_py.Redis(port=server.port, socket_timeout=60)

    def spin() -> None:
        try:
            runner.eval("while true do end", 0)
        except redis_py.ResponseError:
            pass  # killed, as planned

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()

    def is_busy() -> bool:
        try:
            client.ping()
        except redis_py.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    _wait(is_busy, "the server to answer BUSY")
    try:
        yield
    finally:
        def killed() -> bool:
            try:
                client.script_kill()
            except redis_py.ResponseError:
                pass  # NOTBUSY: already over
            thread.join(0.5)
            return not thread.is_alive()

        _wait(killed, "the script to be killed")
        client.config_set("busy-reply-threshold", 5000)
        client.close()
        runner.close()


FAULTS: dict[str, Callable[[LocalServer], AbstractContextManager[None]]] = {
    "READONLY": readonly, "OOM": out_of_memory, "BUSY": busy}


@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_transient_reply_is_an_outage_and_its_event_is_spooled_then_replayed(
        fault: str, twin: str, server: LocalServer, make_config: Callable[..., dict[str, Any]],
        key_prefix: str, tmp_path: Path) -> None:
    cls = Gateway if twin == "sync" else AsyncGateway
    config = make_config(redis={"url": server.url, "onUnavailable": "open",
                                "retryInterval": "1h"})
    settler = cls(config)
    before = await _maybe(settler.admit(_info()))  # admitted by Redis before the fault
    assert before.allowed and not before.ticket.local
    with FAULTS[fault](server):
        await _maybe(settler.settle(before.ticket, Outcome(200, provider_usage=(5, 3)),
                                    before.context))
        assert settler.store.health.is_down(), "a transient reply is an outage"
    spool = tmp_path / "spool"
    assert [_spooled_id(e) for e in _spooled(spool)] == [before.ticket.request_id]
    assert not (spool / "rejected.jsonl").exists()
    # Redis is back: the next gateway to settle replays the spooled event first.
    successor = cls(config)
    later = await _maybe(successor.admit(_info()))
    await _maybe(successor.settle(later.ticket, Outcome(200, provider_usage=(1, 1)),
                                  later.context))
    assert _stream_ids(server.url, key_prefix) == [before.ticket.request_id,
                                                   later.ticket.request_id]
    assert _spooled(spool) == []
    for g in (settler, successor):
        await _maybe(g.close())


def _spooled_id(entry: list[Any]) -> str:
    args = entry[2]
    return str(args[args.index("request_id") + 1])


# Not OOM: admit.lua's first write (trimming the rate-limit log) is not one that maxmemory
# refuses, and Redis lets a script that has written go on writing (all or nothing).
@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("policy", ["open", "closed"])
@pytest.mark.parametrize("fault", ["READONLY", "BUSY"])
async def test_a_transient_reply_at_admission_follows_on_unavailable(
        fault: str, twin: str, policy: str, server: LocalServer,
        make_config: Callable[..., dict[str, Any]]) -> None:
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"url": server.url, "onUnavailable": policy,
                                     "retryInterval": "1h"}))
    assert (await _maybe(gateway.admit(_info()))).allowed
    with FAULTS[fault](server):
        decision = await _maybe(gateway.admit(_info()))
    if policy == "open":
        assert decision.allowed and decision.ticket.local
    else:
        assert decision.status == 503 and decision.error_code == "store_unavailable"
    assert gateway.store.health.is_down()
    await _maybe(gateway.close())


@pytest.fixture
def loading_server(tmp_path: Path) -> Iterator[tuple[LocalServer, Callable[[], LocalServer]]]:
    """A server with a dataset on disk, and a way to restart it on the same port so that
    it loads that dataset slowly (``key-load-delay``): it answers LOADING meanwhile."""
    first = start_server()
    client = redis_py.Redis(port=first.port)
    pipe = client.pipeline(transaction=False)
    for i in range(20_000):
        pipe.set(f"filler:{i}", i)
    pipe.execute()
    client.save()
    client.close()
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(first.directory) / "dump.rdb", data / "dump.rdb")
    servers = [first]

    def restart() -> LocalServer:
        servers[0].stop()
        # 20,000 keys at 1 ms each: LOADING for 20 s, far longer than the test needs;
        # clients are answered (LOADING) every KiB of the file read.
        again = start_server(port=first.port, args=(
            "--dir", str(data), "--key-load-delay", "1000",
            "--loading-process-events-interval-bytes", "1024"))
        servers[0] = again
        return again

    yield first, restart
    servers[0].process.kill()  # a loading server is slow to honour SIGTERM
    servers[0].stop()


@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_loading_after_a_restart_is_an_outage_on_both_stores(
        twin: str, loading_server: tuple[LocalServer, Callable[[], LocalServer]],
        make_config: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    first, restart = loading_server
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"url": first.url, "onUnavailable": "open",
                                     "retryInterval": "1h"}))
    before = await _maybe(gateway.admit(_info()))
    assert before.allowed and not before.ticket.local
    restart()
    probe = redis_py.Redis(port=first.port, retry=None)  # see LOADING itself
    with pytest.raises(redis_py.BusyLoadingError):
        probe.ping()  # the server is loading its dataset
    await _maybe(gateway.settle(before.ticket, Outcome(200, provider_usage=(2, 2)),
                                before.context))
    assert gateway.store.health.is_down()
    assert [_spooled_id(e) for e in _spooled(tmp_path / "spool")] == [before.ticket.request_id]
    assert not (tmp_path / "spool" / "rejected.jsonl").exists()
    with pytest.raises(redis_py.BusyLoadingError):
        probe.ping()  # still loading: what the store met was LOADING
    probe.close()
    await _maybe(gateway.close())


# ------------------------------------------------------------------ a permanent reply

@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_a_permanent_reply_sets_the_event_aside_loudly_and_the_store_stays_up(
        twin: str, make_config: Callable[..., dict[str, Any]], rclient: redis_py.Redis,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"onUnavailable": "open", "retryInterval": "1h"}))
    decision = await _maybe(gateway.admit(_info()))
    assert decision.allowed
    stream = decision.ticket.keys.stream
    rclient.delete(stream)
    rclient.set(stream, "not a stream")  # XADD can never succeed: WRONGTYPE
    try:
        with caplog.at_level(logging.ERROR, logger="ai_saas_middleware"):
            await _maybe(gateway.settle(decision.ticket, Outcome(200, provider_usage=(3, 3)),
                                        decision.context))
    finally:
        rclient.delete(stream)
    assert not gateway.store.health.is_down()
    spool = tmp_path / "spool"
    assert _spooled(spool) == []  # not spooled: a replay could never write it either
    rejected = [json.loads(line) for line in (spool / "rejected.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in rejected] == [decision.ticket.request_id]
    assert "WRONGTYPE" in rejected[0]["error"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any(decision.ticket.request_id in r.getMessage() for r in errors)
    assert not any(stream in r.getMessage() for r in caplog.records)  # never a key
    await _maybe(gateway.close())


@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_a_permanent_reply_at_admission_follows_on_unavailable_without_an_outage(
        twin: str, make_config: Callable[..., dict[str, Any]], rclient: redis_py.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"onUnavailable": "open", "retryInterval": "1h"}))
    first = await _maybe(gateway.admit(_info()))
    quota = first.ticket.keys.quota(first.ticket.month)
    rclient.delete(quota)
    rclient.hset(quota, "x", "1")  # the counter holds a hash: WRONGTYPE for this tenant
    try:
        with caplog.at_level(logging.ERROR, logger="ai_saas_middleware"):
            decision = await _maybe(gateway.admit(_info()))
    finally:
        rclient.delete(quota)
    assert decision.allowed and decision.ticket.local
    assert not gateway.store.health.is_down()  # other tenants are still served by Redis
    assert any(r.levelno == logging.ERROR and decision.ticket.request_id in r.getMessage()
               for r in caplog.records)
    again = await _maybe(gateway.admit(_info()))
    assert again.allowed and not again.ticket.local
    await _maybe(gateway.close())


# ------------------------------------------------------------------ refused credentials

@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_refused_credentials_are_an_outage_logged_as_an_error(
        twin: str, make_config: Callable[..., dict[str, Any]],
        caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(args=("--requirepass", "s3cret"))
    try:
        cls = Gateway if twin == "sync" else AsyncGateway
        gateway = cls(make_config(redis={"url": f"redis://:wrong@127.0.0.1:{server.port}/0",
                                         "onUnavailable": "closed", "retryInterval": "1h"}))
        with caplog.at_level(logging.WARNING, logger="ai_saas_middleware"):
            decision = await _maybe(gateway.admit(_info()))
        assert decision.status == 503
        assert gateway.store.health.is_down()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("credentials" in m for m in errors), errors
        await _maybe(gateway.close())
    finally:
        server.stop()

