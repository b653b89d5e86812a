"""The framework-agnostic core against a real Redis: admission, settlement, tenants, keys.

Scenarios that every adapter relies on run on both twins (``Gateway`` and
``AsyncGateway``) through :class:`Twin`, so the two cannot drift apart.
"""

from __future__ import annotations

import calendar
import dataclasses
import inspect
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from conftest import API_KEYS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from ai_saas_middleware import (
    AsyncGateway,
    Decision,
    Gateway,
    NoEligibleModel,
    Outcome,
    QuotaExceeded,
    RateLimited,
    RequestInfo,
    UnknownTenant,
    load_config,
)
from ai_saas_middleware.cli import main
from ai_saas_middleware.errors import AISaaSError, NoHealthyModel
from ai_saas_middleware.estimate import estimate_prompt_tokens, estimate_tokens
from ai_saas_middleware.store.redis import RedisStore
from ai_saas_middleware.tenants import TenantAdmin

EVENT_FIELDS = {"request_id", "tenant_id", "tier", "model_id", "provider", "prompt_tokens",
                "completion_tokens", "usage_source", "cost", "latency_ms", "status", "cache",
                "fallback_from", "outcome_value", "ts"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def chat(text: str = "Summarise this contract.", max_tokens: int | None = 100,
         **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def prompt_of(text: str = "Summarise this contract.") -> int:
    """The prompt estimate admission reserves for ``chat(text)``."""
    return estimate_prompt_tokens(chat(text))


def request(tenant: str | None = "acme", body: Any = None, *, path: str = "/ai/chat",
            key: str | None = None, headers: dict[str, str] | None = None,
            tenant_id: str | None = None, raw: bytes | None = None) -> RequestInfo:
    hdrs = {"content-type": "application/json"}
    if key is None and tenant is not None:
        key = API_KEYS[tenant]
    if key is not None:
        hdrs["authorization"] = f"Bearer {key}"
    hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
    payload = raw if raw is not None else json.dumps(chat() if body is None else body).encode()
    return RequestInfo("POST", path, hdrs, payload, tenant_id=tenant_id)


def header(decision: Decision, name: str) -> str | None:
    return dict(decision.headers).get(name)


def error_of(decision: Decision) -> dict[str, str]:
    assert not decision.allowed
    assert header(decision, "content-type") == "application/json"
    return json.loads(decision.body)["error"]  # type: ignore[no-any-return]


def this_month() -> str:
    return time.strftime("%Y-%m", time.gmtime())


def seconds_to_next_month() -> int:
    now = time.gmtime()
    year, month = (now.tm_year + 1, 1) if now.tm_mon == 12 else (now.tm_year, now.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) - int(time.time())


class Twin:
    """A Gateway or an AsyncGateway behind one awaitable interface."""

    def __init__(self, gateway: Gateway | AsyncGateway):
        self.gateway = gateway
        self.kind = "async" if isinstance(gateway, AsyncGateway) else "sync"

    @staticmethod
    async def _done(result: Any) -> Any:
        return await result if inspect.isawaitable(result) else result

    async def admit(self, info: RequestInfo) -> Decision:
        return await self._done(self.gateway.admit(info))  # type: ignore[no-any-return]

    async def settle(self, decision: Decision, outcome: Outcome, *,
                     with_context: bool = True) -> None:
        assert decision.ticket is not None
        ctx = decision.context if with_context else None
        await self._done(self.gateway.settle(decision.ticket, outcome, ctx))

    async def close(self) -> None:
        await self._done(self.gateway.close())


@pytest.fixture(params=["sync", "async"])
async def make_twin(request: pytest.FixtureRequest, make_config: Callable[..., dict[str, Any]]
                    ) -> AsyncIterator[Callable[..., Twin]]:
    made: list[Twin] = []

    def make(**overrides: Any) -> Twin:
        cls = Gateway if request.param == "sync" else AsyncGateway
        twin = Twin(cls(make_config(**overrides)))
        made.append(twin)
        return twin

    yield make
    for twin in made:
        await twin.close()


@pytest.fixture
def gateway(make_config: Callable[..., dict[str, Any]]) -> Any:
    gw = Gateway(make_config())
    yield gw
    gw.close()


@pytest.fixture
def admin(make_config: Callable[..., dict[str, Any]]) -> Any:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    yield TenantAdmin(config, store)
    store.close()


def keys_under(rclient: redis.Redis, prefix: str) -> list[str]:
    return sorted(rclient.scan_iter(match=f"{prefix}:*", count=1000))


# --------------------------------------------------------------------------- admit and settle


async def test_admit_then_settle_writes_one_exact_event(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any) -> None:
    twin = make_twin()

    decision = await twin.admit(request("globex", chat("x" * 40, max_tokens=600)))

    assert decision.allowed and decision.status == 200
    ctx = decision.context
    assert ctx is not None and ctx.tenant_id == "globex" and ctx.tier == "pro"
    assert ctx.model.id == "model-small"  # the cheapest of the pro tier
    assert header(decision, "x-request-id") == ctx.request_id
    assert header(decision, "x-ai-model") == "model-small"
    assert header(decision, "ratelimit-limit") == "100"
    assert header(decision, "ratelimit-remaining") == "99"
    # Reserved: the estimated prompt + max_tokens.
    assert quota_used("globex") == prompt_of("x" * 40) + 600

    await twin.settle(decision, Outcome(status=200, provider_usage=(1234, 567)))

    assert quota_used("globex") == 1234 + 567
    (event,) = events()
    assert EVENT_FIELDS <= set(event)
    assert event["request_id"] == ctx.request_id
    assert (event["tenant_id"], event["tier"]) == ("globex", "pro")
    assert (event["model_id"], event["provider"]) == ("model-small", "openai")
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("1234", "567")
    assert event["usage_source"] == "provider"
    assert event["cost"] == "0.0005253"  # 1234 * 0.00000015 + 567 * 0.0000006, exactly
    assert event["status"] == "200"
    assert event["cache"] == "miss"
    assert event["fallback_from"] == "" and event["outcome_value"] == ""
    assert ISO_UTC.match(event["ts"])
    assert int(event["latency_ms"]) >= 0


async def test_event_time_is_the_admission_time_to_the_millisecond_in_any_order(
        make_twin: Callable[..., Twin], events: Any) -> None:
    """Settlements finish out of order and across second (and year) boundaries; each
    event's ts is its own admission time, in ISO-8601 UTC with milliseconds."""
    twin = make_twin()
    admitted = [1798761599999, 1798761600000, 1798761599000, 1798761600001, 1798761599999]
    for ms in admitted:
        decision = await twin.admit(request("globex", chat("hi")))
        assert decision.ticket is not None
        moved = dataclasses.replace(decision.ticket, admitted_ms=ms)
        await twin.settle(dataclasses.replace(decision, ticket=moved),
                          Outcome(status=200, provider_usage=(1, 1)), with_context=False)
    expected = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
                + f".{ms % 1000:03d}Z" for ms in admitted]
    assert [e["ts"] for e in events()] == expected
    assert expected[:2] == ["2026-12-31T23:59:59.999Z", "2027-01-01T00:00:00.000Z"]


async def test_eleventh_request_in_a_minute_on_a_10_per_minute_tier_is_refused(
        make_twin: Callable[..., Twin], quota_used: Any) -> None:
    twin = make_twin()
    remaining = []
    for _ in range(10):
        decision = await twin.admit(request("acme", chat(max_tokens=10)))
        assert decision.allowed
        remaining.append(header(decision, "ratelimit-remaining"))
    used = quota_used("acme")

    refused = await twin.admit(request("acme", chat(max_tokens=10)))

    assert remaining == [str(n) for n in range(9, -1, -1)]
    assert refused.status == 429
    error = error_of(refused)
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert "10 requests per minute" in error["message"]
    retry_after = int(header(refused, "retry-after") or 0)
    assert 1 <= retry_after <= 60
    assert refused.retry_after_s == retry_after
    assert header(refused, "ratelimit-limit") == "10"
    assert header(refused, "ratelimit-remaining") == "0"
    assert header(refused, "ratelimit-reset") == str(retry_after)  # when a slot frees
    assert header(refused, "ratelimit-policy") == "10;w=60"
    assert quota_used("acme") == used  # a refused request reserves nothing
    # Another tenant is not affected.
    assert (await twin.admit(request("globex"))).allowed


async def test_quota_refusal_says_when_the_next_utc_month_starts(
        make_twin: Callable[..., Twin], quota_used: Any) -> None:
    twin = make_twin()
    first = await twin.admit(request("acme", chat(max_tokens=9_000)))
    assert first.allowed
    used = quota_used("acme")

    refused = await twin.admit(request("acme", chat(max_tokens=2_000)))

    assert refused.status == 429
    error = error_of(refused)
    assert error["code"] == "quota_exceeded"
    assert error["type"] == "insufficient_quota"
    retry_after = int(header(refused, "retry-after") or 0)
    assert abs(retry_after - seconds_to_next_month()) <= 5
    assert header(refused, "ratelimit-limit") == "10000"
    assert header(refused, "ratelimit-remaining") == str(10_000 - used)
    assert quota_used("acme") == used
    # A request that still fits is admitted.
    assert (await twin.admit(request("acme", chat(max_tokens=10_000 - used - 20)))).allowed


async def test_reservation_uses_max_tokens_or_the_endpoint_default(
        make_twin: Callable[..., Twin], quota_used: Any) -> None:
    twin = make_twin()
    prompt = prompt_of("y" * 20)

    await twin.admit(request("globex", chat("y" * 20, max_tokens=None)))
    assert quota_used("globex") == prompt + 256  # /ai/* defaultMaxOutputTokens

    await twin.admit(request("globex", chat("y" * 20, max_tokens=None,
                                            max_completion_tokens=77)))
    assert quota_used("globex") == 2 * prompt + 256 + 77

    await twin.admit(request("globex", chat("y" * 20, max_tokens=None), path="/ai/premium"))
    assert quota_used("globex") == 3 * prompt + 256 + 77 + 512  # the built-in default


async def test_after_settling_the_counter_equals_the_tokens_in_the_stream(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any) -> None:
    twin = make_twin()
    usages = [(10, 5), (300, 0), (0, 0), (40, 900)]  # the last exceeds its reservation
    decisions = [await twin.admit(request("globex", chat(max_tokens=100))) for _ in usages]

    for decision, usage in zip(decisions, usages, strict=True):
        await twin.settle(decision, Outcome(status=200, provider_usage=usage))

    stream = events()
    assert len(stream) == len(usages)
    in_stream = sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in stream)
    assert in_stream == sum(p + c for p, c in usages)
    assert quota_used("globex") == in_stream


@pytest.mark.parametrize("outcome", [
    Outcome(status=502, failed=True),
    Outcome(status=503),
    Outcome(status=500, failed=True, disconnected=True),
], ids=["failed", "5xx", "failed-and-gone"])
async def test_a_failed_upstream_call_releases_its_reservation_and_still_writes_one_event(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any, outcome: Outcome) -> None:
    twin = make_twin()
    settled = await twin.admit(request("globex"))
    await twin.settle(settled, Outcome(status=200, provider_usage=(20, 30)))
    decision = await twin.admit(request("globex", chat(max_tokens=500)))
    assert quota_used("globex") > 50

    await twin.settle(decision, outcome)

    assert quota_used("globex") == 50
    failed = [e for e in events() if e["request_id"] == decision.context.request_id]  # type: ignore[union-attr]
    assert len(failed) == 1
    assert failed[0]["status"] == str(outcome.status)
    assert (failed[0]["prompt_tokens"], failed[0]["completion_tokens"]) == ("0", "0")
    assert failed[0]["cost"] == "0"


async def test_a_stream_cut_off_half_way_bills_what_was_produced(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any) -> None:
    twin = make_twin()
    decision = await twin.admit(request("globex", chat("z" * 40, max_tokens=500)))

    await twin.settle(decision, Outcome(status=200, completion_chars=41, disconnected=True))

    (event,) = events()
    assert event["usage_source"] == "estimate"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (
        str(prompt_of("z" * 40)), str(estimate_tokens(41)))
    assert event["client_disconnected"] == "true"
    assert quota_used("globex") == prompt_of("z" * 40) + estimate_tokens(41)


async def test_usage_precedence_handler_then_provider_then_estimate(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any) -> None:
    twin = make_twin()
    handler = await twin.admit(request("globex"))
    provider = await twin.admit(request("globex"))
    estimate = await twin.admit(request("globex", chat("q" * 80)))
    assert handler.context is not None
    handler.context.record_usage(11, 22, outcome_value="0.50")

    await twin.settle(handler, Outcome(status=200, provider_usage=(333, 444)))
    await twin.settle(provider, Outcome(status=200, provider_usage=(333, 444)))
    await twin.settle(estimate, Outcome(status=200, completion_chars=10))

    by_id = {e["request_id"]: e for e in events()}
    got = [by_id[d.context.request_id] for d in (handler, provider, estimate)]  # type: ignore[union-attr]
    assert [(e["usage_source"], e["prompt_tokens"], e["completion_tokens"]) for e in got] == [
        ("handler", "11", "22"), ("provider", "333", "444"),
        ("estimate", str(prompt_of("q" * 80)), str(estimate_tokens(10)))]
    assert got[0]["outcome_value"] == "0.50"
    assert quota_used("globex") == 33 + 777 + prompt_of("q" * 80) + estimate_tokens(10)


async def test_settling_the_same_ticket_twice_counts_once(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any) -> None:
    twin = make_twin()
    decision = await twin.admit(request("globex"))

    await twin.settle(decision, Outcome(status=200, provider_usage=(5, 6)))
    await twin.settle(decision, Outcome(status=200, provider_usage=(5, 6)))

    assert len(events()) == 1
    assert quota_used("globex") == 11


async def test_an_unlimited_tier_is_never_refused_for_tokens_but_still_counted(
        make_twin: Callable[..., Twin], quota_used: Any) -> None:
    twin = make_twin()

    decisions = [await twin.admit(request("initech", chat(max_tokens=100_000)))
                 for _ in range(3)]

    assert all(d.allowed for d in decisions)
    for decision in decisions:
        await twin.settle(decision, Outcome(status=200, provider_usage=(100, 99_000)))
    assert quota_used("initech") == 3 * 99_100


async def test_model_selection_follows_the_request_needs(make_twin: Callable[..., Twin]) -> None:
    twin = make_twin()

    cheapest = await twin.admit(request("acme"))
    tightened = await twin.admit(request("acme", headers={"X-AI-Min-Quality": "0.6"}))
    premium = await twin.admit(request("globex", path="/ai/premium",
                                       headers={"X-AI-Min-Quality": "0.1"}))
    asked = await twin.admit(request("globex", chat(model="model-medium")))

    assert header(cheapest, "x-ai-model") == "model-fast"
    assert header(tightened, "x-ai-model") == "model-small"
    assert header(premium, "x-ai-model") == "model-large"  # a request cannot loosen its endpoint
    assert header(asked, "x-ai-model") == "model-medium"
    assert [m.id for m in premium.context.candidates] == ["model-large", "model-medium"]  # type: ignore[union-attr]


async def test_no_eligible_model_is_a_422_naming_the_requirement(
        make_twin: Callable[..., Twin], quota_used: Any) -> None:
    twin = make_twin()

    quality = await twin.admit(request("acme", path="/ai/premium"))
    not_allowed = await twin.admit(request("acme", chat(model="model-large")))

    assert quality.status == 422
    message = error_of(quality)["message"]
    assert error_of(quality)["code"] == "no_eligible_model"
    assert "model-small: quality 0.62 < required 0.8" in message
    assert "model-fast: quality 0.55 < required 0.8" in message
    assert "model-large: not allowed on tier 'free'" in error_of(not_allowed)["message"]
    assert quota_used("acme") == 0  # refused before anything was reserved


@pytest.mark.parametrize(("info", "status", "code"), [
    (request("acme", raw=b'{"messages": [}'), 400, "invalid_json"),
    (request("acme", raw=b"[1, 2]"), 400, "invalid_json"),
    (request("acme", raw=b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json"),
    (request("acme", raw=b"hello", headers={"content-type": "text/plain"}), 415,
     "unsupported_media_type"),
    (request("acme", chat(max_tokens=None) | {"max_tokens": "many"}), 400,
     "invalid_request"),
    (request("acme", chat(max_tokens=0)), 400, "invalid_request"),
    (request("acme", headers={"X-AI-Min-Quality": "high"}), 400, "invalid_request"),
    (request(None), 401, "missing_api_key"),
    (request(None, key="not-a-key"), 401, "invalid_api_key"),
    (request(None, key="ais_" + "0" * 32 + "_evil:{s1}*"), 401, "invalid_api_key"),
], ids=["bad-json", "json-list", "deeply-nested", "text-plain", "max-tokens-text", "max-tokens-0",
        "bad-quality-header", "no-key", "unknown-key", "stored-key-bad-tenant"])
async def test_bad_requests_get_the_documented_error_and_touch_no_key(
        make_twin: Callable[..., Twin], rclient: redis.Redis, key_prefix: str,
        info: RequestInfo, status: int, code: str) -> None:
    twin = make_twin()

    decision = await twin.admit(info)

    assert decision.status == status
    error = error_of(decision)
    assert error["code"] == code
    assert error["message"]
    assert "not-a-key" not in error["message"]
    assert keys_under(rclient, key_prefix) == []


# --------------------------------------------------------------------------- tenant ids and keys


@pytest.mark.parametrize("evil", ["a:b", "acme}:{s0", "*", "t:{x}:*", "", "x" * 65, "a\nb"])
async def test_a_trusted_tenant_header_full_of_key_syntax_is_refused_before_any_key(
        make_twin: Callable[..., Twin], rclient: redis.Redis, key_prefix: str,
        evil: str) -> None:
    twin = make_twin(http={"tenantHeader": "X-Tenant-ID"})

    decision = await twin.admit(request(None, headers={"X-Tenant-ID": evil}))

    assert decision.status == 401
    assert error_of(decision)["code"] == "invalid_tenant_id"
    assert keys_under(rclient, key_prefix) == []


async def test_a_trusted_tenant_header_names_the_tenant(make_twin: Callable[..., Twin]) -> None:
    twin = make_twin(http={"tenantHeader": "X-Tenant-ID"})

    decision = await twin.admit(request(None, headers={"X-Tenant-ID": "globex"}))

    assert decision.allowed and decision.context.tenant_id == "globex"  # type: ignore[union-attr]


async def test_a_tenant_header_is_ignored_unless_the_deployment_trusts_it(
        make_twin: Callable[..., Twin]) -> None:
    twin = make_twin()

    decision = await twin.admit(request("acme", headers={"X-Tenant-ID": "initech"}))

    assert decision.context.tenant_id == "acme"  # type: ignore[union-attr]


@pytest.mark.parametrize("evil", ["a:b", "{s3}", "acme*", "x" * 65])
async def test_a_resolver_tenant_id_full_of_key_syntax_is_refused_before_any_key(
        make_twin: Callable[..., Twin], rclient: redis.Redis, key_prefix: str,
        evil: str) -> None:
    twin = make_twin()

    decision = await twin.admit(request(None, tenant_id=evil))

    assert error_of(decision)["code"] == "invalid_tenant_id"
    assert keys_under(rclient, key_prefix) == []


async def test_every_key_of_a_tenant_shares_one_hash_tag_with_its_stream(
        make_twin: Callable[..., Twin], rclient: redis.Redis, key_prefix: str,
        admin: TenantAdmin) -> None:
    twin = make_twin()
    stored_key = admin.add("stored-co", "pro")
    tenants = {"acme": request("acme"), "globex": request("globex"),
               "initech": request("initech"), "stored-co": request(None, key=stored_key)}
    for info in tenants.values():
        decision = await twin.admit(info)
        assert decision.allowed
        await twin.settle(decision, Outcome(status=200, provider_usage=(1, 1)))

    # (The deployment's own keys, breakers, price book and statistics, hold no tenant's
    # data and have tags of their own.)
    all_keys = [k for k in keys_under(rclient, key_prefix)
                if not k.startswith((f"{key_prefix}:{{stats}}", f"{key_prefix}:{{breakers}}",
                                     f"{key_prefix}:{{models}}"))]
    tag_re = re.compile(rf"^{key_prefix}:\{{s(\d+)\}}:")
    assert all(tag_re.match(k) and 0 <= int(tag_re.match(k).group(1)) < 16  # type: ignore[union-attr]
               for k in all_keys)
    for tenant in tenants:
        own = [k for k in all_keys if f":t:{tenant}:" in k]
        tags = {tag_re.match(k).group(1) for k in own}  # type: ignore[union-attr]
        assert len(tags) == 1, own
        (shard,) = tags
        stream = f"{key_prefix}:{{s{shard}}}:usage"
        assert rclient.type(stream) == "stream"
        assert any(e["tenant_id"] == tenant for _, e in rclient.xrange(stream))
        # One cluster slot for everything a tenant's scripts touch.
        assert len({key_slot(k.encode()) for k in [*own, stream]}) == 1
        month = this_month()
        assert f"{key_prefix}:{{s{shard}}}:t:{tenant}:q:{month}" in own
    streams = [k for k in all_keys if k.endswith(":usage")]
    assert all(re.fullmatch(rf"{key_prefix}:\{{s\d+\}}:usage", s) for s in streams)


# --------------------------------------------------------------------------- stored tenants


async def test_stored_tenant_key_works_and_revoking_it_takes_effect_at_once(
        make_twin: Callable[..., Twin], admin: TenantAdmin) -> None:
    twin = make_twin()
    key = admin.add("newco", "free", stripe_customer_id="cus_new")

    admitted = await twin.admit(request(None, key=key))
    admin.revoke_key(key)
    revoked = await twin.admit(request(None, key=key))

    assert admitted.allowed
    assert (admitted.context.tenant_id, admitted.context.tier) == ("newco", "free")  # type: ignore[union-attr]
    assert revoked.status == 401
    assert error_of(revoked)["code"] == "revoked_api_key"
    assert admin.get("newco").revoked_keys == 1
    assert admin.get("newco").stripe_customer_id == "cus_new"


async def test_a_well_formed_key_with_the_wrong_secret_is_refused(
        make_twin: Callable[..., Twin], admin: TenantAdmin) -> None:
    twin = make_twin()
    key = admin.add("newco", "free")
    forged = "ais_" + secrets.token_hex(16) + "_newco"
    ghost = "ais_" + secrets.token_hex(16) + "_ghost"

    assert (await twin.admit(request(None, key=key))).allowed
    for wrong in (forged, ghost):
        decision = await twin.admit(request(None, key=wrong))
        assert decision.status == 401
        assert error_of(decision)["code"] == "invalid_api_key"


async def test_set_tier_applies_to_the_next_request(
        make_twin: Callable[..., Twin], admin: TenantAdmin, quota_used: Any) -> None:
    twin = make_twin()
    key = admin.add("newco", "free")
    before = await twin.admit(request(None, key=key))
    assert header(before, "ratelimit-limit") == "10"

    admin.set_tier("newco", "pro")
    after = await twin.admit(request(None, key=key))

    # The process still believed 'free': admit.lua answers the mismatch and admission reruns.
    assert after.allowed
    assert after.context.tier == "pro"  # type: ignore[union-attr]
    assert header(after, "ratelimit-limit") == "100"
    assert after.context.model.id == "model-small"  # type: ignore[union-attr]
    assert quota_used("newco") == 2 * (prompt_of() + 100)


async def test_a_resolver_may_name_a_stored_tenant(
        make_twin: Callable[..., Twin], admin: TenantAdmin) -> None:
    twin = make_twin()
    admin.add("newco", "pro")

    known = await twin.admit(request(None, tenant_id="newco"))
    unknown = await twin.admit(request(None, tenant_id="nobody"))

    assert known.allowed and known.context.tier == "pro"  # type: ignore[union-attr]
    assert unknown.status == 401 and error_of(unknown)["code"] == "unknown_tenant"


def test_tenant_admin_refuses_bad_input(admin: TenantAdmin) -> None:
    admin.add("newco", "free")

    with pytest.raises(AISaaSError, match="already exists"):
        admin.add("newco", "free")
    with pytest.raises(AISaaSError, match="tier must be one of"):
        admin.add("other", "gold")
    with pytest.raises(AISaaSError, match="configuration file"):
        admin.add("acme", "free")
    with pytest.raises(AISaaSError, match="tenant id"):
        admin.add("a:{b}", "free")
    with pytest.raises(UnknownTenant):
        admin.set_tier("ghost", "pro")
    with pytest.raises(AISaaSError, match="no active key"):
        admin.revoke_key("ais_" + "0" * 32 + "_newco")


def test_tenants_cli(tmp_path: Path, make_config: Callable[..., dict[str, Any]],
                     redis_server_url: str, capsys: pytest.CaptureFixture[str],
                     gateway: Gateway) -> None:
    config = tmp_path / "ai-saas-config.yaml"
    config.write_text(yaml.safe_dump(make_config()), "utf-8")
    common = ["--config", str(config), "--redis-url", redis_server_url]

    assert main(["tenants", "add", "cli-co", "--tier", "free", *common]) == 0
    out = capsys.readouterr().out
    key = re.search(r"(ais_[0-9a-f]{32}_cli-co)", out).group(1)  # type: ignore[union-attr]
    assert gateway.admit(request(None, key=key)).context.tier == "free"  # type: ignore[union-attr]

    assert main(["tenants", "list", *common]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"cli-co\s+free\s+active\s+1/0", listing)
    assert re.search(r"globex\s+pro", listing)  # config tenants are listed too

    assert main(["tenants", "set-tier", "cli-co", "pro", *common]) == 0
    capsys.readouterr()
    assert gateway.admit(request(None, key=key)).context.tier == "pro"  # type: ignore[union-attr]

    assert main(["tenants", "revoke-key", key, *common]) == 0
    assert "revoked" in capsys.readouterr().out
    assert error_of(gateway.admit(request(None, key=key)))["code"] == "revoked_api_key"
    assert main(["tenants", "list", *common]) == 0
    assert re.search(r"cli-co\s+pro\s+active\s+0/1", capsys.readouterr().out)


@pytest.mark.parametrize("argv", [
    ["tenants", "add", "cli-co", "--tier", "gold"],
    ["tenants", "add", "bad:{id}", "--tier", "free"],
    ["tenants", "set-tier", "ghost", "pro"],
    ["tenants", "revoke-key", "not-a-stored-key"],
])
def test_tenants_cli_errors_are_one_line_without_a_traceback(
        tmp_path: Path, make_config: Callable[..., dict[str, Any]], redis_server_url: str,
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    config = tmp_path / "ai-saas-config.yaml"
    config.write_text(yaml.safe_dump(make_config()), "utf-8")

    code = main([*argv, "--config", str(config), "--redis-url", redis_server_url])

    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("ai-saas: ") and err.count("\n") == 1
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------- background jobs


def test_request_context_manager_admits_records_and_settles(
        gateway: Gateway, events: Any, quota_used: Any) -> None:
    with gateway.request(tenant_id="globex", endpoint="/ai/summarise",
                         body=chat(max_tokens=50)) as ctx:
        assert (ctx.tenant_id, ctx.tier, ctx.model.id) == ("globex", "pro", "model-small")
        assert ctx.max_output_tokens == 50
        ctx.record_usage(120, 30)

    (event,) = events()
    assert event["request_id"] == ctx.request_id
    assert event["usage_source"] == "handler"
    assert event["endpoint"] == "/ai/*"
    assert quota_used("globex") == 150


async def test_async_request_context_manager_admits_records_and_settles(
        make_config: Callable[..., dict[str, Any]], events: Any, quota_used: Any) -> None:
    gateway = AsyncGateway(make_config())
    try:
        async with gateway.request(tenant_id="globex", body=chat(max_tokens=50)) as ctx:
            answer = await ctx.aexecute(_answer)
            ctx.record_usage(7, 8)
    finally:
        await gateway.close()

    assert answer == "model-small says hi"
    (event,) = events()
    assert (event["request_id"], event["usage_source"]) == (ctx.request_id, "handler")
    assert quota_used("globex") == 15


async def _answer(model: Any) -> str:
    return f"{model.id} says hi"


def test_a_job_that_raises_releases_its_reservation_and_writes_its_event(
        gateway: Gateway, events: Any, quota_used: Any) -> None:
    with pytest.raises(ZeroDivisionError):
        with gateway.request(tenant_id="globex", body=chat(max_tokens=900)):
            assert quota_used("globex") > 900
            1 / 0  # noqa: B018 - the job fails

    assert quota_used("globex") == 0
    (event,) = events()
    assert event["status"] == "500"
    assert event["cost"] == "0"


async def test_an_async_job_that_raises_releases_its_reservation(
        make_config: Callable[..., dict[str, Any]], events: Any, quota_used: Any) -> None:
    gateway = AsyncGateway(make_config())
    try:
        with pytest.raises(RuntimeError):
            async with gateway.request(tenant_id="globex", body=chat(max_tokens=900)):
                raise RuntimeError("provider down")
    finally:
        await gateway.close()

    assert quota_used("globex") == 0
    assert len(events()) == 1


def test_request_raises_the_refusal(gateway: Gateway) -> None:
    for _ in range(10):
        with gateway.request(tenant_id="acme", body=chat(max_tokens=10)):
            pass

    with pytest.raises(RateLimited) as limited:
        with gateway.request(tenant_id="acme"):
            pytest.fail("a refused job must not run")
    with pytest.raises(QuotaExceeded) as quota:
        with gateway.request(tenant_id="globex", body=chat(max_tokens=100_001)):
            pytest.fail("a refused job must not run")
    with pytest.raises(NoEligibleModel, match=r"quality 0\.62 < required 0\.8"):
        with gateway.request(tenant_id="acme", endpoint="/ai/premium"):
            pytest.fail("a refused job must not run")
    with pytest.raises(UnknownTenant):
        with gateway.request(tenant_id="a:{b}*"):
            pytest.fail("a refused job must not run")
    with pytest.raises(ValueError, match="matches no configured endpoint"):
        with gateway.request(tenant_id="acme", endpoint="/health"):
            pytest.fail("a refused job must not run")

    assert 1 <= limited.value.retry_after_s <= 60
    assert limited.value.decision.error_code == "rate_limit_exceeded"
    assert quota.value.decision.error_code == "quota_exceeded"
    assert quota.value.retry_after_s > 0


async def test_async_request_raises_the_refusal(
        make_config: Callable[..., dict[str, Any]]) -> None:
    gateway = AsyncGateway(make_config())
    try:
        with pytest.raises(NoEligibleModel):
            async with gateway.request(tenant_id="acme", body=chat(model="model-large")):
                pytest.fail("a refused job must not run")
        with pytest.raises(QuotaExceeded):
            async with gateway.request(tenant_id="acme", body=chat(max_tokens=10_001)):
                pytest.fail("a refused job must not run")
    finally:
        await gateway.close()


# --------------------------------------------------------------------------- months and matching


def test_admit_lua_answers_the_servers_month_when_the_caller_expects_another(
        gateway: Gateway, rclient: redis.Redis, key_prefix: str) -> None:
    keys = gateway.keys.tenant("acme")
    argv = ["req_month", "1999-12", "static", "", "free", 10, 60_000, 10_000, 100, 60,
            944006400, 946684800]  # December 1999's bounds

    reply = gateway.store.run_script("admit", [keys.rate_limit, keys.quota("1999-12"),
                                               keys.record, keys.api_keys], argv)

    assert reply[0] == 5
    assert reply[2].decode() == this_month()
    assert abs(int(reply[1]) / 1000 - time.time()) < 60
    assert keys_under(rclient, key_prefix) == []  # nothing counted against any month


@pytest.mark.parametrize(("year", "month"), [(2026, 11), (2026, 12), (2027, 1), (2028, 2)])
def test_a_months_bounds_are_its_first_utc_second_and_the_next_months(year: int,
                                                                      month: int) -> None:
    """The bounds admit.lua checks the server's clock against (December runs into the
    next year; a leap February ends on the 29th)."""
    from datetime import datetime, timezone

    from ai_saas_middleware.admission import month_bounds

    name, start, end = month_bounds(year, month)
    first = datetime(year, month, 1, tzinfo=timezone.utc)
    following = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=timezone.utc)
    assert (name, start, end) == (f"{year}-{month:02d}", int(first.timestamp()),
                                  int(following.timestamp()))


def test_an_app_server_clock_in_another_month_is_corrected_by_redis(
        gateway: Gateway, quota_used: Any, events: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ai_saas_middleware.admission as plans  # where a plan reads the clock's month

    monkeypatch.setattr(plans, "_this_month", lambda: ("1999-12", 944006400, 946684800))

    decision = gateway.admit(request("globex"))
    assert decision.allowed
    assert decision.ticket.month == this_month()  # type: ignore[union-attr]
    gateway.settle(decision.ticket, Outcome(status=200, provider_usage=(3, 4)),  # type: ignore[arg-type]
                   decision.context)

    assert quota_used("globex") == 7
    assert len(events()) == 1


def test_first_matching_endpoint_wins_and_other_paths_are_not_ai(gateway: Gateway) -> None:
    premium = gateway.endpoint_for("POST", "/ai/premium-chat")
    plain = gateway.endpoint_for("POST", "/ai/chat")

    assert premium is not None and premium.required_quality == 0.8
    assert plain is not None and plain.default_max_output_tokens == 256
    assert gateway.endpoint_for("GET", "/health") is None
    with pytest.raises(ValueError, match="not an AI endpoint"):
        gateway.admit(RequestInfo("GET", "/health", {}))


async def test_settle_needs_only_the_ticket_and_the_outcome(
        make_twin: Callable[..., Twin], events: Any, quota_used: Any) -> None:
    twin = make_twin()
    decision = await twin.admit(request("globex"))
    assert decision.ticket is not None

    await twin.settle(decision, Outcome(status=200, provider_usage=(1234, 567)),
                      with_context=False)

    (event,) = events()
    assert (event["model_id"], event["provider"]) == ("model-small", "openai")
    assert event["cost"] == "0.0005253"
    assert quota_used("globex") == 1801


def test_a_fallback_is_recorded_and_priced_at_the_model_that_answered(
        gateway: Gateway, events: Any, quota_used: Any) -> None:
    tried: list[str] = []

    def provider(model: Any) -> str:
        tried.append(model.id)
        if model.id == "model-small":
            raise ConnectionError("upstream 503")
        return "ok"

    with gateway.request(tenant_id="globex", body=chat(max_tokens=50)) as ctx:
        assert ctx.execute(provider) == "ok"
        ctx.record_usage(1000, 100)

    assert tried == ["model-small", "model-large"]  # cheapest first, then the next cheapest
    (event,) = events()
    assert (event["model_id"], event["fallback_from"]) == ("model-large", "model-small")
    assert event["cost"] == "0.0035"  # 1000 * 0.0000025 + 100 * 0.00001
    assert quota_used("globex") == 1100


def test_when_every_candidate_fails_the_job_fails_and_its_reservation_is_released(
        gateway: Gateway, events: Any, quota_used: Any) -> None:
    def provider(model: Any) -> str:
        raise TimeoutError(model.id)

    with pytest.raises(NoHealthyModel) as raised:
        with gateway.request(tenant_id="globex", body=chat(max_tokens=50)) as ctx:
            ctx.execute(provider)

    assert isinstance(raised.value.__cause__, TimeoutError)  # the last failure
    assert (raised.value.decision.status, raised.value.decision.error_code) == (
        503, "no_healthy_model")

    assert quota_used("globex") == 0
    assert events()[0]["status"] == "500"


def test_record_usage_refuses_what_cannot_be_billed(gateway: Gateway) -> None:
    with gateway.request(tenant_id="acme") as ctx:
        with pytest.raises(ValueError, match="not one of this request's candidates"):
            ctx.record_usage(1, 1, model_id="model-large")
        with pytest.raises(ValueError):
            ctx.record_usage(-1, 1)
        with pytest.raises(ValueError):
            ctx.record_usage(1, 1, outcome_value="lots")
        ctx.record_usage(1, 1)


def test_a_forked_worker_does_not_repeat_its_parents_request_ids() -> None:
    import os

    from ai_saas_middleware.gateway import _request_ids

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, _request_ids.next().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.waitpid(pid, 0)
    parent_id = _request_ids.next()
    assert child_id[:16] != parent_id[:16]  # another random prefix, not the parent's


# --------------------------------------------------------------------------- any client input

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20)
_openai_like = st.fixed_dictionaries({}, optional={
    key: _json for key in ("model", "messages", "max_tokens", "max_completion_tokens",
                           "prompt", "input")})


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(_openai_like, _json).map(lambda b: json.dumps(b).encode())
       | st.binary(max_size=64),
       content_type=st.sampled_from(["application/json", "application/problem+json",
                                     "text/plain", ""]),
       credentials=st.sampled_from(["acme", "none", "bad", "stored-looking"]),
       needs=st.dictionaries(st.sampled_from(["X-AI-Min-Quality", "X-AI-Max-Latency-Ms",
                                              "X-AI-Max-Cost"]),
                             st.text(max_size=12) | st.sampled_from(["0.5", "100", "0.01"]),
                             max_size=3))
def test_any_client_input_is_admitted_or_refused_with_a_4xx_never_an_error(
        gateway: Gateway, body: bytes, content_type: str, credentials: str,
        needs: dict[str, str]) -> None:
    """Whatever the body, the content type, the credentials and the requirement headers,
    admission answers with a Decision: admitted (200), or a refusal in the 4xx range (a
    client's mistake, or its limits). Never an exception, which a server would turn into
    a 500."""
    key = {"acme": API_KEYS["acme"], "none": None, "bad": "not-a-key",
           "stored-looking": "ais_" + "0" * 32 + "_no:{such}*tenant"}[credentials]
    headers = {"content-type": content_type, **{k.lower(): v for k, v in needs.items()}}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    decision = gateway.admit(RequestInfo("POST", "/ai/chat", headers, body))
    assert isinstance(decision, Decision)
    if decision.allowed:
        assert decision.status == 200 and decision.ticket is not None
        gateway.settle(decision.ticket, Outcome(status=200), decision.context)
    else:
        assert 400 <= decision.status < 500, (decision.status, decision.body)
        error = json.loads(decision.body)["error"]
        assert error["code"] and error["message"]


async def test_retry_after_a_lowered_rate_limit_names_a_time_the_request_passes(
        make_twin: Callable[..., Twin], make_config: Callable[..., dict[str, Any]],
        rclient: redis.Redis, key_prefix: str) -> None:
    """Five admissions in the last minute (made under the old limit of 10), then the tier's
    limit is lowered to 2: a request passes once only one admission is left in the window,
    i.e. when the fourth oldest leaves it, not the oldest."""
    from ai_saas_middleware.store.keys import KeySchema

    tiers = make_config()["tenant"]["tiers"]
    tiers[0]["rateLimit"] = 2  # free, acme's tier
    twin = make_twin(tenant={"tiers": tiers})
    seconds, micros = rclient.time()
    now_us = seconds * 1_000_000 + micros
    log_key = KeySchema(key_prefix, 16).tenant("acme").rate_limit
    rclient.zadd(log_key, {f"old_{age}": now_us - age * 1_000_000 for age in (50, 40, 30, 20, 10)})

    refused = await twin.admit(request("acme"))

    assert refused.status == 429 and refused.error_code == "rate_limit_exceeded"
    assert 39 <= int(header(refused, "retry-after")) <= 41  # the 20 s old one leaves in 40 s
