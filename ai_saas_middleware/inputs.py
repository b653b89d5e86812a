"""What a client sends, read and checked before admission. Pure; no I/O.

Everything here turns client input (headers, the JSON body) into the values admission
needs, or into the 4xx refusal that input calls for: a client's mistake is never a 500
and never an unbounded error message.

- :func:`declared_length`: the ``Content-Length`` (400 when malformed, 413 when too large).
- :func:`parse_body`: the JSON body, ``max_tokens`` and the prompt's estimated tokens.
- :func:`requirements`: the endpoint's needs, tightened by the request's ``X-AI-*`` headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from .config import EndpointConfig
from .estimate import estimate_prompt_tokens
from .responses import refusal
from .routing import Requirements
from .types import Decision, RequestInfo

__all__ = ["declared_length", "parse_body", "requirements", "too_large"]


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
    if not declared.isdigit():
        return refusal("invalid_request", "Content-Length must be a whole number")
    length = int(declared)
    return too_large(max_body_bytes) if length > max_body_bytes else length


def parse_body(info: RequestInfo, endpoint: EndpointConfig
               ) -> tuple[dict[str, Any], int, int] | Decision:
    """(the JSON body, output tokens to reserve, estimated prompt tokens), or a refusal
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
                           f"{content_type or 'a body without a content type'}")
        try:
            body = json.loads(info.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return refusal("invalid_json", f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return refusal("invalid_json", "request body must be a JSON object")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = endpoint.default_max_output_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return refusal("invalid_request", "max_tokens must be a whole number >= 1")
    return body, max_tokens, estimate_prompt_tokens(body)


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
            value = float(headers["x-ai-min-quality"])
            if not 0 <= value <= 1:
                raise ValueError
            quality = value if quality is None else max(quality, value)
        if "x-ai-max-latency-ms" in headers:
            ms = int(headers["x-ai-max-latency-ms"])
            if ms < 1:
                raise ValueError
            latency = ms if latency is None else min(latency, ms)
        if "x-ai-max-cost" in headers:
            usd = Decimal(headers["x-ai-max-cost"])
            if not usd.is_finite() or usd < 0:
                raise ValueError
            cost = usd if cost is None else min(cost, usd)
    except (ValueError, InvalidOperation):
        return refusal("invalid_request", "X-AI-Min-Quality must be 0..1, X-AI-Max-Latency-Ms "
                                          "a whole number >= 1, X-AI-Max-Cost a USD amount")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model == "auto"):
        model = None
    return Requirements(prompt_tokens, max_output_tokens, quality, latency, cost, model)
