"""Values that cross the line between the core and a framework adapter.

An adapter builds a :class:`RequestInfo` from its request, renders the core's
:class:`Decision`, feeds the response through a :class:`~ai_saas_middleware.usage.ResponseMeter`
and hands the resulting :class:`Outcome` to ``settle()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

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


# The hot path builds a Decision and an Outcome on every AI request. A frozen dataclass's
# __init__ sets each field through object.__setattr__ (about 1.9 us for a Decision, 1 us for
# an Outcome); the slots' own descriptors set the same fields of the same frozen object in
# about a third of the time. Internal: the adapters and the core use these two; they name
# every field, in order, and stop the import if the classes' fields ever differ.
_DECISION_FIELDS = ("allowed", "status", "headers", "body", "error_code", "error_message",
                    "retry_after_s", "context", "ticket")
_OUTCOME_FIELDS = ("status", "provider_usage", "completion_chars", "failed", "disconnected")
if (tuple(f.name for f in fields(Decision)) != _DECISION_FIELDS
        or tuple(f.name for f in fields(Outcome)) != _OUTCOME_FIELDS):  # pragma: no cover
    raise ImportError("types.py: allowed_decision/new_outcome name other fields than "
                      "Decision/Outcome have")
_new = object.__new__
_d_allowed, _d_status, _d_headers, _d_body, _d_code, _d_message, _d_retry, _d_context, \
    _d_ticket = (getattr(Decision, name).__set__ for name in _DECISION_FIELDS)
_o_status, _o_usage, _o_chars, _o_failed, _o_disconnected = (
    getattr(Outcome, name).__set__ for name in _OUTCOME_FIELDS)


def allowed_decision(headers: tuple[tuple[str, str], ...], context: RequestContext,
                     ticket: Ticket) -> Decision:
    """``Decision(True, 200, headers, context=context, ticket=ticket)``, sooner."""
    decision: Decision = _new(Decision)
    _d_allowed(decision, True)
    _d_status(decision, 200)
    _d_headers(decision, headers)
    _d_body(decision, b"")
    _d_code(decision, None)
    _d_message(decision, None)
    _d_retry(decision, None)
    _d_context(decision, context)
    _d_ticket(decision, ticket)
    return decision


def new_outcome(status: int, provider_usage: tuple[int, int] | None, completion_chars: int,
                failed: bool, disconnected: bool) -> Outcome:
    """``Outcome(status, provider_usage, completion_chars, failed, disconnected)``, sooner."""
    outcome: Outcome = _new(Outcome)
    _o_status(outcome, status)
    _o_usage(outcome, provider_usage)
    _o_chars(outcome, completion_chars)
    _o_failed(outcome, failed)
    _o_disconnected(outcome, disconnected)
    return outcome
