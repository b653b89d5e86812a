"""Money budgets (issue 9 item 4): admission reserves the worst-case cost beside the
tokens, in the same round trip; settlement replaces it by the real cost; over a budget,
429 ``budget_exceeded`` with ``Retry-After`` at the period's end. Against a real Redis,
with real processes where the claim is about several of them."""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from ai_saas_middleware import Gateway
from ai_saas_middleware.errors import BudgetExceeded
from ai_saas_middleware.store.keys import KeySchema

PICO = Decimal("1e-12")


def budget_config(make_config: Any, **tier: Any) -> dict[str, Any]:
    config = make_config()
    pro = next(t for t in config["tenant"]["tiers"] if t["name"] == "pro")
    pro.update(tier)
    return config


def chat(max_tokens: int, words: int = 20) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "word " * words}],
            "max_tokens": max_tokens}


def spent(rclient: Any, key_prefix: str, tenant: str) -> tuple[Decimal, Decimal]:
    keys = KeySchema(key_prefix, 16).tenant(tenant)
    month = time.strftime("%Y-%m", time.gmtime())
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return (Decimal(rclient.get(keys.spent_month(month)) or 0) * PICO,
            Decimal(rclient.get(keys.spent_day(day)) or 0) * PICO)


def stream_cost(events: Any, tenant: str) -> Decimal:
    return sum((Decimal(e["cost"]) for e in events() if e["tenant_id"] == tenant), Decimal(0))


def test_settlement_replaces_the_worst_case_by_the_real_cost(make_config, rclient, key_prefix,
                                                             events):
    gateway = Gateway(budget_config(make_config, monthlyBudget="10"))
    try:
        decision = gateway.admit(*job(gateway, chat(max_tokens=500)))
        assert decision.allowed
        reserved, _ = spent(rclient, key_prefix, "globex")
        model = decision.context.model
        assert reserved > 0  # the dearest candidate's prompt + 500 output tokens
        decision.context.record_usage(30, 7)
        gateway.settle(decision.ticket, outcome(), decision.context)
        month, day = spent(rclient, key_prefix, "globex")
        real = model.cost_per_input_token * 30 + model.cost_per_output_token * 7
        assert month == day == real == stream_cost(events, "globex")
    finally:
        gateway.close()


def job(gateway: Gateway, body: dict[str, Any], tenant: str = "globex") -> Any:
    return gateway._job_info(tenant, None, body, None)


def outcome() -> Any:
    from ai_saas_middleware.types import Outcome
    return Outcome(200)


def test_over_the_monthly_budget_is_a_429_budget_exceeded_until_the_months_end(make_config):
    # model-medium, pro's dearest: 0.000015/output token; 1000 output tokens ~ $0.015 worst
    # case: two fit in $0.035, three do not.
    gateway = Gateway(budget_config(make_config, monthlyBudget="0.035"))
    try:
        admitted = [gateway.admit(*job(gateway, chat(max_tokens=1000))) for _ in range(3)]
        assert [d.allowed for d in admitted] == [True, True, False]
        refused = admitted[2]
        assert (refused.status, refused.error_code) == (429, "budget_exceeded")
        now = time.time()
        t = time.gmtime(now)
        month_end = calendar.timegm((t.tm_year + (t.tm_mon == 12), t.tm_mon % 12 + 1, 1, 0, 0, 0))
        assert abs(refused.retry_after_s - (month_end - now)) <= 5
        assert "monthly budget" in (refused.error_message or "")
        with pytest.raises(BudgetExceeded):
            with gateway.request(tenant_id="globex", body=chat(max_tokens=1000)):
                pass
        for d in admitted[:2]:
            gateway.settle(d.ticket, outcome(), d.context)
    finally:
        gateway.close()


def test_the_daily_budget_refuses_until_midnight_utc(make_config):
    gateway = Gateway(budget_config(make_config, dailyBudget="0.02"))
    try:
        first = gateway.admit(*job(gateway, chat(max_tokens=1000)))
        second = gateway.admit(*job(gateway, chat(max_tokens=1000)))
        assert first.allowed and not second.allowed
        assert second.error_code == "budget_exceeded"
        now = time.time()
        midnight = (int(now) // 86400 + 1) * 86400
        assert abs(second.retry_after_s - (midnight - now)) <= 5
        assert "daily budget" in (second.error_message or "")
        gateway.settle(first.ticket, outcome(), first.context)
    finally:
        gateway.close()


def test_a_tenants_own_budget_replaces_its_tiers(make_config):
    config = budget_config(make_config, monthlyBudget="100")
    next(t for t in config["tenants"] if t["id"] == "globex")["monthlyBudget"] = "0.02"
    gateway = Gateway(config)
    try:
        first = gateway.admit(*job(gateway, chat(max_tokens=1000)))
        second = gateway.admit(*job(gateway, chat(max_tokens=1000)))
        assert first.allowed and second.error_code == "budget_exceeded"
        gateway.settle(first.ticket, outcome(), first.context)
    finally:
        gateway.close()


def test_a_tier_without_budget_counts_no_money(make_config, rclient, key_prefix):
    gateway = Gateway(make_config())
    try:
        d = gateway.admit(*job(gateway, chat(max_tokens=100)))
        gateway.settle(d.ticket, outcome(), d.context)
        assert spent(rclient, key_prefix, "globex") == (0, 0)
        assert d.ticket.reservation.count(" ") == 2  # tokens only
    finally:
        gateway.close()


WORKER = textwrap.dedent("""
    import json, sys, threading
    from ai_saas_middleware import Gateway
    from ai_saas_middleware.types import Outcome
    config = json.loads(sys.argv[1])
    gateway = Gateway(config)
    barrier = threading.Barrier(16)
    results = []
    def one(i):
        body = {"messages": [{"role": "user", "content": "hello " * (5 + i)}],
                "max_tokens": 400}
        info, endpoint = gateway._job_info("globex", None, body, None)
        barrier.wait()
        d = gateway.admit(info, endpoint)
        if d.allowed:
            d.context.record_usage(10 + i, 100 + 7 * i)   # less than the worst case
            gateway.settle(d.ticket, Outcome(200), d.context)
            results.append("ok")
        else:
            results.append(d.error_code)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads: t.start()
    for t in threads: t.join()
    gateway.close()
    print(json.dumps(results))
""")


def test_two_processes_and_32_concurrent_requests_never_pass_the_budget(
        make_config, rclient, key_prefix, events, tmp_path: Path):
    # Worst case per request on model-large ~ 400 * 0.00001 = $0.004 (+ prompt); 32 of them
    # would be ~$0.13: a budget of $0.05 admits about a dozen at a time, and settlements
    # (real cost lower) let more in.
    budget = Decimal("0.05")
    config = budget_config(make_config, monthlyBudget=str(budget),
                           allowedModels=["model-large"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(config)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results += json.loads(out.strip().splitlines()[-1])
    assert len(results) == 32
    assert set(results) <= {"ok", "budget_exceeded"}
    assert "budget_exceeded" in results and "ok" in results
    month, day = spent(rclient, key_prefix, "globex")
    in_stream = stream_cost(events, "globex")
    assert in_stream <= budget
    assert month == day == in_stream  # exactly, to the picodollar
    assert len([e for e in events() if e["tenant_id"] == "globex"]) == results.count("ok")
