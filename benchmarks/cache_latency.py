"""The response cache against a real Redis: lookup latency, round trips, and a replay.

Three parts (issue 11, benchmarks/README.md "Issue 11"):

1. **Lookup latency at 1,000 and 10,000 entries in one tenant**, all in ONE partition
   (same endpoint, parameters, no history: the case where the semantic path has the
   most to search). The entries are 10,000 templated support questions ("How do I
   <verb> my <thing> <when>?"), a dense cluster of near neighbours, which makes LSH
   buckets large: a hard case for bucketing. Timed per request, as the gateway runs it:

   - ``semantic``: embed the last message (``ngram``), LSH codes, one EVALSHA of
     cache_lookup.lua, the client's exact scoring (``find_match``, guard included), and
     on a hit whose body the lookup did not send along the fallback EVALSHA of
     cache_fetch.lua; with 0, 1 and 2 bodies sent along (``SPECULATIVE_BODIES``),
     interleaved, and how many hits needed the fallback; queries are paraphrases of
     stored questions and novel questions, half each;
   - ``admit, exact lookup``: admit.lua with the exact lookup folded in (a hit) against
     ``admit, cache off``: the same admission without it.

   Also: how often the bucketed candidates give the same answer as scoring the whole
   partition (the LSH's recall, at the configured threshold).
2. **Round trips** per request (``INFO commandstats`` EVALSHA deltas, and the network
   round trips the store made), for: the cache off; an exact miss in an empty partition;
   an exact hit; a semantic miss; a semantic hit.
3. **Replay**: about 400 requests through a real Starlette app and the real middleware, 30%
   of them repeats or paraphrases of earlier ones (the fow-cache should-hit pairs,
   CC BY 4.0, by Mabon ap Gwyn), the rest new questions, among them the fow-cache trap
   twins of earlier ones (which must not be served). The provider is a stand-in that
   answers 150 completion tokens at ``model-medium``'s prices; the saved cost is summed
   from the usage events (``saved_cost``), the spend from their ``cost``; the semantic
   hits that needed the fallback fetch are counted at the store.

    python benchmarks/cache_latency.py            # about a minute
    python benchmarks/cache_latency.py --quick    # 1,000 entries only

A private redis-server (from PATH) is started unless ``REDIS_URL`` is set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
import types
from decimal import Decimal
from pathlib import Path
from typing import Any

# One BLAS thread, as a serving process should run (benchmarks/README.md, Issue 11: a
# second OpenBLAS thread waiting for a busy core is what made the match's p99).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ai_saas_middleware import load_config  # noqa: E402
from ai_saas_middleware.cache import policy  # noqa: E402
from ai_saas_middleware.cache.match import CandidateSet, find_match  # noqa: E402
from ai_saas_middleware.cache.policy import ResponseCache  # noqa: E402
from ai_saas_middleware.embedded import start_server  # noqa: E402
from ai_saas_middleware.gateway import Gateway  # noqa: E402
from ai_saas_middleware.store.keys import KeySchema  # noqa: E402
from ai_saas_middleware.store.redis import RedisStore  # noqa: E402
from ai_saas_middleware.types import Outcome, RequestInfo  # noqa: E402

KEY = "bench-key"
CONFIG: dict[str, Any] = {
    "tenant": {"tiers": [{"name": "pro", "monthlyQuota": "unlimited", "rateLimit": "unlimited",
                          "allowedModels": ["model-medium"]}]},
    "models": [{"id": "model-medium", "provider": "anthropic", "costPerInputToken": "0.000003",
                "costPerOutputToken": "0.000015", "maxTokens": 200000, "qualityScore": 0.85,
                "latencyP99Ms": 2500}],
    "tenants": [{"id": "acme", "tier": "pro", "apiKeys": []},
                {"id": "other", "tier": "pro", "apiKeys": []}],
    "endpoints": [{"path": "/ai/*"}],
    "cache": {"enabled": True, "maxEntriesPerTenant": 20000,
              "maxBytesPerTenant": 512 * 1024 * 1024},
}

VERBS = ["reset", "change", "update", "cancel", "renew", "transfer", "verify", "recover",
         "delete", "export", "lock", "unlock", "share", "rename", "restore", "upgrade",
         "downgrade", "pause", "resume", "link"]
THINGS = ["password", "account", "subscription", "email address", "phone number",
          "billing address", "payment card", "profile photo", "username", "team workspace",
          "API key", "invoice details", "shipping address", "order", "wishlist",
          "loyalty card", "gift card", "security questions", "notification settings",
          "data backup", "calendar", "contacts list", "storage plan", "device list",
          "two-factor login"]
WHENS = ["from the app", "on the website", "without logging in", "on my phone",
         "from abroad", "on a tablet", "as an admin", "for my family", "after moving house",
         "before my trip", "during a sale", "on the desktop client", "with my work account",
         "when it is frozen", "while it is pending", "at the weekend", "by email",
         "over the phone", "in the help centre", "in a browser"]


# A stored answer of about 1.5 KB (the body a hit's lookup may carry along).
ANSWER = "Step by step instructions follow, one short paragraph each. " * 22 + "For: "
# Bodies cache_lookup.lua sends along, compared (the deployment's default among them).
BODIES = (0, 1, 2)
DEFAULT_BODIES = policy.SPECULATIVE_BODIES


def questions() -> list[str]:
    return [f"How do I {v} my {t} {w}?" for v in VERBS for t in THINGS for w in WHENS]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def fake_ctx(model: Any) -> Any:
    return types.SimpleNamespace(failed=False, truncated=False, answered_by=None, model=model)


def completion(text: str, prompt: int, completion_tokens: int) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "model": "model-medium",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                           "role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt + completion_tokens}}).encode()


def chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


# ------------------------------------------------------------------ 1. lookup latency


def fill(store: RedisStore, cache: ResponseCache, config: Any, texts: list[str]) -> None:
    endpoint, model = config.endpoints[0], config.models["model-medium"]
    batch = []
    for text in texts:
        plan = cache.plan("acme", endpoint, model, chat(text), {})
        plan.captured = (False, completion(ANSWER + text, 20, 150))
        call = cache.store_call(plan, None, fake_ctx(model), Outcome(200), (20, 150))  # type: ignore[arg-type]
        batch.append(call)
        if len(batch) == 200:
            store.run_scripts(batch)
            batch = []
    if batch:
        store.run_scripts(batch)


def lookup_latency(url: str, prefix: str, entries: int, rng: random.Random) -> dict[str, Any]:
    raw = copy.deepcopy(CONFIG)
    raw["redis"] = {"url": url, "keyPrefix": prefix}
    config = load_config(raw)
    store = RedisStore(config.redis, url)
    cache = ResponseCache(config, KeySchema(prefix, 16))
    endpoint, model = config.endpoints[0], config.models["model-medium"]
    texts = questions()
    rng.shuffle(texts)
    stored = texts[:entries]
    fill(store, cache, config, stored)
    # Paraphrases that keep every word that matters ("How can I" for "How do I"), and
    # questions never stored.
    queries = [t.replace("How do I", "How can I") for t in rng.sample(stored, 100)]
    novel = [f"Why was my {t} {w} rejected?" for t in THINGS for w in WHENS]
    queries += rng.sample(novel, 100)
    rng.shuffle(queries)
    # The whole partition, for the exhaustive comparison.
    whole = cache.embedder.embed(stored)
    everything = CandidateSet(cache.embedder.embedder_id, tuple(str(i) for i in range(entries)),
                              tuple(stored), whole)
    timings: dict[int, list[float]] = {n: [] for n in BODIES}
    fetched: dict[int, int] = dict.fromkeys(BODIES, 0)
    agree = hits = exhaustive_hits = 0
    for _round in range(5):
        for text in queries:
            for bodies in BODIES:  # interleaved: the same load on each variant
                policy.SPECULATIVE_BODIES = bodies
                plan = cache.plan("acme", endpoint, model, chat(text), {})
                started = time.perf_counter()
                reply = store.run_script(*cache.lookup_call(plan))
                chosen, fields = cache.choose(plan, reply)
                if chosen is not None and fields is None:  # the fallback: one more trip
                    fields = store.run_script(*cache.fetch_call(plan, chosen))
                    if _round == 0:
                        fetched[bodies] += 1
                timings[bodies].append((time.perf_counter() - started) * 1e6)
            if _round == 0:
                best = find_match(plan.vector, text, everything, embedder=cache.embedder,
                                  threshold=cache.threshold)
                exhaustive = best is not None
                hits += chosen is not None
                exhaustive_hits += exhaustive
                agree += (chosen is not None) == exhaustive
    policy.SPECULATIVE_BODIES = DEFAULT_BODIES
    # The exact lookup inside admit.lua, against the same admission without it.
    gateway = Gateway(raw)
    admit_on, admit_off = [], []
    info = RequestInfo("POST", "/ai/chat", {"content-type": "application/json"},
                       json.dumps(chat(stored[0])).encode(), tenant_id="acme")
    off = copy.deepcopy(raw)
    off["cache"] = {"enabled": False}
    plain = Gateway(off)
    for _ in range(600):
        for gw, out in ((gateway, admit_on), (plain, admit_off)):
            plan = gw.admission.prepare(info, gw.config.endpoints[0])
            call = gw.admission.call(plan)
            started = time.perf_counter()
            gw.store.run_script(*call)
            out.append((time.perf_counter() - started) * 1e6)
            if gw is plain:  # give back the reservation
                gw.store.run_script(*gw.admission.release_call(plan))
    gateway.close()
    plain.close()
    store.close()
    return {"entries": entries,
            "latency": {n: (percentile(t, 0.5), percentile(t, 0.99)) for n, t in timings.items()},
            "fetched": fetched, "body_bytes": len(completion(ANSWER + stored[0], 20, 150)),
            "hits": hits, "exhaustive_hits": exhaustive_hits, "agree": agree,
            "queries": len(set(queries)),
            "admit_on": (percentile(admit_on[100:], 0.5), percentile(admit_on[100:], 0.99)),
            "admit_off": (percentile(admit_off[100:], 0.5), percentile(admit_off[100:], 0.99))}


# ------------------------------------------------------------------ 2. round trips


class Counted:
    """Wraps a store: counts its network round trips (a pipelined batch is one)."""

    def __init__(self, store: Any):
        self.store = store
        self.trips = 0
        run_script, run_scripts = store.run_script, store.run_scripts

        def one(*a: Any) -> Any:
            self.trips += 1
            return run_script(*a)

        def many(calls: Any) -> Any:
            self.trips += 1
            return run_scripts(calls)

        store.run_script, store.run_scripts = one, many


def round_trips(url: str, prefix: str) -> list[tuple[str, int, int]]:
    raw = copy.deepcopy(CONFIG)
    raw["redis"] = {"url": url, "keyPrefix": prefix}
    client = redis.Redis.from_url(url)
    out = []
    for enabled in (False, True):
        cfg = copy.deepcopy(raw)
        cfg["cache"]["enabled"] = enabled
        gateway = Gateway(cfg)
        counted = Counted(gateway.store)

        def ask(text: str, gateway: Gateway = gateway, tenant: str = "other") -> None:
            info = RequestInfo("POST", "/ai/chat", {"content-type": "application/json"},
                               json.dumps(chat(text)).encode(), tenant_id=tenant)
            decision = gateway.admit(info)
            if decision.allowed:
                ctx, ticket = decision.context, decision.ticket
                meter = ctx.response_meter()
                meter.start(200, "application/json")
                meter.feed(completion("Yes.", 10, 5))
                meter.finish()
                gateway.settle(ticket, meter.outcome(), ctx)

        # Scripts loaded, connections open; in another tenant (its own partitions).
        ask(f"warm up {enabled}", tenant="acme")
        ask(f"warm up {enabled}", tenant="acme")
        ask(f"warm up {enabled}, too", tenant="acme")
        steps = ([("cache off", "How do I reset my password?")] if not enabled else [
            ("exact miss, empty partition", "How do I reset my password?"),
            ("exact hit", "How do I reset my password?"),
            ("semantic miss (a new question)", "Where can I download my invoices?"),
            ("semantic hit (a paraphrase)", "How can I reset my password?")])
        for label, text in steps:
            before = int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            trips = counted.trips
            ask(text)
            after = int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            out.append((label, after - before, counted.trips - trips))
        gateway.close()
    return out


# ------------------------------------------------------------------ 3. the replay


def replay(url: str, prefix: str, rng: random.Random) -> dict[str, Any]:
    from fow_cache.data import load_questions
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ai_saas_middleware.gateway import AsyncGateway
    from ai_saas_middleware.starlette import AISaaSMiddleware

    pairs = load_questions()
    same = [p for p in pairs if p["same_answer"] and not p.get("ambiguous")]
    traps = [p for p in pairs if not (p["same_answer"] and not p.get("ambiguous"))]
    rng.shuffle(same)
    rng.shuffle(traps)
    # 400 requests: 280 new questions (200 'a' questions, 80 trap twins of earlier ones)
    # and 120 (30%) repeats and paraphrases of earlier questions, interleaved.
    # (Some fow-cache texts occur in two pairs: a text asked twice is a repeat, never
    # a "first" or a "trap"; such pairs are left out.)
    texts_a = {p["a"] for p in pairs}
    traps = [p for p in traps if p["b"] not in texts_a]
    same = [p for p in same if p["b"] not in texts_a]
    firsts = list(dict.fromkeys([p["a"] for p in same[:120]] + [p["a"] for p in traps[:80]]))
    trap_twins = [p["b"] for p in traps[:80]]
    repeats = rng.sample(firsts, 60)
    paraphrases = [p["b"] for p in same[:60]]
    early = firsts[:]
    rng.shuffle(early)
    later = trap_twins + repeats + paraphrases
    rng.shuffle(later)
    workload = [("first", t) for t in early[:100]]
    tail = [("first", t) for t in early[100:]] + [
        ("trap" if t in trap_twins else "repeat" if t in repeats else "paraphrase", t)
        for t in later]
    rng.shuffle(tail)
    # Keep every repeat or paraphrase after its original.
    asked: set[str] = {t for _, t in workload}
    pending = []
    for kind, text in tail:
        pending.append((kind, text))
    originals = {p["b"]: p["a"] for p in same[:60]} | {p["b"]: p["a"] for p in traps[:80]}
    while pending:
        for item in list(pending):
            kind, text = item
            needs = text if kind == "repeat" else originals.get(text)
            if kind == "first" or needs in asked:
                workload.append(item)
                asked.add(text)
                pending.remove(item)

    async def answer(request: Request) -> JSONResponse:
        body = await request.json()
        prompt = sum(len(m["content"]) for m in body["messages"]) // 4 + 8
        return JSONResponse(json.loads(completion("A helpful answer. " * 30, prompt, 150)))

    raw = copy.deepcopy(CONFIG)
    raw["redis"] = {"url": url, "keyPrefix": prefix}
    raw["tenants"][0]["apiKeys"] = [
        "sha256:" + __import__("hashlib").sha256(KEY.encode()).hexdigest()]
    app = Starlette(routes=[Route("/ai/chat", answer, methods=["POST"])])
    gateway = AsyncGateway(raw)
    app.add_middleware(AISaaSMiddleware, gateway=gateway)
    scripts: dict[str, int] = {}
    run_script = gateway.store.run_script

    async def counted(which: str, keys: Any, args: Any) -> Any:
        scripts[which] = scripts.get(which, 0) + 1
        return await run_script(which, keys, args)

    gateway.store.run_script = counted  # type: ignore[method-assign]
    served: dict[str, list[str]] = {"first": [], "repeat": [], "paraphrase": [], "trap": []}
    wrong: list[str] = []
    with TestClient(app) as client:
        for kind, text in workload:
            reply = client.post("/ai/chat", json=chat(text),
                                headers={"Authorization": f"Bearer {KEY}"})
            served[kind].append(reply.headers.get("x-ai-cache", ""))
            if kind == "trap" and served[kind][-1] == "hit":
                wrong.append(f"{text!r} (its twin, asked before: {originals[text]!r})")
    events = []
    rc = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [f for s in rc.scan_iter(match=f"{prefix}:*:usage") for _, f in rc.xrange(s)]
        if len(events) == len(workload):
            break
        time.sleep(0.05)
    import asyncio

    asyncio.run(gateway.close())
    saved = sum((Decimal(e.get("saved_cost", "0")) for e in events), Decimal(0))
    spent = sum((Decimal(e["cost"]) for e in events), Decimal(0))
    return {"requests": len(workload), "events": len(events), "saved": saved, "spent": spent,
            "served": {k: (v.count("hit"), len(v)) for k, v in served.items()},
            "hit_events": sum(e["cache"] == "hit" for e in events), "wrong": wrong,
            "semantic_hits": sum(e.get("cache_match") == "semantic" for e in events),
            "fetched": scripts.get("cache_fetch", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 entries only")
    args = parser.parse_args()
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = start_server()
        url = server.url
    rng = random.Random(11)
    try:
        print("## lookup latency (one tenant, one partition)\n")
        print("The semantic path until the body is in hand (lookup, scoring, and the "
              "fallback fetch when the body was not sent along), by bodies sent along.\n")
        print("| entries | bodies sent along | p50 us | p99 us | hits needing the fallback "
              "fetch | hits (bucketed) | hits (whole partition) | same verdict |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        admits = []
        for entries in ([1000] if args.quick else [1000, 10000]):
            r = lookup_latency(url, f"lat{entries}", entries, rng)
            for n in BODIES:
                p50, p99 = r["latency"][n]
                print(f"| {entries:,} | {n} | {p50:.0f} | {p99:.0f} | {r['fetched'][n]} of "
                      f"{r['hits']} | {r['hits']} of {r['queries']} | {r['exhaustive_hits']} "
                      f"| {r['agree']} of {r['queries']} |")
            admits.append((entries, r))
        print(f"\n(stored bodies: {r['body_bytes']} bytes; load average "
              f"{os.getloadavg()[0]:.1f})\n")
        print("| entries | admit + exact lookup p50 / p99 us | admit, cache off p50 / p99 us |")
        print("|---:|---:|---:|")
        for entries, r in admits:
            print(f"| {entries:,} | {r['admit_on'][0]:.0f} / {r['admit_on'][1]:.0f} | "
                  f"{r['admit_off'][0]:.0f} / {r['admit_off'][1]:.0f} |")
        print("\n## round trips per request\n")
        print("| request | EVALSHA | network round trips |")
        print("|---|---:|---:|")
        for label, evalsha, trips in round_trips(url, "rt"):
            print(f"| {label} | {evalsha} | {trips} |")
        print("\n## replay: about 400 requests, 30% repeats or paraphrases\n")
        r = replay(url, "replay", random.Random(11))  # the same workload in every run
        total = r["saved"] + r["spent"]
        print("| kind | requests | served from the cache |")
        print("|---|---:|---:|")
        for kind, (hits, count) in r["served"].items():
            print(f"| {kind} | {count} | {hits} |")
        for line in r["wrong"]:
            print(f"- trap served: {line}")
        print(f"\nusage events: {r['events']} for {r['requests']} requests, "
              f"{r['hit_events']} with cache=hit, {r['semantic_hits']} of them semantic; "
              f"semantic hits that needed the fallback fetch (cache_fetch.lua): "
              f"{r['fetched']}")
        print(f"spent ${r['spent']:f}, saved ${r['saved']:f} (sum of saved_cost): "
              f"{100 * r['saved'] / total:.1f}% of what the workload would have cost")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
