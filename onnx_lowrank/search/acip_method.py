"""``acip``: a learned global ranking of singular values (needs torch and calibration data).

Every candidate layer is reparametrized by its SVD with a learnable mask over its singular
values, trained on the distillation loss with a growing L1 penalty
(:mod:`onnx_lowrank.torch.acip`); the order in which singular values switch off is one ranking
from which every budget of a sweep is materialized without learning again.
"""

from __future__ import annotations

from onnx_lowrank.errors import OptionError
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.method import OptionSpec, SearchContext, SearchMethod
from onnx_lowrank.search.plan import LayerDecision


def search(ctx: SearchContext, budget: Budget) -> dict[str, LayerDecision]:
    from onnx_lowrank.torch.acip import AcipOptions, acip_ranking

    if budget.kind != "params" or budget.fraction is None:
        raise OptionError("--method acip takes a fraction of parameters (e.g. --budget params=0.4)")
    if "acip" not in ctx.memo:  # one learning run serves every budget of a sweep
        options = AcipOptions(steps=int(ctx.options["steps"]), lr=float(ctx.options["lr"]), seed=ctx.seed,
                              min_params=min(c.layer.params for c in ctx.candidates) if ctx.candidates else 0)
        ctx.memo["acip"] = acip_ranking(
            ctx.model, ctx.calibration.data.feeds, layers=list(ctx.layers), options=options,
            model_sha256=ctx.model_sha256,
        )
    plan = ctx.memo["acip"].plan(list(ctx.layers), budget.fraction)
    keep = LayerDecision("keep", reason="ranked_out")
    return {c.name: plan.layers.get(c.name, keep) for c in ctx.candidates}


METHOD = SearchMethod(
    name="acip",
    search=search,
    description="needs --calib and torch; a learned global ranking of singular values (masks + L1), any size from one run",
    options={
        "steps": OptionSpec(int, 400, "optimizer steps of the mask learning"),
        "lr": OptionSpec(float, 0.02, "Adam learning rate on the masks"),
    },
    needs_calibration=True,
    requires=("torch",),
)
