"""How long the Stripe delivery takes for a month's backlog: gather and send.

Records ``--events`` usage events of ``--tenants`` tenants (each with a Stripe customer)
into a fresh ledger, then times :meth:`Deliverer.gather` (the one claim transaction),
:meth:`Deliverer.send` (over the v2 meter event stream, to tests/stripe_standin.py on
loopback) and an idle round (nothing new: what every ``interval`` costs at rest), on
SQLite and, when PostgreSQL is installed, on a private PostgreSQL cluster.

    python benchmarks/stripe_delivery.py [--events 100000] [--tenants 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ai_saas_middleware import load_config  # noqa: E402
from ai_saas_middleware.billing.events import parse_entry  # noqa: E402
from ai_saas_middleware.billing.ledger import Ledger  # noqa: E402
from ai_saas_middleware.billing.rates import Pricing  # noqa: E402
from ai_saas_middleware.billing.stripe_sync import Deliverer, customers_of  # noqa: E402


def run(url: str, events: int, tenants: int, standin_url: str) -> dict[str, float]:
    names = [f"t{i:04d}" for i in range(tenants)]
    config = load_config({
        "tenant": {"tiers": [{"name": "pro", "monthlyQuota": "unlimited", "rateLimit": 1000,
                              "allowedModels": ["m"]}]},
        "models": [{"id": "m", "provider": "openai", "costPerInputToken": "0.000001",
                    "costPerOutputToken": "0.000002", "maxTokens": 1000,
                    "qualityScore": 0.5, "latencyP99Ms": 100}],
        "tenants": [{"id": n, "tier": "pro", "apiKeys": [], "stripeCustomerId": f"cus_{n}"}
                    for n in names],
        "billing": {"database": url, "stripe": {
            "apiKeyEnv": "BENCH_STRIPE_KEY", "apiBase": standin_url,
            "meterEventsBase": standin_url}},
    })
    ledger = Ledger(url)
    ledger.migrate()
    pricing = Pricing(config.billing)
    ledger.register(pricing)
    for start in range(0, events, 5000):
        ledger.record([parse_entry(f"s 1-{i}", {
            "request_id": f"req-{i}", "tenant_id": names[i % tenants], "tier": "pro",
            "model_id": "m", "provider": "openai", "prompt_tokens": str(10 + i % 50),
            "completion_tokens": "7", "cost": "0.000024", "status": "200",
            "ts": f"2026-11-{1 + i % 28:02d}T12:00:00.000Z"})
            for i in range(start, min(events, start + 5000))], pricing)
    deliverer = Deliverer(config, ledger, customers_of(config))
    t0 = time.perf_counter()
    created = deliverer.gather()
    t1 = time.perf_counter()
    sent = deliverer.send()
    t2 = time.perf_counter()
    idle = []
    for _ in range(20):
        s = time.perf_counter()
        deliverer.gather()
        deliverer.send()
        idle.append(time.perf_counter() - s)
    ledger.close()
    assert created == tenants and sent.delivered == tenants, (created, sent)
    return {"gather_s": t1 - t0, "send_s": t2 - t1, "idle_ms": sorted(idle)[10] * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=500)
    args = parser.parse_args()
    from stripe_standin import API_KEY, start

    os.environ["BENCH_STRIPE_KEY"] = API_KEY
    results: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        standin = start()
        try:
            results.append(("sqlite", run(f"sqlite:///{tmp}/ledger.sqlite3", args.events,
                                          args.tenants, standin.url)))
            from postgres import PostgresCluster, find_bindir

            bindir = find_bindir()
            if bindir is not None:
                cluster = PostgresCluster(bindir)
                try:
                    _, url = cluster.database()
                    standin.close()
                    standin = start()
                    results.append(("postgresql", run(url, args.events, args.tenants,
                                                      standin.url)))
                finally:
                    cluster.close()
        finally:
            standin.close()
    print(f"{args.events} events of {args.tenants} tenants -> {args.tenants} meter events")
    print(f"{'ledger':<11} {'gather s':>9} {'events/s':>10} {'send s':>7} {'idle round ms':>14}")
    for name, r in results:
        print(f"{name:<11} {r['gather_s']:>9.2f} {args.events / r['gather_s']:>10,.0f} "
              f"{r['send_s']:>7.2f} {r['idle_ms']:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
