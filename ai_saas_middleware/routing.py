"""Model selection. Pure; no I/O.

Among the tier's allowed models that have profiles, a model is a candidate when its
context window holds the prompt and the output allowed, its quality and p99 latency
meet the request's needs, its worst-case cost (prompt at the input price plus every
allowed output token at the output price) fits the cost limit, and it is healthy.
Candidates are ordered by expected cost, then higher quality, then lower latency,
then id, so the choice is deterministic. The first is chosen; the rest are the
fallbacks ``ctx.execute`` tries in order.

``is_healthy`` is the seam for circuit breakers: a callable ``model_id -> bool``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from operator import itemgetter

from .config import ModelProfile, TierConfig
from .pricing import MONEY, format_usd

__all__ = ["Requirements", "Selection", "select_model"]


# Plain slots dataclasses, read-only by convention: built on every AI request, and a
# frozen one costs about a microsecond more to build.
@dataclass(slots=True)
class Requirements:
    """What one request needs of a model."""

    prompt_tokens: int
    max_output_tokens: int
    min_quality: float | None = None
    max_latency_ms: int | None = None
    max_cost: Decimal | None = None
    model: str | None = None  # a model the client asked for by id


@dataclass(slots=True)
class Selection:
    """The candidates, cheapest first, and why every other model was excluded."""

    candidates: tuple[ModelProfile, ...]
    excluded: tuple[tuple[str, str], ...]  # (model id, reason)
    unhealthy_only: bool = False  # every model that met the needs had an open breaker

    @property
    def chosen(self) -> ModelProfile | None:
        return self.candidates[0] if self.candidates else None

    def explain(self) -> str:
        return "; ".join(f"{model}: {reason}" for model, reason in self.excluded)


def select_model(tier: TierConfig, models: Mapping[str, ModelProfile], needs: Requirements,
                 is_healthy: Callable[[str], bool] | None = None) -> Selection:
    """Choose the models that can serve ``needs`` on ``tier``, cheapest first."""
    excluded: list[tuple[str, str]] = []
    ranked: list[tuple[Decimal, float, int, str, ModelProfile]] = []
    unhealthy = 0
    allowed = tier.allowed_models
    if needs.model is not None:
        if needs.model not in allowed:
            return Selection((), ((needs.model, f"not allowed on tier {tier.name!r}"),))
        allowed = (needs.model,)
    for model_id in allowed:
        model = models.get(model_id)
        if model is None:
            excluded.append((model_id, "no model profile"))
            continue
        window = needs.prompt_tokens + needs.max_output_tokens
        if window > model.max_tokens:
            excluded.append((model_id, f"context window {model.max_tokens} tokens < "
                                       f"{needs.prompt_tokens} prompt + "
                                       f"{needs.max_output_tokens} output"))
            continue
        if needs.min_quality is not None and model.quality_score < needs.min_quality:
            excluded.append((model_id, f"quality {model.quality_score} < required "
                                       f"{needs.min_quality}"))
            continue
        if needs.max_latency_ms is not None and model.latency_p99_ms > needs.max_latency_ms:
            excluded.append((model_id, f"p99 latency {model.latency_p99_ms} ms > "
                                       f"{needs.max_latency_ms} ms"))
            continue
        # = expected_cost(), inline; in the fixed MONEY context, not the thread's
        cost = _fma(model.cost_per_input_token, needs.prompt_tokens,
                    _multiply(model.cost_per_output_token, needs.max_output_tokens))
        if needs.max_cost is not None and cost > needs.max_cost:
            excluded.append((model_id, f"expected cost ${format_usd(cost)} > "
                                       f"${format_usd(needs.max_cost)}"))
            continue
        if is_healthy is not None and not is_healthy(model_id):
            excluded.append((model_id, "circuit breaker open"))
            unhealthy += 1
            continue
        ranked.append((cost, -model.quality_score, model.latency_p99_ms, model_id, model))
    if len(ranked) > 1:
        ranked.sort(key=_RANK)
    candidates = tuple([row[4] for row in ranked])
    return Selection(candidates, tuple(excluded) if excluded else (),
                     not candidates and unhealthy > 0)


_fma = MONEY.fma
_multiply = MONEY.multiply
_RANK = itemgetter(0, 1, 2, 3)  # expected cost, -quality, p99 latency, id
