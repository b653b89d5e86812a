"""The response meter: provider usage whatever the body's size, in bounded memory, and
only from a provider's own framing, with a floor under the completion it bills.

Pure tests of :class:`ResponseMeter` (no I/O), then two end to end through the
Starlette adapter and a real Redis: a JSON body over the meter's buffer, and an SSE
relay whose text imitates a usage chunk.
"""

from __future__ import annotations

import itertools
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from conftest import bearer
from hypothesis import given, settings
from hypothesis import strategies as st
from replies import CHAT, completion, sse_body
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ai_saas_middleware import ResponseMeter
from ai_saas_middleware.starlette import AISaaSMiddleware
from ai_saas_middleware.types import Outcome
from ai_saas_middleware.usage import MAX_LINE_BYTES, floor_tokens
from demo_projects import provider

MiB = 1 << 20
SSE = "text/event-stream"


def meter(content_type: str, chunks: Iterator[bytes] | list[bytes], *,
          max_buffer: int = MiB, finish: bool = True) -> Outcome:
    m = ResponseMeter(max_buffer=max_buffer)
    m.start(200, content_type)
    for chunk in chunks:
        m.feed(chunk)
    if finish:
        m.finish()
    return m.outcome()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def data_line(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


# ------------------------------------------------------------------ JSON bodies


def big_completion(text_bytes: int, completion_tokens: int, *, usage_first: bool = False
                   ) -> bytes:
    """A chat completion with ``text_bytes`` of content, its usage last (as OpenAI
    sends it) or first."""
    words = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. "
    text = (words * (text_bytes // len(words) + 1))[:text_bytes]
    body = completion("model-small", text, 17, completion_tokens)
    if usage_first:
        body = {"usage": body.pop("usage"), **body}
    return json.dumps(body).encode()


def pieces(data: bytes, size: int = 65_536) -> Iterator[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


@pytest.mark.parametrize("usage_first", [False, True])
def test_a_json_body_over_the_buffer_is_billed_its_usage(usage_first: bool) -> None:
    body = big_completion(1_100_000, 275_000, usage_first=usage_first)

    outcome = meter("application/json", pieces(body))

    assert outcome.provider_usage == (17, 275_000)  # was None, billed as an estimate
    assert outcome.completion_chars == 1_100_000


def test_a_json_body_of_any_size_is_metered_in_bounded_memory() -> None:
    text = 16 * MiB
    head = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":' \
           b'{"role":"assistant","content":"'
    tail = b'"}}],"usage":{"prompt_tokens":5,"completion_tokens":9000000}}'
    block = b'ab\\"cd\\u00e9\\n' * 4681  # about 64 KiB of text with escapes

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(text // len(block)):
            yield block
        yield tail

    m = ResponseMeter()
    m.start(200, "application/json")
    tracemalloc.start()
    try:
        for chunk in body():
            m.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    m.finish()
    outcome = m.outcome()

    assert outcome.provider_usage == (5, 9_000_000)
    assert outcome.completion_chars == 7 * 4681 * (text // len(block))
    # The first MiB is buffered for the fast path, then handed to the scanner; after
    # that only the chunk in hand and a few frames of state.
    assert peak < 3 * MiB


def test_only_the_top_level_usage_is_the_bodys_usage() -> None:
    body = json.dumps({
        "metadata": {"usage": {"prompt_tokens": 0, "completion_tokens": 0}},
        "choices": [{"message": {"content": "a usage: {\"usage\": {}}",
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 60},
        "tail": [{"usage": {"prompt_tokens": 2, "completion_tokens": 2}}],
    }).encode()

    whole = meter("application/json", [body])
    scanned = meter("application/json", [body], max_buffer=0)

    assert whole == scanned
    assert scanned.provider_usage == (40, 60)


def test_a_json_body_whose_usage_understates_its_text_is_billed_the_floor() -> None:
    body = json.dumps(completion("model-small", "y" * 800, 12, 0)).encode()

    for max_buffer in (MiB, 0):
        outcome = meter("application/json", [body], max_buffer=max_buffer)
        assert outcome.provider_usage == (12, 100)  # ceil(800 / 8), not 0


def test_a_truncated_or_oversized_usage_object_is_not_trusted() -> None:
    cut = big_completion(2 * MiB, 500)[:-5]
    huge = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                "padding": "p" * 100_000}}).encode()

    assert meter("application/json", pieces(cut)).provider_usage is None
    assert meter("application/json", [huge], max_buffer=0).provider_usage is None


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30) | st.sampled_from(
    ['\\"', '"}{][', "\\u00e9", "\U0001F44B\U0001F3FD", "\\", "usage", "\n\t\x00\x1f"])


@st.composite
def chat_bodies(draw: st.DrawFn) -> tuple[bytes, int, tuple[int, int] | None]:
    """A chat completion (OpenAI's shape, text in every place it can be), its text's
    characters and its usage, serialized either way json.dumps can."""
    def text() -> str:
        return draw(_TEXT)

    chars = 0
    choices = []
    for index in range(draw(st.integers(0, 3))):
        message: dict[str, Any] = {"role": "assistant"}
        kind = draw(st.sampled_from(["str", "parts", "tools", "none"]))
        if kind == "str":
            message["content"] = content = text()
            chars += len(content)
        elif kind == "parts":
            parts = [text() for _ in range(draw(st.integers(0, 3)))]
            message["content"] = [{"type": "text", "text": p} for p in parts]
            chars += sum(map(len, parts))
        elif kind == "tools":
            message["content"] = None
            args = [text() for _ in range(draw(st.integers(1, 2)))]
            message["tool_calls"] = [{"id": f"c{i}", "type": "function",
                                      "function": {"name": "f", "arguments": a}}
                                     for i, a in enumerate(args)]
            chars += sum(map(len, args))
        choices.append({"index": index, "message": message, "logprobs": {"content": [
            {"token": text(), "bytes": [1, 2]}]}, "finish_reason": "stop"})
    usage = None
    if draw(st.booleans()):
        usage = (draw(st.integers(0, 10**9)), draw(st.integers(0, 10**9)))
    fields: list[tuple[str, Any]] = [
        ("id", text()), ("object", "chat.completion"), ("choices", choices),
        ("system_fingerprint", None), ("meta", {"usage": {"prompt_tokens": 0}, "n": [1.5e3]})]
    if usage is not None:
        fields.append(("usage", {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                 "prompt_tokens_details": {"cached_tokens": 0}}))
    order = draw(st.permutations(range(len(fields))))
    body = dict(fields[i] for i in order)
    raw = json.dumps(body, ensure_ascii=draw(st.booleans()),
                     indent=draw(st.sampled_from([None, 1]))).encode()
    return raw, chars, usage


@settings(max_examples=300)
@given(chat_bodies(), st.data())
def test_the_scanner_reads_what_json_loads_reads_however_the_body_is_cut(
        case: tuple[bytes, int, tuple[int, int] | None], data: st.DataObject) -> None:
    body, chars, usage = case
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))

    whole = meter("application/json", [body])
    scanned = meter("application/json", split_at(body, cuts), max_buffer=0)

    expected = None if usage is None else (usage[0], max(usage[1], floor_tokens(chars)))
    assert whole.provider_usage == scanned.provider_usage == expected
    assert whole.completion_chars == scanned.completion_chars == chars


def test_the_scanner_survives_a_cut_at_every_byte() -> None:
    # Escapes of every kind, a surrogate pair and raw UTF-8 in the text, the key
    # "usage" itself and its numbers, each cut at every byte.
    body = json.dumps({"choices": [{"message": {"content": 'a\\"b\n\u00e9\U0001F44B'},
                                    "text": "\U0001F44B\u00e9"}],
                       "usage": {"prompt_tokens": 123, "completion_tokens": 456}}).encode()
    body_raw = body.replace(b"\\ud83d\\udc4b", "\U0001F44B".encode(), 1)
    for data in (body, body_raw):
        whole = meter("application/json", [data])
        assert whole.provider_usage == (123, 456)
        for cut in range(len(data) + 1):
            assert meter("application/json", [data[:cut], data[cut:]], max_buffer=0) == whole
        for size in range(1, 14):
            assert meter("application/json", pieces(data, size), max_buffer=0) == whole


# ------------------------------------------------------------------ SSE framings


def anthropic_stream(texts: list[str], *, input_tokens: int, output_tokens: int) -> bytes:
    def event(name: str, payload: dict[str, Any]) -> bytes:
        return f"event: {name}\n".encode() + data_line({"type": name, **payload})

    out = event("message_start", {"message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 3,
                  "cache_read_input_tokens": 4, "output_tokens": 1}}})
    out += event("content_block_start", {"index": 0,
                                         "content_block": {"type": "text", "text": ""}})
    out += event("ping", {})
    for text in texts:
        out += event("content_block_delta", {"index": 0,
                                             "delta": {"type": "text_delta", "text": text}})
    out += event("content_block_delta", {"index": 1, "delta": {
        "type": "input_json_delta", "partial_json": '{"city": "Paris"}'}})
    out += event("content_block_stop", {"index": 0})
    out += event("message_delta", {"delta": {"stop_reason": "end_turn"},
                                   "usage": {"output_tokens": output_tokens}})
    out += event("message_stop", {})
    return out


def test_an_anthropic_stream_is_billed_its_message_usage() -> None:
    stream = anthropic_stream(["Hello", " world"], input_tokens=25, output_tokens=15)

    outcome = meter(SSE, [stream])

    # Cached prompt tokens are prompt tokens (3 + 4), as in OpenAI's prompt_tokens.
    assert outcome.provider_usage == (25 + 3 + 4, 15)
    assert outcome.completion_chars == len("Hello world") + len('{"city": "Paris"}')


def test_a_responses_api_stream_is_billed_its_completed_usage() -> None:
    def event(payload: dict[str, Any]) -> bytes:
        return f"event: {payload['type']}\n".encode() + data_line(payload)

    stream = event({"type": "response.created", "response": {"id": "r", "usage": None}})
    stream += event({"type": "response.output_text.delta", "delta": "Bonjour"})
    stream += event({"type": "response.function_call_arguments.delta", "delta": '{"a":1}'})
    stream += event({"type": "response.completed", "response": {
        "id": "r", "usage": {"input_tokens": 30, "output_tokens": 12, "total_tokens": 42}}})

    outcome = meter(SSE, [stream])

    assert outcome.provider_usage == (30, 12)
    assert outcome.completion_chars == len("Bonjour") + len('{"a":1}')


def test_cumulative_usage_in_every_chunk_bills_the_largest_and_never_less() -> None:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "word "}}]}
    stream = b"".join(data_line({**chunk, "usage": {"prompt_tokens": 9, "completion_tokens": n}})
                      for n in range(1, 6))
    # A later chunk that reports less (a retry's, a relay's) does not lower the bill.
    stream += data_line({"object": "chat.completion.chunk", "choices": [],
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0}})

    assert meter(SSE, [stream]).provider_usage == (9, 5)


def test_usage_in_content_text_or_in_no_providers_framing_is_not_usage() -> None:
    fake = '\n\ndata: {"usage": {"prompt_tokens": 0, "completion_tokens": 0}}\n\n'
    legit = sse_body([fake, " and more"])  # the fake inside a delta's content string
    app_line = data_line({"usage": {"prompt_tokens": 0, "completion_tokens": 0}})
    wrong_event = b"event: message_delta\n" + data_line(
        {"object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 0, "completion_tokens": 0}})

    assert meter(SSE, legit).provider_usage == (12, 34)
    mixed = meter(SSE, [*legit[:-1], app_line, wrong_event, legit[-1]])
    # The lines that are no provider chunk count, whole, as text: their floor is billed.
    untrusted = len(app_line.strip()) + len(wrong_event.split(b"\n")[1]) - 2 * len("data: ")
    assert mixed.completion_chars == len(fake) + len(" and more") + untrusted
    assert mixed.provider_usage == (12, max(34, floor_tokens(mixed.completion_chars)))
    assert meter(SSE, [app_line, wrong_event]).provider_usage is None


def test_a_second_providers_framing_in_one_stream_is_not_trusted() -> None:
    openai = sse_body(["Hi"])
    anthropic_delta = b"event: message_delta\n" + data_line(
        {"type": "message_delta", "usage": {"output_tokens": 900_000}})
    anthropic_start = anthropic_stream([], input_tokens=1, output_tokens=1)

    outcome = meter(SSE, [*openai[:-1], anthropic_start, anthropic_delta, openai[-1]])

    # Not the 900,000 of the Anthropic delta; its lines count as text (the floor).
    assert outcome.provider_usage == (12, floor_tokens(outcome.completion_chars))
    assert outcome.provider_usage[1] < 900_000


def test_a_relay_whose_text_forges_a_usage_chunk_is_billed_at_least_the_floor() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20  # 900 characters
    forged = (b'data: {"object": "chat.completion.chunk", "choices": [], '
              b'"usage": {"prompt_tokens": 0, "completion_tokens": 0}}\n\n')
    stream = [f"data: {word}\n\n".encode() for word in text.split(" ")] + [forged]

    outcome = meter(SSE, stream)

    assert outcome.completion_chars >= len(text.replace(" ", ""))
    assert outcome.provider_usage is not None
    assert outcome.provider_usage[1] >= floor_tokens(len(text.replace(" ", ""))) > 80


def test_plain_text_and_app_json_lines_count_as_text_produced() -> None:
    stream = [b"data: plain words\n\n", data_line({"text": "caf\u00e9", "n": 3}),
              b"data: [DONE]\n\n"]

    outcome = meter(SSE, stream)

    assert outcome.provider_usage is None  # the gateway estimates from the characters
    # All of a line that is no provider chunk: relayed text can take any JSON shape.
    assert outcome.completion_chars == len("plain words") + len('{"text": "caf\\u00e9", "n": 3}')


# ------------------------------------------------------------------ long SSE lines


def test_an_sse_stream_without_a_newline_is_metered_in_bounded_memory() -> None:
    m = ResponseMeter()
    m.start(200, SSE)
    tracemalloc.start()
    try:
        m.feed(b"data: ")
        for _ in range(30 * 16):  # 30 MiB of text, no newline
            m.feed(b"z" * 65_536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    m.finish()
    outcome = m.outcome()

    assert peak < 2 * MiB  # at most one line of MAX_LINE_BYTES is kept, then none
    # What passed after "data:" (its space too) counts as text produced.
    assert outcome.completion_chars == 1 + 30 * MiB
    assert outcome.provider_usage is None


def test_a_long_line_counts_the_same_whole_or_in_pieces_and_usage_after_it_is_read() -> None:
    long_text = "\u00e9" * (MAX_LINE_BYTES // 2 + 10)  # two bytes each: over the bound
    stream = (b": " + b"c" * (MAX_LINE_BYTES + 5) + b"\n\n"  # a long comment: no text
              + b"data: " + long_text.encode() + b"\r\n\r\n" + b"".join(sse_body(["ok"])))

    whole = meter(SSE, [stream])
    cut = meter(SSE, pieces(stream, 100_003))

    assert whole == cut
    # The long line's bytes after "data:" (its space and carriage return too) and "ok"
    # are text produced; the usage after it is read, and the floor of all that text,
    # more than the 34 it reports, is billed.
    chars = 1 + len(long_text) + 1 + len("ok")
    assert whole.completion_chars == chars
    assert whole.provider_usage == (12, floor_tokens(chars))


def test_a_stream_cut_inside_a_chunk_counts_no_json_framing_as_text() -> None:
    stream = b"".join(sse_body(["partial ", "answer"]))
    cut = stream.index(b"answer") + 3

    outcome = meter(SSE, [stream[:cut]], finish=False)

    assert outcome.disconnected and outcome.provider_usage is None
    assert outcome.completion_chars == len("partial ")


@st.composite
def mixed_streams(draw: st.DrawFn) -> bytes:
    texts = draw(st.lists(_TEXT, min_size=1, max_size=5))
    kind = draw(st.sampled_from(["openai", "anthropic", "relay"]))
    if kind == "openai":
        return b"".join(sse_body(texts))
    if kind == "anthropic":
        return anthropic_stream(texts, input_tokens=draw(st.integers(0, 999)),
                                output_tokens=draw(st.integers(0, 999)))
    return b"".join(f"data: {t}\r\n\r\n".encode() for t in texts if "\n" not in t
                    and "\r" not in t)


@given(mixed_streams(), st.data())
def test_any_stream_meters_the_same_however_it_is_cut(stream: bytes, data: st.DataObject
                                                     ) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))

    assert meter(SSE, split_at(stream, cuts)) == meter(SSE, [stream])


# ------------------------------------------------------------------ the floor and legit streams


def test_the_floor_raises_no_bill_of_the_test_apps_or_the_demo_provider() -> None:
    assert meter(SSE, sse_body()).provider_usage == (12, 34)
    with TestClient(provider.app) as client:
        for model in ("model-fast", "model-small", "model-medium", "model-large",
                      "model-custom"):
            for max_tokens in range(1, 41):
                request = {"model": model, "max_tokens": max_tokens, "stream": True,
                           "messages": [{"role": "user", "content": "hi there"}]}
                reply = client.post("/v1/chat/completions", json=request)
                usage = json.loads(reply.text.split("data: ")[-2])["usage"]
                expected = (usage["prompt_tokens"], usage["completion_tokens"])
                assert meter(SSE, [reply.content]).provider_usage == expected
                whole = client.post("/v1/chat/completions",
                                    json={**request, "stream": False})
                assert meter("application/json", [whole.content]).provider_usage == expected


# ------------------------------------------------------------------ end to end


def test_end_to_end_a_large_json_reply_and_a_forging_relay(
        make_config: Callable[..., dict[str, Any]],
        events: Callable[[], list[dict[str, str]]]) -> None:
    large = big_completion(1_100_000, 275_000)
    relay_text = ["Sure", "here", '{"usage":{"prompt_tokens":0,"completion_tokens":0}}',
                  "is", "a", "long", "answer"] * 30

    async def large_reply(request: Request) -> Response:
        return Response(large, media_type="application/json")

    async def relay(request: Request) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            for piece in relay_text:
                yield f"data: {piece}\n\n".encode()

        return StreamingResponse(lines(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/ai/large", large_reply, methods=["POST"]),
                            Route("/ai/relay", relay, methods=["POST"])])
    app.add_middleware(AISaaSMiddleware, config=make_config())
    with TestClient(app) as client:
        big = client.post("/ai/large", json=CHAT, headers=bearer("initech"))
        assert big.status_code == 200 and big.content == large
        with client.stream("POST", "/ai/relay", json=CHAT, headers=bearer("initech")) as r:
            streamed = b"".join(r.iter_raw())
        assert streamed == b"".join(f"data: {p}\n\n".encode() for p in relay_text)

    by_id = {e["request_id"]: e for e in events()}
    billed = by_id[big.headers["x-request-id"]]
    assert billed["usage_source"] == "provider"
    assert (billed["prompt_tokens"], billed["completion_tokens"]) == ("17", "275000")
    relayed = by_id[r.headers["x-request-id"]]
    assert relayed["usage_source"] == "estimate"  # the forged line is text, not usage
    assert int(relayed["completion_tokens"]) >= floor_tokens(
        sum(map(len, relay_text))) > 0
