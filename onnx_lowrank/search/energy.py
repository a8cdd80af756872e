"""Energy-threshold rank selection.

Per layer, the smallest rank keeping a fraction E of the squared singular values. With a
budget, one common E is found by bisection so that the candidate layers keep at most the
budget. Also the fixed allocations: a uniform rank cap and full rank (a debugging aid).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from onnx_lowrank.errors import BudgetError
from onnx_lowrank.layers import Layer
from onnx_lowrank.search.analysis import LayerAnalysis
from onnx_lowrank.search.budget import Budget, layer_cost
from onnx_lowrank.search.plan import LayerDecision, RankPlan

log = logging.getLogger(__name__)

_BISECTION_STEPS = 60


def keep_decisions(layers: Iterable[Layer], *, min_params: int) -> dict[str, LayerDecision]:
    """'keep' decisions, with reasons, for the layers no search may touch."""
    decisions = {}
    for layer in layers:
        if not layer.supported:
            decisions[layer.name] = LayerDecision("keep", reason=layer.skip.code)
        elif layer.params < min_params:
            decisions[layer.name] = LayerDecision("keep", reason="below_min_params")
    return decisions


def decide(analysis: LayerAnalysis, rank: int, *, ignore_break_even: bool = False) -> LayerDecision:
    """Factorize at ``rank`` if that stores fewer values than the dense weight, else keep."""
    layer = analysis.layer
    rank = max(1, min(rank, layer.max_rank))
    if not ignore_break_even and rank >= layer.break_even_rank:
        return LayerDecision("keep", reason="above_break_even")
    predicted = {
        "params": layer.factor_params(rank),
        "rel_error": round(analysis.spectrum.relative_error(rank), 6),
    }
    if layer.flops is not None:
        predicted["flops"] = layer.factor_flops(rank)
    return LayerDecision("factorize", method="svd", rank=rank, predicted=predicted)


def plan_energy(analyses: list[LayerAnalysis], energy: float) -> dict[str, LayerDecision]:
    """Each layer at the smallest rank keeping ``energy`` of its squared singular values."""
    return {a.layer.name: decide(a, a.spectrum.rank_for_energy(energy)) for a in analyses}


def plan_rank(analyses: list[LayerAnalysis], rank: int | None) -> dict[str, LayerDecision]:
    """Every layer capped at ``rank``; ``None`` means full rank, ignoring break-even."""
    if rank is None:
        return {a.layer.name: decide(a, a.layer.max_rank, ignore_break_even=True) for a in analyses}
    return {a.layer.name: decide(a, rank) for a in analyses}


def plan_cost(analyses: list[LayerAnalysis], decisions: dict[str, LayerDecision], kind: str) -> float:
    """Total cost of the candidate layers under ``decisions``."""
    total = 0.0
    for a in analyses:
        decision = decisions[a.layer.name]
        rank = decision.rank if decision.action == "factorize" else None
        total += layer_cost(a.layer, rank, kind)
    return total


def search_energy(
    analyses: list[LayerAnalysis], budget: Budget, *, fixed_cost: float = 0.0
) -> tuple[dict[str, LayerDecision], float]:
    """The largest common energy threshold whose plan fits ``budget``.

    ``fixed_cost`` is the cost of supported layers the search may not touch (below
    --min-params): they count in the budget's total and in what is kept, so that "keep 50%"
    holds for every supported layer. Returns the decisions and the threshold. Raises
    :class:`BudgetError` when even rank 1 everywhere does not fit.
    """
    dense = sum(layer_cost(a.layer, None, budget.kind) for a in analyses) + fixed_cost
    limit = budget.limit(dense) - fixed_cost
    smallest = plan_energy(analyses, 1e-12)
    smallest_cost = plan_cost(analyses, smallest, budget.kind)
    if smallest_cost > limit * (1 + 1e-12):
        smallest_cost += fixed_cost
        limit += fixed_cost
        raise BudgetError(
            f"budget {budget.kind} <= {_fmt(limit)} cannot be met: rank 1 in every layer still "
            f"keeps {_fmt(smallest_cost)} of {_fmt(dense)} ({smallest_cost / dense:.1%})"
        )
    low, high = 0.0, 1.0
    if plan_cost(analyses, plan_energy(analyses, 1.0), budget.kind) <= limit:
        low = 1.0
    else:
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if plan_cost(analyses, plan_energy(analyses, max(middle, 1e-12)), budget.kind) <= limit:
                low = middle
            else:
                high = middle
    threshold = max(low, 1e-12)
    decisions = plan_energy(analyses, threshold)
    log.info("energy threshold %.6f meets %s budget", threshold, budget.kind)
    return decisions, threshold


def make_plan(
    layers: list[Layer],
    decisions: dict[str, LayerDecision],
    *,
    min_params: int,
    method: str,
    budget: Budget | None = None,
    options: dict | None = None,
    model_sha256: str | None = None,
) -> RankPlan:
    """A plan covering every layer of the model, in graph order."""
    merged = keep_decisions(layers, min_params=min_params)
    merged.update(decisions)
    ordered = {layer.name: merged[layer.name] for layer in layers if layer.name in merged}
    return RankPlan(
        layers=ordered,
        method=method,
        budget=budget.to_json() if budget else None,
        options=dict(options or {}),
        model_sha256=model_sha256,
    )


def _fmt(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if math.isfinite(value) else str(value)
