"""Done means: 16 concurrent clients in 2 processes against one tenant's token quota.

One process runs 8 threads sharing a sync ``Gateway``; the other 8 asyncio tasks sharing
an ``AsyncGateway``. The quota is small, so it runs out half way. While they run, the
test polls the tenant's counter (which holds settled tokens plus in-flight reservations)
and checks it never passes the quota; afterwards the stream must hold exactly one entry
per admitted request and its tokens must add up to the counter exactly.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import random
import threading
import time
from collections import Counter
from typing import Any

from ai_saas_middleware import AsyncGateway, Decision, Gateway, Outcome, RequestInfo

# More than either process can take alone (every request of one admitted bills 5,177 or
# 5,278 tokens, with at most 8 x 122 reserved in flight), less than both together (10,455):
# so each process gets through and the quota runs out part way, whichever starts first and
# however the machine schedules them. (At 5,000, one process alone could use it all: with
# two suites on two cores, the asyncio process was once refused every request.)
QUOTA = 7_000
CLIENTS_PER_PROCESS = 8
ATTEMPTS_PER_CLIENT = 12
PROMPT = "p" * 40  # its estimate: estimate_prompt_tokens of the body
MAX_TOKENS = 100


def _info() -> RequestInfo:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json"},
                       json.dumps(body).encode(), tenant_id="shared")


def _outcome(rng: random.Random) -> tuple[Outcome, int]:
    """What the provider did, and the tokens that must be billed for it."""
    if rng.random() < 0.15:  # the upstream call failed: nothing billed, reservation released
        return Outcome(status=502, failed=True), 0
    prompt, completion = rng.randint(10, 17), rng.randint(0, MAX_TOKENS)
    return Outcome(status=200, provider_usage=(prompt, completion)), prompt + completion


def _record(decision: Decision, billed: int, out: list[Any]) -> None:
    if decision.allowed:
        out.append(("admitted", decision.context.request_id, billed))  # type: ignore[union-attr]
    else:
        out.append(("refused", decision.error_code, 0))


def _threads(config: dict[str, Any], barrier: Any, seed: int) -> list[Any]:
    gateway = Gateway(config)
    results: list[Any] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        mine: list[Any] = []
        barrier.wait()
        for _ in range(ATTEMPTS_PER_CLIENT):
            decision = gateway.admit(_info())
            billed = 0
            if decision.allowed:
                outcome, billed = _outcome(rng)
                time.sleep(rng.random() / 500)  # the provider call
                gateway.settle(decision.ticket, outcome, decision.context)  # type: ignore[arg-type]
            _record(decision, billed, mine)
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS_PER_PROCESS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gateway.close()
    return results


async def _tasks(gateway: AsyncGateway, seed: int) -> list[Any]:
    results: list[Any] = []

    async def client(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        for _ in range(ATTEMPTS_PER_CLIENT):
            decision = await gateway.admit(_info())
            billed = 0
            if decision.allowed:
                outcome, billed = _outcome(rng)
                await asyncio.sleep(rng.random() / 500)
                await gateway.settle(decision.ticket, outcome, decision.context)  # type: ignore[arg-type]
            _record(decision, billed, results)

    await asyncio.gather(*(client(n) for n in range(CLIENTS_PER_PROCESS)))
    await gateway.close()
    return results


def client_process(style: str, config: dict[str, Any], barrier: Any, results: Any,
                   seed: int) -> None:
    try:
        if style == "threads":
            out = _threads(config, barrier, seed)
        else:  # the gateway made before the barrier, as the threads' is
            gateway = AsyncGateway(config)
            barrier.wait()
            out = asyncio.run(_tasks(gateway, seed))
        results.put((style, out))
    except BaseException as exc:  # report, so the parent fails instead of waiting
        results.put((style, f"{type(exc).__name__}: {exc}"))
        raise


def test_sixteen_clients_in_two_processes_share_one_token_quota_exactly(
        make_config: Any, events: Any, quota_used: Any) -> None:
    config = make_config(
        tenant={"tiers": [{"name": "metered", "monthlyQuota": QUOTA, "rateLimit": "unlimited",
                           "allowedModels": ["model-small"]}]},
        tenants=[{"id": "shared", "tier": "metered"}],
    )
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(CLIENTS_PER_PROCESS + 1)  # 8 threads of one, the other's main thread
    results = ctx.Queue()
    processes = [ctx.Process(target=client_process, args=(style, config, barrier, results, i))
                 for i, style in enumerate(("threads", "asyncio"))]
    for p in processes:
        p.start()

    reports: dict[str, Any] = {}
    highest = 0
    deadline = time.monotonic() + 60  # a hang guard, not a benchmark
    while len(reports) < 2 and time.monotonic() < deadline:
        highest = max(highest, quota_used("shared"))
        try:
            style, out = results.get(timeout=0.002)
        except queue.Empty:
            continue
        reports[style] = out
    for p in processes:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert len(reports) == 2, "a client process did not report back within 60s"
    for style, out in reports.items():
        assert isinstance(out, list), f"{style} process failed: {out}"

    decisions = reports["threads"] + reports["asyncio"]
    admitted = {rid: billed for kind, rid, billed in decisions if kind == "admitted"}
    refusals = Counter(code for kind, code, _ in decisions if kind == "refused")
    assert len(decisions) == 2 * CLIENTS_PER_PROCESS * ATTEMPTS_PER_CLIENT
    # Both processes got through, and the quota ran out part way.
    assert all(any(kind == "admitted" for kind, *_ in out) for out in reports.values())
    assert set(refusals) == {"quota_exceeded"}
    assert len(admitted) == len([d for d in decisions if d[0] == "admitted"])  # unique ids

    # Reservations never let the tenant past its quota, even with every client in flight.
    assert highest <= QUOTA
    stream = [e for e in events() if e["tenant_id"] == "shared"]
    assert sorted(e["request_id"] for e in stream) == sorted(admitted)  # one entry each
    billed_in_stream = {e["request_id"]: int(e["prompt_tokens"]) + int(e["completion_tokens"])
                        for e in stream}
    assert billed_in_stream == admitted
    assert sum(billed_in_stream.values()) == quota_used("shared")
    assert quota_used("shared") <= QUOTA
