"""The billing worker against a real Redis and a real ledger (SQLite and PostgreSQL).

Events are written through the real settle.lua (tests/billing_events.py); the worker runs
in this process (threads) or as ``ai-saas worker`` processes that the tests kill.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from billing_events import Expected, settle_events, tenants
from faults import wait_until
from sqlalchemy import func, select
from stripe_standin import API_KEY as STRIPE_KEY
from stripe_standin import start as start_stripe

from ai_saas_middleware.billing import tables as t
from ai_saas_middleware.billing.ledger import Ledger, Prepared
from ai_saas_middleware.billing.worker import GROUP, Worker, status
from ai_saas_middleware.budgets import from_picodollars
from ai_saas_middleware.cli import main
from ai_saas_middleware.config import load_config
from ai_saas_middleware.pricing import format_usd
from ai_saas_middleware.store.keys import KeySchema

FAST = {"claimIdle": "1s", "trimInterval": "0.2s", "block": "0.2s"}


@pytest.fixture
def billing_config(make_config: Callable[..., dict[str, Any]], ledger_url: str
                   ) -> Callable[..., dict[str, Any]]:
    def make(**billing: Any) -> dict[str, Any]:
        worker = {**FAST, **billing.pop("worker", {})}
        return make_config(billing={"database": ledger_url, "worker": worker, **billing})
    return make


@pytest.fixture
def raw_client(redis_server_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


def ledger_totals(url: str) -> tuple[dict[str, tuple[int, int, Decimal]], int]:
    """Per tenant (requests, tokens, cost) from the rows, and the row count."""
    ledger = Ledger(url)
    e = t.usage_events.c
    try:
        with ledger.reading() as conn:
            rows = conn.execute(select(e.tenant_id, func.count(),
                                       func.sum(e.prompt_tokens + e.completion_tokens),
                                       func.sum(e.cost_p)).group_by(e.tenant_id)).all()
            count = conn.execute(select(func.count()).select_from(t.usage_events)).scalar()
    finally:
        ledger.close()
    return ({r[0]: (int(r[1]), int(r[2]), from_picodollars(int(r[3]))) for r in rows},
            int(count or 0))


def daily_totals(url: str) -> dict[str, tuple[int, int, Decimal]]:
    ledger = Ledger(url)
    d = t.usage_daily.c
    try:
        with ledger.reading() as conn:
            rows = conn.execute(select(d.tenant_id, func.sum(d.requests),
                                       func.sum(d.prompt_tokens + d.completion_tokens),
                                       func.sum(d.cost_p)).group_by(d.tenant_id)).all()
    finally:
        ledger.close()
    return {r[0]: (int(r[1]), int(r[2]), from_picodollars(int(r[3]))) for r in rows}


def expected_totals(expected: Expected) -> dict[str, tuple[int, int, Decimal]]:
    return {tn: (expected.requests[tn], expected.tokens[tn], expected.cost[tn])
            for tn in expected.requests}


def ledger_count(url: str) -> int:
    ledger = Ledger(url)
    try:
        with ledger.reading() as conn:
            return int(conn.execute(select(func.count()).select_from(t.usage_events)).scalar()
                       or 0)
    finally:
        ledger.close()


def drain_once(config: dict[str, Any]) -> tuple[Worker, int]:
    """A worker of ``config`` drains the streams (60 s at most) and is closed: it, and the
    events it inserted."""
    worker = Worker(config)
    try:
        return worker, worker.drain(60)
    finally:
        worker.close()


def test_every_event_is_in_the_ledger_once_with_exact_aggregates(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str) -> None:
    config = billing_config()
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    settle_events(raw_client, keys, 0, 3000, tenants(20), expected)
    # A replayed duplicate (same request id, appended again) and an entry that is not a
    # usage event: the first counts once, the second is kept aside, neither stalls a shard.
    first = raw_client.xrange(keys.tenant("tenant-000").stream, count=1)[0][1]
    raw_client.xadd(keys.tenant("tenant-000").stream, first)
    raw_client.xadd(keys.tenant("tenant-001").stream, {"request_id": "bad", "cost": "1e3"})

    worker, inserted = drain_once(config)

    assert inserted == 3000
    totals, count = ledger_totals(ledger_url)
    assert count == 3000
    assert totals == expected_totals(expected)
    assert daily_totals(ledger_url) == expected_totals(expected)
    assert worker.progress.duplicates == 1 and worker.progress.rejected == 1
    ledger = Ledger(ledger_url)
    with ledger.reading() as conn:
        rejected = conn.execute(select(t.rejected_events)).all()
    ledger.close()
    assert len(rejected) == 1 and "tenant_id" in rejected[0].reason
    # Everything acknowledged, so everything trimmed.
    assert sum(raw_client.xlen(s) for s in keys.streams()) == 0
    assert all(raw_client.xpending(s, GROUP)["pending"] == 0 for s in keys.streams())


def test_a_worker_never_takes_back_its_own_batch_however_slow_its_commit(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit slower than ``claimIdle`` (a busy database): the worker's own entries stay
    its own, recorded once; they are not taken over by the worker itself and recorded a
    second time (as duplicates) while the first commit still runs."""
    # 75 events a stream, 20 a batch: four batches, each read while the one before commits.
    config = billing_config(worker={"claimIdle": "0.2s", "trimInterval": "0.05s",
                                    "batchSize": 20})
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    settle_events(raw_client, keys, 0, 600, tenants(8), expected)
    slow_commit = Prepared.commit

    def commit(self: Prepared) -> Any:
        time.sleep(0.5)  # longer than claimIdle, well within the drain's deadline
        return slow_commit(self)

    monkeypatch.setattr(Prepared, "commit", commit)
    worker, inserted = drain_once(config)

    assert inserted == 600
    assert worker.progress.claimed == 0 and worker.progress.duplicates == 0
    assert worker.progress.read == 600
    totals, count = ledger_totals(ledger_url)
    assert count == 600 and totals == expected_totals(expected)


def test_entries_a_dead_consumer_held_are_taken_over_once_idle(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str) -> None:
    """A consumer that read entries and died before acknowledging them: once they are idle
    for ``claimIdle``, a worker takes them over, records them once and acknowledges them;
    the dead consumer holds nothing after."""
    config = billing_config(worker={"claimIdle": "0.3s"})
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    settle_events(raw_client, keys, 0, 400, tenants(8), expected)
    held = 0
    for stream in keys.streams():
        if raw_client.xlen(stream):
            raw_client.xgroup_create(stream, GROUP, "0")
            read = raw_client.xreadgroup(GROUP, "dead", {stream: ">"}, count=30)
            held += len(read[0][1]) if read else 0
    assert held > 100

    worker, inserted = drain_once(config)

    assert inserted == 400
    assert worker.progress.claimed == held and worker.progress.duplicates == 0
    totals, count = ledger_totals(ledger_url)
    assert count == 400 and totals == expected_totals(expected)
    for stream in keys.streams():
        if raw_client.exists(stream):
            assert raw_client.xpending(stream, GROUP)["pending"] == 0


def test_a_consumer_that_still_reads_is_not_robbed_of_its_entries(
        billing_config: Callable[..., dict[str, Any]], raw_client: redis.Redis,
        key_prefix: str) -> None:
    """Entries idle far past ``claimIdle`` on a consumer that still reads (a worker busy
    with a long batch) stay its own; once the consumer itself stops for ``claimIdle``,
    they are taken over."""
    config = billing_config(worker={"claimIdle": "1s"})
    keys = KeySchema(key_prefix, 16)
    settle_events(raw_client, keys, 0, 40, tenants(1), Expected())
    stream = keys.tenant("tenant-000").stream
    raw_client.xgroup_create(stream, GROUP, "0")
    held = len(raw_client.xreadgroup(GROUP, "busy", {stream: ">"}, count=25)[0][1])
    worker = Worker(config)
    try:
        for _ in range(8):  # 1.6 s: its entries idle past claimIdle, and it still reads
            time.sleep(0.2)
            raw_client.xreadgroup(GROUP, "busy", {stream: "0"}, count=1)  # its own history
            worker.upkeep(force=True, deliver=False)
        assert worker.progress.claimed == 0
        assert raw_client.xpending(stream, GROUP)["consumers"] == [
            {"name": b"busy", "pending": held}]
        time.sleep(1.2)  # the consumer is gone now
        worker.upkeep(force=True, deliver=False)
        assert worker.progress.claimed == held and worker.progress.inserted == held
        assert raw_client.xpending(stream, GROUP)["pending"] == 0
    finally:
        worker.close()


def test_streams_are_trimmed_only_below_what_every_group_acknowledged(
        billing_config: Callable[..., dict[str, Any]], raw_client: redis.Redis,
        key_prefix: str) -> None:
    config = billing_config()
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    settle_events(raw_client, keys, 0, 400, tenants(4), expected)
    stream = keys.tenant("tenant-000").stream
    # Another consumer of the same stream (an app's own analytics, say) has read 10
    # entries and acknowledged none; a third has read everything.
    raw_client.xgroup_create(stream, "analytics", "0")
    held = raw_client.xreadgroup("analytics", "a1", {stream: ">"}, count=10)[0][1]
    raw_client.xgroup_create(stream, "audit", "$")

    worker = Worker(config)
    try:
        worker.drain(60)
    finally:
        worker.close()

    ids = [entry_id for entry_id, _ in raw_client.xrange(stream)]
    assert ids[0] <= held[0][0]  # the oldest entry analytics holds is still there
    assert all(raw_client.xrange(stream, eid, eid) for eid, _ in held)
    others = [s for s in keys.streams() if s != stream]
    assert sum(raw_client.xlen(s) for s in others) == 0  # streams only we read: trimmed


def test_a_trim_survives_pending_entries_acknowledged_while_it_asks(
        billing_config: Callable[..., dict[str, Any]], raw_client: redis.Redis,
        key_prefix: str) -> None:
    """The trim asks every stream's groups, then (a round trip later) the oldest pending
    entry of those with some: entries acknowledged in between (by the committer thread or
    another worker) leave XPENDING's summary empty, which must trim by the last delivered
    entry, not stop the worker."""
    config = billing_config()
    keys = KeySchema(key_prefix, 16)
    settle_events(raw_client, keys, 0, 40, tenants(4), Expected())
    stream = keys.tenant("tenant-000").stream
    raw_client.xgroup_create(stream, "analytics", "0")
    held = raw_client.xreadgroup("analytics", "a1", {stream: ">"})[0][1]

    worker = Worker(config)
    try:
        worker.drain(60)
        asked = worker._each

        def ack_after_the_groups(commands: list[tuple[Any, ...]]) -> list[Any]:
            replies = asked(commands)
            if commands and commands[0][:2] == ("XINFO", "GROUPS"):
                raw_client.xack(stream, "analytics", *[eid for eid, _ in held])
            return replies

        worker._each = ack_after_the_groups  # type: ignore[method-assign]
        worker.upkeep(force=True, deliver=False)
    finally:
        worker.close()
    assert raw_client.xlen(stream) == 0  # all acknowledged by every group: trimmed


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    while _STARTED:  # a test that failed midway leaves none running
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(10)


def start_worker(config_path: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "ai_saas_middleware.cli", "worker", "-c", str(config_path),
         "--name", name], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    _STARTED.append(process)
    return process


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    """The config file, and its ledger created with ``ai-saas billing migrate``."""
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["billing", "migrate", "-c", str(path)]) == 0
    return path


@pytest.mark.billing_faults
def test_killed_workers_lose_and_double_nothing(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 events from 500 tenants written while workers run; the first worker is
    killed with SIGKILL twice mid-run and restarted (once under a new name, once under
    its own); a second worker runs beside it part of the time. Every tenant has a Stripe
    customer, and Stripe's stand-in answers a 429 burst and a 500 after commit meanwhile:
    it ends up holding each tenant's usage exactly once."""
    total = 100_000
    monkeypatch.setenv("AI_SAAS_TEST_STRIPE_KEY", STRIPE_KEY)  # the workers inherit it
    stripe = start_stripe()
    config = billing_config(worker={"batchSize": 500}, stripe={
        "apiKeyEnv": "AI_SAAS_TEST_STRIPE_KEY", "apiBase": stripe.url,
        "meterEventsBase": stripe.url, "interval": "0.5s", "streamAbove": 50})
    config["tenants"] = [{"id": tn, "tier": "pro", "apiKeys": [],
                          "stripeCustomerId": f"cus_{tn}"} for tn in tenants(500)]
    path = write_config(tmp_path, config)
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    log = tmp_path / "workers.log"

    writer_done = threading.Event()

    def write() -> None:
        settle_events(raw_client, keys, 0, total, tenants(500), expected)
        writer_done.set()

    writer = threading.Thread(target=write)
    writer.start()
    w1 = start_worker(path, "w1", log)
    wait_until(lambda: ledger_count(ledger_url) > 15_000, 120, "the first worker's progress")
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    w1 = start_worker(path, "w1b", log)  # a new name: w1's pending entries are claimed
    w2 = start_worker(path, "w2", log)
    with stripe.state.lock:
        stripe.state.rate_limit_burst = 5
        stripe.state.fail_after_commit = 3
    wait_until(lambda: ledger_count(ledger_url) > 50_000, 120, "the workers' progress")
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    w1 = start_worker(path, "w1b", log)  # its own name: it re-reads its own pending first
    wait_until(lambda: ledger_count(ledger_url) > 70_000, 120, "the workers' progress")
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(timeout=30) == 0
    writer.join()
    assert writer_done.is_set()
    wait_until(lambda: ledger_count(ledger_url) >= total, 180,
               lambda: f"every event in the ledger ({ledger_count(ledger_url)} of {total})")
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(timeout=30) == 0, log.read_text()
    # What the last round left pending goes out with one more run to the end.
    last = subprocess.run([sys.executable, "-m", "ai_saas_middleware.cli", "worker", "-c",
                           str(path), "--once"], capture_output=True, timeout=120)
    assert last.returncode == 0, last.stderr

    totals, count = ledger_totals(ledger_url)
    assert count == total
    assert totals == expected_totals(expected)
    assert daily_totals(ledger_url) == expected_totals(expected)
    ledger = Ledger(ledger_url)
    with ledger.reading() as conn:
        ids = set(conn.execute(select(t.usage_events.c.request_id)).scalars())
        undelivered = conn.execute(select(func.count()).select_from(t.usage_events)
                                   .where(t.usage_events.c.delivery.is_(None))).scalar()
        states = dict(conn.execute(select(t.stripe_deliveries.c.state, func.count())
                                   .group_by(t.stripe_deliveries.c.state)).all())
    ledger.close()
    assert ids == expected.ids
    assert all(raw_client.xpending(s, GROUP)["pending"] == 0 for s in keys.streams())
    assert undelivered == 0 and set(states) == {"delivered"}
    stripe.close()
    assert stripe.state.violations == []
    assert stripe.state.totals() == {f"cus_{tn}": Decimal(n)
                                     for tn, n in expected.tokens.items()}


def test_sigterm_finishes_the_batch_and_exits_0_within_seconds(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, billing_config(worker={"block": "5s"}))
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    settle_events(raw_client, keys, 0, 2000, tenants(10), expected)
    worker = start_worker(path, "w", tmp_path / "w.log")
    wait_until(lambda: ledger_count(ledger_url) == 2000, 60, "the worker to catch up")
    # Idle now, blocked in XREADGROUP (5 s): SIGTERM still ends it promptly.
    time.sleep(0.3)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - started < 8
    assert "stopped:" in (tmp_path / "w.log").read_text()
    assert all(raw_client.xpending(s, GROUP)["pending"] == 0 for s in keys.streams())


def test_a_worker_whose_streams_vanished_makes_its_group_again_and_goes_on(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    # A Redis restarted without its data (no persistence, a failover to an empty replica)
    # or a stream deleted by hand: the group is gone with the streams, settle.lua's XADD
    # makes each stream again without it, and a worker that only retried its XREADGROUP
    # got NOGROUP forever while the new events waited unread.
    keys = KeySchema(key_prefix, 16)
    expected = Expected()
    worker = Worker(billing_config())
    runner = threading.Thread(target=worker.run)
    runner.start()
    try:
        settle_events(raw_client, keys, 0, 500, tenants(10), expected)
        wait_until(lambda: ledger_count(ledger_url) == 500, 60, "the first events")
        raw_client.delete(*keys.streams())
        settle_events(raw_client, keys, 500, 500, tenants(10), expected)
        wait_until(lambda: ledger_count(ledger_url) == 1000, 30,
                   lambda: f"the events after the streams vanished ({ledger_count(ledger_url)}"
                           " of 1000 in the ledger)")
    finally:
        worker.stop()
        runner.join(timeout=30)
        worker.close()
    assert not runner.is_alive()
    assert worker.progress.failures > 0  # it did meet the missing group
    # ... and said so, loudly: what the vanished streams held is not in them any more.
    assert any(r.levelname == "ERROR" and "consumer group of 16 stream(s) was gone"
               in r.getMessage() for r in caplog.records)
    totals, count = ledger_totals(ledger_url)
    assert count == 1000 and totals == expected_totals(expected)
    wait_until(lambda: all(raw_client.xpending(s, GROUP)["pending"] == 0
                           for s in keys.streams()), 10, "every entry acknowledged")


@pytest.mark.billing_faults
def test_postgresql_restarted_under_the_worker_loses_and_doubles_nothing(
        make_config: Callable[..., dict[str, Any]], postgres: Any,
        raw_client: redis.Redis, key_prefix: str) -> None:
    if not hasattr(postgres, "data"):
        pytest.skip("an external PostgreSQL is not restarted by the tests")
    name, url = postgres.database()
    try:
        config = make_config(billing={"database": url, "worker": {**FAST, "batchSize": 200}})
        keys = KeySchema(key_prefix, 16)
        expected = Expected()
        worker = Worker(config)
        runner = threading.Thread(target=worker.run)
        runner.start()
        try:
            settle_events(raw_client, keys, 0, 5000, tenants(50), expected)
            wait_until(lambda: ledger_count(url) > 0, 60, "the first commits")
            writer = threading.Thread(target=settle_events, args=(
                raw_client, keys, 5000, 15000, tenants(50), expected), kwargs={"chunk": 200})
            writer.start()
            postgres.restart(down_s=2.0)
            writer.join()
            wait_until(lambda: ledger_count(url) >= 20_000, 120,
                       lambda: f"the worker to resume by itself ({ledger_count(url)})")
        finally:
            worker.stop()
            runner.join(timeout=30)
            worker.close()
        assert not runner.is_alive()
        assert worker.progress.failures > 0  # it did meet the restart
        totals, count = ledger_totals(url)
        assert count == 20_000
        assert totals == expected_totals(expected)
        assert daily_totals(url) == expected_totals(expected)
    finally:
        postgres.drop(name)


def test_worker_status_shows_pending_lag_and_last_event_per_shard(
        billing_config: Callable[..., dict[str, Any]], raw_client: redis.Redis,
        key_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = billing_config()
    path = write_config(tmp_path, config)
    capsys.readouterr()
    keys = KeySchema(key_prefix, 16)
    settle_events(raw_client, keys, 0, 100, tenants(3), Expected())
    stream = keys.tenant("tenant-000").stream

    assert main(["worker", "--status", "-c", str(path), "--format", "json"]) == 0
    before = {row["stream"]: row for row in json.loads(capsys.readouterr().out)}
    assert before[stream]["lag"] == before[stream]["entries"] > 0  # nobody has read it yet

    worker = Worker(config)
    worker.drain(30)
    worker.close()
    assert raw_client.xlen(stream) == 0
    settle_events(raw_client, keys, 100, 30, tenants(3), Expected())
    new = raw_client.xlen(stream)
    raw_client.xreadgroup(GROUP, "stuck", {stream: ">"}, count=5)
    rows = status(worker.config)
    row = next(r for r in rows if r.stream == stream)
    assert new >= 10 and row.pending == 5 and row.lag == new - 5
    assert row.last_event_ms and abs(row.last_event_ms / 1000 - time.time()) < 60
    assert ("stuck", 5) in [(n, p) for n, p, _ in row.consumers]
    assert main(["worker", "--status", "-c", str(path)]) == 0
    table = capsys.readouterr().out
    assert "pending" in table.splitlines()[0] and "stuck (5 pending" in table


def test_usage_shows_the_same_totals_after_the_worker_moved_and_trimmed_the_events(
        billing_config: Callable[..., dict[str, Any]], raw_client: redis.Redis,
        key_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, billing_config())
    keys = KeySchema(key_prefix, 16)
    settle_events(raw_client, keys, 0, 300, tenants(3), Expected())
    capsys.readouterr()
    assert main(["usage", "-c", str(path), "--month", "2026-11"]) == 0
    before = capsys.readouterr().out

    worker = Worker(load_config(path))
    worker.drain(30)
    worker.close()
    settle_events(raw_client, keys, 300, 30, tenants(3), Expected())  # not moved yet
    assert sum(raw_client.xlen(s) for s in keys.streams()) == 30

    assert main(["usage", "-c", str(path), "--month", "2026-11"]) == 0
    after = capsys.readouterr().out
    settle_events(raw_client, keys, 300, 30, tenants(3), Expected())  # replays: no change
    assert main(["usage", "-c", str(path), "--month", "2026-11"]) == 0
    assert capsys.readouterr().out == after
    reference = Expected()
    settle_events(raw_client, KeySchema(key_prefix + "x", 16), 0, 330, tenants(3), reference)
    assert "total cost: $" in before and after != before
    total = sum(reference.cost.values())
    assert f"total cost: ${format_usd(total)}" in after


@contextmanager
def running(worker: Worker, stripe: Any) -> Iterator[list[float]]:
    """``worker.run()`` in a thread for the block; then ``stop()``, timed: the list holds
    the seconds from ``stop()`` until ``run()`` returned. Closes the worker and ``stripe``."""
    runner = threading.Thread(target=worker.run)
    runner.start()
    stopped_in: list[float] = []
    try:
        yield stopped_in
    finally:
        started = time.monotonic()
        worker.stop()
        runner.join(timeout=60)
        stopped_in.append(time.monotonic() - started)
        worker.close()
        stripe.close()
    assert not runner.is_alive()


def test_a_long_delivery_round_does_not_hold_up_shutdown(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow Stripe (0.1 s a request) and 200 deliveries: a round takes 20 s. stop() in
    the middle of it: the round ends after the request in hand, the last round has its
    few seconds, and the worker is gone within seconds; every delivery is delivered once
    or still pending in the ledger (sent at the next run), none lost."""
    monkeypatch.setenv("AI_SAAS_TEST_STRIPE_KEY", STRIPE_KEY)
    stripe = start_stripe()
    config = billing_config(stripe={
        "apiKeyEnv": "AI_SAAS_TEST_STRIPE_KEY", "apiBase": stripe.url,
        "meterEventsBase": stripe.url, "interval": "0.1s", "streamAbove": 10 ** 6})
    config["tenants"] = [{"id": tn, "tier": "pro", "apiKeys": [],
                          "stripeCustomerId": f"cus_{tn}"} for tn in tenants(200)]
    with stripe.state.lock:
        stripe.state.latency_s = 0.1
    keys = KeySchema(key_prefix, 16)
    with running(Worker(config), stripe) as stopped_in:
        settle_events(raw_client, keys, 0, 200, tenants(200), Expected())
        wait_until(lambda: ledger_count(ledger_url) == 200, 30, "the events")
        wait_until(lambda: len(stripe.state.requests) >= 20, 30, "a delivery round underway")
    assert stopped_in[0] < 12  # the round in hand ends at once; the last round has 5 s
    ledger = Ledger(ledger_url)
    with ledger.reading() as conn:
        rows = conn.execute(select(t.stripe_deliveries.c.identifier,
                                   t.stripe_deliveries.c.state)).all()
    ledger.close()
    delivered = {identifier for identifier, state in rows if state == "delivered"}
    assert {state for _, state in rows} <= {"pending", "delivered"}
    assert 20 <= len(delivered) < 200  # part of it sent, the rest kept for the next run
    assert all(stripe.state.received[i] == 1 for i in delivered)


def test_an_unwell_stripe_holds_up_neither_ingestion_nor_shutdown(
        billing_config: Callable[..., dict[str, Any]], ledger_url: str,
        raw_client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stripe answers 429 (Retry-After: 1) to everything: each delivery round backs off
    for its whole budget (10 s), in its own thread, while the streams keep moving; and
    stop() ends the worker within seconds however the round stands."""
    monkeypatch.setenv("AI_SAAS_TEST_STRIPE_KEY", STRIPE_KEY)
    stripe = start_stripe()
    config = billing_config(stripe={
        "apiKeyEnv": "AI_SAAS_TEST_STRIPE_KEY", "apiBase": stripe.url,
        "meterEventsBase": stripe.url, "interval": "0.1s", "maxRetries": 50})
    config["tenants"] = [{"id": tn, "tier": "pro", "apiKeys": [],
                          "stripeCustomerId": f"cus_{tn}"} for tn in tenants(5)]
    with stripe.state.lock:
        stripe.state.rate_limit_burst = 10 ** 6
        stripe.state.retry_after = "1"
    keys = KeySchema(key_prefix, 16)
    with running(Worker(config), stripe) as stopped_in:
        settle_events(raw_client, keys, 0, 200, tenants(5), Expected())
        wait_until(lambda: ledger_count(ledger_url) == 200, 30, "the first events")
        seen = len(stripe.state.requests)
        wait_until(lambda: len(stripe.state.requests) >= seen + 2, 30,
                   "a delivery round retrying")
        settle_events(raw_client, keys, 200, 200, tenants(5), Expected())
        # A round is now backing off (up to 10 s); the next events land meanwhile.
        wait_until(lambda: ledger_count(ledger_url) == 400, 5,
                   "the next events, while Stripe is backed off")
    assert stopped_in[0] < 12  # the round's retries end at stop(); the last round has 5 s
    ledger = Ledger(ledger_url)
    with ledger.reading() as conn:
        states = set(conn.execute(select(t.stripe_deliveries.c.state)).scalars())
    ledger.close()
    assert states <= {"pending"}  # nothing delivered, nothing lost: sent at the next run
