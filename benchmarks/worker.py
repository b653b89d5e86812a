"""Billing worker throughput: a backlog of usage events drained into the ledger.

Each round writes ``--events`` usage events (100,000 by default, from ``--tenants`` 500
tenants over the 16 shard streams) through the real ``settle.lua``, as the middleware
writes them (``tests/billing_events.py``; not timed), then drains them with:

- **floor**: ``XREADGROUP`` + ``XACK`` alone, the same streams, the same ``COUNT`` and
  the same client set-up as the worker (flat replies), nothing parsed, nothing stored:
  what reading the streams costs by itself;
- **sqlite**: :class:`~ai_saas_middleware.billing.worker.Worker` ``.drain()`` into an
  SQLite file on local disk (WAL, ``synchronous=FULL``, as the ledger opens it);
- **postgresql**: the same into a private PostgreSQL cluster started here (initdb into a
  temporary folder, ``fsync = on``, ``synchronous_commit = on``: every commit the worker
  acknowledges is on disk), as a non-superuser role under the row-level security policy.

The three run interleaved within a round (the machine's load hits each alike); each
figure is the median over ``--rounds``. Events/s are given two ways: by wall time, and
by this process's CPU time (``time.process_time()``: the worker's own work, whatever
else the machine runs). This process is pinned to ``--cpu``; redis-server (ours),
PostgreSQL and the lag sampler run on ``--other-cpu``. The lag sampler (a child process)
reads the group's outstanding entries (``XINFO GROUPS``: lag + pending, all streams)
every 50 ms while the worker drains: the lag over time, its maximum and the time to
drain.

    PYTHONPATH=. .venv/bin/python benchmarks/worker.py            # about 3 minutes
    PYTHONPATH=. .venv/bin/python benchmarks/worker.py --quick    # 10,000 events, 1 round
    PYTHONPATH=. .venv/bin/python benchmarks/worker.py --profile sqlite   # cProfile, 1 run

Targets (issue 10): at least 20,000 events/s into each database on one core, and at
least 30% of the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import multiprocessing
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from ai_saas_middleware.billing.worker import GROUP, Worker
from ai_saas_middleware.config import WorkerConfig
from ai_saas_middleware.embedded import start_server
from ai_saas_middleware.store.keys import KeySchema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from billing_events import Expected, settle_events, tenants  # noqa: E402
from postgres import PostgresCluster, find_bindir  # noqa: E402

SHARDS = 16
SAMPLE_S = 0.05
VARIANTS = ("floor", "sqlite", "postgresql")


@dataclass
class Run:
    """One drain of one backlog."""

    variant: str
    events: int
    wall_s: float
    cpu_s: float
    max_lag: int
    drain_s: float  # first sample to the first sample at 0 (the sampler's view)
    lag: list[tuple[float, int]] = field(default_factory=list)

    @property
    def wall_eps(self) -> float:
        return self.events / self.wall_s

    @property
    def cpu_eps(self) -> float:
        return self.events / self.cpu_s


# --------------------------------------------------------------------------- lag sampler

def outstanding(client: redis.Redis, streams: list[str]) -> int:
    """The group's lag + pending over ``streams`` (what is not yet acknowledged)."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.execute_command("XINFO", "GROUPS", stream)
    total = 0
    for groups in pipe.execute():
        for group in groups:
            if group.get("name") == GROUP:
                total += int(group.get("lag") or 0) + int(group.get("pending") or 0)
    return total


def _sample(url: str, streams: list[str], cpu: int | None, conn: Connection) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    client = redis.Redis.from_url(url, decode_responses=True)
    samples: list[tuple[float, int]] = []
    conn.send("ready")
    start = time.monotonic()
    while not conn.poll(SAMPLE_S):
        samples.append((time.monotonic() - start, outstanding(client, streams)))
    samples.append((time.monotonic() - start, outstanding(client, streams)))
    conn.send(samples)
    client.close()


@contextlib.contextmanager
def lag_sampler(url: str, streams: list[str], cpu: int | None
                ) -> Iterator[list[tuple[float, int]]]:
    """Sample the lag in a child process (on ``cpu``) while the body runs; the list it
    yields is filled with (seconds, outstanding) afterwards."""
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_sample, args=(url, streams, cpu, theirs), daemon=True)
    proc.start()
    ours.recv()
    out: list[tuple[float, int]] = []
    try:
        yield out
    finally:
        ours.send("stop")
        out.extend(ours.recv())
        proc.join(10)


# --------------------------------------------------------------------------- variants

def create_groups(client: redis.Redis, streams: list[str]) -> None:
    for stream in streams:
        client.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")


def floor_drain(url: str, streams: list[str], count: int) -> int:
    """XREADGROUP + XACK until nothing is left; the entries read. The client is set up
    as the worker's (replies as Redis sends them), the ACKs pipelined as the worker's."""
    client = redis.Redis.from_url(url)
    client.set_response_callback("XREADGROUP", lambda reply, **_: reply)
    read_args = ["XREADGROUP", "GROUP", GROUP, "floor", "COUNT", count, "STREAMS", *streams,
                 *([">"] * len(streams))]
    total = 0
    # Under the worker's own policy (Worker(own_process=True)): no cyclic collection
    # within a drain, so the floor is not slowed by what the worker is spared.
    collecting = gc.isenabled()
    gc.disable()
    try:
        while True:
            reply = client.execute_command(*read_args)
            if not reply:
                return total
            pipe = client.pipeline(transaction=False)
            # Like the worker's: a mapping of stream -> entries (RESP3, or what this
            # server and parser send), else a list of [stream, entries] pairs.
            for stream, entries in (reply.items() if isinstance(reply, dict) else reply):
                total += len(entries)
                pipe.execute_command("XACK", stream, GROUP, *[eid for eid, _ in entries])
            pipe.execute()
    finally:
        if collecting:
            gc.enable()
        client.close()


def worker_config(url: str, prefix: str, ledger: str, batch: int | None) -> dict[str, Any]:
    worker = {"batchSize": batch} if batch else {}
    return {
        "models": [{"id": "model-large", "provider": "openai",
                    "costPerInputToken": "0.0000025", "costPerOutputToken": "0.00001",
                    "maxTokens": 128000, "qualityScore": 0.9, "latencyP99Ms": 4000}],
        "redis": {"url": url, "keyPrefix": prefix, "shards": SHARDS},
        "billing": {"database": ledger, "markup": "0.5", "worker": worker},
    }


def one_run(variant: str, args: argparse.Namespace, url: str, admin: redis.Redis,
            ledger: str | None, profile: cProfile.Profile | None = None) -> Run:
    """Fill a fresh backlog, drain it with ``variant``; the figures."""
    prefix = "bw" + uuid.uuid4().hex[:10]
    keys = KeySchema(prefix, SHARDS)
    streams = keys.streams()
    create_groups(admin, streams)
    expected = Expected()
    settle_events(admin, keys, 0, args.events, tenants(args.tenants), expected,
                  run=prefix, days=args.days)
    worker = None
    if variant != "floor":
        assert ledger is not None
        # own_process: as `ai-saas worker` runs it (this process does nothing else)
        worker = Worker(worker_config(url, prefix, ledger, args.batch), name="bench",
                        own_process=True)
        count = worker.settings.batch_size
    else:
        count = args.batch or WorkerConfig().batch_size
    try:
        with lag_sampler(url, streams, args.other_cpu) as lag:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            if worker is None:
                handled = floor_drain(url, streams, count)
            else:
                handled = worker.drain(timeout_s=3600)
            if profile is not None:
                profile.disable()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if handled != args.events:
            raise SystemExit(f"{variant}: {handled} events handled, {args.events} written")
        left = outstanding(redis.Redis.from_url(url, decode_responses=True), streams)
        if left:
            raise SystemExit(f"{variant}: {left} entries outstanding after the drain")
        if worker is not None:
            check_ledger(worker, expected)
    finally:
        if worker is not None:
            worker.close()
        for stream in streams:
            admin.unlink(stream)
        for key in admin.scan_iter(match=f"{prefix}:*", count=5000):
            admin.unlink(key)
    zero = next((t for t, n in lag if n == 0), lag[-1][0] if lag else wall)
    return Run(variant, handled, wall, cpu, max((n for _, n in lag), default=0), zero, lag)


def check_ledger(worker: Worker, expected: Expected) -> None:
    """Every event in the ledger once, each tenant's cost exact (not timed)."""
    from ai_saas_middleware.budgets import from_picodollars

    with worker.ledger.reading() as conn:
        rows = conn.exec_driver_sql(
            "SELECT tenant_id, COUNT(*), SUM(cost_p) FROM usage_events GROUP BY tenant_id"
        ).all()
    got = {tenant: (int(n), from_picodollars(int(cost))) for tenant, n, cost in rows}
    want = {tenant: (n, expected.cost[tenant]) for tenant, n in expected.requests.items()}
    if got != want:
        raise SystemExit("the ledger's per-tenant counts or costs differ from the events")


# --------------------------------------------------------------------------- servers

@contextlib.contextmanager
def postgres(cpu: int | None) -> Iterator[PostgresCluster | None]:
    """A private cluster with fsync on (the test cluster's own runs with it off)."""
    bindir = find_bindir()
    if bindir is None:
        yield None
        return
    cluster = PostgresCluster(bindir)
    try:
        with open(os.path.join(cluster.data, "postgresql.conf"), "a",
                  encoding="utf-8") as conf:
            conf.write("\nfsync = on\nsynchronous_commit = on\n")
        cluster.restart()
        with cluster.admin() as conn:
            fsync = conn.execute("SHOW fsync").fetchone()
            assert fsync is not None and fsync[0] == "on", fsync
        if cpu is not None:
            for pid in pids_of(cluster):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, {cpu})
        yield cluster
    finally:
        cluster.close()


def pids_of(cluster: PostgresCluster) -> list[int]:
    """The postmaster and its children (backends fork from it later, inheriting its
    affinity)."""
    pid = int(Path(cluster.data, "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(c) for c in children.read_text().split())] if children.exists() \
        else [pid]


def machine(url: str, cpu: int | None, other: int | None) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    info = client.info("server")
    client.close()
    model = platform.processor()
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    pg = find_bindir()
    pg_version = "not installed"
    if pg:
        pg_version = subprocess.run([os.path.join(pg, "postgres"), "--version"],
                                    capture_output=True, text=True).stdout.strip()
    import sqlite3

    import psycopg
    import sqlalchemy
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "redis": f"{info.get('redis_version')}",
        "redis-py": redis.__version__,
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "postgresql": pg_version,
        "ledger disk": tempfile.gettempdir(),
        "pinning": (f"worker on CPU {cpu}; redis-server, PostgreSQL and the lag sampler on "
                    f"CPU {other}" if cpu is not None else "none"),
    }


# --------------------------------------------------------------------------- main

def pin(cpu: int | None, other: int | None) -> tuple[int | None, int | None]:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None, None
    available = os.sched_getaffinity(0)
    if cpu not in available:
        print(f"note: CPU {cpu} is not available; not pinning", file=sys.stderr)
        return None, None
    os.sched_setaffinity(0, {cpu})
    return cpu, other if other != cpu and other in available else None


def lag_series(lag: list[tuple[float, int]], points: int = 8) -> str:
    if not lag:
        return "-"
    end = lag[-1][0]
    out = []
    for k in range(points + 1):
        at = end * k / points
        n = next((n for t, n in lag if t >= at), lag[-1][1])
        out.append(f"{at:.1f}s:{n}")
    return " ".join(out)


def report(runs: dict[str, list[Run]], args: argparse.Namespace, facts: dict[str, Any],
           batch: int) -> dict[str, Any]:
    med = statistics.median
    summary: dict[str, Any] = {"machine": facts, "events": args.events,
                               "tenants": args.tenants, "days": args.days,
                               "rounds": args.rounds,
                               "batch_size": batch, "variants": {}}
    print("\n".join(f"  {k}: {v}" for k, v in facts.items()))
    print(f"\n{args.events} events, {args.tenants} tenants, {args.days} day(s), {SHARDS} "
          f"streams, batchSize "
          f"{batch} (XREADGROUP COUNT, per stream), {args.rounds} round(s), medians\n")
    print(f"{'variant':<11} {'events/s wall':>14} {'events/s CPU':>13} {'% floor (wall)':>15}"
          f" {'% floor (CPU)':>14} {'max lag':>8} {'drain s':>8}")
    floor = runs.get("floor")
    fw = med([r.wall_eps for r in floor]) if floor else None
    fc = med([r.cpu_eps for r in floor]) if floor else None
    for variant, rs in runs.items():
        wall, cpu = med([r.wall_eps for r in rs]), med([r.cpu_eps for r in rs])
        pw = f"{100 * wall / fw:.0f}%" if fw else "-"
        pc = f"{100 * cpu / fc:.0f}%" if fc else "-"
        print(f"{variant:<11} {wall:>14,.0f} {cpu:>13,.0f} {pw:>15} {pc:>14} "
              f"{med([r.max_lag for r in rs]):>8,.0f} {med([r.drain_s for r in rs]):>8.2f}")
        summary["variants"][variant] = {
            "wall_eps": wall, "cpu_eps": cpu, "each_wall_eps": [r.wall_eps for r in rs],
            "each_cpu_eps": [r.cpu_eps for r in rs],
            "max_lag": med([r.max_lag for r in rs]), "drain_s": med([r.drain_s for r in rs]),
            "lag_last_round": rs[-1].lag[:: max(1, len(rs[-1].lag) // 50)]}
    print("\nlag over time (outstanding entries; last round):")
    for variant, rs in runs.items():
        print(f"  {variant:<11} {lag_series(rs[-1].lag)}")
    print("\neach round, events/s wall / CPU:")
    for variant, rs in runs.items():
        print(f"  {variant:<11} " + ", ".join(f"{r.wall_eps:,.0f} / {r.cpu_eps:,.0f}"
                                              for r in rs))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--days", type=int, default=1,
                        help="the events' days (default 1: a live stream's batch is of one "
                             "day; 28 spreads them over a month, one daily aggregate row "
                             "per event in a batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None,
                        help="billing.worker.batchSize (default: the config's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--cpu", type=int, default=0, help="CPU for this process (0)")
    parser.add_argument("--other-cpu", type=int, default=1,
                        help="CPU for redis-server, PostgreSQL and the lag sampler (1)")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--redis-url", help="use this Redis (default: a private server)")
    parser.add_argument("--quick", action="store_true", help="10,000 events, 1 round")
    parser.add_argument("--profile", choices=VARIANTS[1:],
                        help="one run of this variant under cProfile; print the top")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds = 10_000, 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.profile:
        variants, args.rounds = [args.profile], 1
    cpu, other = pin(None if args.no_pin else args.cpu, args.other_cpu)
    args.other_cpu = other
    server = None if args.redis_url else start_server()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    try:
        if server is not None and other is not None:
            os.sched_setaffinity(server.process.pid, {other})
        admin = redis.Redis.from_url(url)
        workdir = tempfile.mkdtemp(prefix="aisaas-bench-worker-")
        with postgres(other if "postgresql" in variants else None) as cluster:
            if "postgresql" in variants and cluster is None:
                print("note: PostgreSQL is not installed; skipped", file=sys.stderr)
                variants.remove("postgresql")
            runs: dict[str, list[Run]] = {v: [] for v in variants}
            batch = args.batch or WorkerConfig().batch_size
            for rnd in range(args.rounds):
                for variant in variants:
                    ledger = None
                    if variant == "sqlite":
                        ledger = f"sqlite:///{workdir}/ledger-{rnd}.db"
                    elif variant == "postgresql":
                        assert cluster is not None
                        ledger = cluster.database()[1]
                    profile = cProfile.Profile() if args.profile else None
                    run = one_run(variant, args, url, admin, ledger, profile)
                    runs[variant].append(run)
                    print(f"round {rnd + 1} {variant}: {run.wall_eps:,.0f} events/s wall, "
                          f"{run.cpu_eps:,.0f} CPU", file=sys.stderr)
                    if profile is not None:
                        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            facts = machine(url, cpu, other)
            summary = report(runs, args, facts, batch)
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {**summary, "runs": {v: [asdict(r) for r in rs]
                                         for v, rs in runs.items()}}, indent=1))
        shutil.rmtree(workdir, ignore_errors=True)
        admin.close()
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
