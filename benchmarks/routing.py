"""Routing: how long a decision takes, and what it saves.

1. Decision time: ``select_model(...).chosen`` (the router as admission calls it: a
   request without ``max_tokens`` whose endpoint asks quality 0.6 and p99 3 s, observed
   averages for half the models) with 5 and 50 model profiles, against one Redis round
   trip (a PING to a private redis-server, measured in the same run). Target: under 5%
   of the round trip.
2. Savings on a generated mixed workload (short and long prompts, varied quality and
   latency needs, cost limits, some tenants near their budget and so downgraded): total
   expected cost and constraint violations with our router (each strategy) against
   always the first model of the fallback chain, and against the seed's rule (the
   allowed model with the lowest input price, nothing else considered). A violation is a
   request sent to a model whose context window cannot hold it, or below its quality,
   above its latency or over its cost limit.

Reproduce::

    python benchmarks/routing.py                # about 20 s
    python benchmarks/routing.py --requests 50000
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from ai_saas_middleware.config import ModelProfile, TierConfig  # noqa: E402
from ai_saas_middleware.pricing import cost_of  # noqa: E402
from ai_saas_middleware.routing import Requirements, select_model  # noqa: E402

BASE = [  # (id, $/M in, $/M out, context, quality, p99 ms): the seed's four and one more
    ("model-large", "2.5", "10", 128_000, 0.92, 4000),
    ("model-medium", "3", "15", 200_000, 0.85, 2500),
    ("model-small", "0.15", "0.6", 128_000, 0.62, 900),
    ("model-fast", "0.1", "0.4", 16_000, 0.55, 400),
    ("model-mid", "0.8", "3.2", 64_000, 0.75, 1500),
]


def profiles(n: int, seed: int = 7) -> dict[str, ModelProfile]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        name, p_in, p_out, window, quality, p99 = BASE[i % len(BASE)]
        if i >= len(BASE):  # variations of the five
            scale = Decimal(rng.choice(["0.5", "0.8", "1.2", "2"]))
            name = f"{name}-{i}"
            p_in, p_out = str(Decimal(p_in) * scale), str(Decimal(p_out) * scale)
            quality = min(0.99, max(0.3, quality + rng.uniform(-0.08, 0.08)))
            p99 = int(p99 * rng.uniform(0.7, 1.4))
        out[name] = ModelProfile(name, "openai", Decimal(p_in) / 1_000_000,
                                 Decimal(p_out) / 1_000_000, window, round(quality, 2), p99)
    return out


def round_trip_us(samples: int = 3000) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        port = 6390 + random.randrange(500)
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                 "--appendonly", "no", "--dir", tmp],
                                stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(50):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            times = []
            for _ in range(samples):
                t = time.perf_counter()
                client.ping()
                times.append(time.perf_counter() - t)
            return statistics.median(times) * 1e6
        finally:
            proc.terminate()
            proc.wait()


def decision_us(n_models: int, rounds: int = 5, loops: int = 2000) -> float:
    models = profiles(n_models)
    tier = TierConfig("pro", None, None, tuple(models))
    needs = Requirements(800, 256, min_quality=0.6, max_latency_ms=3000, stated_output=False)
    averages = {m: 120 for m in list(models)[: n_models // 2]}
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(loops):
            chosen = select_model(tier, models, needs, None, strategy="cost_optimized",
                                  averages=averages).chosen  # what admission needs of it
        assert chosen is not None
        best = min(best, (time.perf_counter() - t) / loops)
    return best * 1e6


def workload(n: int, seed: int = 11) -> list[tuple[Requirements, bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        long = rng.random() < 0.15
        prompt = rng.randint(20_000, 150_000) if long else rng.randint(50, 3000)
        output = rng.choice([64, 256, 512, 1024])
        quality = rng.choice([None, None, 0.6, 0.8, 0.9])
        latency = rng.choice([None, None, 1000, 3000])
        cost = rng.choice([None, None, None, Decimal("0.01"), Decimal("0.05")])
        near_budget = rng.random() < 0.1
        out.append((Requirements(prompt, output, quality, latency, cost), near_budget))
    return out


def violates(model: ModelProfile, needs: Requirements) -> bool:
    return (needs.prompt_tokens + needs.max_output_tokens > model.max_tokens
            or (needs.min_quality is not None and model.quality_score < needs.min_quality)
            or (needs.max_latency_ms is not None and model.latency_p99_ms > needs.max_latency_ms)
            or (needs.max_cost is not None
                and cost_of(model, needs.prompt_tokens, needs.max_output_tokens) > needs.max_cost))


def savings(n: int) -> list[tuple[str, Decimal, int, int]]:
    models = profiles(5)
    tier = TierConfig("pro", None, None, tuple(models))
    chain = ("model-large", "model-medium", "model-small")  # the seed's fallbackChain
    rows = []
    for label, pick in (
        ("first of the fallback chain", lambda needs, near: models[chain[0]]),
        ("seed rule: lowest input price",
         lambda needs, near: min(models.values(), key=lambda m: m.cost_per_input_token)),
        *((f"ours: {s}, downgradeAt near budget", _ours(tier, models, s))
          for s in ("cost_optimized", "quality_first", "latency_first")),
    ):
        total = Decimal(0)
        bad = refused = 0
        for needs, near in workload(n):
            model = pick(needs, near)
            if model is None:
                refused += 1  # ours refuses (422) what no model can serve
                continue
            total += cost_of(model, needs.prompt_tokens, needs.max_output_tokens // 2)
            bad += violates(model, needs)
        rows.append((label, total, bad, refused))
    return rows


def _ours(tier: TierConfig, models: dict[str, ModelProfile], strategy: str):  # type: ignore[no-untyped-def]
    def pick(needs: Requirements, near: bool) -> ModelProfile | None:
        return select_model(tier, models, needs, None, strategy=strategy,
                            downgrade=near).chosen
    return pick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    rt = round_trip_us()
    print(f"one Redis round trip (PING, median): {rt:.1f} us\n")
    print("| model profiles | decision (us, best of 5) | share of a round trip |")
    print("|---:|---:|---:|")
    for n in (5, 50):
        us = decision_us(n)
        print(f"| {n} | {us:.2f} | {us / rt:.1%} |")
    print(f"\nmixed workload, {args.requests} requests (completion = half of max_tokens):\n")
    print("| router | total cost (USD) | constraint violations | refused (422) |")
    print("|---|---:|---:|---:|")
    for label, total, bad, refused in savings(args.requests):
        print(f"| {label} | {total:.4f} | {bad} | {refused} |")


if __name__ == "__main__":
    main()
