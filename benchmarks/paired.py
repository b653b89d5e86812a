"""This work against an earlier commit, in one process: a paired comparison of the hot path.

``overhead.py`` compares the middleware with its peers within one run; comparing two
commits with it means two runs, and on a shared or virtual machine the speed of the machine
drifts between runs by more than a small regression (10 to 30 us here, on a 250 us figure).
This script takes the drift out: it loads the package of ``--before`` (``git archive``, as
the package ``ai_saas_before``; the package imports itself only relatively) beside the
working tree's ``ai_saas_middleware``, builds the same app on each, and drives the two in
alternating blocks against one Redis, so that both see the same machine at the same time.

Measured, per variant, the median over every request of its blocks (us):

- ``starlette``: a Starlette app under each ``AISaaSMiddleware``, driven in-process as in
  ``overhead.py`` (client-visible: until the last body message was handed over; whole
  call: settlement included);
- ``gateway``: the sync ``Gateway`` alone (``admit``, then ``settle``), no framework.

Reproduce::

    python benchmarks/paired.py --before 07dbcb4            # about a minute
    python benchmarks/paired.py --before 07dbcb4 --rounds 5 --blocks 40
    python benchmarks/paired.py --before without-lease --rounds 5   # the lease's cost alone
    python benchmarks/paired.py --before 07dbcb4 --in-process       # the Python alone

The script and the private redis-server it starts are pinned to CPUs 0 and 1 (``--cpu``,
``--redis-cpu``); ``--redis-url`` uses a server of yours instead.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import overhead as ov  # noqa: E402  (the apps, the request and the ASGI harness)
from ceiling import answer_in_process  # noqa: E402  (--in-process)

BEFORE = "ai_saas_before"
AFTER = "ai_saas_middleware"


def export_before(rev: str, into: Path) -> None:
    """The package of commit ``rev`` as ``into/ai_saas_before``."""
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", "--format=tar", rev,
                              "ai_saas_middleware"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "ai_saas_middleware").rename(into / BEFORE)


# The two lines that make a reservation's lease: without them, the working tree is what it
# would be if issue 7's item 5 kept no record of reservations in Redis (a baseline only:
# killed processes' reservations would then be held until the month ends).
WITHOUT_LEASE = {
    "store/lua/admit.lua": ("redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[13]), member)\n",
                            ""),
    "store/lua/settle.lua": ("local removed = redis.pcall('ZREM', KEYS[4], ARGV[4])",
                             "local removed = 1  -- (as if the reservation were held)"),
}


def export_without_lease(into: Path) -> None:
    """The working tree's package without the lease's write, as ``into/ai_saas_before``."""
    shutil.copytree(HERE.parent / "ai_saas_middleware", into / BEFORE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name, (line, replacement) in WITHOUT_LEASE.items():
        path = into / BEFORE / name
        text = path.read_text("utf-8")
        if text.count(line) != 1:
            raise SystemExit(f"{name} no longer has the lease line this baseline removes")
        path.write_text(text.replace(line, replacement), "utf-8")


IN_PROCESS = False  # set by --in-process: ceiling.py's answer_in_process on both gateways


def starlette_app(package: str, redis_url: str, prefix: str) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Any) -> JSONResponse:
        body = await request.json()
        return JSONResponse(ov.chat_reply(body.get("model", "model-small")))

    middleware = importlib.import_module(f"{package}.starlette").AISaaSMiddleware
    return Starlette(routes=[Route(ov.AI_PATH, chat, methods=["POST"])],
                     middleware=[Middleware(middleware, config=ov.bench_config(redis_url,
                                                                               prefix))])


def run_starlette(redis_url: str, blocks: int, block: int) -> dict[str, tuple[float, float]]:
    apps = {p: starlette_app(p, redis_url, f"paired{p[-6:]}{os.getpid()}")
            for p in (BEFORE, AFTER)}
    loop = asyncio.new_event_loop()
    samples = {p: ov.Samples() for p in apps}
    for app in apps.values():  # warm-up: connections, scripts loaded, caches filled
        loop.run_until_complete(ov.drive(app, ov.ai_scope, ov.REQUEST_BODY, 500, None))
        if IN_PROCESS:  # (the middleware makes its gateway at the first request)
            answer_in_process(ov.find_gateway(app), admit=True, settle=True)
    order = list(apps)
    for i in range(blocks):
        for p in (order if i % 2 == 0 else order[::-1]):
            loop.run_until_complete(ov.drive(apps[p], ov.ai_scope, ov.REQUEST_BODY, block,
                                             samples[p]))
    loop.close()
    return {p: (statistics.median(s.client_ns) / 1000, statistics.median(s.whole_ns) / 1000)
            for p, s in samples.items()}


def run_gateway(redis_url: str, blocks: int, block: int) -> dict[str, tuple[float, float]]:
    body = ov.REQUEST_BODY
    headers = {"content-type": "application/json", "authorization": f"Bearer {ov.API_KEY}",
               "content-length": str(len(body))}
    gateways = {}
    for p in (BEFORE, AFTER):
        gateway = importlib.import_module(f"{p}.gateway").Gateway(
            ov.bench_config(redis_url, f"pairedgw{p[-6:]}{os.getpid()}"))
        types = importlib.import_module(f"{p}.types")
        if IN_PROCESS:
            answer_in_process(gateway, admit=True, settle=True)
        gateways[p] = (gateway, types, gateway.endpoint_for("POST", ov.AI_PATH))
    times: dict[str, tuple[list[int], list[int]]] = {p: ([], []) for p in gateways}

    def drive(p: str, count: int, keep: bool) -> None:
        gateway, types, endpoint = gateways[p]
        perf = time.perf_counter_ns
        admits, settles = times[p]
        for _ in range(count):
            info = types.RequestInfo("POST", ov.AI_PATH, dict(headers), body)
            start = perf()
            decision = gateway.admit(info, endpoint)
            admitted = perf()
            gateway.settle(decision.ticket, types.Outcome(status=200))
            if keep:
                admits.append(admitted - start)
                settles.append(perf() - admitted)

    for p in gateways:
        drive(p, 500, False)
    order = list(gateways)
    for i in range(blocks):
        for p in (order if i % 2 == 0 else order[::-1]):
            drive(p, block, True)
    for gateway, _, _ in gateways.values():
        gateway.close()
    return {p: (statistics.median(a) / 1000, statistics.median(s) / 1000)
            for p, (a, s) in times.items()}


VARIANTS = {"starlette": (run_starlette, "client-visible", "whole call"),
            "gateway": (run_gateway, "admit", "settle")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True,
                        help="the commit to compare with, or 'without-lease': the working "
                             "tree without the reservation lease's write (admit.lua's ZADD, "
                             "settle.lua's ZREM), to measure what that write costs")
    parser.add_argument("--variants", default="starlette,gateway",
                        help="comma-separated: starlette, gateway")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant")
    parser.add_argument("--blocks", type=int, default=30, help="blocks per code per round")
    parser.add_argument("--block", type=int, default=250, help="requests per block")
    parser.add_argument("--in-process", action="store_true",
                        help="answer admit.lua and settle.lua in process: Python alone")
    parser.add_argument("--redis-url", help="use this Redis (default: a private one)")
    parser.add_argument("--cpu", type=int, default=0, help="CPU for this process")
    parser.add_argument("--redis-cpu", type=int, default=1, help="CPU for the private Redis")
    args = parser.parse_args(argv)
    global IN_PROCESS
    IN_PROCESS = args.in_process
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.before == "without-lease":
            export_without_lease(Path(tmp))
        else:
            export_before(args.before, Path(tmp))
        sys.path.insert(0, tmp)
        with ov.redis_server(args.redis_url) as server:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {args.cpu})
                if server.pid is not None:
                    os.sched_setaffinity(server.pid, {args.redis_cpu})
            print(f"before: {args.before}; after: the working tree; redis: {server.note}"
                  + ("; admit.lua and settle.lua answered in process" if IN_PROCESS else ""))
            for variant in variants:
                run, first, second = VARIANTS[variant]
                print(f"\n## {variant}: median per round (us), after minus before\n")
                print(f"| round | {first} before | after | diff | {second} before | after "
                      "| diff |")
                print("|---:|---:|---:|---:|---:|---:|---:|")
                diffs: tuple[list[float], list[float]] = ([], [])
                for r in range(1, args.rounds + 1):
                    res = run(server.url, args.blocks, args.block)
                    (b1, b2), (a1, a2) = res[BEFORE], res[AFTER]
                    diffs[0].append(a1 - b1)
                    diffs[1].append(a2 - b2)
                    print(f"| {r} | {b1:.1f} | {a1:.1f} | {a1 - b1:+.1f} | {b2:.1f} | {a2:.1f} "
                          f"| {a2 - b2:+.1f} |")
                print(f"\nmedian difference: {first} {statistics.median(diffs[0]):+.1f} us, "
                      f"{second} {statistics.median(diffs[1]):+.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
