"""The request context handed to the app, the ticket that settlement needs, and the
usage a handler records on its context."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, TypeVar

from .config import EndpointConfig, ModelProfile
from .estimate import estimate_tokens
from .store.keys import TenantKeys

if TYPE_CHECKING:  # pragma: no cover
    from .fallback import FallbackPolicy
    from .providers import Message, Providers, Reply
    from .routing import Selection

__all__ = ["RequestContext", "Ticket", "Usage"]

T = TypeVar("T")

log = logging.getLogger("ai_saas_middleware")


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
    price_version: int = 0  # the price book's version its models' prices come from


class RequestContext:
    """One AI request as the app sees it: ``request.state.ai``, ``request.ai``, ``g.ai``.

    Attributes:
        tenant_id: the verified tenant.
        tier: the tenant's tier name.
        model: the selected :class:`~ai_saas_middleware.config.ModelProfile` (cheapest that
            meets the request's needs).
        candidates: every eligible model, best first by the strategy; ``execute`` and
            ``complete`` fall back among them (see :mod:`~ai_saas_middleware.fallback`).
        request_id: unique id, also the ``X-Request-ID`` response header and the
            idempotency key of billing.
        max_output_tokens: output tokens reserved for this request; pass it to the provider.
        body: the parsed JSON request body (a dict; empty when there was none).
    """

    __slots__ = (
        "_policy",
        "_providers",
        "_selection",
        "answered_by",
        "body",
        "cache",
        "failed",
        "fallback_from",
        "max_output_tokens",
        "model",
        "outcome_value",
        "request_id",
        "tenant_id",
        "ticket",
        "tier",
        "truncated",
        "usage",
    )

    def __init__(self, *, tenant_id: str, tier: str, model: ModelProfile,
                 candidates: Selection, request_id: str, max_output_tokens: int,
                 body: dict[str, object], ticket: Ticket, policy: FallbackPolicy,
                 providers: Providers | None = None):
        self.tenant_id = tenant_id
        self.tier = tier
        self.model = model
        self._selection = candidates  # ranked when first needed (a fallback)
        self.request_id = request_id
        self.max_output_tokens = max_output_tokens
        self.body = body
        self.ticket = ticket
        self.usage: Usage | None = None
        self.outcome_value: str | None = None
        self.answered_by: ModelProfile | None = None
        self.fallback_from: str | None = None
        self.failed = False
        self.truncated = False  # a stream was cut after its first text
        # The response cache's plan for this request (cache/policy.py), or None. The app
        # may refuse storing its answer: ``ctx.cache.store = False``.
        self.cache: Any = None
        self._policy = policy
        self._providers = providers

    @property
    def candidates(self) -> tuple[ModelProfile, ...]:
        """Every eligible model, best first by the strategy (``model`` is the first)."""
        return self._selection.candidates

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

    # ------------------------------------------------------------ calling models

    def execute(self, call: Callable[[ModelProfile], T]) -> T:
        """Run ``call(model)`` on the chosen model, falling back when it fails.

        The order and the rules are :mod:`~ai_saas_middleware.fallback`'s: the chosen
        model, then ``routing.fallbackChain`` from the failed model onward, then the other
        candidates, skipping open breakers; every attempt feeds the breakers. Returns what
        the first successful call returns and records which model answered.

        Raises:
            NoHealthyModel: every model failed or has an open breaker (from the last
                failure); a web adapter renders it as the 503 ``no_healthy_model`` (or
                ``routing.defaultResponse``).
            Exception: what ``call`` raised when it is not a model's failure (a 4xx, a
                bug): at once, with no fallback.
        """
        policy = self._policy
        last: BaseException | None = None
        for model, probe in policy.attempts(self.model, self._selection):
            try:
                result = call(model)
            except Exception as exc:
                if not policy.ended(model, probe, exc):
                    self.failed = True
                    raise
                last = exc
                continue
            policy.ended(model, probe, None)
            self._answered(model)
            return result
        self.failed = True
        raise policy.none_left(self.candidates) from last

    async def aexecute(self, call: Callable[[ModelProfile], Awaitable[T]]) -> T:
        """Asyncio twin of :meth:`execute`."""
        policy = self._policy
        last: BaseException | None = None
        for model, probe in policy.attempts(self.model, self._selection):
            try:
                result = await call(model)
            except Exception as exc:
                if not policy.ended(model, probe, exc):
                    self.failed = True
                    raise
                last = exc
                continue
            policy.ended(model, probe, None)
            self._answered(model)
            return result
        self.failed = True
        raise policy.none_left(self.candidates) from last

    def complete(self, messages: Sequence[Message], **params: Any) -> Reply:
        """Ask the chosen model's provider (``providers:``) for a whole reply, through the
        fallback chain (see :meth:`execute`), and record the provider's usage.

        ``max_tokens`` defaults to :attr:`max_output_tokens` (what was reserved); other
        ``params`` go to the provider as they are (``temperature`` ...).
        """
        providers = self._providers_or_raise()
        max_tokens = self._max_tokens(params)

        def call(model: ModelProfile) -> Reply:
            return providers.provider_for(model).complete(model.id, messages,
                                                          max_tokens=max_tokens, **params)

        reply = self.execute(call)
        self._record_provider_usage(reply)
        return reply

    async def acomplete(self, messages: Sequence[Message], **params: Any) -> Reply:
        """Asyncio twin of :meth:`complete`."""
        providers = self._providers_or_raise()
        max_tokens = self._max_tokens(params)

        async def call(model: ModelProfile) -> Reply:
            return await providers.provider_for(model).acomplete(
                model.id, messages, max_tokens=max_tokens, **params)

        reply = await self.aexecute(call)
        self._record_provider_usage(reply)
        return reply

    def stream(self, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """The chosen model's answer as text deltas, through the fallback chain.

        A stream that fails before its first delta was handed out falls back to the next
        model; one cut after that ends here, billed for what was produced (the provider's
        usage when it sent some, else an estimate of the text) and its event says
        ``truncated``. At the end the provider's usage is recorded.
        """
        providers = self._providers_or_raise()
        max_tokens = self._max_tokens(params)
        policy = self._policy
        last: BaseException | None = None
        for model, probe in policy.attempts(self.model, self._selection):
            stream = providers.provider_for(model).stream(model.id, messages,
                                                          max_tokens=max_tokens, **params)
            try:
                yield from stream
            except Exception as exc:
                stream.close()
                then = self._after_stream_error(model, probe, stream, exc)
                if then == "raise":
                    raise
                if then == "stop":
                    return
                last = exc
                continue
            finally:
                stream.close()
            policy.ended(model, probe, None)
            self._answered(model)
            self._record_provider_usage(stream)
            return
        self.failed = True
        raise policy.none_left(self.candidates) from last

    async def astream(self, messages: Sequence[Message], **params: Any) -> AsyncIterator[str]:
        """Asyncio twin of :meth:`stream`."""
        providers = self._providers_or_raise()
        max_tokens = self._max_tokens(params)
        policy = self._policy
        last: BaseException | None = None
        for model, probe in policy.attempts(self.model, self._selection):
            stream = providers.provider_for(model).astream(model.id, messages,
                                                           max_tokens=max_tokens, **params)
            try:
                async for delta in stream:
                    yield delta
            except Exception as exc:
                await stream.aclose()
                then = self._after_stream_error(model, probe, stream, exc)
                if then == "raise":
                    raise
                if then == "stop":
                    return
                last = exc
                continue
            finally:
                await stream.aclose()
            policy.ended(model, probe, None)
            self._answered(model)
            self._record_provider_usage(stream)
            return
        self.failed = True
        raise policy.none_left(self.candidates) from last

    def _after_stream_error(self, model: ModelProfile, probe: str, stream: Any,
                            exc: BaseException) -> str:
        """What a streamed attempt's error means: ``"fallback"`` (nothing reached the
        handler yet, and the model failed), ``"stop"`` (cut after its first text: billed
        for what came, truncated), or ``"raise"`` (not the model's fault)."""
        failure = self._policy.ended(model, probe, exc)
        if stream.started:
            self._cut(model, stream, exc)
            return "stop"
        if not failure:
            self.failed = True
            return "raise"
        return "fallback"

    def _providers_or_raise(self) -> Providers:
        if self._providers is None:
            raise RuntimeError("ctx.complete/ctx.stream need a providers: section in the "
                               "configuration (or call your provider yourself with "
                               "ctx.execute)")
        return self._providers

    def _max_tokens(self, params: dict[str, Any]) -> int:
        asked = params.pop("max_tokens", None)
        if asked is None:
            return self.max_output_tokens
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise ValueError(f"max_tokens must be a whole number >= 1, found {asked!r}")
        return min(asked, self.max_output_tokens)  # never more than was reserved

    def _record_provider_usage(self, answer: Any) -> None:
        """The provider's usage of a :class:`Reply` or a stream (what of it the provider
        reported, else an estimate of its text); the handler's own ``record_usage`` takes
        precedence."""
        if self.usage is None:
            prompt, completion = answer.prompt_tokens, answer.completion_tokens
            self.usage = Usage(self.ticket.prompt_estimate if prompt is None else prompt,
                               estimate_tokens(len(answer.text)) if completion is None
                               else completion,
                               "provider" if prompt is not None and completion is not None
                               else "estimate")

    def _cut(self, model: ModelProfile, stream: Any, exc: BaseException) -> None:
        log.warning("request %s: the stream of %s was cut after its first text (%s); "
                    "billed for what was produced, marked truncated",
                    self.request_id, model.id, exc)
        self._answered(model)
        self.truncated = True
        self._record_provider_usage(stream)
