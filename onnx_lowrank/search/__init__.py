"""Rank selection: turn a rank request (budget, energy, fixed rank) into a :class:`RankPlan`.

Requests are explicit types, never a number whose meaning depends on its Python type. Each
request type maps to one planning function in ``PLANNERS``.

The search methods (energy, global, continuous, calibrated, plugins) run through
:func:`search_plan` / :func:`search_sweep` (:mod:`onnx_lowrank.search.engine`); the methods are
listed by :mod:`onnx_lowrank.search.registry`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx

from onnx_lowrank.layers import Layer
from onnx_lowrank.search import energy
from onnx_lowrank.search.analysis import LayerAnalysis, analyze, candidate_layers
from onnx_lowrank.search.budget import Budget, layer_cost, parse_budget
from onnx_lowrank.search.engine import plan_totals, prepare_search, run_search, search_plan, search_sweep
from onnx_lowrank.search.method import SearchContext, SearchMethod
from onnx_lowrank.search.plan import LayerDecision, RankPlan


@dataclasses.dataclass(frozen=True)
class BudgetRequest:
    """Keep at most a budget of the candidate layers' params or FLOPs (energy bisection)."""

    budget: Budget


@dataclasses.dataclass(frozen=True)
class EnergyRequest:
    """Per layer, the smallest rank keeping this fraction of the squared singular values."""

    energy: float


@dataclasses.dataclass(frozen=True)
class RankRequest:
    """One rank cap for every layer."""

    rank: int


@dataclasses.dataclass(frozen=True)
class FullRankRequest:
    """Every supported layer at full rank, ignoring break-even (outputs must not change)."""


Request = BudgetRequest | EnergyRequest | RankRequest | FullRankRequest


def _plan_budget(analyses: list[LayerAnalysis], request: BudgetRequest, fixed: list[Layer]):
    fixed_cost = sum(layer_cost(layer, None, request.budget.kind) for layer in fixed)
    decisions, threshold = energy.search_energy(analyses, request.budget, fixed_cost=fixed_cost)
    return decisions, {"energy_threshold": round(threshold, 9)}, request.budget


def _plan_energy(analyses: list[LayerAnalysis], request: EnergyRequest, fixed: list[Layer]):
    del fixed
    return energy.plan_energy(analyses, request.energy), {"energy": request.energy}, None


def _plan_rank(analyses: list[LayerAnalysis], request: RankRequest, fixed: list[Layer]):
    del fixed
    return energy.plan_rank(analyses, request.rank), {"rank": request.rank}, None


def _plan_full(analyses: list[LayerAnalysis], request: FullRankRequest, fixed: list[Layer]):
    del request, fixed
    return energy.plan_rank(analyses, None), {"rank": "full"}, None


PLANNERS: dict[type, Callable] = {
    BudgetRequest: _plan_budget,
    EnergyRequest: _plan_energy,
    RankRequest: _plan_rank,
    FullRankRequest: _plan_full,
}


def plan_for(
    model: onnx.ModelProto,
    layers: list[Layer],
    request: Request,
    *,
    min_params: int,
    model_sha256: str | None = None,
    on_layer: Callable[[Layer], None] | None = None,
) -> RankPlan:
    """Analyse the candidate layers and allocate ranks for ``request``.

    Full rank ignores ``min_params`` too: it is for proving the rewrite exact on every layer.
    """
    floor = 0 if isinstance(request, FullRankRequest) else min_params
    candidates = candidate_layers(layers, min_params=floor)
    fixed = [layer for layer in layers if layer.supported and layer not in candidates]
    analyses = analyze(model, candidates, on_layer=on_layer)
    decisions, options, budget = PLANNERS[type(request)](analyses, request, fixed)
    options = {"min_params": floor, **options}
    method = "energy" if not isinstance(request, (RankRequest, FullRankRequest)) else "uniform"
    return energy.make_plan(
        layers, decisions, min_params=floor, method=method, budget=budget, options=options, model_sha256=model_sha256
    )


__all__ = [
    "Budget",
    "BudgetRequest",
    "EnergyRequest",
    "FullRankRequest",
    "LayerDecision",
    "RankPlan",
    "RankRequest",
    "SearchContext",
    "SearchMethod",
    "parse_budget",
    "plan_for",
    "plan_totals",
    "prepare_search",
    "run_search",
    "search_plan",
    "search_sweep",
]
