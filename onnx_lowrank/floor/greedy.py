"""The AIMET-style baseline: per-layer scores at ~10 ratios, one common threshold bisected.

As AIMET's greedy rank selection does: every layer alone is compressed with plain (weight) SVD
at ~10 evenly spaced rank ratios and scored on the calibration data with the floor's metric
(the same cached probe as ours); then one common score threshold picks, in every layer, the
smallest rank whose score is within it. The threshold is searched (bisection over the measured
scores, by :func:`onnx_lowrank.floor.allocate.choose`) for the most compression whose
verified whole-model metric holds the floor.
"""

from __future__ import annotations

from onnx_lowrank.floor import allocate, spec
from onnx_lowrank.floor.spec import Floor
from onnx_lowrank.search.method import SearchContext


def threshold_path(ctx: SearchContext, table, floors: tuple[Floor, ...], kind: str) -> allocate.Path:
    """Plan k: every layer at its smallest rank whose score <= the k-th smallest measured score."""
    scores = {
        name: sorted((int(r), spec.normalized_loss(floors, v), v) for r, v in points.items())
        for name, points in table.values.items() if points
    }
    thresholds = sorted({s for points in scores.values() for _, s, _ in points})
    by_name = {c.name: c for c in ctx.candidates}
    dense = sum(ctx.dense_cost(c, kind) for c in ctx.candidates)
    zero = {f.metric: 0.0 for f in floors}
    states, costs, losses = [{}], [dense], [dict(zero)]
    for t in thresholds:
        plan, cost, total = {}, dense, dict(zero)
        for name, points in scores.items():
            within = [(r, v) for r, s, v in points if s <= t]
            if not within:
                continue
            rank, values = within[0]  # smallest rank within the threshold
            plan[name] = (rank, table.method)
            cost += ctx.cost(by_name[name], rank, kind) - ctx.dense_cost(by_name[name], kind)
            for metric, loss in allocate.layer_losses(floors, values).items():
                total[metric] += loss
        if plan == states[-1]:
            continue
        states.append(plan)
        costs.append(cost)
        losses.append(total)
    return allocate.Path(tuple(states), tuple(costs), tuple(losses), allocate.predicted_start(losses, floors))
