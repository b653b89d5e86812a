"""Routing as admission does it, against a real Redis: prices changed at run time,
downgrades near a limit, observed completions fed back, budgets on a web adapter."""

from __future__ import annotations

from typing import Any

from conftest import bearer
from faults import wait_until
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ai_saas_middleware import Gateway
from ai_saas_middleware.asgi import AISaaSMiddleware
from ai_saas_middleware.pricebook import PriceBookAdmin
from ai_saas_middleware.types import Outcome


def body(max_tokens: int | None = 100) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": [{"role": "user", "content": "hello " * 30}]}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


def admit(gateway: Gateway, tenant: str = "globex", max_tokens: int | None = 100) -> Any:
    return gateway.admit(*gateway._job_info(tenant, "/ai/chat", body(max_tokens), None))


def test_a_price_changed_at_run_time_reroutes_and_is_recorded_with_its_version(
        make_config: Any, events: Any) -> None:
    config = make_config()
    gateway = Gateway(config)
    admin = Gateway(config)  # another process: the one an operator's command talks to
    try:
        first = admit(gateway)
        assert first.context.model.id == "model-small"  # the cheapest of tier pro
        first.context.record_usage(10, 10)
        gateway.settle(first.ticket, Outcome(200), first.context)
        # model-small's price goes up tenfold, above model-large's: routing follows.
        PriceBookAdmin(admin.config, admin.store, admin.keys).set(
            "model-small", {"costPerInputToken": "0.00001", "costPerOutputToken": "0.0001"})
        wait_until(lambda: gateway.prices.current.version == 1, what="the new version")
        second = admit(gateway)
        assert second.context.model.id == "model-large"
        assert [m.id for m in second.context.candidates][-1] == "model-small"
        second.context.record_usage(10, 10, model_id="model-small")  # a fallback, say
        gateway.settle(second.ticket, Outcome(200), second.context)
    finally:
        gateway.close()
        admin.close()
    before, after = events()
    assert (before["price_version"], before["cost"]) == ("0", "0.0000075")
    # The new prices, from the version admission used: 10 x 0.00001 + 10 x 0.0001.
    assert (after["price_version"], after["model_id"], after["cost"]) == (
        "1", "model-small", "0.0011")


def test_past_the_downgrade_share_the_cheapest_model_is_chosen_and_said(make_config: Any
                                                                        ) -> None:
    config = make_config(routing={"strategy": "quality_first", "downgradeAt": "0.5"})
    next(t for t in config["tenant"]["tiers"] if t["name"] == "pro")["monthlyQuota"] = 2000
    gateway = Gateway(config)
    try:
        first = admit(gateway, max_tokens=100)  # about 150 of 2000 tokens
        assert first.context.model.id == "model-large"  # quality first
        assert ("x-ai-routing", "downgraded") not in first.headers
        first.context.record_usage(900, 100)
        gateway.settle(first.ticket, Outcome(200), first.context)  # 1000 of 2000 used
        second = admit(gateway, max_tokens=100)
        assert second.context.model.id == "model-small"  # the cheapest, whatever the strategy
        assert ("x-ai-routing", "downgraded") in second.headers
        gateway.settle(second.ticket, Outcome(200), second.context)
    finally:
        gateway.close()


def test_past_the_downgrade_share_of_a_money_budget_too(make_config: Any) -> None:
    config = make_config(routing={"strategy": "quality_first", "downgradeAt": "0.8"})
    next(t for t in config["tenant"]["tiers"] if t["name"] == "pro")["monthlyBudget"] = "0.1"
    gateway = Gateway(config)
    try:
        first = admit(gateway, max_tokens=100)
        assert first.context.model.id == "model-large"
        first.context.record_usage(8000, 0, model_id="model-large")  # $0.02 of $0.10
        gateway.settle(first.ticket, Outcome(200), first.context)
        assert ("x-ai-routing", "downgraded") not in admit(gateway).headers
        heavy = admit(gateway)
        heavy.context.record_usage(24000, 0, model_id="model-large")  # now $0.08+ spent
        gateway.settle(heavy.ticket, Outcome(200), heavy.context)
        late = admit(gateway)
        assert late.context.model.id == "model-small"
        assert ("x-ai-routing", "downgraded") in late.headers
    finally:
        gateway.close()


def test_settled_completions_feed_the_observed_averages_routing_reads(make_config: Any
                                                                      ) -> None:
    gateway = Gateway(make_config())
    try:
        for _ in range(12):
            d = admit(gateway, max_tokens=500)
            d.context.record_usage(40, 60)
            gateway.settle(d.ticket, Outcome(200), d.context)
        wait_until(lambda: gateway.observed.averages("/ai/*").get("model-small") == 60,
                   what="the deployment's average completion of model-small on /ai/*")
    finally:
        gateway.close()


def test_a_budget_refusal_on_a_web_adapter_is_a_429_in_the_documented_shape(
        make_config: Any) -> None:
    config = make_config()
    next(t for t in config["tenant"]["tiers"] if t["name"] == "pro")["dailyBudget"] = "0.001"

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/ai/chat", chat, methods=["POST"])])
    app.add_middleware(AISaaSMiddleware, config=config)
    with TestClient(app) as client:
        reply = client.post("/ai/chat", json=body(max_tokens=1000), headers=bearer("globex"))
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "budget_exceeded"
    assert reply.json()["error"]["type"] == "insufficient_quota"
    assert 1 <= int(reply.headers["retry-after"]) <= 86400  # at midnight UTC
