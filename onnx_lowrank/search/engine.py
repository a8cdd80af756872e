"""Rank search as library calls: analyse once, then plan any number of budgets.

    prepare_search(model, layers, ...) -> SearchContext     SVDs (cached), guard, latency tables
    run_search(context, method, budget, options) -> RankPlan
    search_plan(...)  = prepare + run, for one budget (what ``compress --search`` calls)
    search_sweep(...) = prepare once + run per budget (``search --sweep``)

Plans are deterministic for a given model, options and seed: every method is seeded, ties are
broken by layer order, and nothing machine-dependent (paths, timings) enters the plan, except
measured latencies when a provider is given (they come from the cache on a rerun).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from onnx_lowrank.decompose.svd import Spectrum, spectrum
from onnx_lowrank.errors import BudgetError, OptionError
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.search import allocate, energy, guard, registry
from onnx_lowrank.search.analysis import candidate_layers
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.cache import Cache, array_sha256
from onnx_lowrank.search.method import Candidate, ProgressFactory, SearchContext, SearchMethod, null_progress
from onnx_lowrank.search.plan import LayerDecision, RankPlan

log = logging.getLogger(__name__)

DEFAULT_MIN_PARAMS = 4096


def layer_spectrum(model: onnx.ModelProto, layer: Layer, cache: Cache, model_sha256: str | None) -> tuple[str, Spectrum]:
    """(weight hash, singular values) of a layer, from the cache when it holds them."""
    matrix = weight_matrix(model, layer)
    weight_sha = array_sha256(matrix)
    key = {"kind": "svd", "model": model_sha256, "layer": layer.name, "weight": weight_sha}
    values = cache.array("spectra", model_sha256 or weight_sha, key, lambda: spectrum(matrix).values)
    return weight_sha, Spectrum(values)


def prepare_search(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    *,
    min_params: int = DEFAULT_MIN_PARAMS,
    seed: int = 0,
    model_sha256: str | None = None,
    cache: Cache | None = None,
    provider: str | None = None,
    rank_multiple: int | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    calibration: Any = None,
    calibration_batch: int = 32,
    progress: ProgressFactory = null_progress,
    timer: guard.Timer | None = None,
) -> SearchContext:
    """Everything the methods share: candidates, their singular values, allowed ranks.

    ``cache``: a :class:`~onnx_lowrank.search.cache.Cache` (None: nothing kept on disk).
    ``provider`` ("cpu", "cuda", "tensorrt" or its onnxruntime name): measure per-layer latency there,
    enable the latency guard and latency budgets. ``rank_multiple`` defaults to 16 on CPU,
    8 on CUDA, 1 without a provider. ``calibration``: a
    :class:`~onnx_lowrank.validate.data.Dataset` (see :mod:`onnx_lowrank.calibrate`) for the
    ``calibrated`` method.
    """
    cache = cache if cache is not None else Cache(None)
    if provider is not None:
        from onnx_lowrank.validate import runtime  # onnxruntime lives there

        options = runtime.RuntimeOptions(provider=runtime.provider_key(provider))
        runtime.check_provider(options)
        provider = runtime.PROVIDERS[options.provider]
    multiple = rank_multiple if rank_multiple is not None else guard.default_rank_multiple(provider)
    chosen = candidate_layers(layers, min_params=min_params)
    candidates: list[Candidate] = []
    with progress("SVD", len(chosen)) as advance:
        for layer in chosen:
            weight_sha, values = layer_spectrum(model, layer, cache, model_sha256)
            ranks = guard.rank_lattice(layer, multiple)
            blocked = None if len(ranks) else ("above_break_even" if multiple == 1 else "no_rank_multiple_below_break_even")
            candidates.append(Candidate(layer, weight_sha, values, ranks, blocked))
            advance()
    latency = None
    if provider is not None:
        latency = guard.measure_latency(
            model, candidates, provider, cache, input_shapes=input_shapes, timer=timer, progress=progress
        )
        candidates = guard.apply_latency_guard(candidates, latency)
    session = None
    if calibration is not None:
        from onnx_lowrank.search.calibrated import Calibration

        session = Calibration(model, candidates, calibration, cache, model_sha256, batch_size=calibration_batch, progress=progress)
    settings = {"min_params": min_params, "rank_multiple": multiple}
    if provider is not None:
        settings["provider"] = provider
    if input_shapes:
        settings["input_shapes"] = {name: list(shape) for name, shape in sorted(input_shapes.items())}
    return SearchContext(
        model=model,
        layers=tuple(layers),
        candidates=tuple(candidates),
        cache=cache,
        seed=seed,
        model_sha256=model_sha256,
        latency=latency,
        calibration=session,
        progress=progress,
        settings=settings,
    )


def run_search(
    ctx: SearchContext,
    method: str | SearchMethod,
    budget: Budget,
    options: Mapping[str, Any] | None = None,
) -> RankPlan:
    """One plan for ``budget`` with ``method`` (a registered name or a SearchMethod)."""
    method = registry.get_method(method) if isinstance(method, str) else method
    resolved = method.resolve_options(options)
    if method.needs_calibration and ctx.calibration is None:
        raise OptionError(
            f"method {method.name!r} needs calibration data: give --calib data.npz (or --calib-random N)"
        )
    if budget.kind == "latency-ms" and ctx.latency is None:
        raise OptionError("a latency budget needs measured latency tables: give --provider")
    scoped = ctx.with_options(resolved)
    decisions = dict(method.search(scoped, budget))
    for candidate in ctx.candidates:
        decisions.setdefault(candidate.name, LayerDecision("keep", reason="not_decided"))
    decisions = guard.enforce(decisions, list(ctx.candidates))
    _check_budget(ctx, decisions, budget, method.name)
    options_out: dict[str, Any] = {**ctx.settings, **resolved}
    if method.needs_calibration and ctx.calibration is not None:
        from onnx_lowrank.search.calibrated import calibration_record

        options_out["calibration"] = calibration_record(ctx.calibration.data)
    plan = energy.make_plan(
        list(ctx.layers),
        decisions,
        min_params=ctx.settings.get("min_params", DEFAULT_MIN_PARAMS),
        method=method.name,
        budget=budget,
        options=options_out,
        model_sha256=ctx.model_sha256,
    )
    return dataclasses.replace(plan, seed=ctx.seed)


def search_plan(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    method: str | SearchMethod,
    budget: Budget,
    options: Mapping[str, Any] | None = None,
    **prepare: Any,
) -> RankPlan:
    """Analyse ``model`` and plan one ``budget`` (keywords as :func:`prepare_search`)."""
    return run_search(prepare_search(model, layers, **prepare), method, budget, options)


def search_sweep(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    method: str | SearchMethod,
    budgets: Sequence[Budget],
    options: Mapping[str, Any] | None = None,
    **prepare: Any,
) -> list[RankPlan]:
    """One analysis, one plan per budget (in the order given)."""
    ctx = prepare_search(model, layers, **prepare)
    return [run_search(ctx, method, budget, options) for budget in budgets]


def plan_totals(ctx: SearchContext, plan: RankPlan) -> dict[str, Any]:
    """Supported layers' params/FLOPs (candidates' measured latency) dense and as planned.

    Like budgets, params and FLOPs count every supported layer (those below --min-params at
    their dense cost); latency counts the timed candidates only.
    """
    totals: dict[str, Any] = {"layers_candidate": len(ctx.candidates), "layers_factorized": len(plan.factorized())}
    kinds = ["params"]
    if all(c.layer.flops is not None for c in ctx.candidates):
        kinds.append("flops")
    if ctx.latency is not None and all(c.name in ctx.latency.layers for c in ctx.candidates):
        kinds.append("latency-ms")
    for kind in kinds:
        fixed = ctx.fixed_cost(kind)  # supported layers below --min-params count, kept dense
        dense = fixed + sum(ctx.dense_cost(c, kind) for c in ctx.candidates)
        kept = fixed + sum(ctx.cost(c, _planned_rank(plan, c.name), kind) for c in ctx.candidates)
        label = kind.replace("-", "_")
        totals[f"{label}_dense"] = round(dense, 6) if kind == "latency-ms" else int(dense)
        totals[f"{label}_planned"] = round(kept, 6) if kind == "latency-ms" else int(kept)
        totals[f"{label}_kept"] = round(kept / dense, 6) if dense else 1.0
    return totals


def _planned_rank(plan: RankPlan, name: str) -> int | None:
    decision = plan.layers.get(name)
    return decision.rank if decision is not None and decision.action == "factorize" else None


def _check_budget(ctx: SearchContext, decisions: dict[str, LayerDecision], budget: Budget, method: str) -> None:
    candidates = list(ctx.candidates)
    dense, limit = allocate.budget_limit(ctx, candidates, budget)
    planned = sum(
        ctx.cost(c, decisions[c.name].rank if decisions[c.name].action == "factorize" else None, budget.kind)
        for c in candidates
    )
    if planned > limit * (1 + 1e-9):
        raise BudgetError(
            f"method {method!r} returned a plan keeping {allocate.fmt(planned)} {budget.kind} of "
            f"{allocate.fmt(dense)}, over the budget of {allocate.fmt(limit)}"
        )
