"""Issue 7, item 8: sixty concurrent 20 KB requests on a 100,000-token tier, each stating
``max_tokens``, must not take the counter past the quota (``upper``), or past the
documented bound (``estimate``; see :mod:`ai_saas_middleware.estimate`).

The app is a Starlette app behind :class:`~ai_saas_middleware.starlette.AISaaSMiddleware`,
driven by ``httpx.AsyncClient`` over ``ASGITransport`` with a real Redis. The 60 requests
carry their ~20 KB prompt in different shapes: chat ``messages`` (English, and CJK),
``tools``, a top-level ``system`` and the Responses API's ``input``. Every admitted
request waits in its handler until all 60 have been admitted or refused, so all of them
are in flight at the last admission: the worst case for overshoot.

The handler reports the provider usage a tokenizer would give (a stand-in: no real
tokenizer's data can be fetched in this test; ``benchmarks/estimate_accuracy.py`` checks
the stand-ins against tiktoken's cl100k_base and o200k_base where tiktoken is installed):

- ``plausible``: 1 token per 4 bytes of ASCII (English prose runs at 4 to 4.5 bytes a
  token on cl100k/o200k) and 1 per non-ASCII character (CJK is about one a character),
  plus 3 per message and 3 per request (OpenAI's chat framing);
- ``worst``: 1 token per UTF-8 byte, the most a byte-level BPE tokenizer can produce
  (every token is at least one byte), plus the same framing.

Completions use all of ``max_tokens`` (10). Figures of one run (the counter after all
the admitted requests settled; 100,000 quota):

- before this change (estimate.py as of 5691b24^): all 60 admitted, counter 321,444 (the
  issue's 300,600; prompts in ``tools``, ``system`` and ``input`` were estimated at 3);
- ``estimate`` + ``plausible``: 14 admitted, counter 75,345: never past the quota;
- ``estimate`` + ``worst``: 14 admitted, counter 280,677: past the quota, within the
  documented bound, quota + 2 x the in-flight prompt estimates (94,682) = 289,364;
- ``upper`` + ``plausible``: 4 admitted, counter 21,771; ``upper`` + ``worst``: 4 admitted,
  counter 80,215: never past the quota.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import bearer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ai_saas_middleware.estimate import estimate_prompt_tokens
from ai_saas_middleware.starlette import AISaaSMiddleware

QUOTA = 100_000  # the "pro" tier of tests/conftest.py
REQUESTS = 60
MAX_TOKENS = 10
TENANT = "globex"
ENGLISH = ("Please summarise the quarterly report below and list every risk it names, "
           "with the page on which it appears. ") * 200
CJK = "四半期報告書を要約し、記載されているすべてのリスクを一覧にしてください。" * 400


def english(size: int = 20_000) -> str:
    return ENGLISH[:size]


def cjk(size: int = 20_000) -> str:
    return CJK[:size // 3]  # 3 UTF-8 bytes a character


def body_of(shape: str) -> dict[str, Any]:
    """A ~20 KB prompt carried in ``shape``, with ``max_tokens`` stated."""
    hi = {"role": "user", "content": "Go."}
    if shape == "messages":
        body: dict[str, Any] = {"messages": [{"role": "user", "content": english()}]}
    elif shape == "cjk":
        body = {"messages": [{"role": "user", "content": cjk()}]}
    elif shape == "tools":
        body = {"messages": [hi], "tools": [{"type": "function", "function": {
            "name": "file_report", "description": english(),
            "parameters": {"type": "object", "properties": {"page": {"type": "integer"}}}}}]}
    elif shape == "system":
        body = {"system": english(), "messages": [hi]}
    else:  # the Responses API
        body = {"input": [{"role": "user", "content": [{"type": "input_text",
                                                          "text": english()}]}]}
    body["max_tokens"] = MAX_TOKENS
    return body


SHAPES = ("messages", "cjk", "tools", "system", "input")


def prompt_texts(body: dict[str, Any]) -> tuple[list[str], int]:
    """The texts of :func:`body_of`'s shapes a provider tokenizes, and the message count
    (written for those shapes alone, apart from the estimator it checks)."""
    texts: list[str] = []
    messages = body.get("messages", []) + body.get("input", [])
    for message in messages:
        content = message["content"]
        texts += [content] if isinstance(content, str) else [p["text"] for p in content]
    if "system" in body:
        texts.append(body["system"])
    if "tools" in body:
        texts.append(json.dumps(body["tools"], separators=(",", ":")))
    return texts, len(messages) + ("system" in body)


def plausible_tokens(text: str) -> int:
    ascii_bytes = sum(1 for c in text if c.isascii())
    return math.ceil(ascii_bytes / 4) + (len(text) - ascii_bytes)


def worst_tokens(text: str) -> int:
    return len(text.encode())


TOKENIZERS: dict[str, Callable[[str], int]] = {"plausible": plausible_tokens,
                                               "worst": worst_tokens}


def provider_prompt_tokens(body: dict[str, Any], tokenizer: str) -> int:
    texts, messages = prompt_texts(body)
    return 3 + 3 * messages + sum(TOKENIZERS[tokenizer](t) for t in texts)


class Rendezvous:
    """Holds every admitted request in its handler until all requests are decided."""

    def __init__(self) -> None:
        self.decided = 0
        self.all_decided = asyncio.Event()

    def decide(self) -> None:
        self.decided += 1
        if self.decided == REQUESTS:
            self.all_decided.set()


def make_app(config: dict[str, Any], tokenizer: str, rendezvous: Rendezvous) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        rendezvous.decide()
        await asyncio.wait_for(rendezvous.all_decided.wait(), 30)  # a hang guard
        prompt = provider_prompt_tokens(body, tokenizer)
        return JSONResponse({
            "id": "chatcmpl-1", "object": "chat.completion",
            "model": request.state.ai.model.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Done."},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": MAX_TOKENS,
                      "total_tokens": prompt + MAX_TOKENS}})

    app = Starlette(routes=[Route("/ai/chat", chat, methods=["POST"])])
    app.add_middleware(AISaaSMiddleware, config=config)
    return app


async def run_sixty(config: dict[str, Any], tokenizer: str, events: Any
                    ) -> list[tuple[str, dict[str, Any]]]:
    """The 60 requests at once; the bodies that were admitted, once all have settled."""
    rendezvous = Rendezvous()
    app = make_app(config, tokenizer, rendezvous)
    bodies = [(SHAPES[i % len(SHAPES)], body_of(SHAPES[i % len(SHAPES)]))
              for i in range(REQUESTS)]

    async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
        response = await client.post("/ai/chat", json=body, headers=bearer(TENANT))
        if response.status_code != 200:
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "quota_exceeded"
            rendezvous.decide()
        return response.status_code

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver", timeout=60) as client:
        statuses = await asyncio.gather(*(send(client, body) for _, body in bodies))
    admitted = [shaped for shaped, status in zip(bodies, statuses, strict=True) if status == 200]
    for _ in range(3_000):  # settlement may finish after the response; 30 s at most
        if len(events()) >= len(admitted):
            break
        await asyncio.sleep(0.01)
    assert len(events()) == len(admitted)
    return admitted


def check_ledger(events: Any, quota_used: Callable[[str], int]) -> int:
    """The counter holds exactly the settled events' tokens; returns it."""
    used = quota_used(TENANT)
    assert used == sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in events())
    assert {e["usage_source"] for e in events()} == {"provider"}
    return used


async def test_estimate_keeps_the_counter_within_the_quota_for_plausible_text(
        make_config: Any, events: Any, quota_used: Callable[[str], int]) -> None:
    admitted = await run_sixty(make_config(), "plausible", events)

    used = check_ledger(events, quota_used)
    assert 0 < len(admitted) < REQUESTS
    assert {shape for shape, _ in admitted} == set(SHAPES)  # every shape got in
    # Each estimate covers what the provider counted: no overshoot at all.
    assert all(estimate_prompt_tokens(body) >= provider_prompt_tokens(body, "plausible")
               for _, body in admitted)
    assert used <= QUOTA


async def test_estimate_stays_within_its_documented_bound_for_worst_case_text(
        make_config: Any, events: Any, quota_used: Callable[[str], int]) -> None:
    admitted = await run_sixty(make_config(quota={"promptEstimate": "estimate"}), "worst",
                               events)

    used = check_ledger(events, quota_used)
    in_flight_estimates = sum(estimate_prompt_tokens(body) for _, body in admitted)
    # All admitted requests were in flight at the last admission (the rendezvous), and no
    # text tokenizes to more than 3 times its estimate (f <= 3).
    assert used <= QUOTA + 2 * in_flight_estimates
    assert in_flight_estimates <= QUOTA  # so the bound is at most 3 x the quota


@pytest.mark.parametrize("tokenizer", ["plausible", "worst"])
async def test_upper_never_lets_the_counter_pass_the_quota(
        make_config: Any, events: Any, quota_used: Callable[[str], int],
        tokenizer: str) -> None:
    admitted = await run_sixty(make_config(quota={"promptEstimate": "upper"}), tokenizer,
                               events)

    used = check_ledger(events, quota_used)
    assert admitted
    assert all(estimate_prompt_tokens(body, "upper") >= provider_prompt_tokens(body, "worst")
               for _, body in admitted)
    assert used <= QUOTA
