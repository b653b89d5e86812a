"""admit.lua alone: this tree's script against an earlier commit's, and without the lease.

``paired.py`` times the whole hot path; this script takes everything but the script away,
to tell how much of a difference is Redis's. Each variant of admit.lua is loaded into one
Redis and called through redis-py with the arguments the benchmark app's admission sends
(a static tenant, a rate limit and a quota far above the run), in alternating blocks; per
variant it prints the median over blocks of Redis's own time per call (``INFO
commandstats``, ``usec`` / ``calls`` of ``evalsha``) and the median round trip seen by the
client. Variants:

- ``before``: admit.lua of ``--before`` (default 07dbcb4, the main issue 7 began from;
  its 13 arguments);
- ``now``: this tree's admit.lua;
- ``without-lease``: this tree's, without the reservation lease's ``ZADD``.

Reproduce::

    python benchmarks/admit_script.py                   # about a minute
    python benchmarks/admit_script.py --blocks 120

A private redis-server is started (pinned to ``--redis-cpu``; this process to ``--cpu``)
unless ``--redis-url`` is given. Nothing here settles, so each variant's reservations and
rate-limit log grow through the run, alike for all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import overhead as ov  # noqa: E402  (the private redis-server)
import paired  # noqa: E402  (the lease line the without-lease variant drops)
import redis  # noqa: E402

from ai_saas_middleware.store.redis import load_script  # noqa: E402

HUGE = 10 ** 12
MONTH, MONTH_START, MONTH_END = "2026-12", 1764547200, 1767225600


def variants(before: str) -> dict[str, str]:
    now = load_script("admit")
    line, replacement = paired.WITHOUT_LEASE["store/lua/admit.lua"]
    if now.count(line) != 1:
        raise SystemExit("admit.lua no longer has the lease line this variant removes")
    old = subprocess.run(["git", "-C", str(HERE.parent), "show",
                          f"{before}:ai_saas_middleware/store/lua/admit.lua"],
                         check=True, capture_output=True, text=True).stdout
    if "--#include" in old:
        raise SystemExit(f"{before}'s admit.lua includes other files: not supported")
    return {"before": old, "now": now, "without-lease": now.replace(line, replacement)}


def arguments(variant: str, request_id: str) -> list[str | int]:
    # The benchmark app's admission: static tenant, tier 'bench', reserve 400 tokens.
    common: list[str | int] = [request_id, MONTH, "static", "", "bench", HUGE, 60_000, HUGE,
                               400, 3_000_000, MONTH_START, MONTH_END]
    if variant == "before":
        return [*common, ""]  # ARGV[13]: no retry
    return [*common, 60_000, "0", -1, -1]  # lease ms, no money, no budgets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="07dbcb4", help="the commit to compare with")
    parser.add_argument("--blocks", type=int, default=60, help="blocks per variant")
    parser.add_argument("--block", type=int, default=200, help="calls per block")
    parser.add_argument("--redis-url", help="use this Redis (default: a private one)")
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--redis-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    scripts = variants(args.before)
    with ov.redis_server(args.redis_url) as server:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {args.cpu})
            if server.pid is not None:
                os.sched_setaffinity(server.pid, {args.redis_cpu})
        client = redis.Redis.from_url(server.url)
        shas = {name: client.script_load(text) for name, text in scripts.items()}
        run = f"admitbench{os.getpid()}"
        keys = {name: [f"{run}:{name}:{{t}}:{k}" for k in ("rl", f"q:{MONTH}", "rec", "keys",
                                                           "res")] for name in scripts}
        server_us: dict[str, list[float]] = {name: [] for name in scripts}
        trip_ns: dict[str, list[int]] = {name: [] for name in scripts}
        perf = time.perf_counter_ns

        def evalsha_stats() -> tuple[int, int]:
            stats = client.info("commandstats").get("cmdstat_evalsha",
                                                    {"calls": 0, "usec": 0})
            return stats["calls"], stats["usec"]

        order = list(scripts)
        for i in range(args.blocks + 1):  # block 0 warms up
            for name in (order if i % 2 == 0 else order[::-1]):
                calls0, usec0 = evalsha_stats()
                for j in range(args.block):
                    call_args = arguments(name, f"r{i}-{j}")
                    start = perf()
                    client.evalsha(shas[name], 5, *keys[name], *call_args)
                    if i:
                        trip_ns[name].append(perf() - start)
                calls1, usec1 = evalsha_stats()
                if i:
                    server_us[name].append((usec1 - usec0) / (calls1 - calls0))
        for key in client.scan_iter(match=f"{run}:*", count=1000):
            client.delete(key)
        print(f"admit.lua, {args.blocks} blocks of {args.block} calls per variant; "
              f"redis: {server.note}\n")
        print("| variant | Redis's time per call (us) | round trip (us) |")
        print("|---|---:|---:|")
        for name in scripts:
            print(f"| {name} | {statistics.median(server_us[name]):.1f} | "
                  f"{statistics.median(trip_ns[name]) / 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
