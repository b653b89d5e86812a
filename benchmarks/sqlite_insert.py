"""Where the SQLite ledger's per-row insert cost goes (issue 10), outside the worker.

The worker's own statement (``ledger._SQLITE_INSERT``, ``executemany`` of 26 columns)
into a fresh ledger file with the ledger's pragmas, in batches of 16,000 rows sorted by
tenant as the worker sorts them, one ``BEGIN IMMEDIATE`` ... ``COMMIT`` each; this
process's CPU per row, several repetitions of each variant:

- ``ledger``: the schema as migrated (``tables.metadata``: the request_id primary key
  and the two tenant_id indexes);
- ``no undelivered`` / ``no tenant_period`` / ``no tenant indexes``: the same with those
  indexes dropped (what a narrower index set could save at most);
- ``heap``: a table of the same 26 columns with no index at all (binding + the row);
- ``random ids``: the ledger again with random (uuid4-like) request ids instead of the
  sequential ``<run>-<n>`` ones the worker benchmark writes.

    PYTHONPATH=. .venv/bin/python benchmarks/sqlite_insert.py
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from ai_saas_middleware.billing import ledger as L
from ai_saas_middleware.billing import tables as t

VARIANTS: dict[str, tuple[str, ...]] = {
    "ledger": (),
    "no undelivered": ("usage_events_undelivered",),
    "no tenant_period": ("usage_events_tenant_period",),
    "no tenant indexes": ("usage_events_undelivered", "usage_events_tenant_period"),
    "heap": (),
    "random ids": (),
}


def _rows(rng: random.Random, batch: int, size: int, random_ids: bool
          ) -> list[tuple[Any, ...]]:
    rows = [(str(uuid.UUID(int=rng.getrandbits(128))) if random_ids
             else f"run-{batch * size + i:07d}",
             f"tenant-{rng.randrange(500):03d}", "pro", "gpt-4o-mini", "openai", "2026-12",
             "2026-12-01", "2026-12-01T10:00:00.000Z", 120, 340, "handler",
             1_230_000_000, 1_500_000_000, 0, None, 200, 45, "miss", "", "/v1/chat",
             False, False, 1, 1, f"billing:events:{i % 16} {batch}-{i}",
             "2026-12-01T10:00:01Z") for i in range(size)]
    rows.sort(key=lambda row: row[1])  # the worker's order (ledger._insert_events)
    return rows


def run(variant: str, batches: int, size: int, folder: Path) -> float:
    """This process's CPU per row (us) of ``batches`` inserts of ``size`` rows."""
    path = folder / f"{variant.replace(' ', '_')}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if variant == "heap":
        sql = f"INSERT INTO usage_events VALUES ({', '.join('?' * len(L._COLUMNS))})"
    else:
        engine = create_engine(f"sqlite:///{path}")
        t.metadata.create_all(engine)
        engine.dispose()
        sql = L._SQLITE_INSERT
    conn = sqlite3.connect(path, isolation_level=None)
    L._sqlite_connect(conn, None)  # the ledger's own pragmas
    if variant == "heap":
        conn.execute(f"CREATE TABLE usage_events ({', '.join(L._COLUMNS)})")
    for index in VARIANTS[variant]:
        conn.execute(f"DROP INDEX {index}")
    rng = random.Random(2)
    cpu = 0.0
    for batch in range(batches):
        rows = _rows(rng, batch, size, variant == "random ids")
        conn.execute("BEGIN IMMEDIATE")
        start = time.process_time()
        conn.executemany(sql, rows)
        cpu += time.process_time() - start
        conn.execute("COMMIT")
    conn.close()
    return cpu / (batches * size) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--size", type=int, default=16_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"sqlite {sqlite3.sqlite_version}; {args.batches} batches of {args.size} rows; "
          "this process's CPU per row inserted, us")
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:
            figures = [run(variant, args.batches, args.size, Path(folder))
                       for _ in range(args.repeat)]
            print(f"  {variant:18} " + "  ".join(f"{f:5.1f}" for f in figures))


if __name__ == "__main__":
    main()
