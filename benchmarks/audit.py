"""What ``ai-saas billing audit`` costs: 100,000 events of 500 tenants in the ledger (moved by
the real worker) and 10,000 more still in the streams, audited on SQLite (and PostgreSQL
with ``--postgres URL``, a database the ledger may create its tables in).

Prints the audit's wall time and the longest single audit.lua call (the one command that
holds Redis: one shard's counters, reservations and stream id).

    .venv/bin/python benchmarks/audit.py [--events 100000] [--tenants 500] [--postgres URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from ai_saas_middleware import load_config
from ai_saas_middleware.billing import audit as audit_module
from ai_saas_middleware.billing.audit import audit
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.worker import Worker
from ai_saas_middleware.embedded import start_server
from ai_saas_middleware.store.keys import KeySchema, reservation_member
from ai_saas_middleware.store.redis import RedisStore, load_script

MONTH = time.strftime("%Y-%m", time.gmtime())


def settle(client: redis.Redis, keys: KeySchema, start: int, count: int, tenants: list[str]
           ) -> None:
    sha = client.script_load(load_script("settle"))
    for lo in range(start, start + count, 2000):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(lo + 2000, start + count)):
            tenant = tenants[i % len(tenants)]
            tk = keys.tenant(tenant)
            request_id = f"b-{i:07d}"
            prompt, completion = 10 + i % 97, 1 + i % 31
            fields = ["request_id", request_id, "tenant_id", tenant, "tier", "pro",
                      "model_id", "model-large", "provider", "openai",
                      "prompt_tokens", str(prompt), "completion_tokens", str(completion),
                      "usage_source", "provider", "cost", "0.000125", "latency_ms", "12",
                      "status", "200", "ts", f"{MONTH}-01T12:00:00.000Z"]
            pipe.evalsha(sha, 4, tk.quota(MONTH), tk.stream, tk.settled(request_id),
                         tk.reservations, prompt + completion, 86400, 62 * 86400,
                         reservation_member(request_id, prompt + completion, MONTH), *fields)
        pipe.execute()


def run(ledger_url: str, events: int, tenants: int, redis_url: str, prefix: str) -> None:
    raw: dict[str, Any] = {
        "tenant": {"tiers": [{"name": "pro", "monthlyQuota": "unlimited", "rateLimit": "unlimited",
                              "allowedModels": ["model-large"]}]},
        "models": [{"id": "model-large", "provider": "openai",
                    "costPerInputToken": "0.0000025", "costPerOutputToken": "0.00001",
                    "maxTokens": 128000, "qualityScore": 0.9, "latencyP99Ms": 4000}],
        "redis": {"url": redis_url, "keyPrefix": prefix, "socketTimeout": "5s",
                  "spoolDir": tempfile.mkdtemp(prefix="aisaas-spool-")},
    }
    config = load_config(raw)
    keys = KeySchema(prefix, config.redis.shards)
    client = redis.Redis.from_url(redis_url)
    names = [f"tenant-{k:03d}" for k in range(tenants)]
    settle(client, keys, 0, events, names)
    worker = Worker(raw, ledger_url=ledger_url)
    worker.drain(600)
    worker.close()
    settle(client, keys, events, events // 10, names)  # still in the streams

    longest = 0.0
    snapshot = audit_module._Reader.snapshot

    def timed(self: Any, shard: Any) -> None:
        nonlocal longest
        started = time.perf_counter()
        snapshot(self, shard)
        longest = max(longest, time.perf_counter() - started)

    audit_module._Reader.snapshot = timed  # type: ignore[method-assign]
    store, ledger = RedisStore(config.redis), Ledger(ledger_url)
    started = time.perf_counter()
    results = audit(config, store, ledger, MONTH)
    elapsed = time.perf_counter() - started
    audit_module._Reader.snapshot = snapshot  # type: ignore[method-assign]
    store.close()
    ledger.close()
    assert all(r.status == "ok" for r in results), [r for r in results if not r.ok][:3]
    assert sum(r.ledger.events for r in results) == events
    assert sum(r.stream.events for r in results) == events // 10
    print(f"{ledger_url.split(':')[0]}: audit of {tenants} tenants, {events} events in the "
          f"ledger + {events // 10} in the streams: {elapsed:.2f} s; longest audit.lua "
          f"call (one shard's snapshot, round trip included) {longest * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--postgres", default=None, metavar="URL")
    args = parser.parse_args()
    server = start_server()
    try:
        with tempfile.TemporaryDirectory() as folder:
            run(f"sqlite:///{Path(folder) / 'ledger.sqlite3'}", args.events, args.tenants,
                server.url, "bench-sqlite")
        if args.postgres:
            run(args.postgres, args.events, args.tenants, server.url, "bench-pg")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
