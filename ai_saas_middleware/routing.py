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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from operator import itemgetter
from typing import Any

from .cheapest import Index
from .config import ModelProfile, TierConfig, decimal_places
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


class Selection:
    """The candidates, best first, and why every other model was excluded.

    Ranked lazily: :attr:`chosen` is the best candidate (one pass over them), and the
    whole order (:attr:`candidates`, what a fallback follows) is sorted only when first
    asked for; a request whose first model answers never needs it.
    """

    __slots__ = ("_best", "_excluded", "_fill", "_key", "_reasons", "_rows", "_sorted",
                 "unhealthy_only")

    def __init__(self, candidates: Sequence[ModelProfile],
                 excluded: tuple[tuple[str, str], ...] = (), unhealthy_only: bool = False):
        self._sorted: tuple[ModelProfile, ...] | None = tuple(candidates)
        self._rows: list[tuple[Any, ...]] = []
        self._key: Callable[[tuple[Any, ...]], Any] | None = None
        self._best: ModelProfile | None = None
        self._reasons: tuple[tuple[str, str], ...] | None = excluded  # (model id, reason)
        self._excluded: list[tuple[Any, ...]] = []  # (model id, why, facts...): unworded
        self._fill: Callable[[], Selection] | None = None  # the general pass, when deferred
        self.unhealthy_only = unhealthy_only  # every model meeting the needs was open

    @classmethod
    def ranked(cls, rows: list[tuple[Any, ...]], key: Callable[[tuple[Any, ...]], Any],
               excluded: list[tuple[Any, ...]], unhealthy_only: bool) -> Selection:
        """A selection of ``rows`` (ending with the profile), in ``key`` order;
        ``excluded`` are worded (:func:`_reason`) only when asked for."""
        selection = cls((), (), unhealthy_only)
        if excluded:
            selection._reasons = None
            selection._excluded = excluded
        if len(rows) > 1:
            selection._sorted = None
            selection._rows = rows
            selection._key = key
        elif rows:
            selection._sorted = (rows[0][-1],)
        return selection

    @classmethod
    def deferred(cls, chosen: ModelProfile, fill: Callable[[], Selection]) -> Selection:
        """A selection whose best candidate is known (the fast path's) and whose order and
        exclusions the general pass (``fill``) works out only when they are asked for."""
        selection = cls((), (), False)
        selection._sorted = None
        selection._best = chosen
        selection._fill = fill
        return selection

    def _filled(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            whole = fill()
            self._rows, self._key, self._sorted = whole._rows, whole._key, whole._sorted
            self._excluded, self._reasons = whole._excluded, whole._reasons

    @property
    def candidates(self) -> tuple[ModelProfile, ...]:
        """Every eligible model, best first."""
        if self._fill is not None:
            self._filled()
        if self._sorted is None:
            self._rows.sort(key=self._key)
            self._sorted = tuple([row[-1] for row in self._rows])
        return self._sorted

    @property
    def chosen(self) -> ModelProfile | None:
        """The best candidate (None when there is none)."""
        if self._sorted is not None:
            return self._sorted[0] if self._sorted else None
        if self._best is None:
            self._best = min(self._rows, key=self._key)[-1]
        return self._best

    @property
    def unordered(self) -> tuple[ModelProfile, ...]:
        """The candidates in no particular order (cheaper than :attr:`candidates`)."""
        if self._fill is not None:
            self._filled()
        if self._sorted is not None:
            return self._sorted
        return tuple([row[-1] for row in self._rows])

    def __len__(self) -> int:
        if self._fill is not None:
            self._filled()
        return len(self._sorted) if self._sorted is not None else len(self._rows)

    @property
    def excluded(self) -> tuple[tuple[str, str], ...]:
        """(model id, why) of every allowed model that is not a candidate."""
        if self._fill is not None:
            self._filled()
        if self._reasons is None:
            self._reasons = tuple([(entry[0], _reason(*entry[1:])) for entry in self._excluded])
        return self._reasons

    def excluded_for(self, why: str) -> list[str]:
        """The ids of the models excluded for ``why`` (e.g. ``"breaker"``)."""
        if self._fill is not None:
            self._filled()
        if self._reasons is not None and not self._excluded:
            return [m for m, reason in self._reasons if reason == _REASONS.get(why, why)]
        return [entry[0] for entry in self._excluded if entry[1] == why]

    def explain(self) -> str:
        return "; ".join(f"{model}: {reason}" for model, reason in self.excluded)


_REASONS = {"breaker": "circuit breaker open"}


def _reason(why: str, *facts: Any) -> str:
    """The words for an exclusion, built only when someone reads them."""
    if why == "profile":
        return "no model profile"
    if why == "window":
        window, prompt, output = facts
        return f"context window {window} tokens < {prompt} prompt + {output} output"
    if why == "quality":
        return f"quality {facts[0]} < required {facts[1]}"
    if why == "latency":
        return f"p99 latency {facts[0]} ms > {facts[1]} ms"
    if why == "cost":
        worst, scale, limit = facts
        return (f"expected cost ${format_usd(MONEY.scaleb(Decimal(worst), -scale))} > "
                f"${format_usd(limit)}")
    return _REASONS.get(why, why)


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
    expecting = averages if not needs.stated_output and averages else None
    if (FAST_PATH_MIN_MODELS <= len(tier.allowed_models) <= FAST_PATH_MAX_MODELS
            and needs.model is None and is_healthy is None and latencies is None
            and (downgrade or strategy == "cost_optimized")
            and (needs.max_cost is None or expecting is None)
            and needs.prompt_tokens > 0 and needs.max_output_tokens > 0):
        found = _cheapest(tier, models, needs, expecting)
        if found is not None:
            return Selection.deferred(found, lambda: _select(
                tier, models, needs, is_healthy, strategy, downgrade, averages, latencies))
    return _select(tier, models, needs, is_healthy, strategy, downgrade, averages, latencies)


def _cheapest(tier: TierConfig, models: Mapping[str, ModelProfile], needs: Requirements,
              expecting: Mapping[str, int] | None) -> ModelProfile | None:
    """The fast path (:mod:`.cheapest`): the cheapest eligible model, or None when there
    is none (or it breaks the cost limit: then none does), for the general pass to say
    why."""
    output = needs.max_output_tokens
    # (The averages' snapshot is replaced about once a second: it is checked, not keyed,
    # so its new index takes the old one's place.)
    key = (tier.name, tier.allowed_models, id(models), needs.min_quality, needs.max_latency_ms,
           None if expecting is None else output)
    known = _INDEXES.get(key)
    if known is None or known[0] is not models or known[1] is not expecting:
        scale, rows = _table(tier, models)
        points = []
        for model_id, model, max_tokens, quality, latency, per_in, per_out in rows:
            if model is None or (needs.min_quality is not None and quality < needs.min_quality) \
                    or (needs.max_latency_ms is not None and latency > needs.max_latency_ms):
                continue
            weight = per_out
            if expecting is not None:
                expected = expecting.get(model_id)
                weight = per_out * (expected if expected is not None and expected < output
                                    else output)
            points.append((max_tokens, per_in, weight, (-quality, latency, model_id), model))
        if len(_INDEXES) > 512:  # tiers x needs x price-book and averages snapshots
            _INDEXES.clear()
        known = (models, expecting, Index(points), scale)
        _INDEXES[key] = known
    found = known[2].cheapest(needs.prompt_tokens + output, needs.prompt_tokens,
                              1 if expecting is not None else output)
    if found is None:
        return None
    cost, model = found
    if needs.max_cost is not None and cost > MONEY.scaleb(needs.max_cost, known[3]):
        return None  # (the cost is the worst case here: no expected completion)
    return model  # type: ignore[no-any-return]


# Tiers of fewer allowed models than this take the general pass only. Measured in one
# run, the index is quicker from 5 models on (3.9 against 6.0 us at 5; 4.7 against 16 at
# 50): every tier uses it; tests set this to force the general pass.
FAST_PATH_MIN_MODELS = 0
# Above this many, building an index (once per price book, and per averages snapshot: about
# once a second) costs more than the passes it saves: the general pass decides.
FAST_PATH_MAX_MODELS = 200

# (tier, allowed, models, min quality, max latency, output with averages | None) ->
# (models, averages, its Index, price scale)
_INDEXES: dict[tuple[Any, ...], tuple[Any, Any, Index, int]] = {}


def _select(tier: TierConfig, models: Mapping[str, ModelProfile], needs: Requirements,
            is_healthy: Callable[[str], bool] | None, strategy: str, downgrade: bool,
            averages: Mapping[str, int] | None, latencies: Mapping[str, int] | None
            ) -> Selection:
    """The general pass: every allowed model, each kept or excluded with its reason."""
    excluded: list[tuple[Any, ...]] = []
    ranked: list[tuple[Any, ...]] = []
    unhealthy = 0
    if needs.model is not None:
        if needs.model not in tier.allowed_models:
            return Selection((), ((needs.model, f"not allowed on tier {tier.name!r}"),))
        rows = [row for row in _table(tier, models)[1] if row[0] == needs.model]
        scale = _table(tier, models)[0]
    else:
        scale, rows = _table(tier, models)
    prompt = needs.prompt_tokens
    output = needs.max_output_tokens
    window = prompt + output
    min_quality = needs.min_quality
    max_latency = needs.max_latency_ms
    max_cost = needs.max_cost
    # Costs are compared as whole numbers of 10^-scale USD (see _table): exact, and an
    # int multiply-add instead of two Decimal ones.
    limit = None if max_cost is None else MONEY.scaleb(max_cost, scale)
    expecting = averages if not needs.stated_output and averages else None
    for model_id, model, max_tokens, quality, latency, per_in, per_out in rows:
        if model is None:
            excluded.append((model_id, "profile"))
            continue
        if window > max_tokens:
            excluded.append((model_id, "window", max_tokens, prompt, output))
            continue
        if min_quality is not None and quality < min_quality:
            excluded.append((model_id, "quality", quality, min_quality))
            continue
        if latencies is not None:
            latency = latencies.get(model_id, latency)
        if max_latency is not None and latency > max_latency:
            excluded.append((model_id, "latency", latency, max_latency))
            continue
        worst = per_in * prompt + per_out * output
        if limit is not None and worst > limit:
            excluded.append((model_id, "cost", worst, scale, max_cost))
            continue
        if is_healthy is not None and not is_healthy(model_id):
            excluded.append((model_id, "breaker"))
            unhealthy += 1
            continue
        cost = worst
        if expecting is not None:
            expected = expecting.get(model_id)
            if expected is not None and expected < output:
                cost = per_in * prompt + per_out * expected
        ranked.append((cost, -quality, latency, model_id, model))
    return Selection.ranked(ranked, _RANKS["cost_optimized" if downgrade else strategy],
                            excluded, not ranked and unhealthy > 0)


# (tier, models) -> (scale, rows): each allowed model's id, profile (None: no profile),
# context window, quality, p99 latency, and its prices as whole numbers of 10^-scale USD,
# scale the fewest decimal places that make every price of the tier whole. Built once per
# tier and price book (the models mapping is replaced whole when prices change).
_TABLES: dict[tuple[str, tuple[str, ...], int], tuple[Mapping[str, ModelProfile], int,
                                                        list[tuple[Any, ...]]]] = {}


def _table(tier: TierConfig, models: Mapping[str, ModelProfile]
           ) -> tuple[int, list[tuple[Any, ...]]]:
    key = (tier.name, tier.allowed_models, id(models))
    known = _TABLES.get(key)
    if known is not None and known[0] is models:
        return known[1], known[2]
    profiles = [models.get(model_id) for model_id in tier.allowed_models]
    scale = max([decimal_places(price) for m in profiles if m is not None
                 for price in (m.cost_per_input_token, m.cost_per_output_token)] or [0])
    rows: list[tuple[Any, ...]] = []
    for model_id, m in zip(tier.allowed_models, profiles, strict=True):
        if m is None:
            rows.append((model_id, None, 0, 0.0, 0, 0, 0))
        else:
            rows.append((model_id, m, m.max_tokens, m.quality_score, m.latency_p99_ms,
                         int(MONEY.scaleb(m.cost_per_input_token, scale)),
                         int(MONEY.scaleb(m.cost_per_output_token, scale))))
    if len(_TABLES) > 256:  # tiers x price-book versions: few; a bound all the same
        _TABLES.clear()
    _TABLES[key] = (models, scale, rows)  # (holding models: its id stays its own)
    return scale, rows


# Rows are (expected cost, -quality, p99 latency, id, profile).
_RANKS = {
    "cost_optimized": itemgetter(0, 1, 2, 3),
    "quality_first": itemgetter(1, 0, 2, 3),
    "latency_first": itemgetter(2, 0, 1, 3),
}
