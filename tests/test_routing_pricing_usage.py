"""Pure logic, no I/O: model selection, exact money, and usage read from responses."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_saas_middleware import ModelProfile, ResponseMeter
from ai_saas_middleware.config import TierConfig
from ai_saas_middleware.pricing import cost_of, expected_cost, format_usd
from ai_saas_middleware.routing import Requirements, select_model
from ai_saas_middleware.usage import (
    estimate_prompt_tokens,
    estimate_tokens,
    floor_tokens,
    usage_from,
)


def model(id: str, price_in: str, price_out: str, *, window: int = 128_000,
          quality: float = 0.6, p99_ms: int = 900, provider: str = "openai") -> ModelProfile:
    return ModelProfile(id, provider, Decimal(price_in), Decimal(price_out), window, quality,
                        p99_ms)


MODELS = {m.id: m for m in (
    model("model-fast", "0.0000001", "0.0000004", window=16_000, quality=0.55, p99_ms=400),
    model("model-small", "0.00000015", "0.0000006", window=128_000, quality=0.62, p99_ms=900),
    model("model-medium", "0.000003", "0.000015", window=200_000, quality=0.85, p99_ms=2500),
    model("model-large", "0.0000025", "0.00001", window=128_000, quality=0.92, p99_ms=4000),
)}
FREE = TierConfig("free", 10_000, 10, ("model-small", "model-fast"))
PRO = TierConfig("pro", 100_000, 100, ("model-small", "model-medium", "model-large"))


def ids(selection: Any) -> list[str]:
    return [m.id for m in selection.candidates]


# --------------------------------------------------------------------------- select_model


def test_cheapest_expected_cost_wins_and_the_rest_are_fallbacks_in_cost_order() -> None:
    selection = select_model(PRO, MODELS, Requirements(prompt_tokens=100, max_output_tokens=100))

    assert selection.chosen is not None and selection.chosen.id == "model-small"
    # medium: 100*0.000003 + 100*0.000015 = 0.0018; large: 0.00025 + 0.001 = 0.00125
    assert ids(selection) == ["model-small", "model-large", "model-medium"]
    assert selection.excluded == ()


def test_context_window_is_counted_in_tokens_of_prompt_plus_output() -> None:
    # model-fast (16k window) is cheaper, but 15,000 prompt + 2,000 output do not fit in it.
    selection = select_model(FREE, MODELS, Requirements(15_000, 2_000))

    assert ids(selection) == ["model-small"]
    assert selection.excluded[0][0] == "model-fast"
    assert "context window 16000 tokens" in selection.excluded[0][1]
    # 14,000 + 2,000 = 16,000 fits exactly.
    assert ids(select_model(FREE, MODELS, Requirements(14_000, 2_000)))[0] == "model-fast"


def test_quality_requirement() -> None:
    selection = select_model(PRO, MODELS, Requirements(100, 100, min_quality=0.8))

    assert ids(selection) == ["model-large", "model-medium"]
    assert dict(selection.excluded) == {"model-small": "quality 0.62 < required 0.8"}


def test_latency_requirement() -> None:
    selection = select_model(PRO, MODELS, Requirements(100, 100, max_latency_ms=3000))

    assert ids(selection) == ["model-small", "model-medium"]
    assert dict(selection.excluded) == {"model-large": "p99 latency 4000 ms > 3000 ms"}


def test_cost_limit_counts_every_allowed_output_token_at_the_output_price() -> None:
    # medium: 1000 * 0.000003 + 1000 * 0.000015 = 0.018  (input alone would be 0.003)
    # large:  1000 * 0.0000025 + 1000 * 0.00001 = 0.0125
    needs = Requirements(1000, 1000, min_quality=0.8, max_cost=Decimal("0.015"))

    selection = select_model(PRO, MODELS, needs)

    assert ids(selection) == ["model-large"]
    assert dict(selection.excluded)["model-medium"] == "expected cost $0.018 > $0.015"
    # At exactly the limit the model still qualifies.
    at_limit = select_model(PRO, MODELS, Requirements(1000, 1000, max_cost=Decimal("0.018")))
    assert "model-medium" in ids(at_limit)


def test_ties_are_broken_by_quality_then_latency_then_id_whatever_the_order() -> None:
    same_price = {
        "b-slow": model("b-slow", "0.000001", "0.000002", quality=0.7, p99_ms=900),
        "a-slow": model("a-slow", "0.000001", "0.000002", quality=0.7, p99_ms=900),
        "c-fast": model("c-fast", "0.000001", "0.000002", quality=0.7, p99_ms=300),
        "d-good": model("d-good", "0.000001", "0.000002", quality=0.9, p99_ms=2000),
    }
    expected = ["d-good", "c-fast", "a-slow", "b-slow"]
    for allowed in (("a-slow", "b-slow", "c-fast", "d-good"),
                    ("d-good", "c-fast", "b-slow", "a-slow"),
                    ("b-slow", "d-good", "a-slow", "c-fast")):
        tier = TierConfig("t", None, None, allowed)
        assert ids(select_model(tier, same_price, Requirements(10, 10))) == expected


def test_a_requested_model_is_the_only_candidate() -> None:
    selection = select_model(PRO, MODELS, Requirements(100, 100, model="model-large"))

    assert ids(selection) == ["model-large"]


def test_a_requested_model_not_allowed_on_the_tier_is_named() -> None:
    selection = select_model(FREE, MODELS, Requirements(100, 100, model="model-large"))

    assert selection.chosen is None
    assert not selection.unhealthy_only
    assert selection.explain() == "model-large: not allowed on tier 'free'"


def test_a_requested_model_that_misses_a_requirement_is_not_replaced_by_another() -> None:
    selection = select_model(PRO, MODELS, Requirements(100, 100, min_quality=0.9,
                                                       model="model-small"))

    assert selection.chosen is None
    assert selection.explain() == "model-small: quality 0.62 < required 0.9"


def test_explain_names_which_requirement_excluded_which_model() -> None:
    needs = Requirements(20_000, 500, min_quality=0.6, max_latency_ms=3000,
                         max_cost=Decimal("0.001"))
    tier = TierConfig("t", None, None, ("model-fast", "model-small", "model-medium",
                                        "model-large", "model-ghost"))

    selection = select_model(tier, MODELS, needs)

    assert selection.chosen is None
    reasons = dict(selection.excluded)
    assert reasons["model-fast"].startswith("context window 16000 tokens < 20000 prompt + 500")
    assert reasons["model-small"] == "expected cost $0.0033 > $0.001"
    assert reasons["model-medium"] == "expected cost $0.0675 > $0.001"
    assert reasons["model-large"] == "p99 latency 4000 ms > 3000 ms"
    assert reasons["model-ghost"] == "no model profile"
    text = selection.explain()
    for model_id, reason in selection.excluded:
        assert f"{model_id}: {reason}" in text


def test_is_healthy_removes_models_with_an_open_breaker() -> None:
    selection = select_model(PRO, MODELS, Requirements(100, 100),
                             is_healthy=lambda model_id: model_id != "model-small")

    assert ids(selection) == ["model-large", "model-medium"]
    assert dict(selection.excluded) == {"model-small": "circuit breaker open"}
    assert not selection.unhealthy_only


def test_unhealthy_only_when_every_model_that_met_the_needs_is_unhealthy() -> None:
    down = select_model(FREE, MODELS, Requirements(100, 100), is_healthy=lambda _: False)
    unfit = select_model(FREE, MODELS, Requirements(100, 100, min_quality=0.99),
                         is_healthy=lambda _: False)

    assert down.chosen is None and down.unhealthy_only
    assert unfit.chosen is None and not unfit.unhealthy_only  # nothing fits, healthy or not


# --------------------------------------------------------------------------- pricing


def test_cost_is_exact() -> None:
    small = MODELS["model-small"]

    cost = cost_of(small, 1234, 567)

    # 1234 * 0.00000015 = 0.0001851 ; 567 * 0.0000006 = 0.0003402
    assert cost == Decimal("0.0005253")
    assert type(cost) is Decimal
    assert format_usd(cost) == "0.0005253"


def test_expected_cost_is_the_worst_case() -> None:
    assert expected_cost(MODELS["model-large"], 1000, 1000) == Decimal("0.0125")


@pytest.mark.parametrize(("amount", "text"), [
    (Decimal("0"), "0"), (Decimal("0E-12"), "0"), (Decimal("1.50"), "1.5"),
    (Decimal("100"), "100"), (Decimal("1E+2"), "100"), (Decimal("1.5E-7"), "0.00000015"),
    (Decimal("0.000000000001"), "0.000000000001"),
])
def test_format_usd_is_a_plain_decimal_string(amount: Decimal, text: str) -> None:
    assert format_usd(amount) == text


prices = st.decimals(min_value=0, max_value=Decimal("0.001"), places=10,
                     allow_nan=False, allow_infinity=False)
tokens = st.integers(min_value=0, max_value=10_000_000)


@given(prices, prices, tokens, tokens, tokens, tokens)
def test_cost_is_additive_and_exact(p_in: Decimal, p_out: Decimal, a: int, b: int, c: int,
                                    d: int) -> None:
    m = ModelProfile("m", "p", p_in, p_out, 1, 0.5, 1)

    whole = cost_of(m, a + b, c + d)

    assert whole == cost_of(m, a, c) + cost_of(m, b, d)
    # Exact to the last digit: a billion requests' worth of fractions loses nothing.
    assert whole * 10**10 == (a + b) * int(p_in * 10**10) + (c + d) * int(p_out * 10**10)
    assert Decimal(format_usd(whole)) == whole
    assert "E" not in format_usd(whole) and "e" not in format_usd(whole)


# --------------------------------------------------------------------------- estimates


def test_estimate_prompt_tokens() -> None:
    chat = {"messages": [{"role": "system", "content": "x" * 40},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 9},
                                                      {"type": "image_url", "image_url": {}}]}]}

    # 3 per request + 4 per message or part (3 of them) + the image part's allowance
    # + a token per 3 bytes of text: "system" + 40 + "user" + 9 = 59 bytes -> 20
    assert estimate_prompt_tokens(chat) == 3 + 3 * 4 + 1_600 + 20
    assert estimate_prompt_tokens({"prompt": "z" * 8}) == 3 + 3
    assert estimate_prompt_tokens({"input": ["ab", "cd"]}) == 3 + 2
    assert estimate_prompt_tokens({}) == 0
    # Whatever shape a field has, its text is counted (the provider may read it).
    assert estimate_prompt_tokens({"messages": "not a list", "prompt": "abcd"}) == 3 + 5


@given(st.lists(st.text(max_size=200), max_size=8))
def test_a_longer_prompt_never_estimates_fewer_tokens(contents: list[str]) -> None:
    body = {"messages": [{"role": "user", "content": c} for c in contents]}
    longer = {"messages": body["messages"] + [{"role": "user", "content": "more text"}]}

    estimate = estimate_prompt_tokens(body)

    assert estimate >= 3 + sum(estimate_tokens(len(c)) for c in contents)
    assert estimate_prompt_tokens(longer) > estimate


# --------------------------------------------------------------------------- usage_from


@pytest.mark.parametrize(("payload", "usage"), [
    ({"usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}, (12, 30)),
    ({"usage": {"input_tokens": 5, "output_tokens": 6}}, (5, 6)),
    ({"usage": None}, None),
    ({"usage": {"prompt_tokens": 12}}, None),
    ({"usage": {"prompt_tokens": -1, "completion_tokens": 3}}, None),
    ({"usage": {"prompt_tokens": True, "completion_tokens": 3}}, None),
    ({"usage": {"prompt_tokens": "12", "completion_tokens": 3}}, None),
    ({"choices": []}, None),
    ([1, 2], None),
    (None, None),
])
def test_usage_from(payload: Any, usage: tuple[int, int] | None) -> None:
    assert usage_from(payload) == usage


# --------------------------------------------------------------------------- ResponseMeter


def chat_json(content: str, usage: dict[str, int] | None) -> bytes:
    body: dict[str, Any] = {"id": "x", "object": "chat.completion",
                            "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": content}}]}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def sse(deltas: list[str], usage: tuple[int, int] | None, *, usage_nulls: bool = True,
        done: bool = True, crlf: bool = False) -> bytes:
    """An OpenAI-style chat stream, as a provider with stream_options.include_usage sends it."""
    events = []
    for text in deltas:
        chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": text}}]}
        if usage_nulls:
            chunk["usage"] = None
        events.append(chunk)
    if usage is not None:
        events.append({"choices": [], "usage": {"prompt_tokens": usage[0],
                                                "completion_tokens": usage[1]}})
    nl = "\r\n" if crlf else "\n"
    out = f": keep-alive{nl}{nl}"  # an SSE comment, as proxies and providers send
    out += "".join(f"data: {json.dumps(e, ensure_ascii=False)}{nl}{nl}" for e in events)
    if done:
        out += f"data: [DONE]{nl}{nl}"
    return out.encode()


def meter(content_type: str, chunks: list[bytes], *, finish: bool = True,
          status: int = 200, **outcome: Any) -> Any:
    m = ResponseMeter()
    m.start(status, content_type)
    for chunk in chunks:
        m.feed(chunk)
    if finish:
        m.finish()
    return m.outcome(**outcome)


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


def test_json_body_in_chunks() -> None:
    body = chat_json("Hello there", {"prompt_tokens": 21, "completion_tokens": 9})

    outcome = meter("application/json; charset=utf-8", split_every(body, 7))

    assert outcome.provider_usage == (21, 9)
    assert outcome.completion_chars == len("Hello there")
    assert outcome.status == 200
    assert not outcome.disconnected and not outcome.failed


def test_json_body_without_usage_counts_what_was_produced() -> None:
    outcome = meter("application/json", [chat_json("four", None)])

    assert outcome.provider_usage is None
    assert outcome.completion_chars == 4


def test_a_body_that_is_not_json_or_sse_is_not_parsed() -> None:
    outcome = meter("text/plain", [b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'])

    assert outcome.provider_usage is None
    assert outcome.completion_chars == 0


def test_a_json_body_over_the_buffer_limit_is_scanned_for_its_usage() -> None:
    m = ResponseMeter(max_buffer=64)
    m.start(200, "application/json")
    body = chat_json("x" * 200, {"prompt_tokens": 1, "completion_tokens": 30})
    for chunk in split_every(body, 16):
        m.feed(chunk)
    m.finish()

    outcome = m.outcome()

    assert outcome.provider_usage == (1, 30)  # scanned as it passed, not kept whole
    assert outcome.completion_chars == 200


def test_sse_final_usage_chunk_and_done() -> None:
    stream = sse(["Hel", "lo", " wörld"], (17, 4))

    outcome = meter("text/event-stream; charset=utf-8", [stream])

    assert outcome.provider_usage == (17, 4)
    assert outcome.completion_chars == len("Hello wörld")
    assert not outcome.disconnected


def test_sse_split_mid_line_mid_json_and_mid_utf8_character() -> None:
    stream = sse(["Grüß", " dich 👋"], (8, 5), crlf=True)
    cut_json = stream.index(b'"content"') + 4
    cut_utf8 = stream.index("👋".encode()) + 2  # inside the emoji's four bytes
    cut_line = stream.index(b"data: [DONE]") + 3
    chunks = [stream[:cut_json], stream[cut_json:cut_utf8], stream[cut_utf8:cut_line],
              stream[cut_line:]]

    outcome = meter("text/event-stream", chunks)

    assert outcome.provider_usage == (8, 5)
    assert outcome.completion_chars == len("Grüß dich 👋")


def test_sse_without_usage_counts_the_characters_streamed() -> None:
    outcome = meter("text/event-stream", split_every(sse(["abc", "defg"], None), 5))

    assert outcome.provider_usage is None
    assert outcome.completion_chars == 7


def test_sse_last_line_without_a_trailing_newline_is_still_read() -> None:
    stream = sse(["hi"], (3, 1), done=False).rstrip(b"\n")

    assert meter("text/event-stream", [stream]).provider_usage == (3, 1)


def test_a_stream_that_did_not_finish_is_disconnected_and_bills_what_was_seen() -> None:
    stream = sse(["partial ", "answer", " never sent"], (9, 9))
    cut = stream.index(b"never")

    outcome = meter("text/event-stream", [stream[:cut]], finish=False)

    assert outcome.disconnected
    assert outcome.provider_usage is None
    assert outcome.completion_chars == len("partial answer")


def test_a_failed_response_is_not_also_called_disconnected() -> None:
    outcome = meter("application/json", [b"{}"], finish=False, status=502, failed=True)

    assert outcome.failed and not outcome.disconnected
    assert outcome.status == 502


def test_no_response_at_all_is_a_500() -> None:
    m = ResponseMeter()

    outcome = m.outcome(failed=True)

    assert outcome.status == 500
    assert outcome.provider_usage is None


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[bytes, list[bytes], tuple[int, int], str]:
    letters = st.characters(exclude_categories=("Cs",))  # any text UTF-8 can carry
    texts = draw(st.lists(st.text(letters, min_size=1, max_size=20), min_size=1, max_size=6))
    # A provider never reports fewer completion tokens than the meter's floor of the
    # text it streamed (usage.floor_tokens); below it the floor is billed instead.
    usage = (draw(st.integers(0, 10**6)),
             draw(st.integers(floor_tokens(len("".join(texts))), 10**6)))
    stream = sse(texts, usage, crlf=draw(st.booleans()))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=30))))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    return stream, chunks, usage, "".join(texts)


@given(chunkings())
def test_sse_usage_is_found_however_the_byte_stream_is_chunked(
        case: tuple[bytes, list[bytes], tuple[int, int], str]) -> None:
    stream, chunks, usage, text = case

    whole = meter("text/event-stream", [stream])
    chunked = meter("text/event-stream", chunks)

    assert chunked.provider_usage == whole.provider_usage == usage
    assert chunked.completion_chars == whole.completion_chars == len(text)
    assert not chunked.disconnected
