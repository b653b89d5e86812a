"""The cheapest eligible model, found in logarithmic time: the router's fast path.

Ranked by cost (``cost_optimized``, or any strategy once a tenant is downgraded), the
chosen model is the one that minimises ``a * prompt + B * y`` (``a`` its input price;
``B`` its output price, and ``y`` the request's output tokens; or, when the cost prices
an observed average completion, ``B`` its output price times that expected completion
and ``y = 1``), among the models whose context window holds the request, ties broken by
higher quality, lower latency, id. Minimising a positive linear function over points is
a walk along their lower-left convex hull: the cost is convex along it, so a binary
search finds the minimum.

Per tier, price book, static needs (quality, latency) and, with averages, the endpoint's
output and the averages' snapshot, an :class:`Index` holds the eligible models sorted by
context window, largest first, and one hull per distinct window: a request's models are a
prefix of that order (a bisect), its cheapest a search on that prefix's hull. Everything
is in whole numbers (exact). The general pass (``routing.select_model``) still gives the
whole order and the exclusions when they are asked for, and decides every case this
index does not cover (open breakers, observed latencies, a model asked by id).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

__all__ = ["Index"]

Point = tuple[int, int, tuple[Any, ...], Any]  # (a, B, tiebreak, model)


def _cross(o: Point, p: Point, q: Point) -> int:
    return (p[0] - o[0]) * (q[1] - o[1]) - (p[1] - o[1]) * (q[0] - o[0])


def _chain(points: list[Point]) -> list[Point]:
    """The lower-left convex chain of ``points``: ``a`` increasing, ``B`` decreasing,
    collinear points kept (they tie for some queries). Equal points: the best tiebreak."""
    best: dict[tuple[int, int], Point] = {}
    for point in points:
        known = best.get((point[0], point[1]))
        if known is None or point[2] < known[2]:
            best[(point[0], point[1])] = point
    ordered = sorted(best.values(), key=lambda p: (p[0], p[1]))
    hull: list[Point] = []
    for point in ordered:  # the lower hull, left to right, keeping collinear points
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) < 0:
            hull.pop()
        hull.append(point)
    # From the leftmost point (least a, then least B) down to the first least B: beyond
    # it, B grows with a, and no query with both weights positive ends there.
    least = min(p[1] for p in hull)
    chain: list[Point] = []
    for point in hull:
        if chain and point[0] == chain[-1][0]:
            continue  # the same a, a greater B: never the minimum of a positive query
        chain.append(point)
        if point[1] == least:
            break
    return chain


class Index:
    """The cheapest model of ``rows`` for any request, by window prefix and hull.

    Args:
        rows: ``(window, a, B, tiebreak, model)`` of each statically eligible model.
    """

    __slots__ = ("_chains", "_windows")

    def __init__(self, rows: Sequence[tuple[int, int, int, tuple[Any, ...], Any]]):
        ordered = sorted(rows, key=lambda r: -r[0])  # largest window first
        self._windows: list[int] = []  # negated distinct windows, ascending (for bisect)
        self._chains: list[list[Point]] = []
        points: list[Point] = []
        i = 0
        while i < len(ordered):
            window = ordered[i][0]
            while i < len(ordered) and ordered[i][0] == window:
                _w, a, b, tiebreak, model = ordered[i]
                points.append((a, b, tiebreak, model))
                i += 1
            self._windows.append(-window)
            self._chains.append(_chain(points))

    def cheapest(self, needed_window: int, x: int, y: int) -> tuple[int, Any] | None:
        """(cost, model) of the cheapest model whose window is at least
        ``needed_window``, for the query weights ``x``, ``y`` (both > 0); None if none."""
        k = bisect_right(self._windows, -needed_window)  # the windows >= needed_window
        if k == 0:
            return None
        chain = self._chains[k - 1]
        lo, hi = 0, len(chain) - 1
        while lo < hi:  # the first j whose next point does not cost less
            mid = (lo + hi) // 2
            here, after = chain[mid], chain[mid + 1]
            if x * (after[0] - here[0]) + y * (after[1] - here[1]) < 0:
                lo = mid + 1
            else:
                hi = mid
        best = chain[lo]
        cost = x * best[0] + y * best[1]
        j = lo + 1
        while j < len(chain):  # collinear neighbours that cost the same: the tiebreak
            other = chain[j]
            if x * other[0] + y * other[1] != cost:
                break
            if other[2] < best[2]:
                best = other
            j += 1
        return cost, best[3]
