"""Ledger.record's bulk insert (COPY through a staging table on PostgreSQL, a checked
INSERT under the write lock on SQLite): each request once, however often it comes, and
the daily aggregates of exactly the rows inserted, after a failed transaction too."""

from __future__ import annotations

from decimal import Decimal

import pytest
from billing_events import Expected, event_fields
from sqlalchemy.exc import SQLAlchemyError

from ai_saas_middleware.billing.events import Event, parse_entry
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.rates import Pricing
from ai_saas_middleware.budgets import from_picodollars
from ai_saas_middleware.config import load_config


def events(lo: int, hi: int, expected: Expected | None = None) -> list[Event]:
    out = []
    for i in range(lo, hi):
        tenant = f"tenant-{i % 5}"
        request_id, prompt, completion, cost, fields = event_fields(i, tenant, "run")
        if i % 9 == 0:  # some with an outcome, negative ones too
            at = fields.index("outcome_value") + 1
            fields[at] = f"{'-' if i % 2 else ''}{i}.25"
        out.append(parse_entry(f"s {i}-0", [f.encode() for f in fields]))
        if expected is not None:
            expected.add(tenant, request_id, prompt, completion, cost)
    return out


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    led = Ledger(ledger_url)
    led.migrate()
    return led


@pytest.fixture
def pricing(ledger: Ledger) -> Pricing:
    config = load_config({"models": [{"id": "model-large", "provider": "openai",
                                      "costPerInputToken": "0.0000025",
                                      "costPerOutputToken": "0.00001", "maxTokens": 1000,
                                      "qualityScore": 0.9, "latencyP99Ms": 900}],
                          "billing": {"markup": "0.5"}})
    plans = Pricing(config.billing)
    ledger.register(plans)
    return plans


Totals = dict[str, tuple[int, Decimal]]  # tenant -> (events, cost)


def totals(ledger: Ledger) -> tuple[Totals, Totals]:
    with ledger.reading() as conn:
        rows = conn.exec_driver_sql("SELECT tenant_id, COUNT(*), SUM(cost_p) FROM "
                                    "usage_events GROUP BY tenant_id").all()
        daily = conn.exec_driver_sql("SELECT tenant_id, SUM(requests), SUM(cost_p) FROM "
                                     "usage_daily GROUP BY tenant_id").all()
    return ({t: (int(n), from_picodollars(int(c))) for t, n, c in rows},
            {t: (int(n), from_picodollars(int(c))) for t, n, c in daily})


def test_each_request_is_inserted_once_with_its_aggregates(ledger: Ledger,
                                                          pricing: Pricing) -> None:
    first = ledger.record(events(0, 300), pricing)
    assert (first.inserted, first.duplicates) == (300, 0)
    again = ledger.record(events(200, 500), pricing)  # 100 seen before, 200 new
    assert (again.inserted, again.duplicates) == (200, 100)
    exact = Expected()
    events(0, 500, exact)
    want = {t: (n, exact.cost[t]) for t, n in exact.requests.items()}
    rows, daily = totals(ledger)
    assert rows == want
    assert daily == want
    with ledger.reading() as conn:
        outcomes = dict(conn.exec_driver_sql(
            "SELECT request_id, outcome_p FROM usage_events WHERE outcome_p IS NOT NULL"
        ).all())
    assert outcomes == {ev.request_id: ev.outcome_p for ev in events(0, 500)
                        if ev.outcome_p is not None}


def test_a_failed_transaction_leaves_nothing_and_the_next_one_inserts(
        ledger: Ledger, pricing: Pricing) -> None:
    batch = events(0, 50)
    broken = events(50, 60)
    broken[-1].tenant_id = "t" * 100  # longer than the column: PostgreSQL refuses it
    refused: tuple[type[Exception], ...] = (SQLAlchemyError,)  # what the worker retries
    if ledger.dialect == "sqlite":  # SQLite keeps any length: refuse another way
        broken[-1].status = 2 ** 70  # too large for an SQLite integer
        refused = (SQLAlchemyError, OverflowError)
    with pytest.raises(refused):
        ledger.record(broken, pricing)
    done = ledger.record(batch, pricing)
    assert done.inserted == 50
    rows, daily = totals(ledger)
    assert sum(n for n, _ in rows.values()) == 50
    assert sum(n for n, _ in daily.values()) == 50
