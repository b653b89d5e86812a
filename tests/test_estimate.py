"""The prompt estimate counts every part of a request that reaches the model (issue 7,
item 8), in both modes of ``quota.promptEstimate``; and the ``quota`` configuration.

Each part is checked the way a tenant would slip a prompt past a count: a large text
carried only in that part must raise the estimate by at least what a real tokenizer
would count for it (a token per 4 bytes of English, one per CJK character), and the
``upper`` mode by at least the text's UTF-8 bytes (the byte-level BPE bound).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_saas_middleware import ConfigError, load_config
from ai_saas_middleware.estimate import estimate_prompt_tokens

SEED_CONFIG = Path("/work/shared/seed-config.yaml")
TEXT = ("The quick brown fox jumps over the lazy dog; then it files a report. " * 300)[:20_000]
CJK = ("日本語の文章とひらがなカタカナ한국어中文字符" * 400)[:6_000]
BYTES = len(TEXT.encode())
BASE = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def english_tokens(text: str) -> int:
    """What a real tokenizer gives English-like text: about 4 bytes a token."""
    return math.ceil(len(text.encode()) / 4)


def added(extra: dict[str, Any], mode: str = "estimate") -> int:
    """How many tokens ``extra`` adds to a one-line chat."""
    return estimate_prompt_tokens({**BASE, **extra}, mode) - estimate_prompt_tokens(BASE, mode)


def both_modes_count(extra: dict[str, Any], text_bytes: int, real: int) -> None:
    assert added(extra) >= real
    assert added(extra, "upper") >= text_bytes


# --------------------------------------------------------------------------- every part


def test_tools_count_their_json_text_and_a_preamble() -> None:
    tool = {"type": "function", "function": {
        "name": "lookup", "description": TEXT,
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}

    both_modes_count({"tools": [tool]}, BYTES, english_tokens(TEXT))
    # The tool-use preamble is counted once, the per-tool overhead for each tool.
    small = {"type": "function", "function": {"name": "f", "parameters": {}}}
    one, two = added({"tools": [small]}), added({"tools": [small, small]})
    assert one >= 350 and 8 <= two - one < 50


def test_legacy_functions_count_like_tools() -> None:
    functions = [{"name": "lookup", "description": TEXT, "parameters": {}}]
    both_modes_count({"functions": functions}, BYTES, english_tokens(TEXT))


def test_a_provider_defined_tool_counts_its_allowance() -> None:
    assert added({"tools": [{"type": "computer_20250124", "name": "computer"}]}) >= 1_250


def test_top_level_system_string_and_anthropic_blocks() -> None:
    both_modes_count({"system": TEXT}, BYTES, english_tokens(TEXT))
    blocks = [{"type": "text", "text": TEXT, "cache_control": {"type": "ephemeral"}}]
    both_modes_count({"system": blocks}, BYTES, english_tokens(TEXT))


def test_responses_api_input_string_items_and_instructions() -> None:
    assert estimate_prompt_tokens({"input": TEXT}) >= english_tokens(TEXT)
    items = [{"role": "user", "content": [{"type": "input_text", "text": TEXT}]},
             {"type": "function_call", "name": "lookup", "arguments": TEXT},
             {"type": "function_call_output", "call_id": "c1", "output": TEXT}]
    assert estimate_prompt_tokens({"input": items}) >= 3 * english_tokens(TEXT)
    assert estimate_prompt_tokens({"input": items}, "upper") >= 3 * BYTES
    both_modes_count({"instructions": TEXT}, BYTES, english_tokens(TEXT))


def test_completions_prompt_strings_and_token_ids() -> None:
    assert estimate_prompt_tokens({"prompt": TEXT}) >= english_tokens(TEXT)
    assert estimate_prompt_tokens({"prompt": [TEXT, TEXT]}) >= 2 * english_tokens(TEXT)
    # A token-id array is exactly its length (plus the per-request overhead), in both modes.
    ids = list(range(50_000, 55_000))
    assert estimate_prompt_tokens({"prompt": ids}) == 3 + 5_000
    assert estimate_prompt_tokens({"prompt": ids}, "upper") == 8 + 5_000
    assert estimate_prompt_tokens({"prompt": [ids, ids[:10]]}) == 3 + 5_010
    assert estimate_prompt_tokens({"input": [[1, 2, 3], [4]]}) == 3 + 4  # embeddings


def test_chat_messages_count_every_value() -> None:
    assistant = {"role": "assistant", "content": None, "name": "helper", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "lookup", "arguments": TEXT}}]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": TEXT}
    legacy = {"role": "assistant", "function_call": {"name": "lookup", "arguments": TEXT}}
    for message in (assistant, tool, legacy):
        both_modes_count({"messages": [*BASE["messages"], message]}, BYTES, english_tokens(TEXT))
    parts = {"role": "user", "content": [{"type": "text", "text": TEXT}] * 3}
    both_modes_count({"messages": [*BASE["messages"], parts]}, 3 * BYTES,
                     3 * english_tokens(TEXT))


def test_anthropic_tool_use_input_counts_its_keys_and_values() -> None:
    call = {"type": "tool_use", "id": "t1", "name": "lookup",
            "input": {TEXT[:10_000]: TEXT[10_000:]}}
    use = {"role": "assistant", "content": [call]}
    both_modes_count({"messages": [*BASE["messages"], use]}, BYTES, english_tokens(TEXT))


def test_response_format_schema_counts() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"answer": {"type": "string", "description": TEXT}}}}}
    both_modes_count({"response_format": schema}, BYTES, english_tokens(TEXT))
    both_modes_count({"text": {"format": schema}}, BYTES, english_tokens(TEXT))


def test_non_text_parts_count_a_fixed_allowance_not_their_payload() -> None:
    data_url = "data:image/png;base64," + "A" * 1_000_000
    parts = [
        {"type": "image_url", "image_url": {"url": data_url, "detail": "high"}},
        {"type": "input_image", "image_url": data_url},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "A" * 1_000_000}},
        {"type": "input_audio", "input_audio": {"data": "A" * 1_000_000, "format": "wav"}},
        {"type": "file", "file": {"file_data": "A" * 1_000_000, "filename": "a.pdf"}},
        {"inline_data": {"mime_type": "image/png", "data": "A" * 1_000_000}},  # Gemini
    ]
    for part in parts:
        messages = [*BASE["messages"], {"role": "user", "content": [part]}]
        assert 1_600 <= added({"messages": messages}) < 1_700
        assert 4_000 <= added({"messages": messages}, "upper") < 4_100


def test_a_payload_key_cannot_hide_a_messages_text() -> None:
    message = {"role": "user", "content": TEXT, "image_url": "x"}
    both_modes_count({"messages": [*BASE["messages"], message]}, BYTES, english_tokens(TEXT))


def test_an_anthropic_text_document_counts_as_text() -> None:
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                               "data": TEXT}}
    message = {"role": "user", "content": [document]}
    both_modes_count({"messages": [*BASE["messages"], message]}, BYTES, english_tokens(TEXT))


def test_cjk_counts_a_token_a_character() -> None:
    body = {"messages": [{"role": "user", "content": CJK}]}

    assert estimate_prompt_tokens(body) >= len(CJK)
    assert estimate_prompt_tokens(body, "upper") >= len(CJK.encode())


def test_ascii_counts_a_token_per_three_characters() -> None:
    body = {"prompt": TEXT}
    assert estimate_prompt_tokens(body) == 3 + math.ceil(len(TEXT) / 3)
    assert estimate_prompt_tokens(body, "upper") == 8 + len(TEXT)


def test_no_prompt_is_zero_and_an_unknown_mode_is_refused() -> None:
    assert estimate_prompt_tokens({"model": "x", "max_tokens": 5}) == 0
    with pytest.raises(ValueError, match="estimate, upper"):
        estimate_prompt_tokens(BASE, "exact")


def test_hostile_shapes_are_counted_without_error() -> None:
    deep: Any = TEXT
    for _ in range(100_000):  # deeper than any recursion limit
        deep = [deep]
    assert estimate_prompt_tokens({"messages": deep}) >= english_tokens(TEXT)
    assert estimate_prompt_tokens({"messages": [{"content": "\ud800" * 10}]}, "upper") >= 30
    assert estimate_prompt_tokens({"messages": [{"content": 10 ** 4000}]}) > 4000 // 3
    assert estimate_prompt_tokens({"tools": [{"x": {1, 2}}]}) > 0  # not JSON-able: walked
    assert estimate_prompt_tokens({"tools": {"type": "function", "x": TEXT}}) >= \
        english_tokens(TEXT)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "text", "content", "role", "image_url",
                                       "input", "name", "x"]) | st.text(max_size=5),
                      inner, max_size=4),
    max_leaves=20)
bodies = st.dictionaries(
    st.sampled_from(["messages", "system", "input", "instructions", "prompt", "tools",
                     "functions", "response_format", "text", "contents", "model"]),
    json_values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_upper_is_never_below_estimate(body: dict[str, Any]) -> None:
    assert estimate_prompt_tokens(body, "upper") >= estimate_prompt_tokens(body)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(), max_size=6))
def test_upper_covers_every_byte_of_the_text(contents: list[str]) -> None:
    body = {"messages": [{"role": "user", "content": c} for c in contents]}
    text_bytes = sum(len(c.encode("utf-8", "surrogatepass")) for c in contents)
    assert estimate_prompt_tokens(body, "upper") >= text_bytes
    assert estimate_prompt_tokens(body) >= math.ceil(text_bytes / 3)


# --------------------------------------------------------------------------- quota config


def test_quota_section_defaults_and_values() -> None:
    assert load_config({}).quota.prompt_estimate == "estimate"
    assert load_config({}).quota.reservation_timeout_s == 60.0
    quota = load_config({"quota": {"promptEstimate": "upper", "reservationTimeout": "2m"}}).quota
    assert (quota.prompt_estimate, quota.reservation_timeout_s) == ("upper", 120.0)
    assert load_config(SEED_CONFIG).quota.prompt_estimate == "estimate"


@pytest.mark.parametrize(("section", "path", "expected"), [
    ({"promptEstimate": "exact"}, "quota.promptEstimate", "one of estimate, upper"),
    ({"reservationTimeout": "500ms"}, "quota.reservationTimeout", "at least 1s"),
    ({"reservationTimeout": "soon"}, "quota.reservationTimeout", "a duration"),
    ({"maxOvershoot": 1}, "quota.maxOvershoot", "one of promptEstimate, reservationTimeout"),
    ("upper", "quota", "a mapping"),
])
def test_quota_section_errors_name_their_path(section: Any, path: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"quota": section})
    assert [(p.path, expected in p.expected) for p in caught.value.problems] == [(path, True)]


def test_the_gateway_reserves_in_the_configured_mode(make_config: Any) -> None:
    from ai_saas_middleware import Gateway, RequestInfo

    body = {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 10}
    info = RequestInfo("POST", "/ai/chat", {"content-type": "application/json"},
                       json.dumps(body).encode(), tenant_id="globex")
    reserved = {}
    for mode in ("estimate", "upper"):
        gateway = Gateway(make_config(quota={"promptEstimate": mode}))
        try:
            decision = gateway.admit(info)
            assert decision.allowed
            reserved[mode] = decision.ticket.reserved_tokens  # type: ignore[union-attr]
        finally:
            gateway.close()
    assert reserved == {"estimate": estimate_prompt_tokens(body) + 10,
                        "upper": estimate_prompt_tokens(body, "upper") + 10}


@given(st.lists(st.dictionaries(st.sampled_from(["role", "content", "name", "type", "input"]),
                                st.text(max_size=40), max_size=3), max_size=6),
       st.sampled_from(["estimate", "upper"]))
def test_the_plain_chat_fast_path_counts_what_the_walk_counts(messages: list[Any],
                                                              mode: str) -> None:
    """Plain {key: text} messages are counted without the general walk; the figure must be
    the walk's, and any other shape (a 'type' key, a part list) takes the walk."""
    import ai_saas_middleware.estimate as estimate

    body = {"messages": messages, "max_tokens": 5}
    tally = estimate._Tally()
    tally.walk(messages)
    rates = estimate._RATES[mode]
    walked = (rates.per_request + -(-tally.text_bytes // rates.bytes_per_token)
              + tally.items * rates.per_item + tally.non_text * rates.non_text)
    assert estimate_prompt_tokens(body, mode) == walked
