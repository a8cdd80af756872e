"""``energy``: one common energy threshold, found by bisection, for every layer.

Wraps :func:`onnx_lowrank.search.energy.search_energy` (each layer keeps the smallest rank
holding a fraction E of its squared singular values). When the guard restricts ranks (a rank
multiple, the latency guard) or the budget is latency, the same bisection runs on the allowed
ranks: each layer's energy rank is rounded up to the next allowed rank, else kept dense.
"""

from __future__ import annotations

import logging

import numpy as np

from onnx_lowrank.errors import BudgetError
from onnx_lowrank.search import allocate, energy
from onnx_lowrank.search.analysis import LayerAnalysis
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.guard import rank_lattice, snap_up
from onnx_lowrank.search.method import SearchContext, SearchMethod
from onnx_lowrank.search.plan import LayerDecision

log = logging.getLogger(__name__)

_BISECTION_STEPS = 60


def search(ctx: SearchContext, budget: Budget) -> dict[str, LayerDecision]:
    candidates = list(ctx.candidates)
    plain = ctx.latency is None and budget.kind in ("params", "flops") and all(
        np.array_equal(c.ranks, rank_lattice(c.layer, 1)) for c in candidates
    )
    if plain:
        analyses = [LayerAnalysis(c.layer, c.spectrum) for c in candidates]
        decisions, _ = energy.search_energy(analyses, budget, fixed_cost=ctx.fixed_cost(budget.kind))
        return decisions
    return _search_on_allowed_ranks(ctx, budget)


def _ranks_at(ctx: SearchContext, threshold: float) -> list[int | None]:
    return [snap_up(c.ranks, c.spectrum.rank_for_energy(threshold)) for c in ctx.candidates]


def _cost(ctx: SearchContext, ranks: list[int | None], kind: str) -> float:
    return sum(ctx.cost(c, r, kind) for c, r in zip(ctx.candidates, ranks))


def _search_on_allowed_ranks(ctx: SearchContext, budget: Budget) -> dict[str, LayerDecision]:
    dense, limit = allocate.budget_limit(ctx, list(ctx.candidates), budget)
    tolerance = limit * (1 + 1e-12)
    smallest = _cost(ctx, _ranks_at(ctx, 1e-12), budget.kind)
    if smallest > tolerance:
        raise BudgetError(
            f"budget {budget.kind} <= {allocate.fmt(limit)} cannot be met: the smallest allowed ranks still keep "
            f"{allocate.fmt(smallest)} of {allocate.fmt(dense)} ({smallest / dense:.1%})"
        )
    low, high = 1e-12, 1.0
    if _cost(ctx, _ranks_at(ctx, 1.0), budget.kind) <= tolerance:
        low = 1.0
    else:
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if _cost(ctx, _ranks_at(ctx, middle), budget.kind) <= tolerance:
                low = middle
            else:
                high = middle
    log.info("energy threshold %.6f meets the %s budget on the allowed ranks", low, budget.kind)
    return {c.name: allocate.decision(ctx, c, r) for c, r in zip(ctx.candidates, _ranks_at(ctx, low))}


METHOD = SearchMethod(
    name="energy",
    search=search,
    description="data-free; every layer keeps the same fraction of its squared singular values (bisection)",
)
