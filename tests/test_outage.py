"""Redis unreachable: refuse quickly (closed), or serve within a local allowance and spool
the usage events (open), then replay them in order once Redis is back.

Each test points the gateway at a loopback port of its own: closed at first, then served
by a private server started on that same port (``embedded.start_server``), or a private
server that is frozen with SIGSTOP (a Redis that accepts connections and never answers).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import API_KEYS

from ai_saas_middleware import AsyncGateway, Decision, Gateway, Outcome, RequestInfo, load_config
from ai_saas_middleware.embedded import LocalServer, start_server
from ai_saas_middleware.store.redis import RedisStore
from ai_saas_middleware.tenants import TenantAdmin

HANG_GUARD_S = 2.0  # generous: a refusal must come back long before any client gives up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ai_request(tenant: str | None = "acme", *, max_tokens: int = 50,
               key: str | None = None) -> RequestInfo:
    body = {"messages": [{"role": "user", "content": "Summarise this."}],
            "max_tokens": max_tokens}
    key = key if key is not None else API_KEYS[tenant or "acme"]
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "authorization": f"Bearer {key}"},
                       json.dumps(body).encode())


def code_of(decision: Decision) -> str | None:
    return decision.error_code


class Twin:
    """A Gateway or an AsyncGateway behind one awaitable interface."""

    def __init__(self, gateway: Gateway | AsyncGateway):
        self.gateway = gateway

    @staticmethod
    async def _done(result: Any) -> Any:
        return await result if inspect.isawaitable(result) else result

    async def admit(self, info: RequestInfo) -> Decision:
        return await self._done(self.gateway.admit(info))  # type: ignore[no-any-return]

    async def settle(self, decision: Decision, outcome: Outcome) -> None:
        assert decision.ticket is not None
        await self._done(self.gateway.settle(decision.ticket, outcome, decision.context))

    async def close(self) -> None:
        await self._done(self.gateway.close())


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def servers() -> Iterator[Callable[..., LocalServer]]:
    """``start(port)``: a private server on that port, stopped (and thawed) at the end."""
    started: list[LocalServer] = []

    def start(port: int | None = None) -> LocalServer:
        server = start_server(port=port)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture(params=["sync", "async"])
async def make_twin(request: pytest.FixtureRequest, make_config: Callable[..., dict[str, Any]],
                    port: int) -> AsyncIterator[Callable[..., Twin]]:
    """``make_twin(on_unavailable, **redis)``: a twin aimed at ``port`` (closed for now)."""
    made: list[Twin] = []

    def make(on_unavailable: str = "open", **overrides: Any) -> Twin:
        redis_section = {"url": f"redis://127.0.0.1:{port}/0", "onUnavailable": on_unavailable,
                         "retryInterval": "100ms", "connectTimeout": "250ms",
                         "socketTimeout": "250ms", **overrides.pop("redis", {})}
        config = make_config(redis=redis_section, **overrides)
        cls = Gateway if request.param == "sync" else AsyncGateway
        twin = Twin(cls(config))
        made.append(twin)
        return twin

    yield make
    for twin in made:
        await twin.close()


def spooled_lines(spool_dir: Path) -> list[list[Any]]:
    """The spooled calls in the order a replay takes them: files oldest first (by
    modification time, as ``Spool`` claims them; a replay that failed puts what it did
    not send back in a new file dated 0, under a random name)."""
    lines = []
    for path in sorted(spool_dir.glob("spool-*.jsonl"), key=lambda p: p.stat().st_mtime_ns):
        lines += [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    return lines


def spooled_ids(spool_dir: Path) -> list[str]:
    return [args[args.index("request_id") + 1] for _, _, args in spooled_lines(spool_dir)]


def stream_of(client: redis.Redis, prefix: str) -> list[dict[str, str]]:
    out: list[tuple[str, dict[str, str]]] = []
    for stream in client.scan_iter(match=f"{prefix}:*:usage"):
        out += client.xrange(stream)
    return [e for _, e in sorted(out, key=lambda e: tuple(map(int, e[0].split("-"))))]


def counter(client: redis.Redis, prefix: str, tenant: str) -> int:
    keys = list(client.scan_iter(match=f"{prefix}:*:t:{tenant}:q:*"))
    return sum(int(client.get(k) or 0) for k in keys)


def wait_past_retry_interval() -> None:
    time.sleep(0.15)  # retryInterval is 100ms in these tests


# --------------------------------------------------------------------------- closed


@pytest.mark.parametrize("down", ["refused", "frozen"])
async def test_closed_refuses_with_503_without_hanging(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        tmp_path: Path, down: str) -> None:
    if down == "frozen":  # a real Redis that takes connections and never answers
        os.kill(servers(port).process.pid, signal.SIGSTOP)
    twin = make_twin("closed")

    for _ in range(3):
        started = time.monotonic()
        decision = await twin.admit(ai_request("acme"))
        assert time.monotonic() - started < HANG_GUARD_S

        assert decision.status == 503
        assert code_of(decision) == "store_unavailable"
        assert json.loads(decision.body)["error"]["type"] == "service_unavailable"
        assert int(dict(decision.headers)["retry-after"]) >= 1
    assert spooled_lines(tmp_path / "spool") == []


async def test_a_closed_tier_refuses_while_the_deployment_is_open(
        make_twin: Callable[..., Twin], make_config: Callable[..., dict[str, Any]]) -> None:
    tiers = make_config()["tenant"]["tiers"]
    tiers[0]["onUnavailable"] = "closed"  # free: e.g. a prepaid hard budget
    twin = make_twin("open", tenant={"tiers": tiers})

    free = await twin.admit(ai_request("acme"))
    pro = await twin.admit(ai_request("globex"))

    assert code_of(free) == "store_unavailable"
    assert pro.allowed


# --------------------------------------------------------------------------- open


async def test_open_serves_within_the_per_process_allowance_and_spools_every_event(
        make_twin: Callable[..., Twin], tmp_path: Path) -> None:
    # No retry within the test: a settlement more than retryInterval after the outage was
    # noticed tries to replay the spool, and whether one does depends on the machine's
    # speed (see the next test for that path).
    twin = make_twin("open", redis={"retryInterval": "60s"})

    served = [await twin.admit(ai_request("acme")) for _ in range(10)]
    eleventh = await twin.admit(ai_request("acme"))
    for decision in served:
        await twin.settle(decision, Outcome(status=200, provider_usage=(9, 21)))

    assert all(d.allowed for d in served)
    assert all(dict(d.headers)["x-request-id"] == d.context.request_id  # type: ignore[union-attr]
               for d in served)
    assert eleventh.status == 429 and code_of(eleventh) == "rate_limit_exceeded"
    assert 1 <= int(dict(eleventh.headers)["retry-after"]) <= 60
    assert spooled_ids(tmp_path / "spool") == \
        [d.context.request_id for d in served]  # type: ignore[union-attr]


async def test_open_replays_tried_while_redis_is_down_keep_every_event_in_order(
        make_twin: Callable[..., Twin], tmp_path: Path) -> None:
    twin = make_twin("open")
    served = [await twin.admit(ai_request("globex")) for _ in range(9)]
    for i, decision in enumerate(served):
        if i in (3, 6):  # the next settlement tries a replay, which Redis refuses
            wait_past_retry_interval()
        await twin.settle(decision, Outcome(status=200, provider_usage=(9, 21)))

    assert list((tmp_path / "spool").glob("*.replaying")) == []  # no claim left behind
    assert spooled_ids(tmp_path / "spool") == \
        [d.context.request_id for d in served]  # type: ignore[union-attr]


async def test_open_holds_a_tenant_to_a_share_of_its_quota_while_redis_is_down(
        make_twin: Callable[..., Twin]) -> None:
    twin = make_twin("open")

    # pro: 100,000 tokens a month; a process may spend a tenth of it during an outage.
    big = await twin.admit(ai_request("globex", max_tokens=9_000))
    over = await twin.admit(ai_request("globex", max_tokens=2_000))

    assert big.allowed
    assert over.status == 429 and code_of(over) == "quota_exceeded"


async def test_open_does_not_serve_an_api_key_it_could_never_verify(
        make_twin: Callable[..., Twin], make_config: Callable[..., dict[str, Any]],
        servers: Callable[..., LocalServer], port: int) -> None:
    server = servers(port)
    config = load_config(make_config(redis={"url": server.url}))
    store = RedisStore(config.redis)
    admin = TenantAdmin(config, store)
    seen_key = admin.add("seen", "free")
    other_key, unseen_key = admin.add_key("seen"), admin.add("unseen", "free")
    store.close()
    forged = "ais_" + "0" * 32 + "_seen"  # well formed, names a tenant this process knows
    twin = make_twin("open")
    assert (await twin.admit(ai_request(key=seen_key))).allowed

    server.stop()
    wait_past_retry_interval()
    seen = await twin.admit(ai_request(key=seen_key))
    refused = [await twin.admit(ai_request(key=k)) for k in (forged, other_key, unseen_key)]

    assert seen.allowed and seen.context.tenant_id == "seen"  # type: ignore[union-attr]
    assert [code_of(d) for d in refused] == ["store_unavailable"] * 3


# --------------------------------------------------------------------------- recovery


async def test_the_next_settle_after_redis_returns_replays_the_spool_in_order(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        key_prefix: str, tmp_path: Path) -> None:
    twin = make_twin("open")
    during = []
    for n in range(5):
        decision = await twin.admit(ai_request("globex"))
        assert decision.allowed
        await twin.settle(decision, Outcome(status=200, provider_usage=(10 + n, 20 + n)))
        during.append(decision.context.request_id)  # type: ignore[union-attr]
    assert len(spooled_lines(tmp_path / "spool")) == 5

    server = servers(port)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    wait_past_retry_interval()
    after = await twin.admit(ai_request("globex"))
    assert after.allowed and not after.ticket.local  # type: ignore[union-attr]
    await twin.settle(after, Outcome(status=200, provider_usage=(1, 2)))

    stream = stream_of(client, key_prefix)
    replayed = [e["request_id"] for e in stream if e["request_id"] in during]
    assert replayed == during  # every spooled event, once, in the order they were settled
    assert {e["request_id"] for e in stream} == {*during, after.context.request_id}  # type: ignore[union-attr]
    assert len(stream) == 6
    tokens = sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in stream)
    assert tokens == sum(10 + n + 20 + n for n in range(5)) + 3
    assert counter(client, key_prefix, "globex") == tokens
    assert spooled_lines(tmp_path / "spool") == []
    assert list((tmp_path / "spool").glob("*.replaying")) == []
    client.close()


async def test_a_replayed_duplicate_request_id_is_not_counted_twice(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        key_prefix: str) -> None:
    twin = make_twin("open")
    decision = await twin.admit(ai_request("globex"))
    outcome = Outcome(status=200, provider_usage=(40, 60))
    await twin.settle(decision, outcome)  # spooled: Redis is down

    server = servers(port)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    wait_past_retry_interval()
    await twin.settle(decision, outcome)  # written now; then the spool replays the same id

    stream = stream_of(client, key_prefix)
    assert [e["request_id"] for e in stream] == [decision.context.request_id]  # type: ignore[union-attr]
    assert counter(client, key_prefix, "globex") == 100
    client.close()


async def test_a_spool_left_by_a_process_that_died_is_replayed_by_the_next(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        key_prefix: str, tmp_path: Path) -> None:
    dead = make_twin("open")
    for _ in range(3):
        decision = await dead.admit(ai_request("initech"))
        await dead.settle(decision, Outcome(status=200, provider_usage=(5, 5)))
    await dead.close()
    assert len(spooled_lines(tmp_path / "spool")) == 3

    server = servers(port)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    successor = make_twin("open")  # same spool directory, a fresh process-like gateway
    decision = await successor.admit(ai_request("initech"))
    await successor.settle(decision, Outcome(status=200, provider_usage=(1, 1)))

    assert len(stream_of(client, key_prefix)) == 4
    assert counter(client, key_prefix, "initech") == 32
    client.close()


async def test_an_unreachable_redis_is_not_dialled_on_every_request(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer],
        port: int) -> None:
    twin = make_twin("closed", redis={"retryInterval": "30s"})
    assert code_of(await twin.admit(ai_request("globex"))) == "store_unavailable"

    # Redis comes back at once; the gateway does not know, and must not keep dialling.
    server = servers(port)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    dials_before = client.info("stats")["total_connections_received"]
    for _ in range(20):
        assert code_of(await twin.admit(ai_request("globex"))) == "store_unavailable"
    dials_after = client.info("stats")["total_connections_received"]

    assert dials_after == dials_before
    client.close()


async def test_a_request_admitted_before_the_outage_and_settled_during_it_counts_exactly(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        key_prefix: str) -> None:
    server = servers(port)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    twin = make_twin("open")
    decisions = [await twin.admit(ai_request("globex", max_tokens=500)) for _ in range(2)]
    assert all(d.allowed and not d.ticket.local for d in decisions)  # type: ignore[union-attr]

    # Redis hangs while the responses stream. The first settle times out *after* its
    # command reached the server, which runs it when it wakes up: the spooled copy of
    # that event is then a duplicate. The second is spooled without being sent.
    os.kill(server.process.pid, signal.SIGSTOP)
    await twin.settle(decisions[0], Outcome(status=200, provider_usage=(30, 70)))
    await twin.settle(decisions[1], Outcome(status=502, failed=True))
    os.kill(server.process.pid, signal.SIGCONT)
    wait_past_retry_interval()
    after = await twin.admit(ai_request("globex"))
    await twin.settle(after, Outcome(status=200, provider_usage=(1, 1)))

    stream = stream_of(client, key_prefix)
    assert sorted(e["request_id"] for e in stream) == sorted(
        d.context.request_id for d in (*decisions, after))  # type: ignore[union-attr]
    assert counter(client, key_prefix, "globex") == 100 + 0 + 2
    client.close()


async def test_a_redis_restart_that_empties_the_script_cache_is_survived(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        key_prefix: str) -> None:
    first = servers(port)
    twin = make_twin("closed")
    decision = await twin.admit(ai_request("globex"))
    await twin.settle(decision, Outcome(status=200, provider_usage=(1, 1)))

    first.stop()
    second = servers(port)  # a fresh server on the same address: no scripts loaded
    wait_past_retry_interval()
    decisions = [await twin.admit(ai_request("globex")) for _ in range(2)]

    assert [d.allowed for d in decisions] == [True, True]
    client = redis.Redis.from_url(second.url, decode_responses=True)
    for decision in decisions:
        await twin.settle(decision, Outcome(status=200, provider_usage=(2, 2)))
    assert counter(client, key_prefix, "globex") == 8
    client.close()


def test_a_spooled_call_redis_refuses_is_set_aside_not_blocking(make_config, events, tmp_path):
    """One poisoned spool entry (here: its stream key holds a string) must not stop the
    entries behind it from being replayed, nor the new events from being written."""
    import json as _json

    from ai_saas_middleware import Gateway, RequestInfo
    from ai_saas_middleware.types import Outcome

    gateway = Gateway(make_config())
    spool_dir = gateway.spool.dir
    spool_dir.mkdir(parents=True, exist_ok=True)
    ok = gateway.admit(RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                                        "x-api-key": "key-globex-pro"}, b"{}"))
    assert ok.ticket is not None
    good = gateway._settle_call(ok.ticket, Outcome(200, provider_usage=(4, 2)), ok.context)
    poisoned = ("settle", [good[1][0], good[1][0], good[1][2] + "-x"], good[2])  # XADD on a string
    (spool_dir / "spool-1-dead.jsonl").write_text(
        _json.dumps(list(poisoned)) + "\n" + _json.dumps(list(good)) + "\n")
    gateway.spool.pending = True

    later = gateway.admit(RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                                           "x-api-key": "key-globex-pro"}, b"{}"))
    assert later.ticket is not None
    gateway.settle(later.ticket, Outcome(200, provider_usage=(1, 1)), later.context)

    ids = [e["request_id"] for e in events()]
    assert ids == [ok.ticket.request_id, later.ticket.request_id]  # the spooled one first
    rejected = (spool_dir / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and "refused" in _json.loads(rejected[0])["error"]
    assert not gateway.spool.pending
    gateway.close()


async def test_a_spool_is_replayed_after_an_outage_without_further_traffic(
        make_twin: Callable[..., Twin], servers: Callable[..., LocalServer], port: int,
        key_prefix: str, tmp_path: Path) -> None:
    """The gateway's background round (the lease keeper's thread) replays a spool left
    waiting once Redis answers: the events of the outage's last requests do not wait for
    a settlement that may never come."""
    twin = make_twin("open", quota={"reservationTimeout": "1500ms"})
    decisions = [await twin.admit(ai_request("globex")) for _ in range(3)]
    for decision in decisions:
        await twin.settle(decision, Outcome(status=200, provider_usage=(4, 6)))
    assert len(spooled_lines(tmp_path / "spool")) == 3

    server = servers(port)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    deadline = time.monotonic() + 10
    while len(stream_of(client, key_prefix)) < 3:  # no request is sent meanwhile
        assert time.monotonic() < deadline, "the spool was not replayed"
        await asyncio.sleep(0.05)

    assert [e["request_id"] for e in stream_of(client, key_prefix)] == [
        d.context.request_id for d in decisions]  # type: ignore[union-attr]
    assert counter(client, key_prefix, "globex") == 30
    deadline = time.monotonic() + 5
    while spooled_lines(tmp_path / "spool"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    client.close()
