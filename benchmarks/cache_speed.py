"""What the semantic cache's pure parts cost per request, in microseconds.

Per request: ``request_keys()`` and ``cacheable()`` on a typical 3-message chat body, the
default embedder on its last user message, the lexical guard on one candidate pair; per
semantic lookup: ``find_match()`` over 1,000 and 10,000 candidates of one partition
(random unit vectors, 256 dims as the default embedder's and 384 as MiniLM's; none
reaches the threshold, so the whole scan is timed: the worst case). Each figure is the
median and p99 of ``--rounds`` timed calls, after a warm-up.

Usage::

    python benchmarks/cache_speed.py               # about 20 s
    python benchmarks/cache_speed.py --rounds 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ai_saas_middleware.cache.embedders import _MINILM_CALIBRATION, Embedder, NgramEmbedder
from ai_saas_middleware.cache.guard import LexicalGuard
from ai_saas_middleware.cache.match import CandidateSet, find_match
from ai_saas_middleware.cache.request_key import cacheable, request_keys

BODY = {
    "model": "gpt-4o-mini",
    "temperature": 0,
    "max_tokens": 512,
    "messages": [
        {"role": "system", "content": "You are the helpful support assistant of Acme Ltd. "
                                      "Answer briefly and politely."},
        {"role": "user", "content": "Hi, I ordered a pair of running shoes last week."},
        {"role": "user", "content": "How do I return them if they don't fit?"},
    ],
}


def timed(call: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median, p99) in microseconds."""
    for _ in range(min(200, rounds)):
        call()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def candidates(n: int, dim: int, embedder_id: str) -> CandidateSet:
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return CandidateSet(embedder_id, tuple(f"e{i}" for i in range(n)),
                        tuple(f"stored question {i}" for i in range(n)), vectors)


class _Sized:
    """Stands in for MiniLM in the match: its width and shipped calibration."""

    name = "minilm"
    version = "sized"
    embedder_id = "minilm@sized"
    calibration = _MINILM_CALIBRATION

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def score(self, cosine: Any) -> Any:
        return self.calibration(cosine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5000)
    args = parser.parse_args()
    embedder = NgramEmbedder()
    guard = LexicalGuard()
    question = BODY["messages"][-1]["content"]
    query = embedder.embed([question])[0]
    rows = [
        ("request_keys(), 3-message body",
         lambda: request_keys(BODY, tenant_id="acme", endpoint="/v1/chat/completions",
                              model_class="small")),
        ("cacheable(), same body", lambda: cacheable(BODY)),
        ("ngram embed, the last user message (41 chars)", lambda: embedder.embed([question])),
        ("guard, one pair (features cached)",
         lambda: guard.accepts(question, "How can I send them back if they don't fit?")),
    ]
    print("| what | median us | p99 us |")
    print("|---|---:|---:|")
    for label, call in rows:
        median, p99 = timed(call, args.rounds)
        print(f"| {label} | {median:.1f} | {p99:.1f} |", flush=True)
    minilm_sized = _Sized(384)  # MiniLM's width and calibration, without the model
    rng = np.random.default_rng(1)
    wide_query = rng.standard_normal(384).astype(np.float32)
    wide_query /= np.linalg.norm(wide_query)
    for n in (1000, 10000):
        for model, q in ((embedder, query), (minilm_sized, wide_query)):
            stored = candidates(n, model.dim, model.embedder_id)

            def lookup(stored: CandidateSet = stored, q: np.ndarray = q,
                       model: Embedder = model) -> object:
                return find_match(q, question, stored, embedder=model, threshold=0.85)

            median, p99 = timed(lookup, max(200, args.rounds // 10))
            print(f"| find_match, {n:,} candidates, {model.dim} dims | {median:.1f} "
                  f"| {p99:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
