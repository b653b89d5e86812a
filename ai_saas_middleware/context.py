"""The request context handed to the app, the ticket that settlement needs, and the
usage a handler records on its context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TypeVar

from .config import EndpointConfig, ModelProfile
from .store.keys import TenantKeys

__all__ = ["RequestContext", "Ticket", "Usage"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request and where they came from."""

    prompt_tokens: int
    completion_tokens: int
    source: str  # handler | provider | estimate

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, eq=False)
class Ticket:
    """What settlement needs to know of an admitted request. Read-only by convention (not
    frozen: a frozen dataclass costs about 1.6 us more to build, on every AI request)."""

    request_id: str
    tenant_id: str
    tier: str
    keys: TenantKeys
    month: str  # the quota month the reservation was made in
    reserved_tokens: int
    prompt_estimate: int
    admitted_ms: int  # server time of admission, ms since the epoch
    started: float  # time.monotonic() at admission
    endpoint: EndpointConfig | None
    local: bool = False  # admitted by the per-process allowance while Redis was down
    model: ModelProfile | None = None  # the chosen model, for settle() without a context
    reservation: str = ""  # its member of the tenant's reservations (keys.reservation_member)


class RequestContext:
    """One AI request as the app sees it: ``request.state.ai``, ``request.ai``, ``g.ai``.

    Attributes:
        tenant_id: the verified tenant.
        tier: the tenant's tier name.
        model: the selected :class:`~ai_saas_middleware.config.ModelProfile` (cheapest that
            meets the request's needs).
        candidates: every eligible model, cheapest first; ``execute`` falls back along it.
        request_id: unique id, also the ``X-Request-ID`` response header and the
            idempotency key of billing.
        max_output_tokens: output tokens reserved for this request; pass it to the provider.
        body: the parsed JSON request body (a dict; empty when there was none).
    """

    __slots__ = (
        "answered_by",
        "body",
        "candidates",
        "failed",
        "fallback_from",
        "max_output_tokens",
        "model",
        "outcome_value",
        "request_id",
        "tenant_id",
        "ticket",
        "tier",
        "usage",
    )

    def __init__(self, *, tenant_id: str, tier: str, model: ModelProfile,
                 candidates: tuple[ModelProfile, ...], request_id: str, max_output_tokens: int,
                 body: dict[str, object], ticket: Ticket):
        self.tenant_id = tenant_id
        self.tier = tier
        self.model = model
        self.candidates = candidates
        self.request_id = request_id
        self.max_output_tokens = max_output_tokens
        self.body = body
        self.ticket = ticket
        self.usage: Usage | None = None
        self.outcome_value: str | None = None
        self.answered_by: ModelProfile | None = None
        self.fallback_from: str | None = None
        self.failed = False

    def __repr__(self) -> str:
        return (f"RequestContext(tenant_id={self.tenant_id!r}, tier={self.tier!r}, "
                f"model={self.model.id!r}, request_id={self.request_id!r})")

    def record_usage(self, prompt_tokens: int, completion_tokens: int, model_id: str | None = None,
                     outcome_value: Decimal | int | str | None = None) -> None:
        """Report the request's real usage; it takes precedence over anything measured.

        Args:
            prompt_tokens: input tokens the provider billed.
            completion_tokens: output tokens the provider billed.
            model_id: the model that answered, if not ``ctx.model`` (one of ``candidates``).
            outcome_value: what the request was worth to the business (USD, exact), for
                margin and LTV reports.

        Raises:
            ValueError: negative counts, a model that is not a candidate, or an
                outcome value that is not a decimal number.
        """
        if (isinstance(prompt_tokens, bool) or isinstance(completion_tokens, bool)
                or not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int)
                or prompt_tokens < 0 or completion_tokens < 0):
            raise ValueError("token counts must be whole numbers >= 0, found "
                             f"{prompt_tokens!r} and {completion_tokens!r}")
        if model_id is not None:
            model = next((m for m in self.candidates if m.id == model_id), None)
            if model is None:
                raise ValueError(f"model {model_id!r} is not one of this request's candidates: "
                                 + ", ".join(m.id for m in self.candidates))
            self._answered(model)
        if outcome_value is not None:
            try:
                value = Decimal(str(outcome_value))
            except InvalidOperation:
                raise ValueError(f"outcome_value must be a decimal number, found "
                                 f"{str(outcome_value)[:64]!r}") from None
            if not value.is_finite() or len(value.as_tuple().digits) > 40 \
                    or not -18 <= value.adjusted() <= 18:
                raise ValueError("outcome_value must be a finite USD amount of at most 40 "
                                 f"digits, found {str(outcome_value)[:64]!r}")
            self.outcome_value = format(value, "f")
        self.usage = Usage(prompt_tokens, completion_tokens, "handler")

    def _answered(self, model: ModelProfile) -> None:
        self.answered_by = model
        self.fallback_from = self.model.id if model.id != self.model.id else None

    def execute(self, call: Callable[[ModelProfile], T]) -> T:
        """Run ``call(model)`` on the chosen model, falling back along ``candidates``.

        Returns what the first successful call returns and records which model answered.
        Raises the last error when every candidate failed (the request is then settled
        as failed and its reservation released, unless usage was recorded).
        """
        last: BaseException | None = None
        for model in self.candidates:
            try:
                result = call(model)
            except Exception as exc:
                last = exc
                continue
            self._answered(model)
            return result
        self.failed = True
        assert last is not None
        raise last

    async def aexecute(self, call: Callable[[ModelProfile], Awaitable[T]]) -> T:
        """Asyncio twin of :meth:`execute`."""
        last: BaseException | None = None
        for model in self.candidates:
            try:
                result = await call(model)
            except Exception as exc:
                last = exc
                continue
            self._answered(model)
            return result
        self.failed = True
        assert last is not None
        raise last
