"""Refusals as framework-neutral :class:`~ai_saas_middleware.types.Decision` objects.

Bodies are JSON in the OpenAI error shape ``{"error": {"type", "code", "message"}}``;
every adapter writes them out unchanged, so the bytes are the same on every framework.
"""

from __future__ import annotations

import json

from .types import Decision

__all__ = ["refusal"]

# code -> (status, type)
CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "missing_api_key": (401, "authentication_error"),
    "invalid_api_key": (401, "authentication_error"),
    "revoked_api_key": (401, "authentication_error"),
    "unknown_tenant": (401, "authentication_error"),
    "invalid_tenant_id": (401, "authentication_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "no_eligible_model": (422, "invalid_request_error"),
    "rate_limit_exceeded": (429, "rate_limit_error"),
    "quota_exceeded": (429, "insufficient_quota"),
    "budget_exceeded": (429, "insufficient_quota"),
    "no_healthy_model": (503, "service_unavailable"),
    "store_unavailable": (503, "service_unavailable"),
}

_JSON = ("content-type", "application/json")


def refusal(code: str, message: str, *, retry_after_s: int | None = None,
            headers: tuple[tuple[str, str], ...] = ()) -> Decision:
    """A refusal with the status and type that belong to ``code``."""
    status, kind = CODES[code]
    body = json.dumps({"error": {"type": kind, "code": code, "message": message}},
                      separators=(",", ":")).encode()
    out = [_JSON]
    if retry_after_s is not None:
        out.append(("retry-after", str(retry_after_s)))
    out.extend(headers)
    return Decision(allowed=False, status=status, headers=tuple(out), body=body,
                    error_code=code, error_message=message, retry_after_s=retry_after_s)
