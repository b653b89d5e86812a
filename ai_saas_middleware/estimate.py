"""Token estimates of request bodies and of text. Pure; no I/O.

- :func:`estimate_prompt_tokens`: the prompt tokens of a request body, counted from every
  part of it that reaches the model; used to reserve quota and check a context window,
  and always marked ``estimate`` when it ends up billed.
- :func:`estimate_tokens`: tokens of a number of characters of produced text (completion
  estimates when the provider reports no usage; 4 characters a token).

What is counted
---------------
Chat ``messages`` (every value of every message: string contents and parts of every
type, ``name``, assistant ``tool_calls`` names and arguments, ``function_call``, tool
results), ``tools`` / ``functions`` (their JSON text, plus an overhead per tool and once
for the tool-use preamble a provider adds), a top-level ``system`` (a string or
Anthropic blocks), the Responses API's ``input`` (a string or items with content parts)
and ``instructions``, a completions ``prompt`` or embeddings ``input`` (a string, a list
of strings, a token-id array, which counts exactly its length, or a list of token-id
arrays), ``suffix``, Gemini-style ``contents`` / ``systemInstruction``, and the JSON
schema of ``response_format`` (or the Responses API's ``text.format``). Image, audio,
file and video parts count a fixed allowance each (below); their payload (a URL, base64
data, a file id) is not text the model reads. Only ``type`` and ``cache_control`` keys
are left out: they select how a part is read, they are not read.

Two modes (``quota.promptEstimate``)
------------------------------------
Text is measured in UTF-8 bytes, which is both fast (``str.isascii()`` and ``len`` for the
usual ASCII text; one C-level encode otherwise) and what a byte-level BPE tokenizer
(OpenAI's cl100k/o200k, Llama 3, Claude's, ...) consumes: every token stands for at least
one byte, so **tokens <= UTF-8 bytes** for any text whatever its script.

``estimate`` (the default) counts a token per 3 bytes. Per script that is:

=========================================  ========  ==============  ========================
script (UTF-8 length)                      counted   typical (o200k)  why this factor
=========================================  ========  ==============  ========================
ASCII: English, code, JSON (1 byte)        1/3 char  1/4 .. 1/3.5    safe, not average: code,
                                                                      JSON and numbers run at
                                                                      ~3 characters a token
Latin accents, Greek, Cyrillic, Hebrew,    2/3 char  1/3 .. 1/2       between; conservative
Arabic (2 bytes)                                                      for older vocabularies
CJK, Hiragana, Katakana, Hangul (3 bytes)  1 / char  ~0.7 .. 1        about one a character
Indic, Thai, symbols, punctuation (3)      1 / char  0.3 .. 1.5       conservative, as CJK
emoji, rare CJK (4 bytes)                  4/3 char  1 .. 3           between
=========================================  ========  ==============  ========================

plus, per request 3, per message / part / item 4, per tool 8, a tool-use preamble of 350
once when tools are declared (Anthropic's tool-use system prompt is 313-346 tokens on
current models), a built-in (server or computer-use) tool 1,250, and 1,600 per
non-text part (about Anthropic's cap of an image scaled to 1.15 megapixels, and above
GPT-4o's 1,445 for a high-detail image).

``upper`` counts a token per byte: a true upper bound of the text for byte-level BPE
tokenizers, plus bounded overheads (per request 8, per message / part / item 8, per
tool 32, preamble 600 (Claude 3 Opus's is 530), built-in tool 1,500) and 4,000 per
non-text part (the patch-based image cap, 1,536 patches, times the largest published
multiplier, 2.46). The quota check admits a request only if the counter plus its
reservation (prompt bound + ``max_tokens``) fits, and settlement replaces the reservation
by the real usage, which is then no larger: so in ``upper`` mode **the counter can never
pass the quota, as long as the app passes ``ctx.max_output_tokens`` to the provider**
(a provider that writes more than ``max_tokens`` breaks the promise, whatever the
estimate). What no request body can bound is left out of that promise: a multi-page
document or a long audio clip in one part (each counts one allowance), a model that
bills images far above the caps above (gpt-4o-mini counts an image as 2,833 + 5,667 a
tile), and tools the provider runs itself that add retrieved content to the prompt
(web or file search). A deployment with hard budgets refuses such requests in its app.
``upper`` reserves about 3 to 4 times what English text uses, so fewer requests fit
in flight on a small quota at once; the excess is released at settlement.

The default mode's bound
------------------------
Admission keeps *settled usage + in-flight reservations <= quota*; each settlement then
moves the counter by *real - reserved*. After the last admission only settlements follow,
so the counter ends at most::

    quota + sum over requests in flight then of max(0, real prompt - estimated prompt)
          <= quota + (f - 1) * (sum of those requests' prompt estimates)
          <= quota + (f - 1) * quota

where ``f`` is how many times the estimate the real prompt is (completions are held to
``max_tokens``). For English prose, code and JSON ``f`` < 1 (no overshoot): a real
tokenizer gives 1 token for about 4 bytes, the estimate 1 for 3. For CJK ``f`` is about 1.
No text can make ``f`` more than 3 (tokens <= bytes = 3 x the estimate), so no tenant can
take more than three times its quota, and only with text built to tokenize at a byte a
token (e.g. scripts the tokenizer barely knows, or random bytes); e.g. 13 requests in
flight, each estimated at 7,000 on a 100,000 tier, reach at most 100,000 + 2 x 91,000.
``upper`` makes ``f`` <= 1 always.

Measured with tiktoken's own encodings (``benchmarks/estimate_accuracy.py``, whose
docstring says how to run it offline), ``f`` = real tokens / ``estimate``'s count:

============================  ==========  ==========
text (20 KB, or a CJK page)   cl100k f    o200k f
============================  ==========  ==========
English prose (GPL-3)         0.63        0.63
Python code                   0.72        0.72
JSON tool definitions         0.84        0.84
Chinese                       1.06        0.69
Japanese                      1.01        0.73
Korean                        1.30        0.86
random digits                 1.00        1.00
random hex                    1.70        1.71
random base64                 2.14        2.05
============================  ==========  ==========

and ``upper``'s ratio is at most 0.71 on all of them. So the default mode does not
overshoot on prose, code or JSON; it can on Hangul with cl100k (by 0.3 x the in-flight
estimates) and on random-looking strings (base64, hex) by up to about 1.1 x; only
``upper`` is a bound. ``tests/test_quota_overshoot.py`` reproduces the issue's figure
(60 concurrent 20 KB requests on a 100,000-token tier) and checks both modes; its
docstring has the counters it reached.

The cost, on this project's 2-core machine under load (best of 5; runs differ by up
to 2x), beside ``json.loads`` of the same body, which the gateway does anyway: 1 KB chat
12 us (loads 12 us); 20 KB chat 12 us (74 us); 20 KB of CJK 72 us (61 us, the encode);
20 KB of tool definitions 415 us (196 us: their JSON text is made with ``json.dumps``, a
C-level pass about twice the cost of parsing them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PROMPT_ESTIMATE_MODES", "estimate_prompt_tokens", "estimate_tokens", "text_chars"]

PROMPT_ESTIMATE_MODES = ("estimate", "upper")

CHARS_PER_TOKEN = 4  # produced text, when the provider reports no usage


@dataclass(frozen=True, slots=True)
class _Rates:
    """The figures of one mode (see the module docstring for where each comes from)."""

    bytes_per_token: int
    per_request: int
    per_item: int  # a message, a content part, a tool call, an input item
    per_tool: int
    tools_preamble: int  # once, when any tool or function is declared
    builtin_tool: int  # a tool the provider defines (computer use, web search, ...)
    non_text: int  # an image, audio, file or video part


_RATES = {
    "estimate": _Rates(bytes_per_token=3, per_request=3, per_item=4, per_tool=8,
                       tools_preamble=350, builtin_tool=1_250, non_text=1_600),
    "upper": _Rates(bytes_per_token=1, per_request=8, per_item=8, per_tool=32,
                    tools_preamble=600, builtin_tool=1_500, non_text=4_000),
}

# Fields of a request body whose values reach the model as text (besides the ones with
# rules of their own below). "prompt" and "input" may hold token ids.
_TEXT_FIELDS = ("messages", "system", "instructions", "suffix", "contents",
                "systemInstruction", "system_instruction")
_ID_FIELDS = ("prompt", "input")
_SCHEMA_FIELDS = ("response_format", "text")
_TOOL_FIELDS = ("tools", "functions")
_FUNCTION_TOOL_TYPES = frozenset({"function", "custom"})

# Values whose keys are read too: a tool call's arguments (Anthropic's tool_use
# ``input``, Gemini's ``args`` / ``response``), a schema.
_KEYED_VALUES = frozenset({"input", "args", "response", "arguments", "parameters",
                           "input_schema", "schema"})
_UNREAD_KEYS = frozenset({"type", "cache_control"})
_NON_TEXT_TYPES = frozenset({"image_url", "image", "input_image", "input_audio", "audio",
                             "file", "input_file", "document", "video", "video_url"})
# Keys that carry a non-text part's payload; a mapping holding one is a non-text part
# even without a "type" (Gemini's inline_data / file_data parts).
_PAYLOAD_KEYS = frozenset({"image_url", "input_audio", "inline_data", "inlineData",
                           "file_data", "fileData"})
# What of a non-text part is payload, not read as text (its other values still count,
# so a stray payload key cannot hide a message's text).
_SKIPPED_IN_NON_TEXT = _PAYLOAD_KEYS | _UNREAD_KEYS | {
    "source", "data", "url", "file", "image", "file_id", "file_url", "video_url", "detail",
    "format", "mime_type", "mimeType", "media_type", "filename"}


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of produced text (rounded up)."""
    return -(-chars // CHARS_PER_TOKEN)


def text_chars(content: Any) -> int:
    """Characters of text in a message ``content`` (a string, or a list of strings and
    ``{"text": ...}`` parts); 0 for anything else."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...] or ["a", "b"]
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
        return total
    return 0


_FIELDS_BUT_MESSAGES = frozenset((*_TEXT_FIELDS, *_ID_FIELDS, *_SCHEMA_FIELDS, *_TOOL_FIELDS)
                                 ) - {"messages"}
_NOT_PLAIN = _UNREAD_KEYS | _PAYLOAD_KEYS | frozenset(_KEYED_VALUES)


def _plain_messages(messages: list[Any]) -> int | None:
    """The UTF-8 bytes of chat messages that are all plain ``{key: text}`` mappings (no
    part lists, no tool calls, no key a part's reading depends on), or None for any
    other shape (which :class:`_Tally` walks). Counts exactly what the walk counts."""
    total = 0
    for message in messages:
        if type(message) is not dict:
            return None
        for key, value in message.items():
            if type(value) is not str or key in _NOT_PLAIN:
                return None
            total += len(value) if value.isascii() else _utf8_len(value)
    return total


def _utf8_len(text: str) -> int:
    # JSON may carry lone surrogates ("\ud800"): count them as the 3 bytes they take in
    # surrogatepass form rather than fail on client input.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _Tally:
    """What one body holds: text bytes, and the things counted by number."""

    __slots__ = ("builtin_tools", "found", "ids", "items", "non_text", "text_bytes", "tools")

    def __init__(self) -> None:
        self.text_bytes = self.ids = self.items = self.non_text = 0
        self.tools = self.builtin_tools = 0
        self.found = False

    def walk(self, value: Any, keys: bool = False) -> None:
        """Add every text value under ``value``; mapping keys are text too when ``keys``
        (a schema or a tool call's arguments, whose property names are read), and they
        are under the values of :data:`_KEYED_VALUES`. Iterative (one level of recursion
        at most): a body nested as deep as ``json.loads`` allows cannot overflow it."""
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                self.text_bytes += len(v) if v.isascii() else _utf8_len(v)
            elif isinstance(v, Mapping):
                if keys:
                    for key, item in v.items():
                        if isinstance(key, str):
                            self.text_bytes += _utf8_len(key) + 3  # "key":
                        stack.append(item)
                    continue
                kind = v.get("type")
                skipped = _UNREAD_KEYS
                if (kind in _NON_TEXT_TYPES if isinstance(kind, str) else False) \
                        or not _PAYLOAD_KEYS.isdisjoint(v):
                    self.non_text += 1
                    skipped = _SKIPPED_IN_NON_TEXT
                    source = v.get("source")
                    if kind == "document" and isinstance(source, Mapping) \
                            and source.get("type") in ("text", "content"):
                        # An Anthropic text document: its text is read, as text.
                        self.non_text -= 1
                        stack.append(source.get("data", source.get("content")))
                else:
                    self.items += 1
                for key, item in v.items():
                    if key in skipped:
                        continue
                    if key in _KEYED_VALUES and isinstance(item, Mapping):
                        self.walk(item, keys=True)
                    else:
                        stack.append(item)
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, bool) or v is None:
                self.text_bytes += 5
            elif isinstance(v, int):  # its digits, without turning a huge int into text
                self.text_bytes += v.bit_length() // 3 + 2
            elif isinstance(v, float):
                self.text_bytes += len(repr(v))

    def walk_prompt(self, value: Any) -> None:
        """A completions ``prompt`` or an ``input``: text, items, or token ids (a list
        of ints, or a list of such lists), each id exactly one token."""
        if not isinstance(value, list):
            self.walk(value)
            return
        for element in value:
            if isinstance(element, int) and not isinstance(element, bool):
                self.ids += 1
            elif isinstance(element, list):
                for item in element:
                    if isinstance(item, int) and not isinstance(item, bool):
                        self.ids += 1
                    else:
                        self.walk(item)
            else:
                self.walk(element)

    def json_text(self, value: Any) -> None:
        """Add the JSON text of ``value`` (a tool list, a schema)."""
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            self.walk(value, keys=True)  # not JSON-able or too deep: its keys and values
            return
        self.text_bytes += _utf8_len(text)

    def add_tools(self, tools: Any) -> None:
        if not isinstance(tools, list):
            self.walk(tools, keys=True)
            return
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            if isinstance(kind, str) and kind not in _FUNCTION_TOOL_TYPES:
                self.builtin_tools += 1
            else:
                self.tools += 1
        self.json_text(tools)


def estimate_prompt_tokens(body: Mapping[str, Any], mode: str = "estimate") -> int:
    """Prompt tokens of a request body, counted from every part that reaches the model.

    Args:
        body: the parsed JSON body (OpenAI chat or completions, the Responses API,
            Anthropic messages, Gemini contents, embeddings).
        mode: ``"estimate"`` (a safe estimate, about a token per 3 bytes of text) or
            ``"upper"`` (a true upper bound for byte-level BPE tokenizers: a token per
            byte; with it the quota counter never passes the quota as long as the app
            passes ``ctx.max_output_tokens`` to the provider). See the module docstring.

    Returns:
        The tokens to reserve for the prompt; 0 when the body has no prompt at all.

    Raises:
        ValueError: for a ``mode`` other than ``estimate`` or ``upper``.
    """
    rates = _RATES.get(mode)
    if rates is None:
        raise ValueError(f"mode must be one of {', '.join(PROMPT_ESTIMATE_MODES)}, not {mode!r}")
    messages = body.get("messages")
    if type(messages) is list and body.keys().isdisjoint(_FIELDS_BUT_MESSAGES):
        plain = _plain_messages(messages)
        if plain is not None:  # the usual chat body: what the walk would count, sooner
            return (rates.per_request + -(-plain // rates.bytes_per_token)
                    + len(messages) * rates.per_item)
    tally = _Tally()
    for key in _TEXT_FIELDS:
        value = body.get(key)
        if value is not None:
            tally.found = True
            tally.walk(value)
    for key in _ID_FIELDS:
        value = body.get(key)
        if value is not None:
            tally.found = True
            tally.walk_prompt(value)
    for key in _TOOL_FIELDS:
        value = body.get(key)
        if value is not None:
            tally.found = True
            tally.add_tools(value)
    for key in _SCHEMA_FIELDS:
        value = body.get(key)
        if isinstance(value, Mapping):  # response_format, or the Responses API's text.format
            tally.found = True
            tally.json_text(value)
    if not tally.found:
        return 0
    return (rates.per_request
            + -(-tally.text_bytes // rates.bytes_per_token)
            + tally.ids
            + tally.items * rates.per_item
            + tally.tools * rates.per_tool
            + (rates.tools_preamble if tally.tools or tally.builtin_tools else 0)
            + tally.builtin_tools * rates.builtin_tool
            + tally.non_text * rates.non_text)
