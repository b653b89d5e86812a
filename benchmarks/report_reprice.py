"""How long ``ai-saas report`` and ``ai-saas billing reprice`` take over a month's ledger.

A month of 100,000 events from 500 tenants over 30 days and 3 models (45,000 daily
aggregate rows) is recorded into a fresh SQLite file and, when PostgreSQL is installed,
into a private PostgreSQL cluster (tests/postgres.py); then the report of the month is
built (:func:`build_report`) and the month re-priced with a changed output rate (every
event's price changes).

    python benchmarks/report_reprice.py            # about a minute
    python benchmarks/report_reprice.py --events 20000
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import BASE_CONFIG  # noqa: E402

from ai_saas_middleware import load_config  # noqa: E402
from ai_saas_middleware.billing.events import Event, parse_entry  # noqa: E402
from ai_saas_middleware.billing.ledger import Ledger  # noqa: E402
from ai_saas_middleware.billing.rates import Pricing  # noqa: E402
from ai_saas_middleware.billing.reports import build_report  # noqa: E402
from ai_saas_middleware.billing.reprice import reprice  # noqa: E402

MODELS = ("model-small", "model-medium", "model-large")


def config_of(url: str, output_rate: str) -> Any:
    config = copy.deepcopy(BASE_CONFIG)
    config["billing"] = {"database": url, "cac": "1",
                         "pricingRules": [{"metric": "input_tokens", "rate": "0.00001"},
                                          {"metric": "output_tokens", "rate": output_rate}]}
    return load_config(config)


def month(count: int, tenants: int) -> list[Event]:
    # Tenant, then model, then day vary in turn, so that every tenant x day x model of the
    # month has events (with `i % 30` and `i % 3` the three moduli share factors with 500
    # and the 100,000 events fell into 1,500 daily rows instead of 45,000).
    return [parse_entry(f"s {i}", {
        "request_id": f"r{i}", "tenant_id": f"t{i % tenants}", "tier": "pro",
        "model_id": MODELS[i // tenants % len(MODELS)],
        "ts": f"2026-11-{1 + i // (tenants * len(MODELS)) % 30:02d}T00:00:00Z",
        "prompt_tokens": "100", "completion_tokens": "50", "cost": "0.001", "status": "200"})
        for i in range(count)]


def run(url: str, events: list[Event]) -> None:
    ledger = Ledger(url)
    try:
        ledger.migrate()
        pricing = Pricing(config_of(url, "0.00003").billing)
        ledger.register(pricing)
        for start in range(0, len(events), 5000):
            ledger.record(events[start:start + 5000], pricing)
        began = time.perf_counter()
        report = build_report(ledger, config_of(url, "0.00003"), "2026-11")
        reported = time.perf_counter() - began
        began = time.perf_counter()
        done = reprice(ledger, config_of(url, "0.00006"), "2026-11")
        repriced = time.perf_counter() - began
        print(f"{ledger.dialect:10}  report of {len(report.tenants)} tenants: "
              f"{reported * 1000:7.1f} ms   reprice of {done.events} events "
              f"({done.changed} changed): {repriced:6.2f} s "
              f"({repriced / max(done.events, 1) * 1e6:.0f} us/event)")
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=500)
    args = parser.parse_args()
    events = month(args.events, args.tenants)
    with tempfile.TemporaryDirectory() as folder:
        run(f"sqlite:///{folder}/ledger.sqlite3", events)
    from postgres import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        print("postgresql  not installed: skipped")
        return
    cluster = PostgresCluster(bindir)
    try:
        _name, url = cluster.database()
        run(url, events)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
