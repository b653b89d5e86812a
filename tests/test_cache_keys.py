"""The cache's request identities: what makes two requests the same, what does not, and
which requests may be cached at all. Pure; no Redis."""

from __future__ import annotations

import copy
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_saas_middleware.cache import cacheable, request_keys
from ai_saas_middleware.cache.request_key import RequestKeys

TOOLS = [{"type": "function", "function": {
    "name": "refund", "description": "Refund an order",
    "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}]


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are the support assistant of Acme."},
            {"role": "user", "content": "Where is my parcel?"},
            {"role": "assistant", "content": "Which order do you mean?"},
            {"role": "user", "content": "The one I placed on Monday."},
        ],
    }
    base.update(overrides)
    return base


def keys(b: dict[str, Any], tenant: str = "acme", endpoint: str = "/v1/chat/completions",
         model_class: str = "small") -> RequestKeys:
    return request_keys(b, tenant_id=tenant, endpoint=endpoint, model_class=model_class)


def with_message(index: int, content: Any, b: dict[str, Any] | None = None) -> dict[str, Any]:
    changed = copy.deepcopy(b or body())
    changed["messages"][index]["content"] = content
    return changed


# --- the exact key --------------------------------------------------------------------

def test_exact_key_is_a_sha256_hex_and_stable() -> None:
    k = keys(body())
    assert len(k.exact_key) == 64 and int(k.exact_key, 16) >= 0
    assert keys(body()) == k


def test_exact_key_differs_across_tenants_endpoints_and_model_classes() -> None:
    base = keys(body()).exact_key
    assert keys(body(), tenant="globex").exact_key != base
    assert keys(body(), endpoint="/v1/other").exact_key != base
    assert keys(body(), model_class="large").exact_key != base


@pytest.mark.parametrize("index, content", [
    (0, "You are the billing assistant of Acme."),   # the system prompt
    (1, "Where is my refund?"),                      # an earlier user turn
    (2, "Which parcel do you mean?"),                # an earlier assistant turn
    (3, "The one I placed on Tuesday."),             # the last user turn
])
def test_exact_key_differs_when_any_turn_differs(index: int, content: str) -> None:
    assert keys(with_message(index, content)).exact_key != keys(body()).exact_key


def test_exact_key_differs_when_a_turn_is_added_or_a_role_changes() -> None:
    longer = body()
    longer["messages"] = [longer["messages"][0], {"role": "user", "content": "Hi"},
                          *longer["messages"][1:]]
    other_role = copy.deepcopy(body())
    other_role["messages"][0]["role"] = "user"
    assert keys(longer).exact_key != keys(body()).exact_key
    assert keys(other_role).exact_key != keys(body()).exact_key


@pytest.mark.parametrize("change", [
    {"temperature": 0.2}, {"top_p": 0.5}, {"max_tokens": 50}, {"seed": 7},
    {"stop": ["\n"]}, {"response_format": {"type": "json_object"}}, {"tools": TOOLS},
    {"tool_choice": "none", "tools": TOOLS}, {"model": "gpt-4o"}, {"n": 2},
    {"frequency_penalty": 0.5}, {"logit_bias": {"50256": -100}},
    {"some_future_parameter": True},
])
def test_exact_key_differs_on_parameters_that_change_the_answer(
        change: dict[str, Any]) -> None:
    assert keys(body(**change)).exact_key != keys(body()).exact_key


def test_tool_definitions_are_compared_in_full() -> None:
    other = copy.deepcopy(TOOLS)
    other[0]["function"]["parameters"]["properties"]["order"]["type"] = "integer"
    assert keys(body(tools=TOOLS)).exact_key != keys(body(tools=other)).exact_key


def test_exact_key_ignores_whitespace_unicode_form_key_order_and_transport() -> None:
    messy = {
        "stream": True, "stream_options": {"include_usage": True}, "user": "end-user-42",
        "metadata": {"trace": "x"}, "top_p": None,
        "messages": [
            {"content": "  You are the support\tassistant of Acme.\r\n", "role": "system"},
            {"role": "user", "content": [{"type": "text", "text": "Where  is my parcel?"}]},
            {"role": "assistant", "content": "Which order do you mean?   ", "name": None},
            {"role": "user", "content": "The one I placed on Monday.\n\n\n"},
        ],
        "temperature": 0.0,
        "model": "gpt-4o-mini",
    }
    assert keys(messy).exact_key == keys(body()).exact_key

    composed = with_message(1, "Where is my café order?")
    decomposed = with_message(1, unicodedata.normalize("NFD", "Where is my café order?"))
    assert decomposed["messages"][1]["content"] != composed["messages"][1]["content"]
    assert keys(decomposed).exact_key == keys(composed).exact_key


def test_json_key_order_inside_tools_is_irrelevant_but_list_order_counts() -> None:
    reordered = [{"function": {"parameters": {"properties": {"order": {"type": "string"}},
                                              "type": "object"},
                               "description": "Refund an order", "name": "refund"},
                  "type": "function"}]
    second = {"type": "function", "function": {"name": "track", "parameters": {}}}
    assert keys(body(tools=reordered)).exact_key == keys(body(tools=TOOLS)).exact_key
    assert keys(body(tools=[*TOOLS, second])).exact_key != keys(
        body(tools=[second, *TOOLS])).exact_key


def test_leading_indentation_is_meaning_and_kept() -> None:
    code_a = "Fix this:\ndef f():\n    return 1"
    code_b = "Fix this:\ndef f():\nreturn 1"
    assert keys(with_message(3, code_a)).exact_key != keys(with_message(3, code_b)).exact_key


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([" ", "  ", "\t", " \u00a0"]), min_size=5, max_size=5))
def test_any_run_of_inner_whitespace_is_one_space(gaps: list[str]) -> None:
    words = ["The", "one", "I", "placed", "on", "Monday."]
    text = words[0] + "".join(g + w for g, w in zip(gaps, words[1:], strict=True))
    assert keys(with_message(3, text)).exact_key == keys(body()).exact_key


# --- the partition key and the semantic text -------------------------------------------

def test_partition_key_ignores_only_the_last_user_text() -> None:
    base = keys(body())
    reworded = keys(with_message(3, "It's the order from Monday."))
    assert reworded.partition_key == base.partition_key
    assert reworded.exact_key != base.exact_key
    assert reworded.semantic_text == "It's the order from Monday."
    for index in (0, 1, 2):
        assert keys(with_message(index, "something else")).partition_key != (
            base.partition_key)
    assert keys(body(temperature=0.3)).partition_key != base.partition_key
    assert keys(body(tools=TOOLS)).partition_key != base.partition_key
    assert keys(body(), tenant="globex").partition_key != base.partition_key


def test_partition_and_exact_keys_never_coincide() -> None:
    k = keys(body())
    assert k.partition_key != k.exact_key


def test_non_text_parts_of_the_last_user_message_stay_in_the_partition() -> None:
    def with_image(url: str, text: str) -> dict[str, Any]:
        return with_message(3, [{"type": "text", "text": text},
                                {"type": "image_url", "image_url": {"url": url}}])

    a = keys(with_image("https://x/1.png", "What is in this picture?"))
    b = keys(with_image("https://x/1.png", "What does this picture show?"))
    c = keys(with_image("https://x/2.png", "What is in this picture?"))
    assert a.partition_key == b.partition_key
    assert a.partition_key != c.partition_key
    assert a.semantic_text == "What is in this picture?"


def test_semantic_text_is_the_last_user_message_even_before_a_trailing_turn() -> None:
    prefilled = body()
    prefilled["messages"].append({"role": "assistant", "content": "Sure, "})
    k = keys(prefilled)
    assert k.semantic_text == "The one I placed on Monday."
    assert k.partition_key != keys(body()).partition_key  # the prefill is history


def test_without_a_user_message_there_is_no_semantic_text() -> None:
    k = keys(body(messages=[{"role": "system", "content": "Say hello."}]))
    assert k.semantic_text is None


def test_malformed_messages_raise() -> None:
    with pytest.raises(ValueError, match="messages"):
        keys(body(messages="hello"))
    with pytest.raises(ValueError, match="messages"):
        keys(body(messages=["hello"]))


# --- cacheable() ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {}, {"temperature": 0}, {"temperature": None}, {"n": 1}, {"stream": True},
    {"seed": 1, "top_p": 0.1}, {"tools": TOOLS, "tool_choice": "none"},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "tool", "tool_call_id": "c1", "content": "4"}]},
])
def test_cacheable_by_default(overrides: dict[str, Any]) -> None:
    b = body(**overrides)
    if "temperature" not in overrides:
        b.pop("temperature")
    assert cacheable(b) == (True, "ok")


@pytest.mark.parametrize("overrides, reason", [
    ({"temperature": 0.7}, "temperature"),
    ({"n": 3}, "n"),
    ({"tools": TOOLS}, "tools"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tools"),
    ({"functions": [{"name": "refund"}]}, "tools"),
    ({"messages": []}, "malformed"),
    ({"messages": "hi"}, "malformed"),
    ({"temperature": "hot"}, "malformed"),
])
def test_not_cacheable(overrides: dict[str, Any], reason: str) -> None:
    ok, why = cacheable(body(**overrides))
    assert (ok, why) == (False, reason)


def test_cacheable_knobs() -> None:
    assert cacheable(body(tools=TOOLS), allow_tools=True).cacheable
    assert cacheable(body(temperature=0.2), max_temperature=0.3).cacheable
    assert not cacheable(body(temperature=0.5), max_temperature=0.3).cacheable


@settings(max_examples=50, deadline=None)
@given(st.randoms(use_true_random=False))
def test_the_order_of_fields_never_changes_a_key(rng: Any) -> None:
    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v) for v in value]  # list order is meaning: kept
        return value

    original = body(tools=TOOLS, response_format={"type": "json_object"}, seed=3)
    assert keys(shuffled(original)) == keys(original)
