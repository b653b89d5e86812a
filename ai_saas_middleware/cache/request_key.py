"""What identifies a chat request for the cache. Pure; no I/O, no numpy.

From an OpenAI-style chat body, :func:`request_keys` derives three values:

``exact_key``
    sha256 hex over a canonical encoding of the tenant, the endpoint, the model class
    and everything in the body that can change the answer: the whole message history
    (system prompt included), tools, and the parameters. Two requests with the same
    exact key get the same cached answer.
``partition_key``
    The same, with the text of the *last user message* left out: every earlier turn
    exactly, the system prompt, tools, parameters, and any non-text part (an image) of
    the last user message. Only requests of one partition are compared semantically,
    which is how a conversation matches on its whole history: earlier turns exactly,
    the last one by meaning.
``semantic_text``
    The last user message's text (normalised), the one thing compared by meaning;
    ``None`` when the request has no user message (then only the exact path applies).

Normalisation (so a key does not change with formatting that cannot change the answer):

* Every string is NFC; line endings become ``\\n``; inside a line, a run of whitespace
  after a non-space character becomes one space; trailing whitespace of a line goes; three
  or more line breaks become two; the text is stripped. Leading indentation is kept,
  since in code or YAML it is meaning.
* Mapping key order is irrelevant (sorted); list order is kept (messages, tools,
  content parts and ``stop`` sequences are taken in the order given).
* A field whose value is ``null`` counts as absent (the OpenAI API reads it so);
  numbers compare by value (``0`` and ``0.0`` are one).
* A message's ``content`` given as a string or as one text part is the same.

Fields that cannot change the answer are left out of both keys: ``stream`` and
``stream_options`` (a hit is replayed as SSE when the request streams), ``user``,
``metadata``, ``store``, ``service_tier``. Every other field is kept, including ones
this module does not know (an unknown parameter may change the answer). ``model`` is
kept beside the model class: two requests that name different models miss each other
even when routed to one class.

:func:`cacheable` says whether a request's answer is meant to repeat (see there).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "KEY_VERSION",
    "Cacheability",
    "RequestKeys",
    "cacheable",
    "normalize_text",
    "request_keys",
]

#: Bumped whenever the canonical encoding changes: entries keyed by an older version
#: simply stop matching (they expire), never match something else.
KEY_VERSION = 1

# Body fields that change neither what the model answers nor the body it returns once
# the transport (SSE or JSON) is settled.
_IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store",
                             "service_tier"})

# Stands in for the last user message's text in the partition key, after its non-text
# parts. A client sending this very object as a part only adds a second one, so no two
# different requests encode alike.
_SEMANTIC_SLOT = {"\x00semantic": True}

_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
_WS_OR_CR = re.compile(r"[^\S ]|  ")


def normalize_text(text: str) -> str:
    """``text`` NFC-normalised with insignificant whitespace removed (see the module).

    Cheap for the common case: a string already NFC with single spaces and no other
    whitespace is returned after one regex scan.
    """
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if _WS_OR_CR.search(text) is None:
        return text.strip(" ")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INNER_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _canonical(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with strings normalised and nulls dropped."""
    if isinstance(value, str):
        return normalize_text(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return str(value)


def _content_parts(content: Any) -> list[Any]:
    """``content`` as a list of canonical parts; a plain string is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": normalize_text(content)}]
    if isinstance(content, list):
        return [_canonical(part) for part in content]
    return [] if content is None else [_canonical(content)]


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(
        part.get("text"), str)


@dataclass(frozen=True, slots=True)
class RequestKeys:
    """The cache identities of one request (see the module docstring)."""

    exact_key: str
    partition_key: str
    semantic_text: str | None


def request_keys(body: Mapping[str, Any], *, tenant_id: str, endpoint: str,
                 model_class: str) -> RequestKeys:
    """The exact key, partition key and semantic text of a chat request.

    Args:
        body: the parsed JSON body (``messages``, ``model``, ``temperature`` ...).
        tenant_id: the verified tenant; part of both keys, so tenants never share one.
        endpoint: the endpoint path (or pattern) the request came in on.
        model_class: the class of model that will answer (the routing choice's class).

    Raises:
        ValueError: ``messages`` is not a list of objects (a request :func:`cacheable`
            refuses; callers check that first).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("body.messages: expected a list of message objects")
    canonical_messages: list[dict[str, Any]] = []
    last_user = -1
    for index, message in enumerate(messages):
        entry = {str(k): _canonical(v) for k, v in message.items()
                 if k != "content" and v is not None}
        entry["content"] = _content_parts(message.get("content"))
        canonical_messages.append(entry)
        if message.get("role") == "user":
            last_user = index
    params = {str(k): _canonical(v) for k, v in body.items()
              if k != "messages" and k not in _IGNORED_FIELDS and v is not None}
    head = {"v": KEY_VERSION, "tenant": tenant_id, "endpoint": endpoint,
            "model_class": model_class, "params": params}

    # Each part is encoded once and both digests are fed from the same encodings: JSON
    # never holds a raw newline, so newline-joined encodings parse back unambiguously.
    head_encoded = _ENCODER.encode(head)
    encoded = [_ENCODER.encode(m) for m in canonical_messages]
    exact = _digest(b"exact\n", head_encoded, encoded)
    semantic_text: str | None = None
    if last_user >= 0:
        user_parts = canonical_messages[last_user]["content"]
        texts = [p["text"] for p in user_parts if _is_text_part(p)]
        semantic_text = "\n".join(texts)
        # Non-text parts (an image) stay in the partition: only the text is compared by
        # meaning, so requests about different images never meet.
        slot_parts = [p for p in user_parts if not _is_text_part(p)] + [_SEMANTIC_SLOT]
        encoded[last_user] = _ENCODER.encode({**canonical_messages[last_user],
                                              "content": slot_parts})
    partition = _digest(b"partition\n", head_encoded, encoded)
    return RequestKeys(exact_key=exact, partition_key=partition, semantic_text=semantic_text)


# Built once: json.dumps() with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(kind: bytes, head: str, messages: list[str]) -> str:
    digest = hashlib.sha256(kind)
    digest.update(head.encode("utf-8", "surrogatepass"))
    for message in messages:
        digest.update(b"\n")
        digest.update(message.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class Cacheability(NamedTuple):
    """Whether a request may be answered from (and stored in) the cache, and why.

    ``reason`` is a stable token: ``"ok"``, ``"malformed"``, ``"temperature"``, ``"n"``,
    ``"tools"``.
    """

    cacheable: bool
    reason: str


def cacheable(body: Mapping[str, Any], *, allow_tools: bool = False,
              max_temperature: float = 0.0) -> Cacheability:
    """Whether ``body``'s answer is meant to repeat, so a cached one may serve it.

    By default a request is cacheable when ``temperature`` is unset or 0 (an unset
    temperature is the app not asking for variety; ``max_temperature`` raises the bar),
    ``n`` is unset or 1 (several choices are a request for variety), and it offers no
    tool the model could call: with ``tools`` (or the legacy ``functions``) present the
    answer may be an action, so it is not cacheable unless ``allow_tools``, or unless
    ``tool_choice`` (``function_call``) is ``"none"``, which forbids calling them.
    Streaming is allowed (a hit is replayed as SSE). Tool results in the history are
    data and do not prevent caching. ``top_p``, ``seed`` and the rest do not decide
    cacheability; they are part of the keys.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, Mapping) for m in messages):
        return Cacheability(False, "malformed")
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            return Cacheability(False, "malformed")
        if temperature > max_temperature:
            return Cacheability(False, "temperature")
    n = body.get("n")
    if n is not None and n != 1:
        return Cacheability(False, "n")
    if not allow_tools:
        offers_tools = bool(body.get("tools")) or bool(body.get("functions"))
        forbidden = body.get("tool_choice", body.get("function_call")) == "none"
        if offers_tools and not forbidden:
            return Cacheability(False, "tools")
    return Cacheability(True, "ok")
