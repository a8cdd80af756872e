"""Search methods: budgets met, known-right allocations found, plans deterministic and reloadable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_lowrank.errors import BudgetError, OptionError
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import BudgetRequest, allocate, parse_budget, plan_for, plan_totals, prepare_search, run_search
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.plan import RankPlan
from onnx_lowrank.validate.data import Dataset

DATA_FREE = ["energy", "global", "continuous"]
FAST_CONTINUOUS = {"iterations": 40}


def options_for(method: str) -> dict:
    return dict(FAST_CONTINUOUS) if method == "continuous" else {}


def skip_without_torch(method: str) -> None:
    if method == "continuous":
        pytest.importorskip("torch")


def calibration_for(model, samples: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    name = model.graph.input[0].name
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return Dataset({name: rng.standard_normal((samples, width)).astype(np.float32)}, source="test")


def predicted_error(plan: RankPlan, ctx) -> float:
    """Sum of relative squared weight errors of a plan (the data-free objective)."""
    total = 0.0
    for candidate in ctx.candidates:
        decision = plan.layers[candidate.name]
        if decision.action == "factorize":
            total += candidate.spectrum.relative_error(decision.rank) ** 2
    return total


@pytest.mark.parametrize("method", DATA_FREE + ["calibrated"])
@pytest.mark.parametrize("fraction", [0.7, 0.45, 0.2])
def test_budget_is_met(mlp_model, method, fraction):
    skip_without_torch(method)
    layers = find_layers(mlp_model)
    data = calibration_for(mlp_model) if method == "calibrated" else None
    ctx = prepare_search(mlp_model, layers, min_params=0, calibration=data)
    budget = parse_budget(f"params={fraction}")
    plan = run_search(ctx, method, budget, options_for(method))
    totals = plan_totals(ctx, plan)
    assert totals["params_planned"] <= fraction * totals["params_dense"] + 1e-6
    assert plan.factorized(), "a binding budget must factorize something"
    assert plan.method == method and plan.budget == {"kind": "params", "fraction": fraction}
    for decision in plan.factorized().values():
        assert decision.predicted["params"] > 0


def test_global_fills_the_budget_tightly(mlp_model):
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    for fraction in (0.6, 0.4, 0.25):
        totals = plan_totals(ctx, run_search(ctx, "global", parse_budget(f"params={fraction}")))
        # Within one rank step of the largest layer (64 + 48 = 112 values) of the limit.
        assert fraction * totals["params_dense"] - 112 <= totals["params_planned"] <= fraction * totals["params_dense"]


@pytest.mark.parametrize("method", DATA_FREE + ["calibrated"])
def test_impossible_budget_is_a_budget_error(mlp_model, method):
    skip_without_torch(method)
    layers = find_layers(mlp_model)
    data = calibration_for(mlp_model) if method == "calibrated" else None
    ctx = prepare_search(mlp_model, layers, min_params=0, calibration=data)
    with pytest.raises(BudgetError, match="cannot be met"):
        run_search(ctx, method, parse_budget("params=0.01"), options_for(method))


def test_absolute_and_flops_budgets(mlp_model):
    layers = find_layers(mlp_model, {"x": (8, 32)})
    ctx = prepare_search(mlp_model, layers, min_params=0)
    plan = run_search(ctx, "global", parse_budget("params=2k"))
    assert plan_totals(ctx, plan)["params_planned"] <= 2000
    plan = run_search(ctx, "global", parse_budget("flops=40%"))
    totals = plan_totals(ctx, plan)
    assert totals["flops_planned"] <= 0.4 * totals["flops_dense"]


@pytest.mark.parametrize("method", DATA_FREE + ["calibrated"])
def test_same_seed_same_plan_json(mlp_model, method):
    skip_without_torch(method)
    layers = find_layers(mlp_model)
    texts = []
    for _ in range(2):
        data = calibration_for(mlp_model) if method == "calibrated" else None
        ctx = prepare_search(mlp_model, layers, min_params=0, seed=7, calibration=data, model_sha256="abc")
        texts.append(json.dumps(run_search(ctx, method, parse_budget("params=0.35"), options_for(method)).to_json()))
    assert texts[0] == texts[1]
    assert json.loads(texts[0])["seed"] == 7


def test_plan_round_trip(mlp_model, tmp_path):
    layers = find_layers(mlp_model)
    data = calibration_for(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0, calibration=data, model_sha256="f00d")
    plan = run_search(ctx, "calibrated", parse_budget("params=0.4"))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = RankPlan.load(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()
    assert loaded.options["calibration"]["sha256"] == data.sha256
    assert loaded.model_sha256 == "f00d"
    assert {d.method for d in loaded.factorized().values()} == {"svd-whitened"}


@pytest.mark.parametrize("method", ["global", "continuous", "calibrated"])
def test_cuts_go_to_the_exactly_low_rank_layer(planted_model, method):
    """A 128x128 layer of exact rank 4 and a full-rank 128x32 layer, 30% of their params:
    the right plan cuts the big layer to rank >= 4 (no error) and keeps the small one dense."""
    skip_without_torch(method)
    model = planted_model()
    layers = find_layers(model)
    data = calibration_for(model, samples=64) if method == "calibrated" else None
    ctx = prepare_search(model, layers, min_params=0, calibration=data)
    plan = run_search(ctx, method, parse_budget("params=0.3"), options_for(method))
    assert plan.layers["big"].action == "factorize" and plan.layers["big"].rank >= 4
    assert plan.layers["small"].action == "keep"


def test_global_beats_energy_where_the_allocation_is_known(planted_model):
    """At 20% (too little to keep the full-rank layer dense), one common energy threshold cuts
    the nearly rank-4 layer below rank 4; the global ranking keeps its 4 directions and takes
    the cuts from the full-rank layer, where they cost least."""
    model = planted_model(noise=0.05)
    layers = find_layers(model)
    ctx = prepare_search(model, layers, min_params=0)
    budget = parse_budget("params=0.2")
    energy_plan = run_search(ctx, "energy", budget)
    global_plan = run_search(ctx, "global", budget)
    assert energy_plan.layers["big"].rank < 4 <= global_plan.layers["big"].rank
    assert predicted_error(global_plan, ctx) < predicted_error(energy_plan, ctx)


def test_energy_method_wraps_the_existing_energy_search(mlp_model):
    layers = find_layers(mlp_model)
    budget = parse_budget("params=0.4")
    reference = plan_for(mlp_model, layers, BudgetRequest(budget), min_params=0)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    plan = run_search(ctx, "energy", budget)
    assert {k: v.rank for k, v in plan.layers.items()} == {k: v.rank for k, v in reference.layers.items()}


def test_min_params_layers_count_as_fixed_cost(mlp_model):
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=1000)  # fc3 (480 values) stays out
    assert [c.name for c in ctx.candidates] == ["fc1", "fc2"]
    plan = run_search(ctx, "global", parse_budget("params=0.5"))
    assert plan.layers["fc3"].reason == "below_min_params"
    totals = plan_totals(ctx, plan)
    assert totals["params_dense"] == 32 * 64 + 64 * 48 + 48 * 10
    assert totals["params_planned"] <= 0.5 * totals["params_dense"]


def test_sweep_reuses_the_global_ranking(mlp_model):
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    calls = []
    original = allocate.global_ranking

    def counting(curves):
        calls.append(len(curves))
        return original(curves)

    allocate.global_ranking, saved = counting, allocate.global_ranking
    try:
        plans = [run_search(ctx, "global", Budget("params", fraction=f)) for f in (0.2, 0.3, 0.5, 0.7)]
    finally:
        allocate.global_ranking = saved
    assert len(calls) == 1
    kept = [plan_totals(ctx, p)["params_planned"] for p in plans]
    assert kept == sorted(kept)


def test_hull_handles_the_break_even_jump():
    """Dense (cost 100, error 0), then ranks whose savings only start below break-even."""
    curve = allocate.Curve(
        "layer", 100.0, np.array([1, 2, 3]), np.array([20.0, 40.0, 60.0]), np.array([0.5, 0.1, 0.05])
    )
    path = allocate.hull_path(curve)
    assert path[0] == allocate.DENSE and path[-1] == 0
    states = allocate.allocate([curve], 45.0)
    assert states == [1]  # rank 2 fits 45 and beats rank 1


def test_method_options_are_typed(mlp_model):
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    with pytest.raises(OptionError, match="no option"):
        run_search(ctx, "global", parse_budget("params=0.5"), {"nope": "1"})
    with pytest.raises(OptionError, match="weighting"):
        run_search(ctx, "global", parse_budget("params=0.5"), {"weighting": "sideways"})
    with pytest.raises(OptionError, match="calibration data"):
        run_search(ctx, "calibrated", parse_budget("params=0.5"))


def test_continuous_respects_a_given_gamma(mlp_model):
    pytest.importorskip("torch")
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    with pytest.raises(BudgetError, match="gamma"):
        run_search(ctx, "continuous", parse_budget("params=0.2"), {"gamma": 1e-6, "iterations": 20})
    plan = run_search(ctx, "continuous", parse_budget("params=0.9"), {"gamma": 1e3, "iterations": 20, "fill": False})
    assert plan_totals(ctx, plan)["params_planned"] <= 0.9 * plan_totals(ctx, plan)["params_dense"]
