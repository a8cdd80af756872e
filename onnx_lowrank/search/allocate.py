"""Allocation under a budget: a multiple-choice knapsack over per-layer (cost, error) curves.

Each candidate layer is a :class:`Curve`: keep it dense (its full cost, no error) or factorize
it at one of its allowed ranks (cost ``r * (m + n)`` params, ``2 * tokens * r * (m + n)`` FLOPs
or measured milliseconds; a predicted error). The cost is not convex in the rank -- it jumps
from ``m * n`` dense to ``r * (m + n)`` at the break-even rank -- so the dense state is just
one more point of the curve, and each curve is reduced to its lower convex hull in the
(cost, error) plane, walked from dense towards the cheapest state.

:func:`global_ranking` merges the hull segments of every layer into one order, least error
added per unit of cost saved first. That order is computed once; the plan for ANY budget is a
prefix of it (:func:`walk`), topped up by :func:`fill`, which spends the budget's leftover on
the moves that remove the most error per unit of cost. Errors must be additive across layers
(relative squared errors, or measured output errors, are).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from onnx_lowrank.errors import BudgetError
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.method import Candidate, SearchContext
from onnx_lowrank.search.plan import LayerDecision

log = logging.getLogger(__name__)

DENSE = -1  # the state "kept dense"; other states index a curve's ranks
_TOLERANCE = 1e-9  # relative slack on budget comparisons (float sums of costs)


@dataclasses.dataclass(frozen=True)
class Curve:
    """One layer's options: dense, or rank ``ranks[k]`` at ``costs[k]`` with ``errors[k]``."""

    name: str
    dense_cost: float
    ranks: np.ndarray
    costs: np.ndarray
    errors: np.ndarray

    def cost(self, state: int) -> float:
        return self.dense_cost if state == DENSE else float(self.costs[state])

    def error(self, state: int) -> float:
        return 0.0 if state == DENSE else float(self.errors[state])

    def cheapest(self) -> int:
        """The state of least cost (ties: least error)."""
        if len(self.ranks) == 0:
            return DENSE
        order = np.lexsort((self.errors, self.costs))
        best = int(order[0])
        return best if self.costs[best] < self.dense_cost else DENSE


@dataclasses.dataclass(frozen=True)
class Step:
    """Moving one layer from ``source`` to ``target``: saves ``saved`` cost, adds ``added`` error."""

    curve: int
    source: int
    target: int
    saved: float
    added: float

    @property
    def ratio(self) -> float:
        return self.added / self.saved if self.saved > 0 else math.inf


def hull_path(curve: Curve) -> list[int]:
    """States from dense to the cheapest along the lower convex hull of (cost, error)."""
    points = [(curve.dense_cost, 0.0, DENSE)]
    points += [
        (float(c), float(e), k) for k, (c, e) in enumerate(zip(curve.costs, curve.errors)) if c < curve.dense_cost
    ]
    points.sort()
    lower: list[tuple[float, float, int]] = []
    for point in points:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], point) <= 0:
            lower.pop()
        lower.append(point)
    # Trim the hull at its cheapest zero-error (least-error) vertex; dense is the start.
    best = min(range(len(lower)), key=lambda i: (lower[i][1], lower[i][0]))
    path = [p[2] for p in reversed(lower[: best + 1])]
    return path if path[0] == DENSE else [DENSE, *path]


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def global_ranking(curves: list[Curve]) -> list[Step]:
    """Every layer's hull segments in one order: least error added per cost saved first.

    Within a layer the segments' ratios increase (the hull is convex), so the order keeps each
    layer's segments in sequence; ties are broken by layer order, deterministically.
    """
    steps: list[tuple[float, int, int, Step]] = []
    for index, curve in enumerate(curves):
        path = hull_path(curve)
        for position, (source, target) in enumerate(zip(path, path[1:])):
            step = Step(
                index, source, target, curve.cost(source) - curve.cost(target), curve.error(target) - curve.error(source)
            )
            steps.append((step.ratio, index, position, step))
    steps.sort(key=lambda item: item[:3])
    return [item[3] for item in steps]


def minimum_cost(curves: list[Curve]) -> float:
    return sum(c.cost(c.cheapest()) for c in curves)


def walk(curves: list[Curve], ranking: list[Step], limit: float) -> list[int]:
    """Apply the ranking's steps in order until the total cost is within ``limit``."""
    states = [DENSE] * len(curves)
    total = sum(c.dense_cost for c in curves)
    for step in ranking:
        if total <= limit * (1 + _TOLERANCE):
            break
        states[step.curve] = step.target
        total -= step.saved
    return states


def fill(curves: list[Curve], states: list[int], limit: float) -> list[int]:
    """Spend what is left of ``limit`` on the moves removing the most error per cost added."""
    states = list(states)
    options = [
        (
            np.concatenate([[c.dense_cost], c.costs]),
            np.concatenate([[0.0], c.errors]),
            np.concatenate([[DENSE], np.arange(len(c.ranks))]),
        )
        for c in curves
    ]
    total = sum(c.cost(s) for c, s in zip(curves, states))
    slack = limit * (1 + _TOLERANCE) - total
    while True:
        best = None  # (gain, removed error, -curve index, curve index, state, added cost)
        for index, (curve, (costs, errors, ids)) in enumerate(zip(curves, options)):
            state = states[index]
            added = costs - curve.cost(state)
            removed = curve.error(state) - errors
            ok = (added <= slack) & (removed > 1e-15)
            if not ok.any():
                continue
            gain = np.where(added > 0, removed / np.where(added > 0, added, 1.0), np.inf)
            candidates = np.flatnonzero(ok)
            pick = candidates[np.lexsort((-removed[candidates], -gain[candidates]))[0]]
            key = (gain[pick], removed[pick], -index)
            if best is None or key > best[:3]:
                best = (*key, index, int(ids[pick]), float(added[pick]))
        if best is None:
            return states
        states[best[3]] = best[4]
        slack -= best[5]


def budget_limit(ctx: SearchContext, candidates: list[Candidate], budget: Budget) -> tuple[float, float]:
    """(dense total, what the candidates may keep) in the budget's unit.

    A fraction applies to every supported layer: those the search may not touch (below
    ``--min-params``) count in the total at their dense cost and are subtracted from what the
    candidates may keep, as ``compress --keep-params`` does. (Latency budgets count only the
    candidates: the others are not timed.)
    """
    fixed = ctx.fixed_cost(budget.kind)
    dense = sum(ctx.dense_cost(c, budget.kind) for c in candidates)
    total = budget.limit(dense + fixed)
    if total < fixed:
        raise BudgetError(
            f"budget {budget.kind} <= {fmt(total)} cannot be met: the supported layers below --min-params "
            f"alone keep {fmt(fixed)} (lower --min-params, or give a larger budget)"
        )
    return dense, total - fixed


def allocate(curves: list[Curve], limit: float, *, ranking: list[Step] | None = None, what: str = "cost") -> list[int]:
    """The least-error states within ``limit`` (hull walk + fill); BudgetError if impossible."""
    floor = minimum_cost(curves)
    if floor > limit * (1 + _TOLERANCE):
        dense = sum(c.dense_cost for c in curves)
        raise BudgetError(
            f"budget {what} <= {fmt(limit)} cannot be met: the smallest allowed ranks still keep "
            f"{fmt(floor)} of {fmt(dense)} ({floor / dense:.1%})"
            + (" -- the latency guard or --rank-multiple leaves few ranks" if any(len(c.ranks) == 0 for c in curves) else "")
        )
    ranking = ranking if ranking is not None else global_ranking(curves)
    return fill(curves, walk(curves, ranking, limit), limit)


def plan_cost(curves: list[Curve], states: list[int]) -> float:
    return sum(c.cost(s) for c, s in zip(curves, states))


def decision(
    ctx: SearchContext,
    candidate: Candidate,
    rank: int | None,
    *,
    method: str = "svd",
    predicted: dict | None = None,
    weight_error: bool = True,
) -> LayerDecision:
    """A factorize decision with its predicted params/FLOPs/errors, or a keep with a reason."""
    layer = candidate.layer
    if rank is None:
        return LayerDecision("keep", reason="kept_dense" if len(candidate.ranks) else candidate.blocked or "no_allowed_rank")
    values: dict = {"params": layer.factor_params(rank)}
    if layer.flops is not None:
        values["flops"] = layer.factor_flops(rank)
    if weight_error:
        values["rel_error"] = round(candidate.spectrum.relative_error(rank), 6)
    if ctx.latency is not None and candidate.name in ctx.latency.layers:
        values["latency_ms"] = round(ctx.latency.ms(layer, rank), 5)
        values["dense_latency_ms"] = round(ctx.latency.ms(layer, None), 5)
    values.update(predicted or {})
    return LayerDecision("factorize", method=method, rank=int(rank), predicted=values)


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.4g}"
