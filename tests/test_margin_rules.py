"""billing.marginRules: a tenant whose margin in the month falls below a threshold is
flagged, and with a switching rule priced by it from its next event on; on SQLite and
PostgreSQL, through Ledger.record (the worker's one transaction per batch)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import select

from ai_saas_middleware.billing import tables as t
from ai_saas_middleware.billing.events import Event, parse_entry
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.rates import Pricing
from ai_saas_middleware.config import load_config

PICO = 10 ** 12


def event(n: int, tenant: str, tier: str, cost: str, prompt: int = 100,
          completion: int = 50) -> Event:
    return parse_entry(f"s 1-{n}", [
        b"request_id", f"r{tenant}{n}".encode(), b"tenant_id", tenant.encode(),
        b"tier", tier.encode(), b"model_id", b"m", b"provider", b"p",
        b"prompt_tokens", str(prompt).encode(), b"completion_tokens", str(completion).encode(),
        b"usage_source", b"provider", b"cost", cost.encode(), b"latency_ms", b"5",
        b"status", b"200", b"cache", b"miss", b"fallback_from", b"", b"outcome_value", b"",
        b"ts", b"2026-11-05T10:00:00.000Z", b"endpoint", b"/ai/*",
        b"client_disconnected", b"false", b"price_version", b"0", b"truncated", b"false"])


def ledger_with(ledger_url: str, billing: dict[str, Any]) -> tuple[Ledger, Pricing]:
    config = load_config({"tenant": {"tiers": [{"name": "free", "monthlyQuota": 1000,
                                                "rateLimit": 10},
                                               {"name": "pro", "monthlyQuota": 1000,
                                                "rateLimit": 10}]},
                          "billing": {"database": ledger_url, **billing}})
    ledger = Ledger(ledger_url)
    ledger.migrate()
    pricing = Pricing(config.billing)
    ledger.register(pricing)
    return ledger, pricing


def rows(ledger: Ledger) -> dict[str, tuple[int, int]]:
    with ledger.reading() as conn:
        return {r.request_id: (r.revenue_p, r.pricing_version) for r in
                conn.execute(select(t.usage_events.c.request_id, t.usage_events.c.revenue_p,
                                    t.usage_events.c.pricing_version))}


def test_a_low_margin_flags_the_tenant_and_switches_its_pricing_from_the_next_event(
        ledger_url: str) -> None:
    ledger, pricing = ledger_with(ledger_url, {
        "markup": "0.1",  # margin 0.1 / 1.1 = 9.09%
        # pro is priced by usage: 100 in x 0.00001 + 50 out x 0.00002 = 0.002 per event
        "pricingRules": [{"metric": "input_tokens", "rate": "0.00001", "tier": "pro"},
                         {"metric": "output_tokens", "rate": "0.00002", "tier": "pro"}],
        "marginRules": [{"below": "0.2", "markup": "0.5"}, {"below": "0.05"}]})
    try:
        first = [event(i, "acme", "free", "0.001") for i in range(3)] + \
            [event(i, "globex", "pro", "0.001") for i in range(3)]
        done = ledger.record(first, pricing)
        assert done.inserted == 6
        assert [(tn, p) for tn, p, _ in done.flagged] == [("acme", "2026-11")]
        second = [event(i, "acme", "free", "0.001") for i in range(3, 5)] + \
            [event(i, "globex", "pro", "0.001") for i in range(3, 5)]
        ledger.record(second, pricing)

        got = rows(ledger)
        base = pricing.versions[pricing.base]
        switched = pricing.versions[pricing.switched[0]]
        assert base != switched
        # acme: 0.001 x 1.1 before the flag, 0.001 x 1.5 after, exactly.
        for i in range(3):
            assert got[f"racme{i}"] == (1_100_000_000, base)
        for i in range(3, 5):
            assert got[f"racme{i}"] == (1_500_000_000, switched)
        # globex (pro) is priced by its tier's rates, margin 50%: never flagged.
        assert {got[f"rglobex{i}"] for i in range(5)} == {(2 * PICO // 1000, base)}
        with ledger.reading() as conn:
            flags = conn.execute(select(t.tenant_flags)).all()
        assert [(f.tenant_id, f.period, f.rule, f.pricing_version) for f in flags] == \
            [("acme", "2026-11", 0, switched)]
        assert Decimal(flags[0].margin) == Decimal("0.090909")
    finally:
        ledger.close()


def test_a_margin_below_a_flag_only_rule_flags_without_changing_prices(
        ledger_url: str) -> None:
    ledger, pricing = ledger_with(ledger_url, {
        "minimumPerRequest": "0.0005", "marginRules": [{"below": "0"}]})
    try:
        # No rates, no markup: each request is charged the minimum, 0.0005, against a
        # cost of 0.001: a margin of -100%.
        done = ledger.record([event(1, "acme", "free", "0.001")], pricing)
        assert [(tn, m) for tn, _, m in done.flagged] == [("acme", "-1.000000")]
        ledger.record([event(2, "acme", "free", "0.001")], pricing)
        assert set(rows(ledger).values()) == {(PICO // 2000, pricing.versions[pricing.base])}
    finally:
        ledger.close()
