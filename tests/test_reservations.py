"""Quota reservations: released exactly once, whatever happens between admission and
settlement (a lost admission reply, a process killed mid-request, a long stream, a month
boundary), against the test Redis.

Each test ends on the ledger: the tenant's counter equals its events' tokens plus the
reservations still in flight (``res``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
from conftest import API_KEYS, reservations_held

from ai_saas_middleware import Gateway, Outcome, RequestInfo, StoreError, load_config
from ai_saas_middleware.store.keys import KeySchema, reservation_member
from ai_saas_middleware.store.redis import RedisStore, load_script

MONTH = time.strftime("%Y-%m", time.gmtime())


def ai_request(tenant: str = "globex", max_tokens: int = 100) -> RequestInfo:
    body = {"messages": [{"role": "user", "content": "Summarise this."}],
            "max_tokens": max_tokens}
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "authorization": f"Bearer {API_KEYS[tenant]}"},
                       json.dumps(body).encode())


def in_flight(rclient: redis.Redis, prefix: str, tenant: str) -> dict[str, str]:
    return reservations_held(rclient, KeySchema(prefix, 16).tenant(tenant))


def counter(rclient: redis.Redis, prefix: str, tenant: str, month: str = MONTH) -> int:
    return int(rclient.get(KeySchema(prefix, 16).tenant(tenant).quota(month)) or 0)


def ledger_holds(rclient: redis.Redis, prefix: str, tenant: str,
                 events: list[dict[str, str]]) -> None:
    """counter == the tenant's events' tokens + what its reservations in flight hold."""
    billed = sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in events
                 if e["tenant_id"] == tenant)
    held = sum(int(v.split()[0]) for v in in_flight(rclient, prefix, tenant).values()
               if v.split()[1] == MONTH)
    assert counter(rclient, prefix, tenant) == billed + held


def test_a_settled_request_leaves_no_reservation_behind(make_config, rclient, key_prefix,
                                                        events) -> None:
    gateway = Gateway(make_config())
    decision = gateway.admit(ai_request(max_tokens=100))
    assert decision.ticket is not None
    held = in_flight(rclient, key_prefix, "globex")
    assert held == {decision.ticket.request_id: f"{decision.ticket.reserved_tokens} {MONTH}"}

    gateway.settle(decision.ticket, Outcome(200, provider_usage=(7, 30)), decision.context)

    assert in_flight(rclient, key_prefix, "globex") == {}
    assert rclient.zcard(KeySchema(key_prefix, 16).tenant("globex").reservations) == 0
    assert counter(rclient, key_prefix, "globex") == 37
    assert gateway.leases.held == 0
    gateway.close()


def test_a_lost_admission_reply_is_settled_for_what_redis_reserved(
        make_config, rclient, key_prefix, events, monkeypatch) -> None:
    """admit.lua ran, its reply never came back (a timeout after the write): the request is
    served from the local allowance, and its settlement releases what Redis reserved."""
    gateway = Gateway(make_config())
    real_run = gateway.store.run_script

    def reply_lost(which: str, keys: Any, args: Any) -> Any:
        result = real_run(which, keys, args)
        if which == "admit":
            raise StoreError("Redis at ...: TimeoutError: Timeout reading from socket")
        return result

    monkeypatch.setattr(gateway.store, "run_script", reply_lost)
    decision = gateway.admit(ai_request(max_tokens=300))
    monkeypatch.undo()
    assert decision.allowed and decision.ticket is not None and decision.ticket.local
    assert counter(rclient, key_prefix, "globex") == decision.ticket.prompt_estimate + 300

    gateway.settle(decision.ticket, Outcome(200, provider_usage=(10, 20)), decision.context)

    [event] = events()
    assert event["request_id"] == decision.ticket.request_id
    assert counter(rclient, key_prefix, "globex") == 30  # the real usage, nothing leaked
    assert in_flight(rclient, key_prefix, "globex") == {}
    gateway.close()


def test_an_admission_that_never_reached_redis_is_billed_its_real_usage(
        make_config, rclient, key_prefix, events, monkeypatch) -> None:
    gateway = Gateway(make_config())

    def unreachable(which: str, keys: Any, args: Any) -> Any:
        raise StoreError("Redis at ...: ConnectionError: refused")

    monkeypatch.setattr(gateway.store, "run_script", unreachable)
    decision = gateway.admit(ai_request())
    monkeypatch.undo()
    assert decision.ticket is not None and decision.ticket.local
    gateway.settle(decision.ticket, Outcome(200, provider_usage=(10, 20)), decision.context)

    assert counter(rclient, key_prefix, "globex") == 30
    ledger_holds(rclient, key_prefix, "globex", events())
    gateway.close()


def test_a_reservation_whose_lease_ran_out_never_makes_the_quota_refuse(
        make_config, rclient, key_prefix, events) -> None:
    """The quota is full only because of a dead process's reservation: the next admission
    releases it first and is admitted (admit.lua looks for expired reservations before it
    refuses)."""
    config = make_config(quota={"reservationTimeout": "1s"})
    crashed = Gateway(config)
    lost = crashed.admit(ai_request(max_tokens=500))
    assert lost.ticket is not None
    crashed.leases.close()  # as if the process died: nobody renews, nobody settles
    keys = KeySchema(key_prefix, 16).tenant("globex")
    settled = 100_000 - 100 - lost.ticket.reserved_tokens  # 100 left, counting the dead one
    rclient.incrby(keys.quota(MONTH), settled)
    time.sleep(1.2)  # past the lease (server time)

    survivor = Gateway(config)
    fresh = survivor.admit(ai_request(max_tokens=200))

    assert fresh.allowed and fresh.ticket is not None
    assert set(in_flight(rclient, key_prefix, "globex")) == {fresh.ticket.request_id}
    assert counter(rclient, key_prefix, "globex") == settled + fresh.ticket.reserved_tokens
    # The late settlement of the released request still bills its real usage, once.
    crashed.settle(lost.ticket, Outcome(200, provider_usage=(5, 5)), lost.context)
    survivor.settle(fresh.ticket, Outcome(200, provider_usage=(1, 2)), fresh.context)
    assert counter(rclient, key_prefix, "globex") == settled + 13
    crashed.close()
    survivor.close()


def test_a_quota_full_of_live_reservations_still_refuses(make_config, rclient,
                                                        key_prefix) -> None:
    gateway = Gateway(make_config())
    running = gateway.admit(ai_request(max_tokens=500))
    assert running.ticket is not None
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.incrby(keys.quota(MONTH), 100_000 - 100 - running.ticket.reserved_tokens)

    refused = gateway.admit(ai_request(max_tokens=200))

    assert refused.status == 429 and refused.error_code == "quota_exceeded"
    assert set(in_flight(rclient, key_prefix, "globex")) == {running.ticket.request_id}
    assert counter(rclient, key_prefix, "globex") == 99_900
    gateway.close()


def test_a_reservation_whose_lease_ran_out_is_released_soon_without_quota_pressure(
        make_config, rclient, key_prefix, events) -> None:
    """An unlimited tier is never refused, yet a dead reservation does not stay: about one
    admission in 16 looks for expired ones (admit.lua, by the server clock)."""
    config = make_config(quota={"reservationTimeout": "1s"})
    crashed = Gateway(config)
    lost = crashed.admit(ai_request("initech", max_tokens=500))
    assert lost.ticket is not None
    crashed.leases.close()
    time.sleep(1.2)

    survivor = Gateway(config)
    admissions = 0
    # (15/16)**300 < 1e-8: the chance that 300 admissions never look.
    while lost.ticket.request_id in in_flight(rclient, key_prefix, "initech"):
        assert admissions < 300, "the dead reservation was never released"
        probe = survivor.admit(ai_request("initech", max_tokens=10))
        assert probe.ticket is not None
        survivor.settle(probe.ticket, Outcome(200, provider_usage=(1, 1)), probe.context)
        admissions += 1

    assert in_flight(rclient, key_prefix, "initech") == {}
    assert counter(rclient, key_prefix, "initech") == 2 * admissions
    ledger_holds(rclient, key_prefix, "initech", events())
    crashed.close()
    survivor.close()


def test_a_long_request_keeps_its_reservation_while_its_process_renews_it(
        make_config, rclient, key_prefix, events) -> None:
    config = make_config(quota={"reservationTimeout": "2s"})
    gateway = Gateway(config)
    long = gateway.admit(ai_request(max_tokens=500))
    assert long.ticket is not None
    time.sleep(4.5)  # more than two leases; the keeper renews every third of one

    other = Gateway(config)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.incrby(keys.quota(MONTH), 100_000 - 5 - long.ticket.reserved_tokens)
    probe = other.admit(ai_request(max_tokens=10))  # refused, after a look for expired ones
    assert probe.error_code == "quota_exceeded"
    assert long.ticket.request_id in in_flight(rclient, key_prefix, "globex")
    rclient.decrby(keys.quota(MONTH), 100_000 - 5 - long.ticket.reserved_tokens)
    probe = other.admit(ai_request(max_tokens=10))
    assert probe.ticket is not None

    gateway.settle(long.ticket, Outcome(200, provider_usage=(10, 400)), long.context)
    other.settle(probe.ticket, Outcome(200, provider_usage=(1, 1)), probe.context)
    assert counter(rclient, key_prefix, "globex") == 412
    assert in_flight(rclient, key_prefix, "globex") == {}
    gateway.close()
    other.close()


def test_renewal_extends_only_reservations_still_held(make_config, rclient,
                                                      key_prefix) -> None:
    gateway = Gateway(make_config(quota={"reservationTimeout": "30s"}))
    keys = KeySchema(key_prefix, 16).tenant("globex")
    running, done = gateway.admit(ai_request()), gateway.admit(ai_request())
    assert running.ticket is not None and done.ticket is not None
    gateway.settle(done.ticket, Outcome(200, provider_usage=(1, 1)), done.context)
    before = rclient.zscore(keys.reservations, running.ticket.reservation)
    gateway.leases.period_s = 0  # everything in flight is due now

    assert gateway.leases.renew_due() == 1  # the running request; the settled one is gone
    assert rclient.zscore(keys.reservations, running.ticket.reservation) >= before
    assert rclient.zscore(keys.reservations, done.ticket.reservation) is None
    assert rclient.zcard(keys.reservations) == 1
    gateway.close()


def test_a_retried_admission_on_a_tier_without_rate_limit_reserves_once(
        make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    k = KeySchema(key_prefix, 16).tenant("initech")
    from ai_saas_middleware.gateway import _this_month

    this, start, end = _this_month()
    keys = [k.rate_limit, k.quota(this), k.record, k.api_keys, k.reservations]
    args = ["req_r1", this, "static", "", "enterprise", 0, 60_000, -1, 400, 86400, start, end,
            60_000, 0, -1, -1]
    assert store.run_script("admit", keys, args)[0] == 0
    assert store.run_script("admit", keys, [*args, "retry"])[0] == 0  # the reply was lost

    assert int(rclient.get(k.quota(this))) == 400
    assert rclient.zrange(k.reservations, 0, -1) == [reservation_member("req_r1", 400, this)]
    store.close()


def test_a_reservation_made_last_month_is_released_from_last_months_counter(
        make_config, rclient, key_prefix, events) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    k = KeySchema(key_prefix, 16).tenant("globex")
    rclient.set(k.quota("2026-10"), 900)  # 900 reserved for req_m on the last day of October
    member = reservation_member("req_m", 900, "2026-10")
    rclient.zadd(k.reservations, {member: int(time.time() * 1000) + 60_000})

    store.run_script("settle", [k.quota("2026-11"), k.stream, k.settled("req_m"),
                                k.reservations],
                     [120, 60, 90, member, "request_id", "req_m", "tenant_id", "globex"])

    assert rclient.get(k.quota("2026-10")) == "0"
    assert rclient.get(k.quota("2026-11")) == "120"
    assert rclient.zcard(k.reservations) == 0
    store.close()


def test_settle_under_oom_writes_nothing_and_says_oom() -> None:
    """maxmemory reached: settle.lua is refused at its first write, with nothing changed,
    and the reply's first word says OOM (so it is an outage, not a bad entry)."""
    from ai_saas_middleware.embedded import start_server

    with start_server() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        k = KeySchema("oom", 16).tenant("globex")
        client.set(k.quota(MONTH), 50)
        member = reservation_member("req_o", 50, MONTH)
        client.zadd(k.reservations, {member: int(time.time() * 1000) + 60_000})
        client.set("ballast", "x" * 2_000_000)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(client.info("memory")["used_memory"] - 100_000))
        script = client.register_script(load_script("settle"))
        settle_keys = [k.quota(MONTH), k.stream, k.settled("req_o"), k.reservations]
        settle_args = [20, 60, 90, member, "request_id", "req_o"]

        with pytest.raises(redis.exceptions.OutOfMemoryError):  # the reply began "OOM"
            script(keys=settle_keys, args=settle_args)
        assert client.exists(k.stream, k.settled("req_o")) == 0
        assert client.get(k.quota(MONTH)) == "50"
        assert client.zrange(k.reservations, 0, -1) == [member]

        client.delete("ballast")
        assert script(keys=settle_keys, args=settle_args)
        assert client.get(k.quota(MONTH)) == "20" and client.xlen(k.stream) == 1
        client.close()


KILLED_APP = """
import json, sys, time
from ai_saas_middleware import Gateway, RequestInfo
gateway = Gateway(json.loads(sys.argv[1]))
body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 700})
decision = gateway.admit(RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                     "authorization": "Bearer " + sys.argv[2]}, body.encode()))
print(decision.ticket.request_id, flush=True)
time.sleep(120)  # mid-request, until killed
"""


def test_a_process_killed_mid_request_has_its_reservation_released(
        make_config, rclient, key_prefix, events) -> None:
    config = make_config(quota={"reservationTimeout": "1s"})
    app = subprocess.Popen([sys.executable, "-c", KILLED_APP, json.dumps(config),
                            API_KEYS["globex"]], stdout=subprocess.PIPE, text=True)
    try:
        request_id = app.stdout.readline().strip()  # type: ignore[union-attr]
        assert request_id in in_flight(rclient, key_prefix, "globex")
        held_before = counter(rclient, key_prefix, "globex")
        assert held_before > 700
        time.sleep(0.5)  # the victim's keeper may renew once; then it is killed
    finally:
        os.kill(app.pid, signal.SIGKILL)
        app.wait()
    others = {t: counter(rclient, key_prefix, t) for t in ("acme", "initech")}

    keys = KeySchema(key_prefix, 16).tenant("globex")
    member = f"{request_id} {in_flight(rclient, key_prefix, 'globex')[request_id]}"
    lease_end = float(rclient.zscore(keys.reservations, member) or 0)
    deadline = time.monotonic() + 5
    while (lambda t: t[0] * 1000 + t[1] // 1000)(rclient.time()) <= lease_end:
        assert time.monotonic() < deadline, "the killed request's lease did not end"
        time.sleep(0.1)
    # Only the dead reservation stands between the tenant and its quota: the next
    # admission releases it and is admitted.
    settled = 100_000 - held_before - 20
    rclient.incrby(keys.quota(MONTH), settled)
    gateway = Gateway(config)
    probe = gateway.admit(ai_request(max_tokens=100))
    assert probe.ticket is not None
    gateway.settle(probe.ticket, Outcome(200, provider_usage=(1, 1)), probe.context)

    assert in_flight(rclient, key_prefix, "globex") == {}
    assert counter(rclient, key_prefix, "globex") == settled + 2
    assert request_id not in {e["request_id"] for e in events()}
    assert {t: counter(rclient, key_prefix, t) for t in others} == others
    gateway.close()


def test_an_admission_reply_out_of_step_is_an_outage_not_a_500(
        make_config, rclient, key_prefix, events, monkeypatch) -> None:
    """A reply that is not admit.lua's (a connection whose replies no longer match its
    calls, e.g. behind a proxy that lost bytes) must not become an exception: the request
    follows onUnavailable and the store starts over on fresh connections."""
    gateway = Gateway(make_config())
    dropped: list[bool] = []
    monkeypatch.setattr(gateway.store, "run_script",
                        lambda which, keys, args: b"1733000000000-0")  # a settle's reply
    monkeypatch.setattr(gateway.store, "out_of_step", lambda: dropped.append(True))

    decision = gateway.admit(ai_request())

    assert decision.allowed and decision.ticket is not None and decision.ticket.local
    assert dropped == [True]
    gateway.close()
