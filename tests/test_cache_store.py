"""The response cache's Redis half, through the core (``Gateway``), against a real Redis:
capacity (TTL, LRU by entries and by bytes), the key layout, pipelining, the quota
switch, and the configuration (issue 11)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import API_KEYS

from ai_saas_middleware import load_config
from ai_saas_middleware.errors import ConfigError, StoreError
from ai_saas_middleware.gateway import Gateway
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.types import RequestInfo
from ai_saas_middleware.usage import meter_for


def body(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 16}


REPLY = {"id": "c", "object": "chat.completion", "model": "model-small",
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "An answer."}}],
         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


class Client:
    """A bare-core client: admit, answer REPLY, settle (as an adapter does)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def ask(self, text: str, tenant: str = "globex", headers: dict[str, str] | None = None,
            reply: dict[str, Any] = REPLY, status: int = 200, refuse_store: bool = False
            ) -> str:
        hdrs = {"authorization": f"Bearer {API_KEYS[tenant]}",
                "content-type": "application/json", **(headers or {})}
        info = RequestInfo("POST", "/ai/chat", hdrs, json.dumps(body(text)).encode())
        decision = self.gateway.admit(info)
        if not decision.allowed:
            assert decision.status == 200, decision.body
            return dict(decision.headers)["x-ai-cache"]
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        if refuse_store:
            ctx.cache.store = False  # the app says: not this answer
        meter = meter_for(ctx)
        meter.start(status, "application/json")
        meter.feed(json.dumps(reply).encode())
        meter.finish()
        self.gateway.settle(ticket, meter.outcome(), ctx)
        return dict(decision.headers).get("x-ai-cache", "")


@pytest.fixture
def make_client(make_config: Any) -> Iterator[Any]:
    made: list[Gateway] = []

    def make(**cache: Any) -> Client:
        gateway = Gateway(make_config(cache={"enabled": True, **cache}))
        made.append(gateway)
        return Client(gateway)

    yield make
    for gateway in made:
        gateway.close()


def cache_keys(rclient: redis.Redis, prefix: str) -> list[str]:
    return sorted(rclient.scan_iter(match=f"{prefix}:*:c:*", count=1000))


def test_entries_expire_after_the_ttl(make_client: Any, rclient: redis.Redis,
                                      key_prefix: str) -> None:
    # 3 s: long enough that the keys are still there when they are read just after the
    # store on a busy machine (with 1 s, CI once read a key whose TTL had rounded to 0).
    client = make_client(ttl="3s")
    assert client.ask("What is the refund window?") == "miss"
    keys = KeySchema(key_prefix, 16).tenant("globex")
    found = cache_keys(rclient, key_prefix)
    ttls = dict(zip(found, [rclient.pttl(k) for k in found], strict=True))
    [entry] = [k for k in found if ":c:e:" in k]
    assert 0 < ttls[entry] <= 3000
    assert all(0 < ms <= 63_000 for ms in ttls.values()), ("every cache key expires", ttls)
    deadline = time.monotonic() + 10
    while rclient.exists(entry) and time.monotonic() < deadline:  # Redis expires it
        time.sleep(0.02)
    assert not rclient.exists(entry)
    assert client.ask("What is the refund window?") == "miss"
    assert rclient.zcard(keys.cache_lru) == 1  # the stale record was replaced, not added


def test_lru_keeps_at_most_max_entries_and_evicts_memberships(
        make_client: Any, rclient: redis.Redis, key_prefix: str) -> None:
    client = make_client(maxEntriesPerTenant=3)
    questions = ["Where is my parcel?", "How do I change my address?",
                 "Can I pay by invoice?", "Do you ship to Norway?"]
    for q in questions[:3]:
        assert client.ask(q) == "miss"
    assert client.ask(questions[0]) == "hit"  # touched: now the most recently used
    assert client.ask(questions[3]) == "miss"  # evicts the least recently used: [1]
    keys = KeySchema(key_prefix, 16).tenant("globex")
    assert rclient.zcard(keys.cache_lru) == 3
    assert client.ask(questions[0]) == "hit"
    assert client.ask(questions[2]) == "hit"
    assert client.ask(questions[1]) == "miss"  # it was evicted (and is stored again)
    # Eviction removed the entry from its partition and its buckets too.
    members = set()
    for key in cache_keys(rclient, key_prefix):
        if ":c:p:" in key or ":c:l:" in key:
            members |= rclient.smembers(key)  # type: ignore[arg-type]
    assert members == set(rclient.zrange(keys.cache_lru, 0, -1))


def test_bytes_per_tenant_are_bounded(make_client: Any, rclient: redis.Redis,
                                      key_prefix: str) -> None:
    client = make_client(maxBytesPerTenant=8192)
    big = {**REPLY, "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "x" * 2500}}]}
    for i in range(6):
        client.ask(f"Question number {i}?", reply=big)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    held = int(rclient.get(keys.cache_bytes) or 0)
    assert 0 < held <= 8192
    assert 1 <= rclient.zcard(keys.cache_lru) < 6
    sizes = rclient.hgetall(keys.cache_sizes)
    assert sum(int(v.split()[0]) for v in sizes.values()) == held
    huge = {**big, "choices": [{**big["choices"][0], "message": {"role": "assistant",
                                                                  "content": "y" * 9000}}]}
    client.ask("A question with a huge answer?", reply=huge)
    assert client.ask("A question with a huge answer?") == "miss"  # never stored


def test_a_hit_can_count_towards_the_quota(make_client: Any, quota_used: Any) -> None:
    client = make_client(countTowardsQuota=True)
    assert client.ask("Where is my parcel?") == "miss"
    assert quota_used("globex") == 15
    assert client.ask("Where is my parcel?") == "hit"
    assert quota_used("globex") == 30  # the entry's 10 + 5 tokens, counted


def test_non_2xx_and_error_bodies_are_not_stored(make_client: Any, rclient: redis.Redis,
                                                 key_prefix: str) -> None:
    client = make_client()
    client.ask("Where is my parcel?", status=503)
    client.ask("Where is my parcel?", reply={"error": {"message": "overloaded"}})
    assert cache_keys(rclient, key_prefix) == []


def test_scripts_name_only_the_tenants_own_slot(make_client: Any, key_prefix: str) -> None:
    """Isolation by construction: every key a cache call names is under the tenant's base
    (one hash tag), so no lookup can reach another tenant's entries."""
    client = make_client()
    gateway = client.gateway
    cache = gateway.admission.cache
    schema = KeySchema(key_prefix, 16)
    for tenant in ("globex", "initech"):
        base = schema.tenant(tenant).cache_base
        plan = cache.plan(tenant, gateway.config.endpoints[1],
                          gateway.config.models["model-small"], body("Where is my parcel?"), {})
        extra_keys, _ = cache.admit_extra(plan)
        calls = [cache.lookup_call(plan), cache.fetch_call(plan, plan.entry_id)]
        named = extra_keys + [k for _, keys, _ in calls for k in keys]
        assert named and all(k.startswith(base) for k in named)
        assert all(schema.tag(schema.shard_of(tenant)) in k for k in named)
    plan_a = cache.plan("globex", gateway.config.endpoints[1],
                        gateway.config.models["model-small"], body("Hi"), {})
    plan_b = cache.plan("initech", gateway.config.endpoints[1],
                        gateway.config.models["model-small"], body("Hi"), {})
    assert plan_a.entry_id != plan_b.entry_id and plan_a.partition_id != plan_b.partition_id


def test_run_scripts_is_one_write(make_client: Any, monkeypatch: Any) -> None:
    client = make_client()
    store = client.gateway.store
    client.ask("Warm the connection and the scripts.")
    client.ask("Warm the connection and the scripts.")
    lane = store._lane
    if lane is None:
        pytest.skip("no hiredis: run_scripts falls back to one call after another")
    calls = [("release", [KeySchema(client.gateway.keys.prefix, 16).tenant("globex")
                          .reservations, "x"], ["nothing"])] * 2
    store.run_script(*calls[0])  # loaded: NOSCRIPT would run each alone, to load it
    conn = lane._idle[-1]
    writes: list[int] = []
    original = conn.send_packed_command

    def counting(commands: Any, check_health: bool = True) -> Any:
        writes.append(len(commands))
        return original(commands, check_health=check_health)

    monkeypatch.setattr(conn, "send_packed_command", counting)
    assert store.run_scripts(calls) == [0, 0]
    assert writes == [2]


# ------------------------------------------------------------------ configuration


def test_the_seed_cache_section_loads(make_config: Any) -> None:
    config = load_config(make_config(cache={"enabled": True, "ttl": 3600,
                                            "similarityThreshold": 0.85}))
    cache = config.cache
    assert (cache.enabled, cache.ttl_s, cache.similarity_threshold) == (True, 3600.0, 0.85)
    assert (cache.max_entries_per_tenant, cache.embedder, cache.count_towards_quota) == \
        (10_000, "ngram", False)


@pytest.mark.parametrize(("section", "path"), [
    ({"maxEntriesPerTenant": 0}, "cache.maxEntriesPerTenant"),
    ({"maxBytesPerTenant": "lots"}, "cache.maxBytesPerTenant"),
    ({"embedder": "gpt"}, "cache.embedder"),
    ({"countTowardsQuota": "yes"}, "cache.countTowardsQuota"),
    ({"similarityThreshold": 1.5}, "cache.similarityThreshold"),
    ({"ttl": "soon"}, "cache.ttl"),
    ({"size": 1}, "cache.size"),
])
def test_bad_cache_values_name_their_path(make_config: Any, section: dict[str, Any],
                                          path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(make_config(cache={"enabled": True, **section}))
    assert [p.path for p in caught.value.problems] == [path]


def test_endpoint_and_tier_switches_must_be_booleans(make_config: Any) -> None:
    config = make_config()
    config["endpoints"][0]["cache"] = "no"
    config["tenant"]["tiers"][0]["cache"] = 0
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert {p.path for p in caught.value.problems} == {"endpoints[0].cache",
                                                       "tenant.tiers[0].cache"}


def test_without_numpy_an_enabled_cache_fails_at_start_naming_the_extra(
        make_config: Any, monkeypatch: Any) -> None:
    for name in [m for m in sys.modules if m == "numpy" or m.startswith("numpy.")
                 or m.startswith("ai_saas_middleware.cache.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy: ImportError
    with pytest.raises(ConfigError) as caught:
        Gateway(make_config(cache={"enabled": True}))
    [problem] = caught.value.problems
    assert problem.path == "cache.enabled"
    assert "ai-saas-middleware[cache]" in problem.expected
    Gateway(make_config(cache={"enabled": False})).close()  # off: numpy never needed


async def test_async_run_scripts_is_one_write(make_config: Any, monkeypatch: Any) -> None:
    from ai_saas_middleware.gateway import AsyncGateway

    gateway = AsyncGateway(make_config(cache={"enabled": True}))
    store = gateway.store
    calls = [("release", [gateway.keys.tenant("globex").reservations, "x"], ["nothing"])] * 2
    try:
        await store.run_script(*calls[0])  # connected, scripts loaded
        lane = store._lane
        if lane is None:
            pytest.skip("no hiredis: run_scripts falls back to one call after another")
        transport = lane._transport
        writes: list[bytes] = []
        original = transport.write

        def counting(data: bytes) -> None:
            writes.append(data)
            original(data)

        monkeypatch.setattr(transport, "write", counting)
        assert await store.run_scripts(calls) == [0, 0]
        assert len(writes) == 1 and writes[0].count(b"EVALSHA") == 2
    finally:
        await gateway.close()


def test_a_hit_event_is_read_by_the_billing_worker(make_client: Any, events: Any) -> None:
    from ai_saas_middleware.billing.events import parse_entry

    client = make_client()
    client.ask("Where is my parcel?")
    assert client.ask("Where is my parcel?") == "hit"
    raw = [x for pair in events()[1].items() for x in pair]
    event = parse_entry("1-0", [v.encode() for v in raw])
    assert (event.cache, event.cost_p, event.usage_source) == ("hit", 0, "cache")
    assert event.saved_p == (10 * 150_000 + 5 * 600_000)  # picodollars, model-small's prices


def test_vectors_of_another_embedder_are_never_compared(make_client: Any) -> None:
    client = make_client()
    cache = client.gateway.admission.cache
    config = client.gateway.config
    plan = cache.plan("globex", config.endpoints[1], config.models["model-small"],
                      body("Where is my parcel?"), {})
    cache.lookup_call(plan)  # embeds
    vector = plan.vector.astype("<f4").tobytes()
    own = cache.embedder.embedder_id.encode() + b"\n" + vector + b"Where is my parcel?"
    other = b"minilm@x\n" + vector + b"Where is my parcel?"
    assert cache.choose(plan, [1, [], b"a" * 32, own]) == ("a" * 32, None)
    assert cache.choose(plan, [1, [], b"b" * 32, other]) == (None, None)
    assert cache.choose(plan, [1, [], b"c" * 32, own[:-30]]) == (None, None)  # corrupt
    # The body sent along is used only for the entry chosen.
    sent = [b"a" * 32, b"{}", b"1", b"2", b"model-small"]
    assert cache.choose(plan, [1, sent, b"a" * 32, own]) == ("a" * 32, sent[1:])
    assert cache.choose(plan, [1, [b"d" * 32, *sent[1:]], b"a" * 32, own]) == ("a" * 32, None)


@pytest.mark.parametrize("reply", [
    {"choices": []},
    {"choices": [{"message": {"role": "assistant", "content": None,
                              "tool_calls": [{"id": "t", "type": "function"}]}}]},
    {"choices": [{"message": {"content": "a"}}, {"message": {"content": "b"}}]},
])
def test_only_one_text_answer_is_stored(make_client: Any, rclient: redis.Redis,
                                        key_prefix: str, reply: dict[str, Any]) -> None:
    client = make_client()
    client.ask("Where is my parcel?", reply=reply)
    assert cache_keys(rclient, key_prefix) == []


def test_numpy_stays_out_of_the_import_path_with_the_cache_off() -> None:
    import subprocess

    code = ("import sys, ai_saas_middleware.starlette, ai_saas_middleware.flask, "
            "ai_saas_middleware.wsgi, ai_saas_middleware.gateway; "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_a_verifier_can_veto_a_semantic_match(make_client: Any) -> None:
    client = make_client()
    asked: list[tuple[str, str]] = []

    class No:
        def accepts(self, new_text: str, cached_text: str) -> bool:
            asked.append((new_text, cached_text))
            return False

    assert client.ask("How do I reset my password?") == "miss"
    client.gateway.admission.cache.verifier = No()
    assert client.ask("How can I reset my password?") == "miss"
    assert asked == [("How can I reset my password?", "How do I reset my password?")]
    assert client.ask("How do I reset my password?") == "hit"  # exact: no verifier


def test_the_app_can_refuse_to_store_an_answer(make_client: Any, rclient: redis.Redis,
                                               key_prefix: str) -> None:
    client = make_client()
    assert client.ask("Where is my parcel?", refuse_store=True) == "miss"
    assert cache_keys(rclient, key_prefix) == []
    assert client.ask("Where is my parcel?") == "miss"
    assert client.ask("Where is my parcel?") == "hit"


def test_a_large_partition_is_searched_through_its_buckets(make_client: Any,
                                                           rclient: redis.Redis,
                                                           key_prefix: str) -> None:
    """Past 64 entries a partition is no longer scored whole: among 100 near neighbours
    (they differ in a number, so none answers another) the LSH buckets find the
    paraphrase, and the guard still refuses a number that was never asked."""
    from ai_saas_middleware.cache.policy import WHOLE_PARTITION

    client = make_client()
    for n in range(1001, 1101):
        assert client.ask(f"Where is my parcel with tracking number {n}?", "initech") == "miss"
    keys = KeySchema(key_prefix, 16).tenant("initech")  # (1000 requests a minute)
    [partition] = [k for k in cache_keys(rclient, key_prefix) if ":c:p:" in k]
    assert rclient.scard(partition) == 100 > WHOLE_PARTITION
    assert client.ask("Where's my parcel with tracking number 1042?", "initech") == "hit"
    assert client.ask("Where is my parcel with the tracking number 1077?", "initech") == "hit"
    assert client.ask("Where is my parcel with tracking number 1142?", "initech") == "miss"
    assert rclient.zcard(keys.cache_lru) == 101


def test_lsh_codes_are_fixed() -> None:
    import numpy as np

    from ai_saas_middleware.cache.lsh import SignHasher

    vector = np.linspace(-1, 1, 256, dtype=np.float32)
    vector /= np.linalg.norm(vector)
    first, again = SignHasher(256, 16, 10), SignHasher(256, 16, 10)
    codes = first.codes(vector)
    assert codes == again.codes(vector) and len(codes) == 16
    assert all(len(c) == 3 and int(c, 16) < 1024 for c in codes)
    assert first.codes(-vector) != codes
    assert SignHasher(256, 16, 10).version != SignHasher(256, 16, 8).version


def test_a_semantic_lookup_that_fails_serves_a_miss(make_client: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis refusing the lookup (or the cache's own code failing) costs the request
    nothing but the hit: it is admitted and answered as a miss."""
    client = make_client()
    assert client.ask("How do I reset my password?") == "miss"
    run, tried = client.gateway._run, []

    def refusing(call: Any) -> Any:
        if call[0] == "cache_lookup":
            tried.append(call)
            raise StoreError("the lookup was refused")
        return run(call)

    monkeypatch.setattr(client.gateway, "_run", refusing)
    assert client.ask("How can I reset my password?") == "miss"  # a paraphrase: a hit else
    assert len(tried) == 1
    monkeypatch.setattr(client.gateway.admission.cache, "choose",
                        lambda *_: 1 / 0)  # a bug in the cache's own code
    monkeypatch.setattr(client.gateway, "_run", run)
    assert client.ask("How could I reset my password?") == "miss"
