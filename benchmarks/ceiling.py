"""How far this design can go: the middleware with parts of its Redis work taken away.

An experiment, not a mode of the product. ``overhead.py`` measures the middleware as it
ships; this script measures the same app with the Redis calls answered in process, so
that what is left is the middleware's own Python work, and with settlement alone taken
away, so that the cost of each round trip shows. It answers two questions the targets
of ``overhead.py`` raise:

- **Served** (Starlette under uvicorn, 1 worker, wrk as in ``overhead.py``): how many
  requests per second the middleware could serve if its two round trips cost nothing,
  against the bare app's. If that alone is near 0.7x, no tuning of the Redis side can
  reach 0.7x with them.
- **In process** (Flask, sync, as in ``overhead.py``): the client-visible time the
  middleware adds without Redis (its Python work alone); with only admission answered
  in process (so the difference to the shipped middleware is what the admission round
  trip costs in place, amid the app's work on the CPU Redis shares); and one admission
  round trip by itself (``admit.lua`` down the store's own connection, nothing else);
  each against the floor of ``overhead.py`` (one EVALSHA of ``return 1`` with
  redis-py). The target there is 1.5x the floor; the round trip of admission is the
  one part no Redis-backed design of admission can leave out.

"Answered in process" keeps every step of the core: credentials, body, model choice,
the script call built, its reply interpreted, the context and ticket made, the
response metered and the settlement call built; only the script does not go to Redis
(admission gets the reply of an admitted request; settlement the reply of a written
event).

    python benchmarks/ceiling.py            # about 2 minutes; --quick about 20 s

Pinned like ``overhead.py``: this process, redis-server and uvicorn on CPU 0, wrk on
CPU 1. In the served part Redis runs beside wrk (CPU 1), the placement that charges
uvicorn's CPU nothing for Redis's work: the most favourable to the middleware.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import signal
import sys
import time
import uuid
from functools import partial
from typing import Any

import redis

from ai_saas_middleware.types import RequestInfo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead as oh  # the harness and apps of overhead.py

SERVED_VARIANTS = ("bare", "middleware", "no-settle", "no-redis")
LABELS = {
    "bare": "bare Starlette endpoint",
    "middleware": "+ AISaaSMiddleware (as shipped: admit.lua, settle.lua)",
    "no-settle": "+ AISaaSMiddleware, settlement answered in process",
    "no-redis": "+ AISaaSMiddleware, both scripts answered in process",
}
WSGI_VARIANTS = ("bare", "middleware", "no-admit", "no-redis", "admit", "floor")
WSGI_LABELS = {
    "bare": "bare Flask endpoint, client-visible",
    "middleware": "+ AISaaS, client-visible (as shipped)",
    "no-admit": "+ AISaaS, admission answered in process, client-visible",
    "no-redis": "+ AISaaS, both scripts answered in process, client-visible",
    "admit": "admit.lua alone: one round trip down the store's connection",
    "floor": "floor: one EVALSHA `return 1`, redis-py sync client",
}


def answer_in_process(gateway: Any, *, admit: bool, settle: bool) -> None:
    """Make ``gateway`` answer its own script calls (``admit`` and/or ``settle``)."""
    real = gateway._run

    def reply(call: Any) -> Any:
        if call[0] == "admit" and admit:
            return [0, int(time.time() * 1000), 1_000_000, 60_000, 0]
        if call[0] == "settle" and settle:
            return b"0-0"
        return None

    if inspect.iscoroutinefunction(real):
        async def run_async(call: Any) -> Any:
            answer = reply(call)
            return answer if answer is not None else await real(call)
        gateway._run = run_async
    else:
        def run(call: Any) -> Any:
            answer = reply(call)
            return answer if answer is not None else real(call)
        gateway._run = run


def serve(variant: str, port: int, redis_url: str, prefix: str) -> None:
    """``--serve``: one variant under uvicorn, 1 worker, no access log."""
    app = oh.build_app("starlette", "bare" if variant == "bare" else "middleware", redis_url,
                       prefix)
    if variant in ("no-settle", "no-redis"):
        app.middleware_stack = app.build_middleware_stack()
        answer_in_process(oh.find_gateway(app), admit=variant == "no-redis", settle=True)
    oh.run_uvicorn(app, port)


def serve_args(prefix: str, variant: str) -> list[str]:
    return [os.path.abspath(__file__), "--serve", variant, "--prefix", f"{prefix}{variant[:4]}"]


def in_process_flask(redis_url: str, prefix: str, requests: int, block: int
                     ) -> dict[str, oh.Samples]:
    apps = {v: oh.build_app("flask", "bare" if v == "bare" else "middleware", redis_url,
                            f"{prefix}{v[:4]}")
            for v in ("bare", "middleware", "no-admit", "no-redis")}
    answer_in_process(oh.find_gateway(apps["no-admit"]), admit=True, settle=False)
    answer_in_process(oh.find_gateway(apps["no-redis"]), admit=True, settle=True)
    gateway = oh.find_gateway(apps["middleware"])
    info = RequestInfo("POST", oh.AI_PATH, {"content-type": "application/json",
                                               "authorization": f"Bearer {oh.API_KEY}"},
                          oh.REQUEST_BODY)
    plan = gateway.admission.prepare(info, gateway.endpoint_for("POST", oh.AI_PATH))
    ids = iter(range(10**12))

    def admit() -> Any:
        # A new request id each time, as in the middleware: the rate-limit log grows alike.
        plan.request_id = f"req_ceiling{next(ids):012x}"
        return gateway.store.run_script(*gateway.admission.call(plan))

    floor_client, floor_script = oh.floor_script(redis.Redis, redis_url)
    floor_script()
    run = oh.wsgi_run(apps, {"admit": admit,
                             "floor": lambda: floor_script(keys=[], args=[])})
    samples = {v: oh.Samples() for v in WSGI_VARIANTS}
    try:
        for variant in WSGI_VARIANTS:  # warm-up
            run(variant, 500, None)
        for _ in range(max(1, requests // block)):  # always in this order
            for variant in WSGI_VARIANTS:
                run(variant, block, samples[variant])
    finally:
        floor_client.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--requests", type=int, default=20_000,
                        help="in-process requests per variant (default 20000)")
    parser.add_argument("--block", type=int, default=500)
    parser.add_argument("--served-seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--serve", choices=SERVED_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.prefix)
        return 0
    if args.quick:
        args.requests, args.block, args.served_seconds, args.rounds = 1000, 250, 1, 1
    _cpu, load_cpu = oh.pin(args.cpu, args.load_cpu)
    prefix = "ceil" + uuid.uuid4().hex[:8]
    with oh.redis_server(None) as server:
        admin = redis.Redis.from_url(server.url)
        try:
            samples = in_process_flask(server.url, prefix + "f", args.requests, args.block)
            print("## In process, Flask (us)\n")
            print("| variant | median | p99 | added median |")
            print("|---|---:|---:|---:|")
            bare = oh.med(samples["bare"].client_ns) / 1000
            floor = oh.med(samples["floor"].client_ns) / 1000
            for variant in WSGI_VARIANTS:
                values = samples[variant].client_ns
                median = oh.med(values) / 1000
                added = (f"+{median - bare:.1f} = {(median - bare) / floor:.2f}x the floor"
                         if variant in ("middleware", "no-admit", "no-redis") else
                         f"({median / floor:.2f}x the floor)" if variant == "admit" else "")
                print(f"| {WSGI_LABELS[variant]} | {median:.1f} | "
                      f"{oh.pct(values, 99):.1f} | {added} |")
            in_place = (oh.med(samples["middleware"].client_ns)
                        - oh.med(samples["no-admit"].client_ns)) / 1000
            print(f"\nTarget of issue 3: added <= 1.5x the floor = {1.5 * floor:.1f} us. "
                  f"The admission round trip in place (as shipped minus admission answered "
                  f"in process): {in_place:.1f} us = {in_place / floor:.2f}x the floor.")
            if shutil.which("wrk"):
                srv = oh.served(partial(serve_args, prefix + "s"), SERVED_VARIANTS, server,
                                [oh.Placement("Redis beside wrk", load_cpu)],
                                args.served_seconds, args.rounds, args.connections, load_cpu,
                                signal.SIGINT)
                place = srv["placements"][0]
                print(f"\n## Served: uvicorn (1 worker), wrk -t1 -c{args.connections}, "
                      f"{args.served_seconds} s x {args.rounds} rounds interleaved, Redis "
                      f"beside wrk\n")
                print("| app | req/s | vs bare | uvicorn CPU us/req |")
                print("|---|---:|---:|---:|")
                base = place["median_rps"]["bare"]
                for variant in SERVED_VARIANTS:
                    rps = place["median_rps"][variant]
                    print(f"| {LABELS[variant]} | {rps:.0f} | {rps / base:.2f}x | "
                          f"{place['app_cpu_us'][variant]:.0f} |")
            else:
                print("\nwrk not on PATH: served part skipped", file=sys.stderr)
        finally:
            oh.clean_up(admin, prefix)
            admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
