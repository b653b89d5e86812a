"""A settlement interrupted half way (a cancel scope around the request, a client hang-up,
a server shutting down) is written or spooled, exactly once, and leaves the spool usable.

The interruption is placed at a known await: the gateway's store is wrapped so that the
settle round trip parks (before the script is sent, or after it ran with its reply
unread) until the test cancels it; Redis itself is the real test server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import API_KEYS, reservations_held

from ai_saas_middleware import AsyncGateway, Outcome, RequestInfo
from ai_saas_middleware.bodies import wait_for_settlements
from ai_saas_middleware.starlette import AISaaSMiddleware
from ai_saas_middleware.store.keys import KeySchema

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 40}


def ai_request(tenant: str = "globex") -> RequestInfo:
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "authorization": f"Bearer {API_KEYS[tenant]}"},
                       json.dumps(CHAT).encode())


def park_settlements(gateway: AsyncGateway, *, after_running: bool
                     ) -> tuple[asyncio.Event, Callable[[], None]]:
    """Make the next settle round trip hang (as a Redis reply that never comes); returns
    (set once it is parked, a function that lets Redis answer again)."""
    real: Callable[..., Awaitable[Any]] = gateway.store.run_script
    parked = asyncio.Event()

    async def run_script(which: str, keys: Any, args: Any) -> Any:
        if which == "settle" and not parked.is_set():
            if after_running:  # the script ran; its reply is what never arrives
                await real(which, keys, args)
            parked.set()
            await asyncio.Event().wait()
        return await real(which, keys, args)

    gateway.store.run_script = run_script  # type: ignore[method-assign]

    def answer_again() -> None:
        gateway.store.run_script = real  # type: ignore[method-assign]

    return parked, answer_again


def no_spool_left(spool_dir: Path) -> bool:
    return not list(spool_dir.glob("spool-*.jsonl")) and not list(spool_dir.glob("*.replaying"))


@pytest.mark.parametrize("after_running", [False, True], ids=["before-sent", "reply-lost"])
async def test_a_cancelled_settlement_is_spooled_and_written_once(
        make_config: Callable[..., dict[str, Any]], events: Any, quota_used: Any,
        tmp_path: Path, after_running: bool, rclient: Any) -> None:
    gateway = AsyncGateway(make_config())
    decision = await gateway.admit(ai_request())
    assert decision.ticket is not None
    parked, answer_again = park_settlements(gateway, after_running=after_running)

    settling = asyncio.ensure_future(gateway.settle(
        decision.ticket, Outcome(200, provider_usage=(10, 20)), decision.context))
    await parked.wait()
    answer_again()
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    await wait_for_settlements()  # the replay started for it

    [event] = events()
    assert event["request_id"] == decision.ticket.request_id
    assert quota_used("globex") == 30
    keys = KeySchema(gateway.config.redis.key_prefix, 16).tenant("globex")
    assert gateway.leases.held == 0
    assert no_spool_left(tmp_path / "spool")
    # The spool is not left claimed: the next settlement goes to Redis, not to disk.
    later = await gateway.admit(ai_request())
    assert later.ticket is not None
    await gateway.settle(later.ticket, Outcome(200, provider_usage=(1, 1)), later.context)
    assert len(events()) == 2 and no_spool_left(tmp_path / "spool")
    assert reservations_held(rclient, keys) == {}
    await gateway.close()


async def test_a_cancel_scope_around_the_request_does_not_lose_its_event(
        make_config: Callable[..., dict[str, Any]], events: Any, quota_used: Any,
        tmp_path: Path) -> None:
    """An outer ASGI layer (a timeout middleware, a server's request scope) cancels its
    scope while the middleware's settlement waits on Redis: inside a cancelled scope every
    further await is cancelled at once, so nothing can be sent from there."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse({"object": "chat.completion", "choices": [],
                             "usage": {"prompt_tokens": 11, "completion_tokens": 22}})

    gateway = AsyncGateway(make_config())
    app = Starlette(routes=[Route("/ai/chat", chat, methods=["POST"])])
    app.add_middleware(AISaaSMiddleware, gateway=gateway)
    parked, answer_again = park_settlements(gateway, after_running=False)

    async def cancelling(scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope() as cancel_scope:
            async def cancel_once_parked() -> None:
                await parked.wait()
                answer_again()
                cancel_scope.cancel()

            watcher = asyncio.ensure_future(cancel_once_parked())
            await app(scope, receive, send)
        await watcher

    transport = httpx.ASGITransport(app=cancelling)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        reply = await client.post("/ai/chat", json=CHAT,
                                  headers={"Authorization": f"Bearer {API_KEYS['globex']}"})
        assert reply.status_code == 200
        await wait_for_settlements()

    [event] = events()
    assert event["request_id"] == reply.headers["x-request-id"]
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("11", "22")
    assert quota_used("globex") == 33
    assert no_spool_left(tmp_path / "spool")
    await gateway.close()


async def test_a_replay_cancelled_half_way_puts_its_claim_back(
        make_config: Callable[..., dict[str, Any]], events: Any, quota_used: Any,
        tmp_path: Path) -> None:
    """Cancelled while replaying the spool: the claimed spool file is put back (the entry in
    flight included: its replay is counted once), not left claimed for a minute during
    which every settlement would go to disk."""
    gateway = AsyncGateway(make_config())
    waiting = [await gateway.admit(ai_request()) for _ in range(3)]
    for decision in waiting:  # spooled, as during an outage
        assert decision.ticket is not None
        gateway.spool.append(gateway._settle_call(decision.ticket, Outcome(
            200, provider_usage=(2, 3)), decision.context))
    fresh = await gateway.admit(ai_request())
    assert fresh.ticket is not None
    parked, answer_again = park_settlements(gateway, after_running=True)

    settling = asyncio.ensure_future(gateway.settle(
        fresh.ticket, Outcome(200, provider_usage=(10, 20)), fresh.context))
    await parked.wait()  # parked on the first spooled entry's reply
    answer_again()
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    await wait_for_settlements()

    ids = [e["request_id"] for e in events()]
    assert sorted(ids) == sorted(d.ticket.request_id for d in (*waiting, fresh))  # type: ignore[union-attr]
    assert quota_used("globex") == 3 * 5 + 30
    assert no_spool_left(tmp_path / "spool")
    await gateway.close()


@pytest.mark.parametrize("after_running", [False, True], ids=["before-sent", "reply-lost"])
async def test_an_admission_cancelled_on_its_way_gives_its_reservation_back(
        make_config: Callable[..., dict[str, Any]], rclient: Any, events: Any,
        quota_used: Any, after_running: bool) -> None:
    gateway = AsyncGateway(make_config())
    real: Callable[..., Awaitable[Any]] = gateway.store.run_script
    parked = asyncio.Event()

    async def run_script(which: str, keys: Any, args: Any) -> Any:
        if which == "admit":
            if after_running:
                await real(which, keys, args)
            parked.set()
            await asyncio.Event().wait()
        return await real(which, keys, args)

    gateway.store.run_script = run_script  # type: ignore[method-assign]
    admitting = asyncio.ensure_future(gateway.admit(ai_request()))
    await parked.wait()
    gateway.store.run_script = real  # type: ignore[method-assign]
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    await wait_for_settlements()

    keys = KeySchema(gateway.config.redis.key_prefix, 16).tenant("globex")
    assert reservations_held(rclient, keys) == {}
    assert quota_used("globex") == 0
    assert events() == []  # never admitted as far as the client knows: no event
    await gateway.close()
