"""Which model a request tries next when one fails, and what it answers when none is left.

``ctx.execute(call)`` / ``ctx.complete(...)`` (and their async and streamed forms) try the
chosen model, then, after a failure of model M, follow ``routing.fallbackChain`` from M
onward (from the chain's start when M is not in it), then the request's remaining
candidates in rank order. A model is skipped when it is not one of the request's
candidates (the tier does not allow it, or the request's needs exclude it), when it was
tried already, or when its circuit breaker is open (decided at call time: a breaker that
opened after admission is obeyed). Every attempt feeds the breakers.

What counts as a failure is :func:`~ai_saas_middleware.providers.failures.is_failure`:
timeouts, connection errors, 5xx and 429. Anything else the call raises (a client's 4xx,
a bug in the handler) is not the model's fault: it is raised at once, with no fallback,
since another model would meet the same request.

When the chain is exhausted, :class:`~ai_saas_middleware.errors.NoHealthyModel` is raised
(from the last failure); its decision is the 503 ``no_healthy_model`` with
``Retry-After``, or, when configured, ``routing.defaultResponse``. A web adapter that sees
it leave the handler renders that decision, never a 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from .breakers import BreakerBoard
from .config import ModelProfile, RoutingConfig
from .errors import NoHealthyModel, Refusal
from .providers.failures import is_failure

if TYPE_CHECKING:  # pragma: no cover
    from .routing import Selection

__all__ = ["FallbackPolicy", "is_failure"]


class FallbackPolicy:
    """A gateway's fallback rules: the chain, the breakers, the answer when none is left.

    Args:
        routing: ``routing`` (its ``fallbackChain``).
        breakers: the deployment's breakers as this process sees them.
        exhausted: builds the decision when no model is left (the names of the models whose
            breakers are open -> the 503 or the default response).
    """

    def __init__(self, routing: RoutingConfig, breakers: BreakerBoard,
                 exhausted: Callable[[list[str]], Refusal]):
        self.chain = routing.fallback_chain
        self.breakers = breakers
        self._exhausted = exhausted

    def attempts(self, first: ModelProfile, selection: Selection
                 ) -> Iterator[tuple[ModelProfile, str]]:
        """The models to call in order, each with its breaker's ticket (``""``, or the
        probe's owner); the caller reports each attempt's end with :meth:`ended`.

        The generator moves on only when the caller asks for the next model, after the
        one just yielded failed: the whole order is worked out only then."""
        tried: set[str] = set()
        model: ModelProfile | None = first
        by_id: dict[str, ModelProfile] | None = None
        while model is not None:
            tried.add(model.id)
            probe = self.breakers.begin(model.id)
            if probe is not None:
                yield model, probe
            candidates = selection.candidates
            if by_id is None:
                by_id = {m.id: m for m in candidates}
            model = self._next(model.id, by_id, candidates, tried)

    def _next(self, failed: str, by_id: dict[str, ModelProfile],
              candidates: Sequence[ModelProfile], tried: set[str]) -> ModelProfile | None:
        chain = self.chain
        onward = chain[chain.index(failed) + 1:] if failed in chain else chain
        for model_id in onward:
            model = by_id.get(model_id)
            if model is not None and model_id not in tried:
                return model
        for model in candidates:
            if model.id not in tried:
                return model
        return None

    def ended(self, model: ModelProfile, probe: str, exc: BaseException | None) -> bool:
        """Report an attempt's end to the breakers; True when ``exc`` is a failure (the
        caller falls back), False for a success or an error that is not the model's."""
        failed = exc is not None and is_failure(exc)
        self.breakers.end(model.id, probe, failed)
        return failed

    def none_left(self, candidates: Sequence[ModelProfile]) -> NoHealthyModel:
        """The error to raise when every attempt failed or was skipped."""
        open_now = [m.id for m in candidates if not self.breakers.is_healthy(m.id)]
        return NoHealthyModel(self._exhausted(open_now))
