"""The latency guard's last step: the whole compressed model must not run slower than the original.

Per-layer timings (:mod:`onnx_lowrank.search.guard`) miss what only the whole graph shows:
layout conversions between factorized convs, fusions the dense graph had, one more kernel
launch per layer. So after the search the compressed model is timed against the original,
interleaved on the provider (the code path of ``bench``). While it is slower, the factorized
layer with the smallest measured per-layer margin is kept dense and the search runs again
under the same budget, so the other layers take up the slack. It stops when the model is at
least as fast as the original; when blocking layers leaves the budget out of reach or no
layer factorized, it says so instead of writing a slower model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnx_lowrank.errors import BudgetError, NothingToDo
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.engine import run_search
from onnx_lowrank.search.method import SearchContext, SearchMethod
from onnx_lowrank.search.plan import RankPlan

log = logging.getLogger(__name__)

BLOCKED_REASON = "latency_guard_model"

# measure(compressed) -> (speedup, (iqr_low, iqr_high)); speedup = time(original) / time(compressed)
Measure = Callable[[Any], tuple[float, tuple[float, float]]]


@dataclasses.dataclass(frozen=True)
class GuardStep:
    """One whole-model measurement: how many layers were factorized and how fast it ran."""

    layers_factorized: int
    speedup: float  # median of per-pair ratios time(original) / time(compressed), > 1 = faster
    speedup_iqr: tuple[float, float]
    blocked: str | None = None  # the layer kept dense after this measurement (None: accepted)

    def to_json(self) -> dict[str, Any]:
        out = {
            "layers_factorized": self.layers_factorized,
            "speedup": round(self.speedup, 4),
            "speedup_iqr": [round(v, 4) for v in self.speedup_iqr],
        }
        if self.blocked is not None:
            out["blocked"] = self.blocked
        return out


@dataclasses.dataclass(frozen=True)
class ModelGuardResult:
    """The accepted plan, what ``build`` made of it, and every measurement on the way."""

    plan: RankPlan
    built: Any
    steps: tuple[GuardStep, ...]

    @property
    def speedup(self) -> float:
        """The accepted model's measured speedup over the original (>= 1.0)."""
        return self.steps[-1].speedup

    @property
    def blocked(self) -> list[str]:
        return [step.blocked for step in self.steps if step.blocked is not None]

    def to_json(self) -> dict[str, Any]:
        return {"speedup": round(self.speedup, 4), "blocked": self.blocked, "steps": [s.to_json() for s in self.steps]}


def guard_whole_model(
    ctx: SearchContext,
    method: str | SearchMethod,
    budget: Budget,
    options: Mapping[str, Any] | None,
    plan: RankPlan,
    build: Callable[[RankPlan], Any],
    measure: Measure,
    *,
    model_of: Callable[[Any], Any] = lambda built: built.model,
) -> ModelGuardResult:
    """Re-search with slow layers kept dense until the whole model is not slower than the original.

    ``ctx`` must hold latency tables (``prepare_search(..., provider=...)``); ``plan`` is
    ``run_search(ctx, method, budget, options)``. ``build(plan)`` makes the compressed model
    (e.g. :func:`onnx_lowrank.compress.apply_plan`'s result; ``model_of`` takes the ModelProto
    out of it) and ``measure(model)`` times it against the original. Raises
    :class:`BudgetError` when the budget cannot be met without the slow layers and
    :class:`NothingToDo` when no factorized layer is left.
    """
    if ctx.latency is None:
        raise ValueError("the whole-model latency guard needs a context with latency tables (a provider)")
    steps: list[GuardStep] = []
    blocked: set[str] = set()
    speedup = None
    while True:
        factorized = plan.factorized()
        if not factorized:
            last = f" (last: {speedup:.3f}x)" if speedup is not None else ""
            raise NothingToDo(
                f"every compressed variant ran slower than the original on {ctx.latency.provider}{last}; "
                "the latency guard kept every layer dense; no file written"
            )
        built = build(plan)
        speedup, iqr = measure(model_of(built))
        if speedup >= 1.0:
            steps.append(GuardStep(len(factorized), speedup, iqr))
            return ModelGuardResult(plan, built, tuple(steps))
        victim, plan, ctx, error = _block_one(ctx, method, budget, options, plan, blocked)
        steps.append(GuardStep(len(factorized), speedup, iqr, victim))
        if victim is None:
            raise BudgetError(
                f"the compressed model ran {speedup:.3f}x as fast as the original on {ctx.latency.provider}, and "
                f"keeping any of its factorized layers dense breaks the budget ({error}); raise the budget "
                "or leave out the latency guard"
            )
        log.info("whole model %.3fx as fast as the original: keeping %s dense", speedup, victim)
        blocked.add(victim)


def pair_measure(
    original: Any,
    feeds: dict[str, np.ndarray],
    options: Any,
    *,
    warmup: int = 20,
    iters: int = 200,
    on_result: Callable[[float, str], None] | None = None,
) -> Measure:
    """A :data:`Measure` that times a model against ``original`` interleaved on ``feeds`` with
    :func:`onnx_lowrank.validate.latency.measure_pair` (``options``: a RuntimeOptions).
    ``on_result(speedup, provider used)`` hears every measurement."""
    from onnx_lowrank.validate.latency import measure_pair  # onnxruntime lives there

    def measure(compressed: Any) -> tuple[float, tuple[float, float]]:
        pair = measure_pair(
            original, compressed, feeds, options=options, warmup=warmup, iters=iters, labels=("original", "compressed")
        )
        if on_result is not None:
            on_result(pair.speedup, pair.a.provider)
        return pair.speedup, pair.iqr

    return measure


def _block_one(ctx, method, budget, options, plan, blocked):
    """Keep one more layer dense: the factorized one with the smallest per-layer margin whose
    blocking still meets the budget. Returns (layer, new plan, new context, None) or
    (None, plan, ctx, the last budget error)."""
    error = None
    for victim in _by_margin(ctx, plan):
        trial = _with_blocked(ctx, blocked | {victim})
        try:
            return victim, run_search(trial, method, budget, options), trial, None
        except BudgetError as exc:
            error = exc
    return None, plan, ctx, error


def _by_margin(ctx: SearchContext, plan: RankPlan) -> list[str]:
    """Factorized layers, smallest measured per-layer speedup at their planned rank first."""
    margins = {}
    for name, decision in plan.factorized().items():
        entry = ctx.latency.layers.get(name)
        margins[name] = entry.speedup_at(decision.rank) if entry is not None and decision.rank else np.inf
    return sorted(margins, key=lambda name: (margins[name], name))


def _with_blocked(ctx: SearchContext, blocked: set[str]) -> SearchContext:
    """The context with ``blocked`` layers allowed no rank (and a fresh memo: rankings change)."""
    candidates = tuple(
        dataclasses.replace(c, ranks=c.ranks[:0], blocked=BLOCKED_REASON) if c.name in blocked else c
        for c in ctx.candidates
    )
    return dataclasses.replace(ctx, candidates=candidates, memo={})
