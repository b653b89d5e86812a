"""CPU per request of the provider layer against a raw aiohttp client (issue 9 item 7).

The OpenAI-compatible stand-in of tests/provider_standins.py runs in a process of its
own, so this process's CPU (``time.process_time``) is the client's alone. For each
concurrency (1, 16, 64) the same number of whole-reply requests goes through

* ``raw aiohttp``: one ``ClientSession``, ``session.post(url, json=body)``, ``.json()``;
* ``provider``: ``OpenAIProvider.acomplete(...)`` (our aiohttp transport, JSON, Reply);

both on one event loop, interleaved: each round splits its requests into ``--slices``
slices per client, run in ABBA order (raw, provider, provider, raw, ...), so a change of
the machine's load (2 shared cores, steal time) falls on both clients alike. The table
shows each client's median round and the median of the rounds' paired ratios
(provider / raw of the same round). Target: the provider within 1.2x of raw aiohttp's
CPU per request, and no collapse at 64 (CPU per request at 64 not far above that at 16).

``--clients`` adds the measurement that chose the HTTP clients: httpx's AsyncClient
against aiohttp (async), and httpx's Client against urllib3 (sync, in threads).

    PYTHONPATH=. .venv/bin/python benchmarks/providers.py [--requests 2000] [--rounds 5]
        [--slices 8] [--clients]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ai_saas_middleware.config import ProviderConfig  # noqa: E402
from ai_saas_middleware.providers import build_provider  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say hello in five words"}]
CONCURRENCY = (1, 16, 64)


def start_standin() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "provider_standins.py"),
                             "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        proc.kill()
        raise SystemExit("the stand-in did not start")
    return proc, f"http://127.0.0.1:{line[1]}"


async def measure_async(call: Callable[[], Awaitable[Any]], concurrency: int,
                        requests: int) -> tuple[float, float]:
    """(CPU microseconds per request, requests per second) for ``requests`` calls with
    at most ``concurrency`` in flight."""
    await asyncio.gather(*(call() for _ in range(concurrency)))  # open the connections
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    done = per_worker * concurrency
    return cpu / done * 1e6, done / wall


def measure_threads(call: Callable[[], Any], concurrency: int, requests: int
                    ) -> tuple[float, float]:
    for _ in range(concurrency):
        call()
    per_worker = requests // concurrency

    def worker() -> None:
        for _ in range(per_worker):
            call()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    done = per_worker * concurrency
    return cpu / done * 1e6, done / wall


async def raw_and_provider(base_url: str, concurrency: int, requests: int, slices: int
                           ) -> dict[str, tuple[float, float]]:
    """One round: (CPU us per request, requests per second) of each client, over
    ``requests`` calls each split into ``slices`` interleaved slices."""
    import aiohttp

    url = f"{base_url}/chat/completions"
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": 16}
    headers = {"Authorization": "Bearer sk-bench"}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
    provider = build_provider(ProviderConfig("bench", "openai", base_url, None),
                              api_key="sk-bench")

    async def raw() -> Any:
        async with session.post(url, json=body, headers=headers) as resp:
            data = await resp.json()
        return data["choices"][0]["message"]["content"], data["usage"]

    async def ours() -> Any:
        return await provider.acomplete("bench", MESSAGES, max_tokens=16)

    clients = {"raw aiohttp": raw, "provider": ours}
    try:
        for call in clients.values():  # warm both: connections, caches
            await measure_async(call, concurrency, concurrency * 4)
        cpu = dict.fromkeys(clients, 0.0)
        wall = dict.fromkeys(clients, 0.0)
        per_slice = max(requests // slices, concurrency)
        for i in range(slices):
            for name in (list(clients) if i % 2 == 0 else list(clients)[::-1]):
                us, rps = await measure_async(clients[name], concurrency, per_slice)
                cpu[name] += us / slices
                wall[name] += per_slice / rps
        return {name: (cpu[name], per_slice * slices / wall[name]) for name in clients}
    finally:
        await session.close()
        await provider.aclose()


def client_choice(base_url: str, requests: int) -> list[tuple[str, int, float, float]]:
    import aiohttp
    import httpx
    import urllib3

    url = f"{base_url}/chat/completions"
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": 16}
    raw = json.dumps(body).encode()
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    rows: list[tuple[str, int, float, float]] = []
    for concurrency in CONCURRENCY:
        async def run_async(concurrency: int) -> None:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
            async with httpx.AsyncClient(limits=limits) as hx, aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=100)) as aio:
                async def call_hx() -> Any:
                    return (await hx.post(url, content=raw, headers=headers)).json()

                async def call_aio() -> Any:
                    async with aio.post(url, data=raw, headers=headers) as resp:
                        return await resp.json()

                for name, call in (("aiohttp (async)", call_aio),
                                   ("httpx AsyncClient", call_hx)):
                    rows.append((name, concurrency,
                                 *await measure_async(call, concurrency, requests)))

        asyncio.run(run_async(concurrency))
        pool = urllib3.PoolManager(maxsize=100)
        client = httpx.Client(limits=httpx.Limits(max_connections=100,
                                                  max_keepalive_connections=100))
        for name, call in (
                ("urllib3 (threads)",
                 lambda pool=pool: json.loads(  # type: ignore[misc]
                     pool.request("POST", url, body=raw, headers=headers).data)),
                ("httpx Client (threads)",
                 lambda client=client: client.post(  # type: ignore[misc]
                     url, content=raw, headers=headers).json())):
            rows.append((name, concurrency, *measure_threads(call, concurrency, requests)))
        client.close()
        pool.clear()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per cell")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (median shown)")
    parser.add_argument("--slices", type=int, default=8,
                        help="interleaved slices per client in a round")
    parser.add_argument("--clients", action="store_true",
                        help="also measure httpx against aiohttp and urllib3")
    args = parser.parse_args()
    proc, base_url = start_standin()
    try:
        print(f"provider layer vs raw aiohttp, {args.requests} whole replies per client "
              f"and round in {args.slices} interleaved slices, median of {args.rounds} "
              "rounds (ratio: median of the rounds' paired ratios); CPU of this process only")
        print(f"{'concurrency':>11}  {'raw us/req':>10}  {'layer us/req':>12}  "
              f"{'ratio':>5}  {'raw req/s':>9}  {'layer req/s':>11}")
        for concurrency in CONCURRENCY:
            rounds = [asyncio.run(raw_and_provider(base_url, concurrency, args.requests,
                                                   args.slices))
                      for _ in range(args.rounds)]
            ratio = statistics.median(r["provider"][0] / r["raw aiohttp"][0] for r in rounds)
            raw_cpu = statistics.median(r["raw aiohttp"][0] for r in rounds)
            our_cpu = statistics.median(r["provider"][0] for r in rounds)
            raw_rps = statistics.median(r["raw aiohttp"][1] for r in rounds)
            our_rps = statistics.median(r["provider"][1] for r in rounds)
            print(f"{concurrency:>11}  {raw_cpu:>10.0f}  {our_cpu:>12.0f}  "
                  f"{ratio:>5.2f}  {raw_rps:>9.0f}  {our_rps:>11.0f}", flush=True)
        if args.clients:
            print("\nHTTP client choice (one round each)")
            print(f"{'client':<24}{'concurrency':>11}  {'us CPU/req':>10}  {'req/s':>7}")
            for name, concurrency, cpu, rps in client_choice(base_url, args.requests):
                print(f"{name:<24}{concurrency:>11}  {cpu:>10.0f}  {rps:>7.0f}", flush=True)
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
