"""``compress_to_floor``: the smallest (or fastest) model that keeps the user's accuracy floor.

    split (calibration | held-back) -> candidates, SVDs, [latency tables]    (search.engine)
      -> per-layer x rank sensitivity on the calibration part, cached         (floor.analysis)
      -> path of plans + verified choice with back-off                        (floor.allocate / greedy)
      -> held-back check with validate.accuracy.compare_models
      -> FloorResult, or FloorNotMet with the closest point

Only the calibration :class:`Dataset` reaches the search; the held-back part is used by the
final check alone. If that check fails, the choice is redone on the calibration part with the
floors' allowances halved (at most twice, reported as ``held_back.retries``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import onnx

from onnx_lowrank.errors import FloorNotMet, NothingToDo, OptionError
from onnx_lowrank.floor import allocate, greedy, spec
from onnx_lowrank.floor.analysis import PLAIN, Table, Workspace, analyse, greedy_ranks, merge, probe_ranks, refine_ranks
from onnx_lowrank.floor.spec import Floor
from onnx_lowrank.floor.split import split_dataset
from onnx_lowrank.layers import Layer
from onnx_lowrank.search.allocate import decision
from onnx_lowrank.search.cache import Cache
from onnx_lowrank.search.calibrated import DEFAULT_DAMPING, WHITENED
from onnx_lowrank.search.energy import make_plan
from onnx_lowrank.search.engine import DEFAULT_MIN_PARAMS, prepare_search
from onnx_lowrank.search.method import ProgressFactory, null_progress
from onnx_lowrank.search.plan import RankPlan
from onnx_lowrank.validate.data import Dataset

log = logging.getLogger(__name__)

OBJECTIVES = {"params": "params", "flops": "flops", "latency": "latency-ms"}
RETRY_FACTORS = (0.5, 0.25)


@dataclasses.dataclass(frozen=True)
class FloorMethod:
    """How a method picks ranks to measure and turns measurements into a path of plans."""

    factors: str  # WHITENED or PLAIN
    ranks: object  # (allowed ranks, count) -> ranks to measure
    path: object  # (ctx, table, floors, kind) -> allocate.Path
    refine: bool  # measure finer ranks around the first choice (a second analysis pass)


METHODS = {
    "floor": FloorMethod(WHITENED, probe_ranks, allocate.hull_path, False),
    "greedy": FloorMethod(PLAIN, lambda ranks, count: greedy_ranks(ranks, 10), greedy.threshold_path, False),
}


@dataclasses.dataclass(frozen=True)
class FloorResult:
    """The chosen plan, the compressed model and the ``floor`` report section."""

    plan: RankPlan
    model: onnx.ModelProto
    report: dict
    table: Table
    compressed: object  # compress.CompressResult (layer rows and totals for the CLI report)


def compress_to_floor(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    data: Dataset,
    floors: Sequence[Floor],
    objective: str = "params",
    *,
    method: str = "floor",
    provider: str = "cpu",
    seed: int = 0,
    holdout: float = 0.3,
    cache: Cache | None = None,
    progress: ProgressFactory = null_progress,
    max_evals: int | None = None,
    time_budget: float | None = None,
    min_params: int = DEFAULT_MIN_PARAMS,
    model_sha256: str | None = None,
    ranks_per_layer: int = 24,
) -> FloorResult:
    """Compress ``model`` as far as ``objective`` allows while every floor holds on held-back data.

    ``objective``: "params", "flops" or "latency" (measured per layer on ``provider``).
    ``method``: "floor" (whitened SVD, global hull allocation) or "greedy" (AIMET-style).
    ``holdout``: fraction of ``data`` held back for the final check; ``seed`` draws the split.
    ``max_evals`` / ``time_budget`` (seconds) cap new per-layer evaluations.
    Raises :class:`FloorNotMet` (nothing to write) with the closest achievable point.
    """
    started = time.perf_counter()
    floors = tuple(floors)
    if not floors:
        raise OptionError("give at least one --floor METRIC=VALUE")
    if objective not in OBJECTIVES:
        raise OptionError(f"--minimize must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if method not in METHODS:
        raise OptionError(f"--method must be one of {', '.join(METHODS)} with --floor, got {method!r}")
    chosen_method = METHODS[method]
    kind = OBJECTIVES[objective]
    split = split_dataset(data, holdout, seed)
    calibration = split.calibration  # the search's whole view of the data
    ctx = prepare_search(
        model, layers, min_params=min_params, seed=seed, model_sha256=model_sha256, cache=cache,
        provider=provider if objective == "latency" else None, calibration=calibration, progress=progress,
    )
    if not ctx.candidates:
        raise NothingToDo(f"nothing to compress: no supported layer has >= {min_params} weight values; no file written")
    output = floors[0].output
    work = Workspace(ctx, calibration, output)
    spec.check_measurable(floors, work.reference, calibration.labels)
    rank_sets = {c.name: chosen_method.ranks(c.ranks, ranks_per_layer) for c in ctx.candidates}
    table = analyse(work, rank_sets, chosen_method.factors, progress=progress, max_evals=max_evals, time_budget=time_budget)
    path = chosen_method.path(ctx, table, floors, kind)

    def verify(states):
        return work.evaluate(states)

    if chosen_method.refine:
        table = _refine(work, table, path, floors, verify, progress, max_evals, time_budget)
        path = chosen_method.path(ctx, table, floors, kind)
    analysis_seconds = time.perf_counter() - started
    dense_cost = path.costs[0]

    attempts = []
    k, verified, held = 0, [], None
    for factor in (1.0, *RETRY_FACTORS):
        target = floors if factor == 1.0 else allocate.tightened(floors, factor)
        k, verified = allocate.choose(path, target, verify)
        if k == 0:
            break
        plan = _plan(ctx, layers, path, k, method, floors, min_params, table, kind)
        compressed = _apply(ctx, layers, plan)
        held = _held_back(model, compressed.model, split.held_back, work.output, provider)
        attempts.append({"factor": factor, "plan": k, "realized": held, "passed": spec.holds(floors, held)})
        if spec.holds(floors, held):
            break
    else:
        k = 0
    if k == 0:  # no plan of the path holds: fall back on the best single-layer step, if it does
        path, message = _closest(ctx, layers, table, floors, kind, method, min_params, split, work, provider, model)
        if path is None:
            raise FloorNotMet(message)
        k, verified = allocate.choose(path, floors, verify)
        held = _held_back(model, _apply(ctx, layers, _plan(ctx, layers, path, 1, method, floors, min_params, table, kind)).model,
                          split.held_back, work.output, provider) if k else None
        if not k or not spec.holds(floors, held):
            raise FloorNotMet(message)
        plan = _plan(ctx, layers, path, k, method, floors, min_params, table, kind)
        compressed = _apply(ctx, layers, plan)
        attempts.append({"factor": "single-step fallback", "plan": k, "realized": held, "passed": True})
    chosen = next(v for v in verified if v.k == k)
    report = {
        "floors": [f.to_json() for f in floors],
        "output": work.output,
        "objective": objective,
        "method": method,
        "split": split.to_json(),
        "analysis": {**table.to_json(), "seconds": round(analysis_seconds, 3), "probe_runs": work.probe.runs},
        "curve": allocate.curve_points(path, floors, dense_cost),
        "predicted_start": path.start,
        "verifications": [v.to_json(path, floors, dense_cost) for v in verified],
        "chosen": {
            "plan": k, "cost": round(path.costs[k], 6), "cost_dense": round(dense_cost, 6),
            "cost_kept": round(path.costs[k] / dense_cost, 6) if dense_cost else 1.0,
            "predicted": allocate._round(path.predicted(k, floors)),
            "realized_calibration": allocate._round({f.spec.field: chosen.values.get(f.spec.field) for f in floors}),
        },
        "held_back": {
            "samples": split.held_back.n, "predicted": allocate._round(path.predicted(k, floors)),
            "realized": allocate._round(held), "passed": True, "retries": len(attempts) - 1, "attempts": attempts,
        },
        "layers": _layer_rows(ctx, path, k, table, floors, kind),
        "sweep": [
            {"kept_params": p["cost_kept"], "metric": p["predicted"][floors[0].spec.field]} for p in
            allocate.curve_points(path, floors, dense_cost, limit=25)
        ] if kind == "params" else [],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return FloorResult(_with_split(plan, data, holdout, seed), compressed.model, report, table, compressed)


def _refine(work, table, path, floors, verify, progress, max_evals, time_budget) -> Table:
    """Second pass: measure the ranks just below each layer's rank at the first verified choice
    and at the next plan (where it failed), so the final choice is not limited by the grid."""
    k, _ = allocate.choose(path, floors, verify)
    around: dict[str, set[int]] = {}
    for states in {k, min(k + 1, len(path.states) - 1)}:
        for name, (rank, _) in path.states[states].items():
            around.setdefault(name, set()).add(rank)
    sets = {}
    for candidate in work.ctx.candidates:
        measured = sorted(table.values.get(candidate.name) or {})
        extra = set()
        for rank in around.get(candidate.name, ()):
            extra.update(refine_ranks(candidate.ranks, measured, rank))
        if not around.get(candidate.name) and measured:  # dense at the choice: refine below its top rank
            extra.update(refine_ranks(candidate.ranks, measured[:-1], measured[-1]))
        sets[candidate.name] = sorted(extra)
    remaining = None if max_evals is None else max(max_evals - table.evaluated, 0)
    budget = None if time_budget is None else max(time_budget - table.seconds, 0.0)
    return merge(table, analyse(work, sets, table.method, progress=progress, max_evals=remaining, time_budget=budget))


def _with_split(plan: RankPlan, data, holdout: float, seed: int) -> RankPlan:
    """Record how the calibration part was cut from the user's data, so that
    ``compress --plan --calib DATA`` can cut it again and reproduce the whitened factors."""
    record = plan.options.get("calibration")
    if not record:
        return plan
    split = {"holdout": holdout, "seed": seed, "data_sha256": data.sha256}
    return dataclasses.replace(plan, options={**plan.options, "calibration": {**record, "split": split}})


def _plan(ctx, layers, path, k, method, floors, min_params, table, kind) -> RankPlan:
    decisions = {}
    by_name = {c.name: c for c in ctx.candidates}
    for name, (rank, factors) in path.states[k].items():
        values = table.values[name][rank]
        predicted = {f.spec.field: round(float(values[f.spec.field]), 6) for f in floors}
        decisions[name] = decision(ctx, by_name[name], rank, method=factors, predicted=predicted, weight_error=False)
    for candidate in ctx.candidates:
        decisions.setdefault(candidate.name, decision(ctx, candidate, None))
    options = {"objective": kind, "floors": [f.to_json() for f in floors], "min_params": min_params}
    if any(f == WHITENED for _, f in path.states[k].values()):
        from onnx_lowrank.search.calibrated import calibration_record

        options["calibration"] = calibration_record(ctx.calibration.data)
        options["damping"] = DEFAULT_DAMPING
    plan = make_plan(list(layers), decisions, min_params=min_params, method=f"floor-{method}", options=options,
                     model_sha256=ctx.model_sha256)
    return dataclasses.replace(plan, seed=ctx.seed)


def _apply(ctx, layers, plan: RankPlan):
    from onnx_lowrank.compress import apply_plan
    from onnx_lowrank.search.calibrated import apply_calibrated_plan

    if any(d.method == WHITENED for d in plan.factorized().values()):
        return apply_calibrated_plan(ctx.model, list(layers), plan, ctx.calibration.covariances)
    return apply_plan(ctx.model, list(layers), plan)


def _held_back(original, compressed, held: Dataset, output: str, provider: str) -> dict:
    """The floor metrics of ``compressed`` on the held-back part (compare_models)."""
    from onnx_lowrank.validate.accuracy import compare_models
    from onnx_lowrank.validate.runtime import RuntimeOptions

    result = compare_models(original, compressed, held, options=RuntimeOptions(provider=provider))
    metrics = result.output(output)
    values = {
        "top1_agreement": metrics.top1_agreement, "cosine": metrics.cosine, "rel_error": metrics.rel_l2_error,
        "accuracy_drop": None,
    }
    if result.accuracy is not None and result.accuracy.output == output:
        values["accuracy_drop"] = result.accuracy.drop_points
        values["accuracy_original"] = result.accuracy.original
        values["accuracy_compressed"] = result.accuracy.compressed
    return values


def _layer_rows(ctx, path, k, table, floors, kind) -> dict:
    """Per-layer decision with a reason (what was measured, what the allocation did)."""
    rows = {}
    start_states = path.states[path.start]
    for candidate in ctx.candidates:
        measured = table.values.get(candidate.name) or {}
        row: dict = {"measured_ranks": sorted(measured)}
        if candidate.name in path.states[k]:
            rank = path.states[k][candidate.name][0]
            values = measured[rank]
            row.update(
                action="factorize", rank=rank,
                cost_saved=round(ctx.dense_cost(candidate, kind) - ctx.cost(candidate, rank, kind), 6),
                measured={f.spec.field: allocate._round({"v": values[f.spec.field]})["v"] for f in floors},
                reason="within the floor: least metric loss per saving",
            )
        else:
            row["action"] = "keep"
            if not len(candidate.ranks):
                row["reason"] = candidate.blocked or "no allowed rank"
            elif not measured:
                row["reason"] = "not measured (--max-evals / --time-budget, or weight not substitutable)"
            elif candidate.name in start_states:
                row["reason"] = "backed off: the whole-model check failed with it compressed"
            else:
                best = min(spec.normalized_loss(floors, v) for v in measured.values())
                row["reason"] = f"every measured rank costs too much of the floor (best alone: {best:.2f}x the allowance)"
        rows[candidate.name] = row
    return rows


def _closest(ctx, layers, table, floors, kind, method, min_params, split, work, provider, model):
    """(single-step path or None, FloorNotMet message): the best single-layer step (least
    loss, then most saving), its metrics checked on the held-back data for the message."""
    what = " and ".join(f.text for f in floors)
    head = f"no compression keeps {what} on the held-back data"
    best = None
    for candidate in ctx.candidates:
        for rank, values in (table.values.get(candidate.name) or {}).items():
            saved = ctx.dense_cost(candidate, kind) - ctx.cost(candidate, rank, kind)
            if saved <= 0:
                continue
            key = (spec.normalized_loss(floors, values), -saved)
            if best is None or key < best[0]:
                best = (key, candidate, rank, saved)
    if best is None:
        return None, f"{head}; no layer could be measured (nothing substitutable or no allowed rank); no file written"
    _, candidate, rank, saved = best
    factors = METHODS[method].factors
    cost = sum(ctx.dense_cost(c, kind) for c in ctx.candidates)
    losses = allocate.layer_losses(floors, table.values[candidate.name][rank])
    path = allocate.Path(({}, {candidate.name: (rank, factors)}), (cost, cost - saved), ({f.metric: 0.0 for f in floors}, losses), 1)
    plan = _plan(ctx, layers, path, 1, method, floors, min_params, table, kind)
    held = _held_back(model, _apply(ctx, layers, plan).model, split.held_back, work.output, provider)
    dense = cost + ctx.fixed_cost(kind)
    unit = {"params": "parameters", "flops": "FLOPs", "latency-ms": "layer latency"}[kind]
    message = (
        f"{head}; the closest: {saved / dense:.1%} fewer {unit} ({candidate.name} at rank {rank}) at "
        f"{spec.describe(floors, held)}; no file written"
    )
    return path, message
