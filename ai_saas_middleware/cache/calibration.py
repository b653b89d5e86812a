"""What ``cache.similarityThreshold`` means: a calibrated score, the same for every embedder.

Raw cosines are not comparable across embedders (character n-grams put unrelated
questions at 0.3, MiniLM at 0.1; paraphrases land at 0.6 for one and 0.8 for the other),
so a threshold on raw cosine would mean something different per embedder. Instead each
embedder ships a :class:`Calibration`, a monotone piecewise-linear map from raw cosine to
a *score* defined by the wrong answers it lets through:

    score(c) = 1 - 3 * F(c)

where ``F(c)`` is the share of the reference trap pairs (questions that look alike but
need different answers: the fow-cache pairs' negation, entity, number/date and scope
traps) that a match at raw cosine threshold ``c`` would serve *with the built-in lexical
guard on* (a trap the guard vetoes is never served). So, for every embedder:

=========  ==================================================
threshold  wrong answers on the reference traps, at most about
=========  ==================================================
0.95       1.7%
0.90       3.3%
0.85       5%      (the seed config's value: the recommended point)
0.80       6.7%
0.75       8.3%
=========  ==================================================

and the hit rate at that point is whatever the embedder achieves (that is where the
embedders differ). :func:`fit_calibration` computes the knots; ``benchmarks/cache_eval.py
--fit`` runs it on the pairs and prints the constants shipped in
:mod:`.embedders`. The fit uses only the traps; the hit rates reported in
benchmarks/README.md are cross-validated (each half of the pairs scored with knots fitted
on the other half).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

__all__ = ["FALSE_HIT_SLOPE", "Calibration", "fit_calibration"]

#: ``score = 1 - FALSE_HIT_SLOPE * false-hit rate``: 0.85 is a 5% false-hit point.
FALSE_HIT_SLOPE = 3.0

# The scores that become knots, each at the cosine where the false-hit rate crosses
# (1 - score) / 3: denser near the recommended 0.85, where thresholds are actually set.
_KNOT_SCORES = (0.0, 0.25, 0.4, 0.55, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.925, 0.95, 0.97,
                1.0)


@dataclass(frozen=True, slots=True)
class Calibration:
    """A monotone piecewise-linear map from raw cosine to calibrated score.

    ``cosines`` strictly increasing, ``scores`` non-decreasing, both the same length
    (at least 2); below the first knot the first score, above the last the last.
    """

    cosines: tuple[float, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.cosines) < 2 or len(self.cosines) != len(self.scores):
            raise ValueError("Calibration: need two or more (cosine, score) knots")
        if any(b <= a for a, b in pairwise(self.cosines)):
            raise ValueError("Calibration: cosines must be strictly increasing")
        if any(b < a for a, b in pairwise(self.scores)):
            raise ValueError("Calibration: scores must not decrease")

    def __call__(self, cosine: Any) -> Any:
        """The calibrated score of ``cosine`` (a float or a numpy array of them)."""
        import numpy as np

        result = np.interp(cosine, self.cosines, self.scores)
        return float(result) if np.ndim(result) == 0 else result

    def cosine_at(self, score: float) -> float:
        """The smallest raw cosine whose score reaches ``score`` (1.0 if none does)."""
        for (c0, s0), (c1, s1) in pairwise(zip(self.cosines, self.scores, strict=True)):
            if s1 >= score:
                if s0 >= score:
                    return c0
                return c0 + (c1 - c0) * (score - s0) / (s1 - s0)
        return 1.0


def fit_calibration(accepted_trap_cosines: Sequence[float], trap_count: int) -> Calibration:
    """Knots from the raw cosines of the trap pairs the guard would let through.

    Args:
        accepted_trap_cosines: cosine of every reference trap pair the guard does *not*
            veto (vetoed traps are never served at any threshold).
        trap_count: all trap pairs, vetoed ones included (the denominator of ``F``).

    For each level ``f`` the knot sits midway between the cosine of the trap that would
    push the false-hit rate above ``f`` and the next one up, so that a threshold at the
    knot serves at most ``f`` of the traps.
    """
    if trap_count <= 0:
        raise ValueError("fit_calibration: trap_count must be positive")
    ranked = sorted(accepted_trap_cosines, reverse=True)
    knots: dict[float, float] = {}
    for score in _KNOT_SCORES:
        level = (1 - score) / FALSE_HIT_SLOPE
        allowed = int(level * trap_count + 1e-9)  # traps a threshold here may serve
        if allowed >= len(ranked):
            continue  # the guard alone keeps wrong answers under this level
        above = ranked[allowed - 1] if allowed > 0 else 1.0
        cosine = round((ranked[allowed] + above) / 2, 6)
        knots[cosine] = max(score, knots.get(cosine, score))
    knots.setdefault(1.0, 1.0)
    knots[1.0] = 1.0
    xs = sorted(knots)
    # Ties in cosine were merged above; enforce a non-decreasing score from the bottom.
    ys: list[float] = []
    for x in xs:
        ys.append(max(knots[x], ys[-1] if ys else 0.0))
    if xs[0] > -1.0:
        xs.insert(0, -1.0)
        ys.insert(0, 0.0)
    return Calibration(tuple(xs), tuple(ys))
