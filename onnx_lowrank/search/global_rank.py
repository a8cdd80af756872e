"""``global``: one ranking of every singular value of every layer; any size from one analysis.

Data-free. Dropping singular value ``i`` of a layer costs ``sigma_i^2 / ||W||_F^2`` of relative
squared error and saves ``m + n`` parameters (``2 * tokens * (m + n)`` FLOPs, or the measured
milliseconds). Per layer those (cost, error) points -- plus "keep dense", which is where the
break-even jump lives -- are reduced to their lower convex hull, and all layers' hull segments
are merged into one order, least error per saved cost first
(:func:`onnx_lowrank.search.allocate.global_ranking`). The SVDs and that order are computed
once per model; a plan for each budget of a sweep is then a prefix of the order plus a greedy
top-up of the leftover budget, which costs milliseconds.
"""

from __future__ import annotations

import numpy as np

from onnx_lowrank.search import allocate
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.method import Candidate, OptionSpec, SearchContext, SearchMethod
from onnx_lowrank.search.plan import LayerDecision

WEIGHTINGS = ("relative", "absolute")


def tail_errors(candidate: Candidate, weighting: str = "relative") -> np.ndarray:
    """Squared error of the best rank-r approximation at each allowed rank r.

    ``relative``: divided by ``||W||_F^2`` (every layer's relative error counts alike);
    ``absolute``: the raw ``sum_{i>r} sigma_i^2``.
    """
    squares = candidate.spectrum.values.astype(np.float64) ** 2
    total = squares.sum()
    tails = total - np.cumsum(squares)  # tails[r - 1] = sum_{i > r} sigma_i^2
    tails = np.maximum(tails, 0.0)
    errors = tails[candidate.ranks - 1] if len(candidate.ranks) else np.zeros(0)
    if weighting == "relative":
        return errors / total if total > 0 else np.zeros_like(errors)
    return errors


def curves(ctx: SearchContext, kind: str, errors_of) -> list[allocate.Curve]:
    """One (cost, error) curve per candidate for budgets of ``kind``."""
    built = []
    for candidate in ctx.candidates:
        dense, costs = ctx.cost_table(candidate, kind)
        built.append(allocate.Curve(candidate.name, dense, candidate.ranks, costs, errors_of(candidate)))
    return built


def search(ctx: SearchContext, budget: Budget) -> dict[str, LayerDecision]:
    weighting = ctx.options.get("weighting", "relative")
    key = ("global", budget.kind, weighting)
    if key not in ctx.memo:  # the one analysis a sweep shares: curves and their global order
        layer_curves = curves(ctx, budget.kind, lambda c: tail_errors(c, weighting))
        ctx.memo[key] = (layer_curves, allocate.global_ranking(layer_curves))
    layer_curves, ranking = ctx.memo[key]
    _, limit = allocate.budget_limit(ctx, list(ctx.candidates), budget)
    states = allocate.allocate(layer_curves, limit, ranking=ranking, what=budget.kind)
    return {
        candidate.name: allocate.decision(ctx, candidate, None if state == allocate.DENSE else int(candidate.ranks[state]))
        for candidate, state in zip(ctx.candidates, states)
    }


METHOD = SearchMethod(
    name="global",
    search=search,
    description="data-free; one global order of all singular values by error per saved param/FLOP/ms",
    options={
        "weighting": OptionSpec(str, "relative", "error of a dropped singular value: relative to its layer's norm, or absolute", WEIGHTINGS),
    },
)
