"""What a client sends, read and checked before admission. Pure; no I/O.

Everything here turns client input (headers, the JSON body) into the values admission
needs, or into the 4xx refusal that input calls for: a client's mistake is never a 500
and never an unbounded error message.

- :func:`declared_length`: the ``Content-Length`` (400 when malformed, 413 when too large).
- :func:`parse_body`: the JSON body, ``max_tokens`` and the prompt's estimated tokens.
- :func:`requirements`: the endpoint's needs, tightened by the request's ``X-AI-*`` headers.

Every number a client sends is bounded before it is parsed (the text's length and
alphabet) and after (its value), so no input costs more than a few microseconds to
read, and no message built from one grows with it: ``Content-Length`` is at most
:data:`MAX_LENGTH_DIGITS` ASCII digits, ``max_tokens`` at most
:data:`MAX_OUTPUT_TOKENS`, each requirement header at most :data:`MAX_HEADER_CHARS`
characters (a cost in plain decimal notation, never an exponent), and what an error
message echoes of the client's text (content type, model name) is cut to
:data:`MAX_ECHO_CHARS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from . import jsonbytes
from .config import EndpointConfig
from .estimate import estimate_prompt_tokens
from .responses import refusal
from .routing import Requirements
from .types import Decision, RequestInfo

__all__ = ["MAX_OUTPUT_TOKENS", "declared_length", "parse_body", "requirements", "too_large"]

# 18 digits are more than any body a server would take (10**18 bytes is an exabyte) and
# fewer than int() is slow on (or refuses: Python's 4,300-digit limit is a ValueError).
MAX_LENGTH_DIGITS = 18
# The largest max_tokens / max_completion_tokens taken. No model today produces more
# than a few hundred thousand tokens in one answer; ten million leaves room for a
# decade of growth, and keeps every figure built from it (the reservation, the
# context-window check, prices times tokens) small and exact. Anything larger is a
# 400, never a reservation that alone exhausts any quota by accident.
MAX_OUTPUT_TOKENS = 10_000_000
MAX_HEADER_CHARS = 32  # an X-AI-* requirement header's text; far more than any real value
MAX_MODEL_CHARS = 256  # a model id in the body; longer ones cannot name a profile we serve
MAX_ECHO_CHARS = 64  # what a message quotes of a client's text
# X-AI-Max-Cost: USD as a plain decimal, at most 9 whole digits and 18 decimals. No
# exponent: Decimal("1e-100000000") is cheap to make but 100 MB to print.
_USD = re.compile(r"[0-9]{1,9}(?:\.[0-9]{0,18})?|\.[0-9]{1,18}")
_MAX_LATENCY_DIGITS = 9  # X-AI-Max-Latency-Ms: up to 999,999,999 ms (over eleven days)


def _echo(text: str) -> str:
    """``text`` as a message may quote it: at most :data:`MAX_ECHO_CHARS` characters."""
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def too_large(max_body_bytes: int) -> Decision:
    """The refusal for a body over ``http.maxBodyBytes``."""
    return refusal("request_too_large",
                   f"request body is larger than the limit of {max_body_bytes} bytes")


def declared_length(headers: Mapping[str, str], max_body_bytes: int) -> int | Decision | None:
    """The request's Content-Length (None without one), or the refusal it calls for:
    400 when it is not a whole number, 413 when it is over ``max_body_bytes`` (so an
    oversized body is refused before a byte of it is read)."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    # ASCII digits only: str.isdigit() also takes '²' and other scripts' digits, which
    # int() refuses or reads; and a bounded count, as int() of thousands is an error.
    if not (0 < len(declared) <= MAX_LENGTH_DIGITS and declared.isascii()
            and declared.isdigit()):
        return refusal("invalid_request", "Content-Length must be a whole number of at most "
                                          f"{MAX_LENGTH_DIGITS} ASCII digits")
    length = int(declared)
    return too_large(max_body_bytes) if length > max_body_bytes else length


def parse_body(info: RequestInfo, endpoint: EndpointConfig, prompt_estimate: str = "estimate"
               ) -> tuple[dict[str, Any], int, int] | Decision:
    """(the JSON body, output tokens to reserve, the prompt's tokens estimated in the
    ``prompt_estimate`` mode of ``quota.promptEstimate``), or a refusal
    (415 for another content type, 400 for a body that is not a JSON object or a bad
    ``max_tokens``)."""
    body: Any = {}
    if info.body and not info.body.isspace():
        content_type = info.headers.get("content-type", "")
        if content_type != "application/json":  # the usual case, without parsing
            content_type = content_type.split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return refusal("unsupported_media_type",
                           f"this endpoint takes application/json, not "
                           f"{_echo(content_type) or 'a body without a content type'}")
        try:
            body = jsonbytes.loads(info.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return refusal("invalid_json", f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return refusal("invalid_json", "request body must be a JSON object")
    max_tokens = _max_output_tokens(body)
    if isinstance(max_tokens, Decision):
        return max_tokens
    if max_tokens is None:
        max_tokens = endpoint.default_max_output_tokens
    return body, max_tokens, estimate_prompt_tokens(body, prompt_estimate)


def _max_output_tokens(body: Mapping[str, Any]) -> int | Decision | None:
    """The output tokens the body allows (None when it states none), or a 400.

    ``max_tokens`` and ``max_completion_tokens`` (OpenAI's newer name for it) are each
    checked whatever the other holds: absent or null is unstated, anything else must be
    a whole number from 1 to :data:`MAX_OUTPUT_TOKENS`. When both are stated the larger
    is reserved: which one a provider honours differs (OpenAI's newer models take only
    the new name, many compatible servers only the old one), and reserving the larger
    is the only choice whose reservation covers what the provider may produce.
    """
    stated: int | None = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, int)
                or not 1 <= value <= MAX_OUTPUT_TOKENS):
            return refusal("invalid_request",
                           f"{name} must be a whole number from 1 to {MAX_OUTPUT_TOKENS:,}")
        stated = value if stated is None else max(stated, value)
    return stated


def requirements(headers: Mapping[str, str], endpoint: EndpointConfig, body: Mapping[str, Any],
                 prompt_tokens: int, max_output_tokens: int) -> Requirements | Decision:
    """What the request needs of a model: the endpoint's requirements, tightened (never
    loosened) by ``X-AI-Min-Quality``, ``X-AI-Max-Latency-Ms`` and ``X-AI-Max-Cost``, and
    the model the body names; or a 400 for a malformed header."""
    quality = endpoint.required_quality
    latency = endpoint.max_latency_ms
    cost = endpoint.max_cost_per_request
    try:
        if "x-ai-min-quality" in headers:
            text = headers["x-ai-min-quality"]
            if len(text) > MAX_HEADER_CHARS:
                raise ValueError
            value = float(text)
            if not 0 <= value <= 1:  # also refuses nan and inf
                raise ValueError
            quality = value if quality is None else max(quality, value)
        if "x-ai-max-latency-ms" in headers:
            text = headers["x-ai-max-latency-ms"]
            if len(text) > MAX_HEADER_CHARS:
                raise ValueError
            text = text.strip()
            if not (len(text) <= _MAX_LATENCY_DIGITS and text.isascii() and text.isdigit()):
                raise ValueError
            ms = int(text)
            if ms < 1:
                raise ValueError
            latency = ms if latency is None else min(latency, ms)
        if "x-ai-max-cost" in headers:
            text = headers["x-ai-max-cost"]
            if len(text) > MAX_HEADER_CHARS or _USD.fullmatch(text.strip()) is None:
                raise ValueError
            usd = Decimal(text.strip())  # a construction: exact in any decimal context
            cost = usd if cost is None else min(cost, usd)
    except (ValueError, InvalidOperation):
        return refusal("invalid_request",
                       "X-AI-Min-Quality must be a number from 0 to 1, X-AI-Max-Latency-Ms a "
                       f"whole number from 1 to {10 ** _MAX_LATENCY_DIGITS - 1}, X-AI-Max-Cost "
                       "a USD amount in plain decimals (at most 9 whole digits and 18 "
                       "decimals, no exponent)")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model == "auto"):
        model = None
    elif model is not None and len(model) > MAX_MODEL_CHARS:
        return refusal("invalid_request", f"model must be a model id of at most "
                                          f"{MAX_MODEL_CHARS} characters, found "
                                          f"{len(model):,} characters")
    return Requirements(prompt_tokens, max_output_tokens, quality, latency, cost, model)
