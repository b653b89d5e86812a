"""Usage to Stripe exactly once, on SQLite and PostgreSQL, against a stateful stand-in.

The official stripe SDK talks real HTTP to tests/stripe_standin.py on loopback; the
ledger is a real database (the ``ledger_url`` fixture). Each test ends by checking that
every request the SDK made had Stripe's shape (``violations`` empty) and that Stripe
holds each usage exactly once: its per-customer totals equal the ledger's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select, text

from ai_saas_middleware import load_config
from ai_saas_middleware.billing import tables as t
from ai_saas_middleware.billing.events import parse_entry
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.rates import Pricing
from ai_saas_middleware.billing.stripe_client import StripeMeter
from ai_saas_middleware.billing.stripe_sync import (
    TICK_BUDGET_S,
    Deliverer,
    customers_of,
    identifier_of,
    units,
)
from ai_saas_middleware.cli import main
from ai_saas_middleware.config import Config

sys.path.insert(0, str(Path(__file__).parent))
from stripe_standin import API_KEY, Running, start

KEY_ENV = "AI_SAAS_TEST_STRIPE_KEY"
PERIOD = "2026-11"
CUSTOMERS = {"acme": "cus_acme", "globex": "cus_globex", "hooli": "cus_hooli",
             "umbrella": "cus_umbrella"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    running = start()
    yield running
    running.close()


@pytest.fixture
def setup(make_config: Callable[..., dict[str, Any]], standin: Running, ledger_url: str,
          tmp_path: Path) -> Callable[..., tuple[Config, Path]]:
    """``setup(**stripe)``: (the config, its file) with billing.stripe pointed at the
    stand-in, tenants acme/globex/hooli/umbrella with customers and initech without."""

    def make(metric: str = "tokens", **stripe: Any) -> tuple[Config, Path]:
        raw = make_config()
        tenants = [{"id": tid, "tier": "pro", "apiKeys": [],
                    "stripeCustomerId": cus} for tid, cus in CUSTOMERS.items()]
        tenants.append({"id": "initech", "tier": "pro", "apiKeys": []})
        raw["tenants"] = tenants
        raw["billing"] = {"database": ledger_url, "usageMetric": metric, "stripe": {
            "apiKeyEnv": KEY_ENV, "apiBase": standin.url, "meterEventsBase": standin.url,
            "interval": "1h", **stripe}}
        path = tmp_path / "ai-saas-config.yaml"
        path.write_text(yaml.safe_dump(raw))
        config = load_config(path)
        ledger = Ledger(config.billing.database)
        ledger.migrate()
        ledger.close()
        return config, path

    return make


def make_deliverer(config: Config, ledger: Ledger, sleeps: list[float] | None = None,
                   **options: Any) -> Deliverer:
    """A Deliverer of ``config``'s customers from ``ledger`` over :func:`meter`."""
    return Deliverer(config, ledger, customers_of(config), meter=meter(config, sleeps),
                     **options)


def meter(config: Config, sleeps: list[float] | None = None) -> StripeMeter:
    """A meter with short backoff; given ``sleeps``, it waits on a fake clock instead
    and records each delay there."""
    assert config.billing.stripe is not None
    if sleeps is None:
        return StripeMeter(config.billing.stripe, backoff_s=0.001, backoff_cap_s=0.01)
    now = [0.0]

    def sleep(delay: float) -> None:
        sleeps.append(delay)
        now[0] += delay

    return StripeMeter(config.billing.stripe, backoff_s=0.001, backoff_cap_s=0.01,
                       sleep=sleep, clock=lambda: now[0])


class Usage:
    """Records events into the ledger as the worker would, and remembers them."""

    def __init__(self, config: Config):
        self.ledger = Ledger(config.billing.database)
        self.pricing = Pricing(config.billing)
        self.ledger.register(self.pricing)
        self.count = 0

    def add(self, tenant: str, n: int, day: int = 15, prompt: int = 10,
            completion: int = 3) -> None:
        batch = []
        for _ in range(n):
            self.count += 1
            i = self.count
            batch.append(parse_entry(f"s 1-{i}", {
                "request_id": f"req-{tenant}-{i}", "tenant_id": tenant, "tier": "pro",
                "model_id": "model-small", "provider": "openai",
                "prompt_tokens": str(prompt + i % 7), "completion_tokens": str(completion),
                "cost": "0.000001", "status": "200",
                "ts": f"{PERIOD}-{day:02d}T10:{i % 60:02d}:{(i * 7) % 60:02d}.{i % 1000:03d}Z"}))
        self.ledger.record(batch, self.pricing)

    def totals(self, metric: str = "tokens") -> dict[str, int]:
        """Customer -> the ledger's units (tenants with a customer)."""
        out: dict[str, int] = {}
        with self.ledger.reading() as conn:
            for row in conn.execute(select(t.usage_events)):
                customer = CUSTOMERS.get(row.tenant_id)
                if customer:
                    out[customer] = out.get(customer, 0) + units(
                        metric, row.prompt_tokens, row.completion_tokens)
        return out

    def deliveries(self) -> list[Any]:
        with self.ledger.reading() as conn:
            return list(conn.execute(select(t.stripe_deliveries)).all())

    def undelivered(self) -> dict[str, int]:
        ue = t.usage_events.c
        with self.ledger.reading() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(
                select(ue.tenant_id, func.count()).where(ue.delivery.is_(None))
                .group_by(ue.tenant_id))}


def exactly_once(standin: Running, usage: Usage, metric: str = "tokens") -> None:
    """Stripe holds each usage once: its totals are the ledger's, every event of a
    customer's tenant is in exactly one delivered meter event, nothing was malformed."""
    assert standin.state.violations == []
    held = {cus: int(v) for cus, v in standin.state.totals().items()}
    assert held == usage.totals(metric)
    deliveries = usage.deliveries()
    assert {d.state for d in deliveries} == {"delivered"}
    assert set(standin.state.events) == {d.identifier for d in deliveries}
    with usage.ledger.reading() as conn:
        events = conn.execute(select(func.count()).select_from(t.usage_events)
                              .where(t.usage_events.c.tenant_id != "initech")).scalar_one()
    assert sum(d.events for d in deliveries) == events
    assert "initech" not in usage.undelivered() or set(usage.undelivered()) == {"initech"}


def test_each_usage_delivered_once_in_whole_units_with_derived_identifiers(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup()
    usage = Usage(config)
    usage.add("acme", 5)
    usage.add("acme", 3, day=2)
    usage.add("globex", 4)
    usage.add("initech", 6)  # no customer: stays undelivered
    deliverer = make_deliverer(config, usage.ledger)
    sent = deliverer.flush()
    assert (sent.delivered, sent.duplicates, sent.failed, sent.pending) == (2, 0, 0, 0)
    exactly_once(standin, usage)
    assert usage.undelivered() == {"initech": 6}
    # One meter event per tenant x month; the identifier is derived from its events; the
    # timestamp is the latest event's; the value whole units of usageMetric.
    ue = t.usage_events.c
    deliveries = usage.deliveries()
    with usage.ledger.reading() as conn:
        for d in deliveries:
            rows = conn.execute(select(ue.request_id, ue.ts, ue.prompt_tokens,
                                       ue.completion_tokens)
                                .where(ue.delivery == d.identifier)).all()
            assert d.identifier == identifier_of(d.tenant_id, d.period, "ai_usage",
                                                 [r.request_id for r in rows])
            assert len(d.identifier) <= 100
            assert d.value == sum(r.prompt_tokens + r.completion_tokens for r in rows)
            latest = max(datetime.fromisoformat(r.ts.replace("Z", "+00:00")) for r in rows)
            assert d.timestamp == int(latest.timestamp())
            stored = standin.state.events[d.identifier]
            assert (stored.customer, stored.value, stored.timestamp, stored.via) == (
                CUSTOMERS[d.tenant_id], d.value, d.timestamp, "v1")
    # Nothing new: nothing sent.
    before = len(standin.state.requests)
    assert deliverer.flush().delivered == 0
    assert len(standin.state.requests) == before
    usage.add("globex", 2)
    assert deliverer.flush().delivered == 1
    exactly_once(standin, usage)


@pytest.mark.parametrize("metric", ["input_tokens", "output_tokens", "requests"])
def test_value_is_whole_units_of_the_usage_metric(
        setup: Callable[..., tuple[Config, Path]], standin: Running, metric: str) -> None:
    config, _ = setup(metric=metric)
    usage = Usage(config)
    usage.add("hooli", 9, prompt=1000, completion=77)
    make_deliverer(config, usage.ledger).flush()
    exactly_once(standin, usage, metric)


def test_a_429_burst_is_retried_with_backoff_honouring_retry_after(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup(maxRetries=5)
    usage = Usage(config)
    for tenant in ("acme", "globex"):
        usage.add(tenant, 3)
    standin.state.rate_limit_burst = 4
    standin.state.retry_after = "2"
    sleeps: list[float] = []
    sent = make_deliverer(config, usage.ledger, sleeps).flush()
    assert sent.delivered == 2
    assert len(sleeps) == 4 and min(sleeps) >= 2.0  # never sooner than Retry-After
    exactly_once(standin, usage)


def test_retries_spent_leave_it_pending_for_the_next_round(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup(maxRetries=2)
    usage = Usage(config)
    usage.add("acme", 3)
    usage.add("globex", 3)
    standin.state.rate_limit_burst = 3  # one more than the attempts allowed
    sleeps: list[float] = []
    deliverer = make_deliverer(config, usage.ledger, sleeps)
    sent = deliverer.flush()
    assert (sent.delivered, sent.pending) == (0, 2)
    assert {d.state for d in usage.deliveries()} == {"pending"}
    assert all(s < 0.02 for s in sleeps[:2])  # jittered backoff within its cap
    sent = deliverer.flush()
    assert sent.delivered == 2
    exactly_once(standin, usage)


def test_a_flush_budget_ends_retrying_and_keeps_the_rest_pending(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup(maxRetries=50)
    usage = Usage(config)
    usage.add("acme", 2)
    standin.state.rate_limit_burst = 1000  # Stripe unwell for longer than the budget
    standin.state.retry_after = "1"
    sleeps: list[float] = []
    deliverer = make_deliverer(config, usage.ledger, sleeps)
    sent = deliverer.flush(budget_s=3.5)  # on the fake clock: 3 retries of 1 s fit
    assert sent.pending == 1 and sleeps == [1.0, 1.0, 1.0]
    [pending] = usage.deliveries()
    assert pending.state == "pending" and "RateLimitError (429)" in pending.last_error
    standin.state.rate_limit_burst = 0
    assert deliverer.flush().delivered == 1
    exactly_once(standin, usage)


def test_a_5xx_after_commit_counts_once(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup()
    usage = Usage(config)
    usage.add("acme", 3)
    usage.add("globex", 3)
    standin.state.fail_after_commit = 1  # Stripe stores acme's event, then answers 500
    sent = make_deliverer(config, usage.ledger).flush()
    # The retry carries the same identifier under a fresh idempotency key (the first
    # key's saved 500 would be replayed): Stripe answers "already exists": delivered.
    assert (sent.delivered, sent.duplicates) == (1, 1)
    assert sorted(standin.state.received.values()) == [1, 2]
    exactly_once(standin, usage)


def test_a_refusal_marks_the_delivery_failed_and_reconcile_lists_it(
        setup: Callable[..., tuple[Config, Path]], standin: Running,
        capsys: pytest.CaptureFixture[str]) -> None:
    config, path = setup()
    usage = Usage(config)
    usage.add("acme", 2)
    usage.add("hooli", 2)
    standin.state.refuse_customers = {"cus_hooli"}
    sent = make_deliverer(config, usage.ledger).flush()
    assert (sent.delivered, sent.failed) == (1, 1)
    failed = next(d for d in usage.deliveries() if d.tenant_id == "hooli")
    assert failed.state == "failed" and "No such customer: 'cus_hooli'" in failed.last_error
    assert standin.state.requests.count(("POST", "/v1/billing/meter_events")) == 2  # no retry
    code, out, _ = reconcile(path, capsys)
    assert code == 1
    assert "cus_hooli (hooli): failed: 1 meter event(s) of" in out
    assert "No such customer" in out
    assert standin.state.violations == []


CRASHING_SENDER = """
import sys
from ai_saas_middleware import load_config
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.stripe_sync import Deliverer, customers_of
config = load_config(sys.argv[1])
ledger = Ledger(config.billing.database)
Deliverer(config, ledger, customers_of(config)).flush()
"""


def test_a_crash_between_send_and_record_resends_the_same_identifier_counted_once(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, path = setup()
    usage = Usage(config)
    usage.add("umbrella", 4)
    standin.state.hold = threading.Event()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SENDER, str(path)], env=env)
    try:
        # Stripe has stored the event; its answer is held back; the sender is killed.
        assert standin.state.held.wait(60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    standin.state.hold.set()
    [pending] = usage.deliveries()
    assert (pending.state, len(standin.state.events)) == ("pending", 1)
    standin.state.hold = None
    sent = make_deliverer(config, usage.ledger).flush()
    assert sent.delivered + sent.duplicates == 1
    # Sent twice (the re-send under the same idempotency key, or meeting the identifier),
    # held once.
    assert standin.state.requests.count(("POST", "/v1/billing/meter_events")) == 2
    exactly_once(standin, usage)


def test_the_v2_stream_renews_an_expired_session(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup(streamAbove=3)
    usage = Usage(config)
    tenants = [f"t{i:03d}" for i in range(230)]
    CUSTOMERS.update({tid: f"cus_{tid}" for tid in tenants})
    try:
        cfg = _with_tenants(config, tenants)
        for tid in tenants:
            usage.add(tid, 1)
        standin.state.expire_after_calls = 1  # the second batch meets an expired token
        standin.state.rate_limit_burst = 1
        standin.state.fail_after_commit = 1  # the first batch stored, then a 500
        m = meter(cfg)
        sent = Deliverer(cfg, usage.ledger, customers_of(cfg), meter=m).flush()
        assert sent.delivered == 230
        assert standin.state.expired_answers == 1 and m.sessions_created == 2
        # 100 + 100 + 30, plus a 429, a 500 after commit (re-sent: dropped as already
        # held) and an expired session.
        assert standin.state.stream_calls == 6
        assert max(standin.state.received.values()) == 2
        assert {e.via for e in standin.state.events.values()} == {"v2"}
        exactly_once(standin, usage)
    finally:
        for tid in tenants:
            CUSTOMERS.pop(tid, None)


def _with_tenants(config: Config, tenants: list[str]) -> Config:
    import dataclasses

    from ai_saas_middleware.config import TenantConfig

    extra = {tid: TenantConfig(tid, "pro", (), f"cus_{tid}") for tid in tenants}
    return dataclasses.replace(config, tenants={**config.tenants, **extra})


def test_two_deliverers_at_once_never_claim_an_event_twice(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup()
    usage = Usage(config)
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0, 0]

    def run(i: int) -> None:
        ledger = Ledger(config.billing.database)
        deliverer = make_deliverer(config, ledger)
        try:
            while not stop.is_set() or rounds[i] == 0:
                deliverer.flush()
                rounds[i] += 1
            deliverer.flush()
        except BaseException as exc:  # reported below: a thread's failure fails the test
            errors.append(exc)
        finally:
            ledger.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    try:
        for n in range(40):
            usage.add(("acme", "globex", "hooli", "umbrella")[n % 4], 5)
    finally:
        stop.set()
        for th in threads:
            th.join(120)
    assert errors == []
    make_deliverer(config, usage.ledger).flush()
    assert usage.undelivered() == {}
    exactly_once(standin, usage)


def test_two_gathers_at_the_same_moment_split_a_backlog_without_overlap(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    config, _ = setup()
    usage = Usage(config)
    for tenant in ("acme", "globex", "hooli", "umbrella"):
        usage.add(tenant, 500)
    barrier = threading.Barrier(2)
    created: list[int] = []
    errors: list[BaseException] = []

    def gather() -> None:
        ledger = Ledger(config.billing.database)
        try:
            deliverer = make_deliverer(config, ledger)
            barrier.wait(30)
            created.append(deliverer.gather())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            ledger.close()

    threads = [threading.Thread(target=gather) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == [] and len(created) == 2
    deliveries = usage.deliveries()
    assert sum(created) == len(deliveries) >= 4
    assert sum(d.events for d in deliveries) == 2000  # each event claimed by one of them
    make_deliverer(config, usage.ledger).flush()
    exactly_once(standin, usage)


def test_a_worker_tick_retries_an_unwell_stripe_only_within_its_budget(
        setup: Callable[..., tuple[Config, Path]], standin: Running) -> None:
    """The worker calls tick() between batches: however many retries maxRetries allows,
    a round spends at most TICK_BUDGET_S of backoff before ingestion goes on."""
    config, _ = setup(maxRetries=50)
    usage = Usage(config)
    usage.add("acme", 2)
    standin.state.rate_limit_burst = 1000
    standin.state.retry_after = "1"
    sleeps: list[float] = []
    deliverer = make_deliverer(config, usage.ledger, sleeps)
    sent = deliverer.tick()
    assert sent is not None and sent.pending == 1
    assert sum(sleeps) <= TICK_BUDGET_S < 50  # (without the budget: 50 retries, 50 s)
    standin.state.rate_limit_burst = 0
    assert deliverer.flush().delivered == 1
    exactly_once(standin, usage)


def test_tick_waits_for_its_interval_and_survives_a_failing_ledger(
        setup: Callable[..., tuple[Config, Path]], standin: Running,
        caplog: pytest.LogCaptureFixture) -> None:
    config, _ = setup(interval="10s")
    usage = Usage(config)
    now = [0.0]
    deliverer = make_deliverer(config, usage.ledger, clock=lambda: now[0])
    usage.add("acme", 2)
    first = deliverer.tick()
    assert first is not None and first.delivered == 1
    usage.add("acme", 2)
    now[0] = 9.9
    assert deliverer.tick() is None  # not yet time
    now[0] = 10.0
    second = deliverer.tick()
    assert second is not None and second.delivered == 1
    usage.add("globex", 1)
    with usage.ledger.writing() as conn:  # the ledger breaks under it
        conn.execute(text("ALTER TABLE stripe_deliveries RENAME TO stripe_deliveries_away"))
    now[0] = 20.0
    assert deliverer.tick() is None
    assert "the delivery round failed on the ledger" in caplog.text
    with usage.ledger.writing() as conn:
        conn.execute(text("ALTER TABLE stripe_deliveries_away RENAME TO stripe_deliveries"))
    now[0] = 30.0
    third = deliverer.tick()
    assert third is not None and third.delivered == 1
    exactly_once(standin, usage)


def reconcile(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["billing", "reconcile", "-c", str(path), "--period", PERIOD])
    out, err = capsys.readouterr()
    return code, out, err


def test_reconcile_agrees_after_delivery_and_lists_each_planted_difference(
        setup: Callable[..., tuple[Config, Path]], standin: Running,
        capsys: pytest.CaptureFixture[str]) -> None:
    config, path = setup()
    usage = Usage(config)
    usage.add("acme", 4)
    usage.add("globex", 2)
    usage.add("initech", 3)  # not billed through Stripe: a note, not a difference
    deliverer = make_deliverer(config, usage.ledger)
    deliverer.flush()
    code, out, err = reconcile(path, capsys)
    assert (code, err) == (0, "")
    assert "no differences." in out and "initech" in out
    totals = usage.totals()
    for customer, tenant in (("cus_acme", "acme"), ("cus_globex", "globex")):
        row = re.search(rf"^{customer} +{tenant} +(\d+) +(\d+) +(\S+)$", out, re.M)
        assert row is not None, out
        ledger_units, delivered, in_stripe = row.groups()
        assert int(ledger_units) == int(delivered) == totals[customer]
        assert Decimal(in_stripe) == totals[customer]

    stamp = int(datetime.fromisoformat(f"{PERIOD}-20T00:00:00+00:00").timestamp())
    standin.state.plant("cus_acme", 17, stamp)  # Stripe has usage we never sent
    globex = next(d for d in usage.deliveries() if d.tenant_id == "globex")
    with standin.state.lock:  # and lost one we did
        del standin.state.events[globex.identifier]
    usage.add("hooli", 2)
    deliverer.gather()  # gathered, not sent: pending
    usage.add("umbrella", 1)  # not even gathered
    code, out, err = reconcile(path, capsys)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert any("cus_acme (acme): extra_in_stripe:" in s and "17 extra" in s for s in lines)
    assert any("cus_globex (globex): missing_in_stripe:" in s
               and f"{globex.value} missing" in s for s in lines)
    assert any("cus_hooli (hooli): pending: 1 meter event(s)" in s for s in lines)
    assert any("cus_umbrella (umbrella): undelivered: 1 event(s)" in s for s in lines)
    assert "4 difference(s):" in out
    assert standin.state.violations == []


def test_reconcile_explains_what_stops_it_without_a_traceback(
        setup: Callable[..., tuple[Config, Path]], standin: Running, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = setup(maxRetries=0)
    raw = yaml.safe_load(path.read_text())
    no_stripe = {**raw, "billing": {k: v for k, v in raw["billing"].items() if k != "stripe"}}
    other = tmp_path / "no-stripe.yaml"
    other.write_text(yaml.safe_dump(no_stripe))
    code, _, err = reconcile(other, capsys)
    assert code == 2 and "no billing.stripe section" in err and "Traceback" not in err

    unmigrated = tmp_path / "unmigrated.yaml"
    unmigrated.write_text(yaml.safe_dump({**raw, "billing": {
        **raw["billing"], "database": f"sqlite:///{tmp_path / 'empty.sqlite3'}"}}))
    code, _, err = reconcile(unmigrated, capsys)
    assert code == 2 and "run 'ai-saas billing migrate'" in err

    unopenable = tmp_path / "unopenable.yaml"
    unopenable.write_text(yaml.safe_dump({**raw, "billing": {
        **raw["billing"], "database": f"sqlite:///{tmp_path / 'no-such-dir' / 'l.sqlite3'}"}}))
    code, _, err = reconcile(unopenable, capsys)
    assert code == 2 and "cannot be read: unable to open database file" in err
    assert "Traceback" not in err

    monkeypatch.delenv(KEY_ENV)
    code, _, err = reconcile(path, capsys)
    assert code == 2 and f"the environment variable {KEY_ENV}" in err

    monkeypatch.setenv(KEY_ENV, API_KEY)
    standin.close()  # Stripe unreachable
    code, _, err = reconcile(path, capsys)
    assert code == 2 and "APIConnectionError" in err and "Traceback" not in err


def test_the_api_key_never_reaches_a_log(
        setup: Callable[..., tuple[Config, Path]], standin: Running,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's own included
    monkeypatch.setenv("STRIPE_LOG", "debug")
    config, path = setup(maxRetries=3)
    usage = Usage(config)
    usage.add("acme", 2)
    usage.add("globex", 2)
    standin.state.rate_limit_burst = 2
    standin.state.fail_after_commit = 1
    make_deliverer(config, usage.ledger).flush()
    reconcile(path, capsys)
    wrong = "sk_test_wrong_key_0123456789abcdef"
    monkeypatch.setenv(KEY_ENV, wrong)
    usage.add("hooli", 1)
    sent = make_deliverer(config, usage.ledger).flush()
    assert sent.pending == 1 and "refused the API key" in sent.errors[0]
    code, out, err = reconcile(path, capsys)
    assert code == 2
    text = caplog.text + out + err + json.dumps(sent.errors)
    for key in (API_KEY, wrong):
        assert key not in text


def test_the_worker_moves_settled_usage_through_the_ledger_to_stripe_once(
        make_config: Callable[..., dict[str, Any]], ledger_url: str, standin: Running,
        redis_server_url: str, key_prefix: str) -> None:
    import redis
    from billing_events import Expected, settle_events, tenants

    from ai_saas_middleware.billing.worker import Worker
    from ai_saas_middleware.store.keys import KeySchema

    names = tenants(12)
    raw = make_config()
    raw["tenants"] = [{"id": n, "tier": "pro", "apiKeys": [],
                       **({"stripeCustomerId": f"cus_{n}"} if i % 3 else {})}
                      for i, n in enumerate(names)]
    raw["billing"] = {"database": ledger_url,
                      "worker": {"claimIdle": "1s", "trimInterval": "0.2s", "block": "0.2s"},
                      "stripe": {"apiKeyEnv": KEY_ENV, "apiBase": standin.url,
                                 "meterEventsBase": standin.url, "streamAbove": 4}}
    config = load_config(raw)
    client = redis.Redis.from_url(redis_server_url)
    expected = Expected()
    try:
        settle_events(client, KeySchema(key_prefix, 16), 0, 3000, names, expected)
    finally:
        client.close()
    standin.state.rate_limit_burst = 2
    standin.state.fail_after_commit = 1
    worker = Worker(config)
    try:
        assert worker.drain(60) == 3000
    finally:
        worker.close()
    billed = {f"cus_{n}": expected.tokens[n] for i, n in enumerate(names) if i % 3}
    assert {c: int(v) for c, v in standin.state.totals().items()} == billed
    assert standin.state.violations == []


def test_a_drain_to_the_end_delivers_everything_to_a_slow_stripe(
        make_config: Callable[..., dict[str, Any]], ledger_url: str, standin: Running,
        redis_server_url: str, key_prefix: str) -> None:
    """``ai-saas worker --once`` (``drain``) ends with a whole Stripe round, however long a
    healthy Stripe takes: its last round is not the 5 s of a stop by signal (which left
    deliveries pending after a cron run on a loaded machine)."""
    import redis
    from billing_events import Expected, settle_events, tenants

    from ai_saas_middleware.billing.worker import Worker
    from ai_saas_middleware.store.keys import KeySchema

    names = tenants(12)
    raw = make_config()
    raw["tenants"] = [{"id": n, "tier": "pro", "apiKeys": [], "stripeCustomerId": f"cus_{n}"}
                      for n in names]
    raw["billing"] = {"database": ledger_url, "stripe": {
        "apiKeyEnv": KEY_ENV, "apiBase": standin.url, "meterEventsBase": standin.url,
        "interval": "1h", "streamAbove": 1000}}  # one request per delivery
    config = load_config(raw)
    client = redis.Redis.from_url(redis_server_url)
    expected = Expected()
    try:
        settle_events(client, KeySchema(key_prefix, 16), 0, 600, names, expected)
    finally:
        client.close()
    standin.state.latency_s = 0.5  # 12 deliveries: 6 s, more than a stop's 5 s
    worker = Worker(config)
    started = time.monotonic()
    try:
        assert worker.drain(60) == 600
    finally:
        worker.close()
    assert time.monotonic() - started > 5  # (the round did take longer than a stop's)
    assert {c: int(v) for c, v in standin.state.totals().items()} == {
        f"cus_{n}": expected.tokens[n] for n in names}
    assert standin.state.violations == []


def test_a_redis_stored_tenants_customer_is_delivered_to_and_reconciled(
        setup: Callable[..., tuple[Config, Path]], standin: Running,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A tenant stored in Redis (``ai-saas tenants add --stripe-customer``), not in the
    file: the worker delivers its usage to its customer, and reconcile finds it there."""
    from ai_saas_middleware.store.redis import RedisStore
    from ai_saas_middleware.tenants import TenantAdmin

    config, path = setup()
    store = RedisStore(config.redis)
    try:
        TenantAdmin(config, store).add("wayne", "pro", stripe_customer_id="cus_wayne")
        usage = Usage(config)
        usage.add("wayne", 3)
        Deliverer(config, usage.ledger, customers_of(config, store),
                  meter=meter(config)).flush()
    finally:
        store.close()
    with usage.ledger.reading() as conn:
        tokens = sum(r.prompt_tokens + r.completion_tokens
                     for r in conn.execute(select(t.usage_events)))
    assert standin.state.totals() == {"cus_wayne": Decimal(tokens)}
    code, out, err = reconcile(path, capsys)
    assert (code, err) == (0, ""), out
    assert re.search(r"^cus_wayne +wayne +\d+ +\d+ +\S+$", out, re.M), out
