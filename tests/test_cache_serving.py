"""The response cache served through every adapter, against a real Redis (issue 11).

Each test runs on Starlette, Flask, Django under WSGI and Django under ASGI, through the
contract table's drivers (``tests/test_contract.py``: the adapter's test app behind a
server of our own, under a key prefix of its own). ``replies.CHAT_CALLS`` counts the
``/ai/chat`` view's runs, so a hit is seen not to call it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import API_KEYS, BASE_CONFIG, PATIENT_REDIS, PrefixCommands, reservations_held
from replies import CHAT_CALLS
from test_contract import ADAPTERS, Driver, Reply, serve

from ai_saas_middleware.cache import policy
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import CACHE_SCRIPTS, load_script

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
TRAPS = [("Can I return an item after 30 days?", "Can I return an item after 60 days?"),
         ("Is the store open on Sunday?", "Is the store not open on Sunday?")]
SAVED = "0.0000222"  # 12 x 0.00000015 + 34 x 0.0000006: model-small, the reply's usage


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 32, **extra}


@dataclass
class Cached:
    """One adapter's app with the cache on, and what Redis holds under its prefix."""

    server: Driver
    rclient: redis.Redis
    prefix: str

    def post(self, body: Any, *, tenant: str = "globex", path: str = "/ai/chat",
             headers: dict[str, str] | None = None, hang_up_after: int | None = None
             ) -> Reply:
        sent = {"Authorization": f"Bearer {API_KEYS[tenant]}",
                "Content-Type": "application/json", **(headers or {})}
        return self.server.call("POST", path, sent, json.dumps(body).encode(), hang_up_after)

    def events(self) -> list[dict[str, str]]:
        self.server.settled()
        out: list[tuple[str, dict[str, str]]] = []
        for stream in self.rclient.scan_iter(match=f"{self.prefix}:*:usage", count=1000):
            out += self.rclient.xrange(stream)  # type: ignore[arg-type]
        return [f for _, f in sorted(out, key=lambda e: tuple(map(int, e[0].split("-"))))]

    def cache_keys(self) -> list[str]:
        self.server.settled()
        return sorted(self.rclient.scan_iter(match=f"{self.prefix}:*:c:*", count=1000))

    def entries(self, tenant: str) -> list[str]:
        base = KeySchema(self.prefix, 16).tenant(tenant).cache_base
        return [k for k in self.cache_keys() if k.startswith(base + "e:")]


@pytest.fixture
def cached(redis_server_url: str, key_prefix: str, rclient: redis.Redis, tmp_path: Path
           ) -> Callable[..., Any]:
    """``with cached(adapter, **cache_section) as app:`` the adapter's test app, cache on."""

    @contextmanager
    def make(adapter: str, **cache: Any) -> Iterator[Cached]:
        config = copy.deepcopy(BASE_CONFIG)
        config["redis"] = {"url": redis_server_url, "keyPrefix": key_prefix,
                           "spoolDir": str(tmp_path / "spool"), **PATIENT_REDIS}
        config["cache"] = {"enabled": True, **cache}
        with serve(adapter, config) as server:
            yield Cached(server, rclient, key_prefix)

    return make


def hit_event(event: dict[str, str], kind: str) -> None:
    assert (event["cache"], event["cost"], event["saved_cost"], event["cache_match"]) == \
        ("hit", "0", SAVED, kind)
    assert (event["prompt_tokens"], event["completion_tokens"], event["usage_source"],
            event["status"]) == ("0", "0", "cache", "200")


# ------------------------------------------------------------------ hits


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_exact_hit_skips_the_handler_and_bills_nothing(adapter: str, cached: Any,
                                                       quota_used: Any) -> None:
    with cached(adapter) as app:
        calls = CHAT_CALLS[0]
        first = app.post(chat(QUESTION))
        second = app.post(chat(QUESTION))
        assert (first.status, second.status) == (200, 200)
        assert first.header("x-ai-cache") == "miss" and second.header("x-ai-cache") == "hit"
        assert CHAT_CALLS[0] == calls + 1  # the view ran once
        assert json.loads(second.body) == json.loads(first.body)
        assert second.header("content-type") == "application/json"
        assert second.header("x-request-id") != first.header("x-request-id")
        assert second.header("ratelimit-remaining") == "98"  # a hit counts as a request
        miss, hit = app.events()
        assert (miss["cache"], miss["cost"], "saved_cost" in miss) == ("miss", SAVED, False)
        assert hit["request_id"] == second.header("x-request-id")
        hit_event(hit, "exact")
        assert quota_used("globex") == 46  # the miss's tokens only
        keys = KeySchema(app.prefix, 16).tenant("globex")
        assert reservations_held(app.rclient, keys) == {}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_semantic_paraphrase_hits_and_traps_miss(adapter: str, cached: Any) -> None:
    with cached(adapter) as app:
        assert app.post(chat(QUESTION)).header("x-ai-cache") == "miss"
        for stored, _trap in TRAPS:
            assert app.post(chat(stored)).header("x-ai-cache") == "miss"
        calls = CHAT_CALLS[0]
        paraphrase = app.post(chat(PARAPHRASE))
        assert paraphrase.header("x-ai-cache") == "hit", paraphrase.body
        assert CHAT_CALLS[0] == calls
        for _stored, trap in TRAPS:  # a number, a negation changed: never served
            assert app.post(chat(trap)).header("x-ai-cache") == "miss"
        assert CHAT_CALLS[0] == calls + len(TRAPS)
        events = app.events()
        hit_event(events[len(TRAPS) + 1], "semantic")
        assert [e["cache"] for e in events[len(TRAPS) + 2:]] == ["miss"] * len(TRAPS)
        keys = KeySchema(app.prefix, 16).tenant("globex")
        assert reservations_held(app.rclient, keys) == {}  # the semantic hit's released


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_streaming_request_gets_its_hit_replayed_as_sse(adapter: str, cached: Any) -> None:
    with cached(adapter) as app:
        stored = json.loads(app.post(chat(QUESTION)).body)
        reply = app.post(chat(QUESTION, stream=True, stream_options={"include_usage": True}))
        assert reply.header("x-ai-cache") == "hit"
        assert (reply.header("content-type") or "").startswith("text/event-stream")
        data = [line[6:] for line in reply.body.decode().splitlines()
                if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"])
        assert text == stored["choices"][0]["message"]["content"]
        assert chunks[1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"] == stored["usage"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_streamed_answer_is_stored_and_served_as_json(adapter: str, cached: Any) -> None:
    with cached(adapter) as app:
        streamed = app.post(chat(QUESTION, stream=True), path="/ai/stream")
        assert streamed.header("x-ai-cache") == "miss"
        assert app.entries("globex"), "a complete stream is stored"
        reply = app.post(chat(QUESTION), path="/ai/stream")
        assert reply.header("x-ai-cache") == "hit"
        completion = json.loads(reply.body)
        assert completion["choices"][0]["message"]["content"] == "Hello there, my good friend!"
        assert completion["usage"]["completion_tokens"] == 34


# ------------------------------------------------------------------ isolation


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_two_tenants_never_share_an_entry(adapter: str, cached: Any) -> None:
    with cached(adapter) as app:
        calls = CHAT_CALLS[0]
        assert app.post(chat(QUESTION), tenant="globex").header("x-ai-cache") == "miss"
        assert app.post(chat(QUESTION), tenant="initech").header("x-ai-cache") == "miss"
        assert app.post(chat(PARAPHRASE), tenant="acme").header("x-ai-cache") == "miss"
        assert CHAT_CALLS[0] == calls + 3  # each tenant's first ask reached the model
        assert app.post(chat(QUESTION), tenant="initech").header("x-ai-cache") == "hit"
        assert app.post(chat(PARAPHRASE), tenant="globex").header("x-ai-cache") == "hit"
        schema = KeySchema(app.prefix, 16)
        bases = {t: schema.tenant(t).cache_base for t in ("globex", "initech", "acme")}
        keys = app.cache_keys()
        assert keys and all(any(k.startswith(b) for b in bases.values()) for k in keys)
        for tenant, base in bases.items():
            assert len(app.entries(tenant)) == 1
            for key in keys:  # every key of a tenant carries its hash tag (its slot)
                if key.startswith(base):
                    assert key.startswith(schema.tag(schema.shard_of(tenant)) + ":t:" + tenant)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_an_earlier_turn_that_differs_never_hits(adapter: str, cached: Any) -> None:
    def conversation(first: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": first},
                             {"role": "assistant", "content": "Sure."},
                             {"role": "user", "content": QUESTION}], "max_tokens": 32}

    with cached(adapter) as app:
        assert app.post(conversation("I use the mobile app.")).header("x-ai-cache") == "miss"
        assert app.post(conversation("I use the website.")).header("x-ai-cache") == "miss"
        assert app.post(conversation("I use the website.")).header("x-ai-cache") == "hit"


# ------------------------------------------------------------------ what is not cached


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_cache_control_no_cache_and_no_store(adapter: str, cached: Any) -> None:
    with cached(adapter) as app:
        app.post(chat(QUESTION), headers={"Cache-Control": "no-store"})
        assert app.entries("globex") == []
        app.post(chat(QUESTION))
        calls = CHAT_CALLS[0]
        bypass = app.post(chat(QUESTION), headers={"Cache-Control": "no-cache"})
        assert bypass.header("x-ai-cache") == "miss" and CHAT_CALLS[0] == calls + 1
        assert app.post(chat(QUESTION)).header("x-ai-cache") == "hit"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_errors_failures_and_cut_streams_are_not_stored(adapter: str, cached: Any) -> None:
    with cached(adapter) as app:
        assert app.post(chat(QUESTION), path="/ai/upstream-down").status == 502
        app.post(chat(QUESTION), path="/ai/boom")
        app.post(chat(QUESTION), path="/ai/stream-stalls", hang_up_after=2)
        app.post(chat(QUESTION, temperature=0.7))  # not meant to repeat
        app.post({**chat(QUESTION), "tools": [{"type": "function",
                                              "function": {"name": "refund"}}]})
        assert app.entries("globex") == []
        assert [e["cache"] for e in app.events()] == ["miss"] * 5


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_cache_off_on_an_endpoint_or_tier(adapter: str, cached: Any, make_config: Any) -> None:
    with cached(adapter) as app:  # the base config's tiers and endpoints: on
        pass
    tiers = copy.deepcopy(BASE_CONFIG["tenant"])
    tiers["tiers"][1]["cache"] = False  # pro (globex)
    # (serve() builds the app from the config given: rebuilt with the tier switched off)
    config = make_config(tenant=tiers, cache={"enabled": True})
    with serve(adapter, config) as server:
        app = Cached(server, app.rclient, app.prefix)
        for _ in range(2):
            assert app.post(chat(QUESTION)).header("x-ai-cache") is None
        assert app.post(chat(QUESTION), tenant="initech").header("x-ai-cache") == "miss"
        assert app.entries("globex") == []


# ------------------------------------------------------------------ round trips


def evalsha(watch: PrefixCommands) -> int:
    watch.count()  # everything sent so far has been seen
    return sum(1 for c in watch.seen if c.startswith("EVALSHA "))


def scripts_run(watch: PrefixCommands) -> list[str]:
    """The names of the scripts run so far, in order (by their SHA-1)."""
    names = {hashlib.sha1(load_script(n).encode()).hexdigest(): n
             for n in ("admit", "settle", *CACHE_SCRIPTS)}
    watch.count()
    return [names.get(c.split()[1].strip("'\""), "?") for c in watch.seen
            if c.startswith("EVALSHA ")]


@pytest.mark.parametrize("adapter", ["starlette", "flask"])
def test_round_trips(adapter: str, cached: Any, prefix_commands: PrefixCommands) -> None:
    with cached(adapter) as app:
        app.post(chat("warm up the scripts"), tenant="initech")
        app.post(chat("warm up the scripts"), tenant="initech")
        app.post(chat("warm up the scripts, too"), tenant="initech")
        app.events()

        def run(body: dict[str, Any], tenant: str = "globex") -> list[str]:
            before = len(scripts_run(prefix_commands))
            app.post(body, tenant=tenant)
            app.events()
            return scripts_run(prefix_commands)[before:]

        # An exact miss in an empty partition: admit + (settle | store, one round trip).
        assert run(chat(QUESTION)) == ["admit", "settle", "cache_store"]
        assert run(chat(QUESTION)) == ["admit", "settle"]  # an exact hit
        # A semantic miss: + the lookup; the store rides with the settlement.
        assert run(chat("Where can I download my invoices?")) == [
            "admit", "cache_lookup", "settle", "cache_store"]
        # A semantic hit: 3 round trips: admit, the lookup (which brought the body), the
        # settlement with the entry's touch pipelined (no cache_fetch.lua).
        assert run(chat(PARAPHRASE)) == ["admit", "cache_lookup", "settle", "cache_touch"]
        assert run(chat(QUESTION, temperature=1)) == ["admit", "settle"]  # not cacheable


@pytest.mark.parametrize("adapter", ["starlette", "flask"])
def test_a_hit_whose_body_was_not_sent_along_is_fetched(
        adapter: str, cached: Any, prefix_commands: PrefixCommands,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: the lookup sends no body (as when the chosen entry is not the one
    the LSH ranks first, or its body is over the limit); cache_fetch.lua reads it."""
    monkeypatch.setattr(policy, "SPECULATIVE_BODIES", 0)
    with cached(adapter) as app:
        for text in (QUESTION, PARAPHRASE):  # the scripts loaded (a first EVALSHA fails)
            app.post(chat(text), tenant="initech")
        app.post(chat(QUESTION))
        app.events()
        before = len(scripts_run(prefix_commands))
        hit = app.post(chat(PARAPHRASE))
        app.events()
        assert hit.header("x-ai-cache") == "hit"
        assert scripts_run(prefix_commands)[before:] == [
            "admit", "cache_lookup", "cache_fetch", "settle"]
        # The one that was sent along is used, and the same answer served.
        before = len(scripts_run(prefix_commands))
        monkeypatch.setattr(policy, "SPECULATIVE_BODIES", 1)
        again = app.post(chat("How could I reset my password?"))
        app.events()
        assert again.header("x-ai-cache") == "hit" and again.body == hit.body
        assert scripts_run(prefix_commands)[before:] == [
            "admit", "cache_lookup", "settle", "cache_touch"]
        monkeypatch.setattr(policy, "SPECULATIVE_MAX_BYTES", 10)  # the body is larger
        before = len(scripts_run(prefix_commands))
        assert app.post(chat("How would I reset my password?")).body == hit.body
        app.events()
        assert "cache_fetch" in scripts_run(prefix_commands)[before:]


@pytest.mark.parametrize("adapter", ["starlette", "flask"])
def test_cache_disabled_is_todays_behaviour(adapter: str, cached: Any,
                                            prefix_commands: PrefixCommands) -> None:
    with cached(adapter, enabled=False) as app:
        app.post(chat(QUESTION))
        app.events()
        before = evalsha(prefix_commands)
        replies = [app.post(chat(QUESTION)) for _ in range(2)]
        app.events()
        assert evalsha(prefix_commands) - before == 4  # admit + settle, each
        assert all(r.header("x-ai-cache") is None for r in replies)
        assert app.cache_keys() == []
        assert all("saved_cost" not in e and e["cache"] == "miss" for e in app.events())
