"""From measured per-layer metrics to a chosen model: a path of plans, then verification.

Both methods produce a :class:`Path`: plans ``0..K`` of increasing compression (plan 0 = every
layer dense), each with its cost and predicted floor losses (per-layer losses summed, see
:mod:`onnx_lowrank.floor.spec`).

- ``floor`` (ours): each layer's measured (cost, loss) points go through the convex-hull global
  ranking of :mod:`onnx_lowrank.search.allocate` (loss = the largest loss / allowance over the
  floors, plus a small tie-break on the output's squared relative error so zero-flip ranks are
  still ordered); plan k applies the first k steps, least loss per saved cost first.
- ``greedy`` (AIMET-style, :mod:`onnx_lowrank.floor.greedy`): plan k uses one common score
  threshold, each layer at its smallest rank within it.

:func:`choose` starts at the largest plan predicted to hold the floor, verifies the whole model
on the calibration part (one probe run with every layer substituted), and moves: down while it
fails (bisection; dropping a prefix's tail restores the steps with the worst loss per saving
first: the back-off), up while it holds (galloping; layer interactions can also help). The
realized and predicted metrics of every verified plan are kept for the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from onnx_lowrank.floor import spec
from onnx_lowrank.floor.spec import Floor
from onnx_lowrank.search import allocate as hull
from onnx_lowrank.search.method import SearchContext

TIE_BREAK = 1e-2  # weight of the squared relative output error in the ranking's loss
MAX_VERIFY = 16  # whole-model verifications per choice

States = dict[str, tuple[int, str]]  # layer -> (rank, method); absent = dense


@dataclasses.dataclass(frozen=True)
class Path:
    """Plans of increasing compression; ``states[0]`` is the dense model."""

    states: tuple[States, ...]
    costs: tuple[float, ...]  # objective cost of the candidates (dense cost at 0)
    losses: tuple[dict[str, float], ...]  # predicted loss per floor metric
    start: int  # the largest plan predicted to hold

    def predicted(self, k: int, floors: tuple[Floor, ...]) -> dict[str, float]:
        return {f.spec.field: f.spec.value(self.losses[k][f.metric]) for f in floors}


def layer_losses(floors: tuple[Floor, ...], values: dict) -> dict[str, float]:
    return {f.metric: f.spec.loss(values[f.spec.field]) for f in floors}


def predicted_start(losses: list[dict[str, float]], floors: tuple[Floor, ...]) -> int:
    """The last plan before the first whose summed losses exceed any floor's allowance."""
    for k, loss in enumerate(losses):
        if any(loss[f.metric] > f.allowance + 1e-12 for f in floors):
            return max(k - 1, 0)
    return len(losses) - 1


def hull_path(ctx: SearchContext, table, floors: tuple[Floor, ...], kind: str) -> Path:
    """Ours: the global convex-hull ranking of every layer's measured (cost, loss) points."""
    curves, names, measured = [], [], []
    for candidate in ctx.candidates:
        points = table.values.get(candidate.name) or {}
        if not points:
            continue
        ranks = np.array(sorted(points), dtype=np.int64)
        costs = np.array([ctx.cost(candidate, int(r), kind) for r in ranks], dtype=np.float64)
        errors = np.array([_score(floors, points[int(r)]) for r in ranks], dtype=np.float64)
        curves.append(hull.Curve(candidate.name, ctx.dense_cost(candidate, kind), ranks, costs, errors))
        names.append(candidate.name)
        measured.append(points)
    ranking = hull.global_ranking(curves)
    dense = sum(ctx.dense_cost(c, kind) for c in ctx.candidates)
    state_index = [hull.DENSE] * len(curves)
    states: list[States] = [{}]
    costs = [dense]
    zero = {f.metric: 0.0 for f in floors}
    losses = [dict(zero)]
    for step in ranking:
        state_index[step.curve] = step.target
        plan: States = {}
        total = dict(zero)
        for i, s in enumerate(state_index):
            if s == hull.DENSE:
                continue
            rank = int(curves[i].ranks[s])
            plan[names[i]] = (rank, table.method)
            for metric, loss in layer_losses(floors, measured[i][rank]).items():
                total[metric] += loss
        states.append(plan)
        costs.append(costs[-1] - step.saved)
        losses.append(total)
    return Path(tuple(states), tuple(costs), tuple(losses), predicted_start(losses, floors))


def _score(floors: tuple[Floor, ...], values: dict) -> float:
    rel = values.get("rel_error") or 0.0
    return spec.normalized_loss(floors, values) + TIE_BREAK * min(rel * rel, 1.0)


@dataclasses.dataclass(frozen=True)
class Verified:
    k: int
    values: dict
    passed: bool

    def to_json(self, path: Path, floors, dense_cost: float) -> dict:
        return {
            "plan": self.k, "cost_kept": round(path.costs[self.k] / dense_cost, 6) if dense_cost else 1.0,
            "predicted": _round(path.predicted(self.k, floors)),
            "realized": _round({f.spec.field: self.values.get(f.spec.field) for f in floors}), "passed": self.passed,
        }


def choose(path: Path, floors: tuple[Floor, ...], verify: Callable[[States], dict]) -> tuple[int, list[Verified]]:
    """The most compressed plan found whose verified metrics hold ``floors`` (0 if none does)."""
    done: dict[int, Verified] = {}

    def check(k: int) -> bool:
        if k not in done:
            values = verify(path.states[k]) if k else {}
            done[k] = Verified(k, values, True if k == 0 else spec.holds(floors, values))
        return done[k].passed

    last = len(path.states) - 1
    start = path.start
    if start == 0 and last > 0:
        start = 1  # the prediction allows nothing: still verify the cheapest single step
    if check(start):
        low, step, high = start, 1, None
        while low < last and len(done) < MAX_VERIFY // 2:
            probe = min(low + step, last)
            if not check(probe):
                high = probe
                break
            low, step = probe, step * 2
    else:
        low, high = 0, start
    while high is not None and high - low > 1 and len(done) < MAX_VERIFY:
        mid = (low + high) // 2
        if check(mid):
            low = mid
        else:
            high = mid
    return low, [done[k] for k in sorted(done) if k]


def curve_points(path: Path, floors: tuple[Floor, ...], dense_cost: float, limit: int = 200) -> list[dict]:
    """The trade-off curve (objective kept vs predicted metrics), at most ``limit`` points."""
    ks = np.unique(np.round(np.linspace(0, len(path.states) - 1, min(limit, len(path.states)))).astype(int))
    return [
        {"plan": int(k), "cost_kept": round(path.costs[k] / dense_cost, 6) if dense_cost else 1.0,
         "predicted": _round(path.predicted(int(k), floors))}
        for k in ks
    ]


def tightened(floors: tuple[Floor, ...], factor: float) -> tuple[Floor, ...]:
    """The floors with their allowances scaled by ``factor`` (a held-back retry)."""
    return tuple(dataclasses.replace(f, value=f.spec.value(f.allowance * factor)) for f in floors)


def _round(values: dict) -> dict:
    return {k: (round(float(v), 6) if v is not None and math.isfinite(v) else None) for k, v in values.items()}
