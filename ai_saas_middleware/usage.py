"""Usage from request and response bodies. Pure; no I/O.

- :func:`~ai_saas_middleware.estimate.estimate_prompt_tokens` (re-exported): tokens of a
  request body, estimated; see :mod:`ai_saas_middleware.estimate`.
- :class:`ResponseMeter`: fed the response body as it passes (JSON or SSE), it finds the
  provider's own usage and counts the text produced, without changing or holding back a
  byte, in bounded memory whatever the body's size.

What is trusted, and the floor under it:

- A JSON body: its top-level ``usage`` object (OpenAI ``prompt_tokens`` /
  ``completion_tokens``, or ``input_tokens`` / ``output_tokens``). A body up to
  ``max_buffer`` is parsed whole; a larger one goes through :class:`_JsonScanner`, which
  keeps a few frames of state and the ``usage`` object's bytes (at most
  ``USAGE_MAX_BYTES``), never the body.
- An SSE stream: usage only from a provider's own chunk framing, i.e. OpenAI
  chat/completions chunks, Anthropic Messages events and OpenAI Responses events (see
  :func:`_provider_chunk`). The first provider framing seen is the stream's; a chunk of
  another framing, a JSON line of no provider's framing, and anything inside content
  text are not provider usage. Of the figures trusted, each count takes the largest
  reported: real counts are cumulative, so that is the last one, and a later chunk can
  never lower the bill.
- The floor: completion tokens are never billed below ``ceil(chars / 8)`` of the
  completion text seen (``FLOOR_CHARS_PER_TOKEN``), so text that imitates a provider
  chunk cannot bill what was produced as free.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from . import jsonbytes
from .estimate import estimate_prompt_tokens, estimate_tokens
from .types import Outcome, new_outcome

__all__ = ["ResponseMeter", "estimate_prompt_tokens", "estimate_tokens", "meter_for",
           "usage_from"]

# Why 8: BPE tokenizers (cl100k, o200k, Claude's, Llama's) average about 4 characters
# a token on English prose, 3 on code, and 1 to 2 on CJK and most other scripts; a
# token of more than 8 characters on average over a whole reply takes text made mostly
# of very long words or runs of spaces or punctuation. So ceil(chars / 8) stays below
# what a provider really counts for any ordinary reply (every stream and body of the
# tests and demos included), and still bills at least half of a prose reply whatever a
# forged usage line says.
FLOOR_CHARS_PER_TOKEN = 8
# A JSON body over this many bytes is scanned as it passes instead of parsed whole.
MAX_BUFFER_BYTES = 1_048_576
# An SSE line longer than this is not kept: its bytes after ``data:`` count as text
# produced (never as usage), as they pass.
MAX_LINE_BYTES = 1_048_576
# The largest top-level ``usage`` object kept from a scanned JSON body (real ones are
# well under 2 KB); a larger one is not trusted.
USAGE_MAX_BYTES = 65_536


def usage_from(payload: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI-compatible ``usage`` object, if present."""
    if not isinstance(payload, (dict, Mapping)):  # dict first: the ABC check is slower
        return None
    usage = payload.get("usage")
    if not isinstance(usage, (dict, Mapping)):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if _count(prompt) is not None and _count(completion) is not None:
        return prompt, completion
    return None


def _count(value: Any) -> int | None:
    """``value`` if it is a token count (a non-negative int, not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def floor_tokens(chars: int) -> int:
    """The fewest completion tokens ``chars`` characters of text are billed."""
    return -(-chars // FLOOR_CHARS_PER_TOKEN)


# ------------------------------------------------------------------ where text is
# A trie of the paths whose strings are completion text: a dict maps a key (``"*"``:
# any item of an array) to the node below; ``TEXT: True`` marks a node whose string
# value counts. One definition serves the whole-body parse and the scanner, so both
# count the same characters.
TEXT = None  # the key that marks a counted string
_LEAF: dict[Any, Any] = {TEXT: True}
_CONTENT: dict[Any, Any] = {TEXT: True, "*": {TEXT: True, "text": _LEAF}}  # str or parts
_MESSAGE: dict[Any, Any] = {
    "content": _CONTENT, "refusal": _LEAF, "reasoning_content": _LEAF,
    "tool_calls": {"*": {"function": {"arguments": _LEAF}}},
    "function_call": {"arguments": _LEAF},
}
_USAGE: dict[Any, Any] = {}  # marker: the root's usage object (captured, not counted)
_JSON_BODY: dict[Any, Any] = {"choices": {"*": {"message": _MESSAGE, "text": _LEAF}},
                              "usage": _USAGE}
_OPENAI_CHUNK: dict[Any, Any] = {"choices": {"*": {"delta": _MESSAGE, "text": _LEAF}}}


def _text_chars(value: Any, node: Mapping[Any, Any]) -> int:
    """Characters of the strings of ``value`` at the trie ``node``'s counted paths."""
    total = 0
    todo = [(value, node)]
    while todo:
        value, node = todo.pop()
        if isinstance(value, str):
            if node.get(TEXT):
                total += len(value)
        # A dict and a list are what JSON parses to: each is tested before the Mapping
        # ABC, whose isinstance costs several times a plain type's (no list is a Mapping).
        elif isinstance(value, dict):
            for key, child in node.items():
                if key is not TEXT and key != "*" and key in value:
                    todo.append((value[key], child))
        elif isinstance(value, list):
            child = node.get("*")
            if child is not None:
                todo.extend((item, child) for item in value)
        elif isinstance(value, Mapping):
            for key, child in node.items():
                if key is not TEXT and key != "*" and key in value:
                    todo.append((value[key], child))
    return total


_CONTINUATION = bytes(range(0x80, 0xC0))


def _utf8_chars(data: bytes) -> int:
    """Characters of UTF-8 bytes (those that start a character), split-proof."""
    return len(data.translate(None, _CONTINUATION))


# ------------------------------------------------------------------ SSE framings
_ANTHROPIC_EVENTS = frozenset({
    "message_start", "message_delta", "message_stop", "content_block_start",
    "content_block_delta", "content_block_stop", "ping", "error"})
_ANTHROPIC_DELTA_TEXT = ("text", "partial_json", "thinking")
_RESPONSES_USAGE = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Deltas of text the model produced (not audio, whose deltas are base64).
_RESPONSES_TEXT = frozenset({
    "response.output_text.delta", "response.refusal.delta",
    "response.function_call_arguments.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.custom_tool_call_input.delta"})
_OPENAI_OBJECTS = frozenset({"chat.completion.chunk", "text_completion"})

OPENAI, ANTHROPIC, RESPONSES = "openai", "anthropic", "responses"


def _anthropic_usage(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, Mapping):
        return None, None
    prompt = _count(usage.get("input_tokens"))
    if prompt is not None:  # cached prompt tokens are prompt tokens too, as with OpenAI
        for key in ("cache_creation_input_tokens", "cache_read_input_tokens"):
            prompt += _count(usage.get(key)) or 0
    return prompt, _count(usage.get("output_tokens"))


def _provider_chunk(event: Any) -> tuple[str, int | None, int | None, int] | None:
    """A data line's JSON as a provider chunk: (framing, prompt, completion, text chars),
    a count None when the chunk does not report it; None when it is no provider chunk."""
    if not isinstance(event, Mapping):
        return None
    kind = event.get("type")
    if isinstance(kind, str):
        if kind in _ANTHROPIC_EVENTS:
            if kind == "message_start":
                message = event.get("message")
                usage = message.get("usage") if isinstance(message, Mapping) else None
                return ANTHROPIC, *_anthropic_usage(usage), 0
            if kind == "message_delta":
                return ANTHROPIC, *_anthropic_usage(event.get("usage")), 0
            chars = 0
            delta = event.get("delta")
            if kind == "content_block_delta" and isinstance(delta, Mapping):
                for key in _ANTHROPIC_DELTA_TEXT:
                    text = delta.get(key)
                    if isinstance(text, str):
                        chars += len(text)
            return ANTHROPIC, None, None, chars
        if kind.startswith("response."):
            if kind in _RESPONSES_USAGE:
                response = event.get("response")
                usage = response.get("usage") if isinstance(response, Mapping) else None
                if isinstance(usage, Mapping):
                    return (RESPONSES, _count(usage.get("input_tokens")),
                            _count(usage.get("output_tokens")), 0)
                return RESPONSES, None, None, 0
            delta = event.get("delta")
            chars = len(delta) if kind in _RESPONSES_TEXT and isinstance(delta, str) else 0
            return RESPONSES, None, None, chars
        return None
    obj = event.get("object")
    # OpenAI's chunks name their object; some OpenAI-compatible servers (and the final
    # usage chunk of others) send only ``choices``.
    if obj in _OPENAI_OBJECTS or (obj is None and isinstance(event.get("choices"), list)):
        usage = usage_from(event)
        chars = _text_chars(event, _OPENAI_CHUNK)
        if usage is None:
            return OPENAI, None, None, chars
        return OPENAI, usage[0], usage[1], chars
    return None


# ------------------------------------------------------------------ the JSON scanner
_WS = re.compile(rb"[ \t\r\n]*+")
_SCALAR = re.compile(rb'[^,:{}\[\]" \t\r\n]++')
_SKIP_RUN = re.compile(rb'[^"{}\[\]]*+')  # inside a subtree nothing below matters in
_STRING_SKIP = re.compile(rb'(?:[^"\\]++|\\.)*+', re.S)  # stops at " or a final \
# Only whole escapes: stops at ", at an escape cut by the chunk's end, or a bad escape.
_STRING_COUNT = re.compile(
    rb'(?:[^"\\]++|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}'
    rb'|\\u[0-9a-fA-F]{4}|\\[^u])*+', re.S)
_ESCAPE = re.compile(
    rb'\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\.',
    re.S)
_HIGH_SURROGATE = re.compile(rb'\\u[dD][89abAB][0-9a-fA-F]{2}')
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")
_QUOTE, _COMMA, _COLON, _LBRACE, _BACKSLASH = b'"'[0], b","[0], b":"[0], b"{"[0], b"\\"[0]
_SKIP, _COUNT, _KEY = 0, 1, 2  # what a string being read is
_MAX_KEY_BYTES = 256  # a longer key names nothing we look for
_MAX_CARRY = 12  # an escaped surrogate pair, the longest escape cut by a chunk's end


def _escaped_chars(segment: bytes) -> int:
    """Characters a run of whole JSON string bytes decodes to (escapes each one, an
    escaped surrogate pair one, UTF-8 by its lead bytes)."""
    chars = _utf8_chars(segment)
    backslashes = segment.count(b"\\")
    if not backslashes:
        return chars
    if b"\\\\u" in segment or b"\\ud" in segment or b"\\uD" in segment:
        # An escaped backslash before a "u", or maybe a surrogate pair: match escapes.
        matched = _ESCAPE.findall(segment)
        return chars - (sum(map(len, matched)) - len(matched))
    # Otherwise by counts, at C speed: a run of backslashes pairs up from its start (a
    # segment starts between escapes), each escape is one character, \uXXXX four more.
    escapes = backslashes - segment.count(b"\\\\")
    return chars - escapes - 4 * segment.count(b"\\u")


class _JsonScanner:
    """Reads a JSON body chunk by chunk, in bounded memory, for its top-level ``usage``
    object and the characters of its completion text (the ``_JSON_BODY`` trie).

    Only the levels on a trie path are tracked (a few frames); any other subtree is
    skipped by bracket depth, and string contents by compiled regexes, so a multi-MB
    string costs C speed. What a chunk ends in the middle of (a string, an escape, a
    key, a number) carries over: at most ``_MAX_CARRY`` bytes and the key read so far.
    The body is not validated: a malformed one yields what was read of it.
    """

    __slots__ = ("_capture", "_capture_from", "_capturing", "_carry", "_key", "_skip_depth",
                 "_stack", "_string", "chars", "usage_bytes")

    def __init__(self) -> None:
        # A frame: [trie node, is an object, a key is expected next, the current key].
        # The bottom one is an array holding the root value.
        self._stack: list[list[Any]] = [[{"*": _JSON_BODY}, False, False, None]]
        self._skip_depth = 0  # > 0: inside a subtree of no interest (or the usage object)
        self._string: int | None = None  # the kind of string being read, if any
        self._key = bytearray()
        self._carry = b""
        self._capturing = False
        self._capture: bytearray | None = None
        self._capture_from = 0
        self.chars = 0
        self.usage_bytes: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        """Read the next bytes of the body."""
        buf = self._carry + chunk if self._carry else chunk
        self._carry = b""
        end = len(buf)
        pos = 0
        stack = self._stack
        while pos < end:
            if self._string is not None:
                pos = self._read_string(buf, pos)
                continue
            if self._skip_depth:
                pos = _SKIP_RUN.match(buf, pos).end()  # type: ignore[union-attr]
                if pos == end:
                    break
                byte = buf[pos]
                pos += 1
                if byte == _QUOTE:
                    self._string = _SKIP
                elif byte in _OPEN:
                    self._skip_depth += 1
                else:
                    self._skip_depth -= 1
                    if not self._skip_depth and self._capturing:
                        self._capture_end(buf, pos)
                continue
            pos = _WS.match(buf, pos).end()  # type: ignore[union-attr]
            if pos == end:
                break
            byte = buf[pos]
            frame = stack[-1]
            if byte == _COMMA:
                frame[2] = frame[1]
                pos += 1
            elif byte == _COLON:
                pos += 1
            elif byte in _CLOSE:
                if len(stack) > 1:
                    stack.pop()
                pos += 1
            elif frame[2]:  # an object's key
                frame[2] = False
                frame[3] = None
                if byte == _QUOTE:
                    self._key.clear()
                    self._string = _KEY
                    pos += 1
                elif byte in _OPEN:  # malformed: skip what it opens
                    self._skip_depth = 1
                    pos += 1
                else:
                    pos = _SCALAR.match(buf, pos).end()  # type: ignore[union-attr]
            else:  # a value
                node = frame[0].get(frame[3] if frame[1] else "*")
                pos += 1
                if byte == _QUOTE:
                    self._string = _COUNT if node is not None and node.get(TEXT) else _SKIP
                elif byte in _OPEN:
                    if node is _USAGE and byte == _LBRACE:
                        self._capturing = True
                        self._capture = bytearray()
                        self._capture_from = pos - 1
                        self._skip_depth = 1
                    elif node and len(node) > (TEXT in node):
                        is_object = byte == _LBRACE
                        stack.append([node, is_object, is_object, None])
                    else:
                        self._skip_depth = 1
                else:
                    pos = _SCALAR.match(buf, pos - 1).end()  # type: ignore[union-attr]
        if self._capturing:
            self._capture_add(buf[self._capture_from:end - len(self._carry)])
            self._capture_from = 0

    def _read_string(self, buf: bytes, pos: int) -> int:
        """Read a string's bytes from ``pos``; the position after them (or the end)."""
        end = len(buf)
        if self._string == _COUNT:
            stop = _STRING_COUNT.match(buf, pos).end()  # type: ignore[union-attr]
            if stop < end and buf[stop] == _QUOTE:
                self.chars += _escaped_chars(buf[pos:stop])
                self._string = None
                return stop + 1
            if stop < end and end - stop >= _MAX_CARRY:  # a bad escape: skip the rest
                self.chars += _escaped_chars(buf[pos:stop])
                self._string = _SKIP
                return stop
            # The chunk ends inside the string, maybe inside an escape, maybe between the
            # halves of an escaped surrogate pair: keep those bytes for the next chunk.
            cut = stop
            high = cut - 6
            if high >= pos and _HIGH_SURROGATE.fullmatch(buf, high, cut):
                run = high
                while run > pos and buf[run - 1] == _BACKSLASH:
                    run -= 1
                if (high - run) % 2 == 0:  # that backslash starts an escape
                    cut = high
            self.chars += _escaped_chars(buf[pos:cut])
            self._carry = buf[cut:]
            return end
        stop = _STRING_SKIP.match(buf, pos).end()  # type: ignore[union-attr]
        if self._string == _KEY and len(self._key) <= _MAX_KEY_BYTES:
            self._key += buf[pos:stop]
        if stop < end and buf[stop] == _QUOTE:
            if self._string == _KEY:
                self._key_end()
            self._string = None
            return stop + 1
        self._carry = buf[stop:]  # nothing, or a backslash whose escape is cut
        return end

    def _key_end(self) -> None:
        key: str | None = None
        if len(self._key) <= _MAX_KEY_BYTES:
            raw = bytes(self._key)
            try:
                key = json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
            except ValueError:
                key = None
        self._stack[-1][3] = key

    def _capture_add(self, data: bytes) -> None:
        if self._capture is not None:
            self._capture += data
            if len(self._capture) > USAGE_MAX_BYTES:
                self._capture = None  # too large to be a provider's usage

    def _capture_end(self, buf: bytes, pos: int) -> None:
        self._capture_add(buf[self._capture_from:pos])
        self._capturing = False
        # The last ``usage`` key wins, as with json.loads.
        self.usage_bytes = bytes(self._capture) if self._capture is not None else None
        self._capture = None

    def usage(self) -> tuple[int, int] | None:
        """The top-level ``usage`` object's (prompt, completion), if one was read whole."""
        if self.usage_bytes is None:
            return None
        try:
            return usage_from({"usage": json.loads(self.usage_bytes)})
        except (ValueError, RecursionError):
            return None


# ------------------------------------------------------------------ the meter
class ResponseMeter:
    """Watches one response body go by and says what it used.

    Call :meth:`start` with the status and content type, :meth:`feed` with each body
    chunk as it is sent, and :meth:`outcome` when the response ended (or the client
    left). A JSON body up to ``max_buffer`` bytes is kept and parsed at the end, a larger
    one scanned as it passes; an SSE stream is read line by line, keeping at most one
    line of ``MAX_LINE_BYTES``. Memory stays bounded whatever the body's size.
    """

    __slots__ = (
        "_buffer",
        "_chars",
        "_completion",
        "_event_name",
        "_framing",
        "_json",
        "_long_line",
        "_prompt",
        "_scanner",
        "_size",
        "_sse",
        "complete",
        "length_declared",
        "max_buffer",
        "status",
    )

    def __init__(self, max_buffer: int = MAX_BUFFER_BYTES):
        self.max_buffer = max_buffer
        self.status = 0
        self._sse = False
        self._json = False
        self._buffer: list[bytes] = []
        self._size = 0
        self._scanner: _JsonScanner | None = None
        self._prompt: int | None = None  # the largest trusted figure of each count
        self._completion: int | None = None
        self._chars = 0
        self._framing: str | None = None  # the provider framing of this stream
        self._event_name: bytes | None = None  # the SSE event's ``event:`` field
        self._long_line = 0  # 1: in a long data line (counted), 2: another long line
        self.complete = False
        self.length_declared = False

    def start(self, status: int, content_type: str, content_length: str | None = None) -> None:
        """The response began: its status, content type and declared length, if any."""
        self.status = status
        self.length_declared = content_length is not None
        content_type = content_type.lower()
        self._sse = content_type.startswith("text/event-stream")
        self._json = not self._sse and "json" in content_type

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the body, as they are sent."""
        if not chunk:
            return
        if self._sse:
            self._feed_sse(chunk)
        elif self._scanner is not None:
            self._scanner.feed(chunk)
        elif self._json:
            self._buffer.append(chunk)
            self._size += len(chunk)
            if self._size > self.max_buffer:  # too large to keep: scan it from here on
                self._scanner = _JsonScanner()
                for part in self._buffer:
                    self._scanner.feed(part)
                self._buffer = []

    # -------------------------------------------------------------- SSE
    def _feed_sse(self, chunk: bytes) -> None:
        if self._long_line:
            newline = chunk.find(b"\n")
            if self._long_line == 1:
                self._chars += _utf8_chars(chunk if newline < 0 else chunk[:newline])
            if newline < 0:
                return
            self._long_line = 0
            chunk = chunk[newline + 1:]
        last = chunk.rfind(b"\n")
        if last < 0:
            self._buffer.append(chunk)
            self._size += len(chunk)
            if self._size > MAX_LINE_BYTES:
                self._start_long_line(self._buffer)
            return
        lines = b"".join([*self._buffer, chunk[:last]]).split(b"\n") if self._buffer \
            else chunk[:last].split(b"\n")
        rest = chunk[last + 1:]
        self._buffer = [rest] if rest else []
        self._size = len(rest)
        for line in lines:
            self._sse_line(line)
        if self._size > MAX_LINE_BYTES:
            self._start_long_line(self._buffer)

    def _start_long_line(self, pieces: list[bytes]) -> None:
        """A line grew past ``MAX_LINE_BYTES``: count what it holds as text produced (if
        it is a data line) as it passes, and keep none of it. (Its pieces are counted
        one by one, not joined: that would hold the line twice.)"""
        self._buffer = []
        self._size = 0
        if b"".join(piece[:5] for piece in pieces[:5])[:5] == b"data:":
            self._long_line = 1
            self._chars += sum(map(_utf8_chars, pieces)) - len(b"data:")
        else:
            self._long_line = 2

    def _sse_line(self, line: bytes) -> None:
        if len(line) > MAX_LINE_BYTES:  # as if it had come in pieces: see _start_long_line
            if line.startswith(b"data:"):
                self._chars += _utf8_chars(line[5:])
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._event_name = None  # an event ends at a blank line
        elif line.startswith(b"data:"):
            payload = line[6:] if line.startswith(b"data: ") else line[5:]
            if payload and payload != b"[DONE]":
                self._sse_data(payload)
        elif line.startswith(b"event:"):
            self._event_name = line[6:].strip()

    def _sse_last_line(self, line: bytes) -> None:
        """The stream's last line, which no newline ended. If the response was cut
        short, a line that does not parse may be a provider chunk cut in two: its bytes
        are mostly JSON framing, not text, so it counts only if it does not look like
        JSON (a relay's plain text, cut, was still produced)."""
        if not self.complete and line.startswith(b"data:"):
            payload = line[5:].lstrip(b" ")
            if payload[:1] in (b"{", b"[", b'"'):
                try:
                    json.loads(payload)
                except (ValueError, RecursionError):
                    return
        self._sse_line(line)

    def _sse_data(self, payload: bytes) -> None:
        try:
            event = jsonbytes.loads(payload)
        except (ValueError, RecursionError):  # not JSON (or too deeply nested): text
            self._chars += _utf8_chars(payload)
            return
        chunk = _provider_chunk(event)
        if chunk is not None:
            framing, prompt, completion, chars = chunk
            name = self._event_name
            named_right = (name is None or name == b"message" if framing == OPENAI
                           else name is None or name == str(event.get("type")).encode())
            if named_right and self._framing in (None, framing):
                self._framing = framing
                if prompt is not None and (self._prompt is None or prompt > self._prompt):
                    self._prompt = prompt
                if completion is not None and (self._completion is None
                                               or completion > self._completion):
                    self._completion = completion
                self._chars += chars
                return
        # No provider chunk: all of it counts as text produced (keys and numbers too,
        # since relayed model text can take any JSON shape), and none of it as usage.
        self._chars += _utf8_chars(payload)

    # -------------------------------------------------------------- the end
    def finish(self) -> None:
        """The last byte was sent."""
        self.complete = True

    def outcome(self, *, failed: bool = False, disconnected: bool = False) -> Outcome:
        """What the response used: the provider's usage (with the completion floor
        applied) if it was seen, and the characters of text produced."""
        if self._sse:
            if self._buffer:
                rest = b"".join(self._buffer)
                self._buffer = []
                self._size = 0
                self._sse_last_line(rest)
        elif self._scanner is not None:
            self._prompt, self._completion = self._scanner.usage() or (None, None)
            self._chars = self._scanner.chars
        elif self._json and self._buffer:
            try:
                payload = jsonbytes.loads(b"".join(self._buffer))
            except (ValueError, RecursionError):
                payload = None
            self._prompt, self._completion = usage_from(payload) or (None, None)
            self._chars = _text_chars(payload, _JSON_BODY)
            self._buffer = []
        usage = None
        if self._prompt is not None and self._completion is not None:
            usage = (self._prompt, max(self._completion, floor_tokens(self._chars)))
        return new_outcome(self.status or 500, usage, self._chars, failed,
                           disconnected or (not self.complete and not failed))

    @property
    def provider_usage(self) -> tuple[int, int] | None:
        """The trusted usage seen so far (before the floor), if both counts were seen."""
        if self._prompt is None or self._completion is None:
            return None
        return self._prompt, self._completion

    @property
    def completion_chars(self) -> int:
        """Characters of completion text seen so far."""
        return self._chars


def meter_for(ctx: Any) -> ResponseMeter:
    """The meter for the response of the request ``ctx`` (a ``RequestContext``) admitted:
    one that also keeps the body when the response cache may store it (adapters make
    theirs here)."""
    cache = ctx.cache
    if cache is not None and cache.store and cache.hit is None:
        meter: ResponseMeter = cache.meter()
        return meter
    return ResponseMeter()
