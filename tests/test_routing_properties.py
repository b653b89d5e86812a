"""Property-based tests of the router (hypothesis): whatever the models, the tier, the
request and the breakers, the router never picks a model outside the tier's allowed
list, with a too-small context window, below the quality or above the latency asked
for, over the cost limit or with an open breaker; it leaves out no model that meets
them all; and no candidate ranks better under the strategy than the one chosen."""

from __future__ import annotations

from decimal import Context, Decimal
from typing import Any
from unittest.mock import patch

from hypothesis import event, given, settings
from hypothesis import strategies as st

from ai_saas_middleware import routing
from ai_saas_middleware.config import ModelProfile, TierConfig
from ai_saas_middleware.routing import Requirements, select_model

EXACT = Context(prec=100)  # the test's own arithmetic, exact for these magnitudes

# Random prices, and prices from a small set (ties, equal and collinear price points: the
# fast path's hardest cases).
prices = (st.decimals(min_value=Decimal("0"), max_value=Decimal("0.0001"), places=10)
          | st.sampled_from([Decimal(x) for x in ("0", "0.0000001", "0.0000002", "0.0000003",
                                                  "0.0000004", "0.0000006", "0.0000012")]))
profiles = st.builds(
    lambda i, p_in, p_out, window, quality, p99: ModelProfile(
        f"m{i}", "openai", p_in, p_out, window, quality, p99),
    st.integers(0, 11), prices, prices,
    st.sampled_from([1_000, 4_000, 16_000, 128_000, 200_000]) | st.integers(1, 300_000),
    st.sampled_from([0.3, 0.5, 0.55, 0.62, 0.8, 0.85, 0.92, 0.99]),
    st.sampled_from([200, 400, 900, 2500, 4000, 9000]),
)


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    models = {m.id: m for m in draw(st.lists(profiles, min_size=1, max_size=12))}
    known = [*sorted(models), "m-unprofiled"]
    allowed = tuple(draw(st.lists(st.sampled_from(known), unique=True, min_size=1,
                                  max_size=10)))
    needs = Requirements(
        prompt_tokens=draw(st.integers(0, 3_000) | st.integers(0, 200_000)),
        max_output_tokens=draw(st.integers(1, 2_000) | st.integers(1, 100_000)),
        min_quality=draw(st.none() | st.none() | st.sampled_from([0.5, 0.6, 0.8, 0.9])),
        max_latency_ms=draw(st.none() | st.none() | st.sampled_from([300, 1000, 3000, 5000])),
        max_cost=draw(st.none() | st.none() | st.decimals(
            min_value=Decimal("0"), max_value=Decimal("5"), places=6)),
        stated_output=draw(st.booleans()),
    )
    return {
        "tier": TierConfig("t", None, None, allowed),
        "models": models,
        "needs": needs,
        "open": set(draw(st.lists(st.sampled_from(known), unique=True, max_size=3))
                    if draw(st.booleans()) else []),
        "strategy": draw(st.sampled_from(["cost_optimized", "quality_first", "latency_first"])),
        "downgrade": draw(st.booleans()),
        "fast_from": draw(st.sampled_from([0, 1000])),  # the fast path when it applies, or never
        "averages": draw(st.dictionaries(
            st.sampled_from(known), st.integers(0, 2_500) | st.integers(0, 120_000),
            max_size=12)),
    }


def worst_cost(m: ModelProfile, needs: Requirements) -> Decimal:
    return EXACT.add(EXACT.multiply(m.cost_per_input_token, needs.prompt_tokens),
                     EXACT.multiply(m.cost_per_output_token, needs.max_output_tokens))


def expected_cost(m: ModelProfile, needs: Requirements, averages: dict[str, int]) -> Decimal:
    completion = needs.max_output_tokens
    if not needs.stated_output and m.id in averages:
        completion = min(completion, averages[m.id])
    return EXACT.add(EXACT.multiply(m.cost_per_input_token, needs.prompt_tokens),
                     EXACT.multiply(m.cost_per_output_token, completion))


def eligible(m: ModelProfile | None, s: dict[str, Any]) -> bool:
    needs = s["needs"]
    return (m is not None
            and needs.prompt_tokens + needs.max_output_tokens <= m.max_tokens
            and (needs.min_quality is None or m.quality_score >= needs.min_quality)
            and (needs.max_latency_ms is None or m.latency_p99_ms <= needs.max_latency_ms)
            and (needs.max_cost is None or worst_cost(m, needs) <= needs.max_cost)
            and m.id not in s["open"])


def rank(m: ModelProfile, s: dict[str, Any]) -> tuple[Any, ...]:
    cost = expected_cost(m, s["needs"], s["averages"])
    strategy = "cost_optimized" if s["downgrade"] else s["strategy"]
    if strategy == "quality_first":
        return (-m.quality_score, cost, m.latency_p99_ms, m.id)
    if strategy == "latency_first":
        return (m.latency_p99_ms, cost, -m.quality_score, m.id)
    return (cost, -m.quality_score, m.latency_p99_ms, m.id)


@settings(max_examples=1500, deadline=None)
@given(scenarios())
def test_the_router_picks_only_eligible_models_and_none_ranks_better(s: dict[str, Any]) -> None:
    healthy = (lambda model_id: model_id not in s["open"]) if s["open"] else None
    with patch.object(routing, "FAST_PATH_MIN_MODELS", s["fast_from"]):
        selection = select_model(s["tier"], s["models"], s["needs"], healthy,
                                 strategy=s["strategy"], downgrade=s["downgrade"],
                                 averages=s["averages"])
        first = selection.chosen  # (asked first: the fast path's answer, when it gave one)

    chosen = [m.id for m in selection.candidates]
    assert (first is None) == (not chosen)
    assert first is None or first.id == chosen[0]  # the fast path agrees with the pass
    event(f"{min(len(chosen), 3)} candidates")
    for m in selection.candidates:
        assert m.id in s["tier"].allowed_models
        assert eligible(m, s), m
    should = sorted({m for m in s["tier"].allowed_models if eligible(s["models"].get(m), s)})
    assert sorted(chosen) == should  # none left out
    ranks = [rank(m, s) for m in selection.candidates]
    assert ranks == sorted(ranks)  # best first: nothing ranks better than the chosen
    if not chosen:
        assert selection.unhealthy_only == any(
            eligible(s["models"].get(m), {**s, "open": set()}) for m in s["tier"].allowed_models)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 5), st.integers(0, 5),
                          st.integers(0, 3)), max_size=12),
       st.integers(1, 6), st.integers(1, 5), st.integers(1, 5))
def test_the_fast_paths_index_finds_what_a_search_of_every_model_finds(
        rows: list[tuple[int, int, int, int]], needed: int, x: int, y: int) -> None:
    # Small integers: many equal costs, equal and collinear points, equal windows.
    from ai_saas_middleware.cheapest import Index

    models = [(window, a, b, (tie, i), f"m{i}") for i, (window, a, b, tie) in enumerate(rows)]
    found = Index(models).cheapest(needed, x, y)
    eligible = [(x * a + y * b, tiebreak, model) for window, a, b, tiebreak, model in models
                if window >= needed]
    if not eligible:
        assert found is None
    else:
        cost, _tiebreak, model = min(eligible)
        assert found == (cost, model)


@settings(max_examples=1500, deadline=None)
@given(scenarios(), st.booleans())
def test_the_fast_path_chooses_what_the_general_pass_ranks_first(s: dict[str, Any],
                                                                 downgrade: bool) -> None:
    # Only what the fast path serves: ranked by cost, no open breaker, no observed
    # latencies; averages dense (most requests state no max_tokens).
    needs = s["needs"]
    averages = {m: a for m, a in s["averages"].items()} or {m: 50 for m in s["models"]}
    with patch.object(routing, "FAST_PATH_MIN_MODELS", 0):
        fast = select_model(s["tier"], s["models"], needs, None, strategy="cost_optimized"
                            if not downgrade else s["strategy"], downgrade=downgrade,
                            averages=averages).chosen
    whole = routing._select(s["tier"], s["models"], needs, None, "cost_optimized"
                            if not downgrade else s["strategy"], downgrade, averages, None)
    assert (fast.id if fast else None) == (whole.candidates[0].id if whole.candidates
                                           else None)
