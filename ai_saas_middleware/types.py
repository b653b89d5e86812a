"""Values that cross the line between the core and a framework adapter.

An adapter builds a :class:`RequestInfo` from its request, renders the core's
:class:`Decision`, feeds the response through a :class:`~ai_saas_middleware.usage.ResponseMeter`
and hands the resulting :class:`Outcome` to ``settle()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Usage is what a handler records on its context, so it lives with the context (the
# module below this one) and is re-exported here, its documented home.
from .context import RequestContext, Ticket, Usage

__all__ = ["Decision", "Outcome", "RequestInfo", "Usage"]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the core needs to know of an HTTP request.

    ``headers`` has lower-case names. ``tenant_id`` is set only by a trusted source
    (the app's resolver, from its own authenticated user); the core never takes it
    from a client header unless ``http.tenantHeader`` names one.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""
    tenant_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The core's answer to an AI request, neutral of any framework.

    When ``allowed``, ``headers`` are to be added to the app's response and
    ``context``/``ticket`` are set. Otherwise ``status``, ``headers`` and ``body``
    (a JSON error in the OpenAI shape) are the whole response to send.
    """

    allowed: bool
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    error_code: str | None = None
    error_message: str | None = None
    retry_after_s: int | None = None
    context: RequestContext | None = None
    ticket: Ticket | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an admitted request ended, as the adapter saw it."""

    status: int
    provider_usage: tuple[int, int] | None = None  # (prompt, completion) from the response
    completion_chars: int = 0  # text produced, for an estimate when no usage was seen
    failed: bool = False  # the handler raised, or the upstream call failed
    disconnected: bool = False  # the client went away before the end
