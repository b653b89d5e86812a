"""What the request side of the price book and the observed statistics costs.

- ``ObservedStats.record(...)``: the per-request call at settlement (one deque append;
  no watch thread here, so only the call itself is timed), the deque emptied between
  batches so it never reaches its bound.
- ``PriceBook.current``: the per-request read of the book in force (an attribute read).
- the round's fold of the recorded samples (done by the watch thread, off the request
  path), per sample.

Each figure is the median over batches of 1000 calls.

Needs no Redis (no round is run)::

    PYTHONPATH=. .venv/bin/python benchmarks/observed_record.py
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from ai_saas_middleware.config import load_config
from ai_saas_middleware.observed import ObservedStats
from ai_saas_middleware.pricebook import PriceBook
from ai_saas_middleware.store.keys import KeySchema

# Batches of 1000: what one round (1 s) folds at 1000 AI requests per second; a larger
# batch measures the allocator more than the call (the deque never holds more in use).
N = 1_000
ROUNDS = 301


def ns_per_call(run: Any, after: Any = None) -> float:
    """Median over ROUNDS of ``run()``'s time per call (``after()`` untimed)."""
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        run()
        times.append((time.perf_counter_ns() - start) / N)
        if after is not None:
            after()
    return statistics.median(times)


def main() -> None:
    keys = KeySchema("bench", 16)
    stats = ObservedStats(keys)
    record = stats.record

    def records() -> None:
        for _ in range(N):
            record("/ai/*", "model-small", 200, 800)

    config = load_config({"models": [{"id": "m", "provider": "openai",
                                      "costPerInputToken": "0.000001",
                                      "costPerOutputToken": "0.000002", "maxTokens": 1000,
                                      "qualityScore": 0.5, "latencyP99Ms": 900}]})
    book = PriceBook(config, keys)

    def reads() -> None:
        for _ in range(N):
            book.current  # noqa: B018

    latencies = [800 + (i & 255) for i in range(N)]  # 256 distinct values, made beforehand

    def fill() -> None:
        stats._samples.clear()
        for latency in latencies:
            record("/ai/*", "model-small", 200, latency)

    def folds() -> None:
        stats._fold()

    def nothing() -> None:
        for _ in range(N):
            pass

    print(f"a bare loop:             {ns_per_call(nothing):6.0f} ns per pass")
    print(f"ObservedStats.record():  {ns_per_call(records, stats._samples.clear):6.0f} ns "
          "per call")
    print(f"PriceBook.current:       {ns_per_call(reads):6.0f} ns per read")
    fill()
    print(f"the round's fold:        {ns_per_call(folds, fill):6.0f} ns per sample "
          "(in the watch thread, off the request)")


if __name__ == "__main__":
    main()
