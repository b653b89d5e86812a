"""Model selection. Pure; no I/O.

Among the tier's allowed models that have profiles, a model is a candidate when its
context window holds the prompt and the output allowed, its quality and p99 latency
meet the request's needs, its worst-case cost (prompt at the input price plus every
allowed output token at the output price) fits the cost limit, and its circuit breaker
is not open (``is_healthy``, a callable ``model_id -> bool``; see :mod:`.breakers`).

The candidates are then ranked by the strategy (``routing.strategy``):

==================  ============================================================
``cost_optimized``  lowest expected cost, then higher quality, lower latency, id
``quality_first``   higher quality, then lowest expected cost, lower latency, id
``latency_first``   lower p99 latency, then lowest expected cost, higher quality, id
==================  ============================================================

The *expected* cost prices the completion the request will probably get: all of
``max_output_tokens`` when the request stated ``max_tokens`` (``stated_output``), else
the running average completion observed for the endpoint and model (``averages``),
capped at ``max_output_tokens``, else ``max_output_tokens`` (the endpoint's default).
The cost *limit* always checks the worst case. With ``downgrade`` (the tenant is past
``routing.downgradeAt``), the ranking is ``cost_optimized`` whatever the strategy: the
cheapest eligible model first. The first candidate is chosen; the rest are the
fallbacks. Ties end at the model id, so a choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from operator import itemgetter
from typing import Any

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
    stated_output: bool = True  # max_output_tokens is the request's own max_tokens


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
                 is_healthy: Callable[[str], bool] | None = None, *,
                 strategy: str = "cost_optimized", downgrade: bool = False,
                 averages: Mapping[str, int] | None = None,
                 latencies: Mapping[str, int] | None = None) -> Selection:
    """Choose the models that can serve ``needs`` on ``tier``, best first.

    Args:
        is_healthy: False for a model whose breaker is open (None: all are healthy).
        strategy: ``cost_optimized``, ``quality_first`` or ``latency_first``.
        downgrade: rank by cost whatever the strategy (the tenant is near its limits).
        averages: model id -> average completion tokens observed on this endpoint.
        latencies: model id -> observed p99 latency (ms), instead of the profile's.
    """
    excluded: list[tuple[str, str]] = []
    ranked: list[tuple[Any, ...]] = []
    unhealthy = 0
    allowed = tier.allowed_models
    if needs.model is not None:
        if needs.model not in allowed:
            return Selection((), ((needs.model, f"not allowed on tier {tier.name!r}"),))
        allowed = (needs.model,)
    output = needs.max_output_tokens
    window = needs.prompt_tokens + output
    for model_id in allowed:
        model = models.get(model_id)
        if model is None:
            excluded.append((model_id, "no model profile"))
            continue
        if window > model.max_tokens:
            excluded.append((model_id, f"context window {model.max_tokens} tokens < "
                                       f"{needs.prompt_tokens} prompt + {output} output"))
            continue
        if needs.min_quality is not None and model.quality_score < needs.min_quality:
            excluded.append((model_id, f"quality {model.quality_score} < required "
                                       f"{needs.min_quality}"))
            continue
        latency = model.latency_p99_ms
        if latencies is not None:
            latency = latencies.get(model_id, latency)
        if needs.max_latency_ms is not None and latency > needs.max_latency_ms:
            excluded.append((model_id, f"p99 latency {latency} ms > "
                                       f"{needs.max_latency_ms} ms"))
            continue
        # = expected_cost(), inline; in the fixed MONEY context, not the thread's
        worst = _fma(model.cost_per_input_token, needs.prompt_tokens,
                     _multiply(model.cost_per_output_token, output))
        if needs.max_cost is not None and worst > needs.max_cost:
            excluded.append((model_id, f"expected cost ${format_usd(worst)} > "
                                       f"${format_usd(needs.max_cost)}"))
            continue
        if is_healthy is not None and not is_healthy(model_id):
            excluded.append((model_id, "circuit breaker open"))
            unhealthy += 1
            continue
        cost = worst
        if not needs.stated_output and averages:
            expected = averages.get(model_id)
            if expected is not None and expected < output:
                cost = _fma(model.cost_per_input_token, needs.prompt_tokens,
                            _multiply(model.cost_per_output_token, expected))
        ranked.append((cost, -model.quality_score, latency, model_id, model))
    if len(ranked) > 1:
        ranked.sort(key=_RANKS["cost_optimized" if downgrade else strategy])
    candidates = tuple([row[4] for row in ranked])
    return Selection(candidates, tuple(excluded) if excluded else (),
                     not candidates and unhealthy > 0)


_fma = MONEY.fma
_multiply = MONEY.multiply
# Rows are (expected cost, -quality, p99 latency, id, profile).
_RANKS = {
    "cost_optimized": itemgetter(0, 1, 2, 3),
    "quality_first": itemgetter(1, 0, 2, 3),
    "latency_first": itemgetter(2, 0, 1, 3),
}
