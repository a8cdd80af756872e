"""ACIP's learned ranking: planted low rank, budgets, break-even, determinism, JSON."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import mlp  # noqa: E402

from onnx_lowrank.compress import apply_plan  # noqa: E402
from onnx_lowrank.errors import BudgetError, InputError  # noqa: E402
from onnx_lowrank.layers import find_layers  # noqa: E402
from onnx_lowrank.torch.acip import AcipOptions, AcipRanking, acip_ranking, acip_search, ranking_kept_fraction  # noqa: E402

OPTIONS = AcipOptions(steps=120, lr=0.05, batch_size=32, min_params=0, penalty_end=10.0)


def _feeds(n=128, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def planted():
    """fc1 (32 x 16) has exact rank 4; fc2 (6 x 32) is full rank."""
    model = mlp(seed=0, rank=4)
    return model, find_layers(model), acip_ranking(model, _feeds(), options=OPTIONS)


def test_ranking_covers_every_singular_value_once(planted):
    _, _, ranking = planted
    assert ranking.max_ranks == {"fc1": 16, "fc2": 6}
    assert sorted(ranking.removal) == sorted([("fc1", i) for i in range(16)] + [("fc2", i) for i in range(6)])


def test_planted_zero_singular_values_are_removed_first(planted):
    _, _, ranking = planted
    fc1 = [index for name, index in ranking.removal if name == "fc1"]
    assert set(fc1[:12]) == set(range(4, 16))  # the 12 zero singular values go before the 4 real ones
    assert ranking.history[-1]["kept"] < ranking.history[0]["kept"]


@pytest.mark.parametrize("keep", [0.9, 0.6, 0.4, 0.25])
def test_plans_meet_the_budget_and_respect_break_even(planted, keep):
    model, layers, ranking = planted
    plan = ranking.plan(layers, keep)
    assert plan.method == "acip" and plan.budget == {"kind": "params", "fraction": keep}
    assert ranking_kept_fraction(ranking, layers, keep) <= keep + 1e-9
    by_name = {layer.name: layer for layer in layers}
    kept = 0
    for name, decision in plan.layers.items():
        layer = by_name[name]
        if decision.action == "factorize":
            assert 1 <= decision.rank < layer.break_even_rank
            kept += layer.factor_params(decision.rank)
        else:
            assert decision.reason == "above_break_even"
            kept += layer.params
    assert kept <= keep * sum(layer.params for layer in layers)
    result = apply_plan(model, layers, plan)
    assert result.totals["layer_params_after"] == kept


def test_budgets_nest_and_impossible_ones_fail(planted):
    _, layers, ranking = planted
    ranks = [ranking.ranks_for(layers, keep) for keep in (0.9, 0.6, 0.4, 0.25)]
    for larger, smaller in zip(ranks, ranks[1:]):
        assert all(smaller[name] <= larger[name] for name in larger)
    with pytest.raises(BudgetError):
        ranking.plan(layers, 0.01)


def test_same_seed_same_ranking_and_json_round_trip(planted, tmp_path):
    model, layers, ranking = planted
    again = acip_ranking(model, _feeds(), options=OPTIONS)
    assert again.removal == ranking.removal
    path = tmp_path / "ranking.json"
    ranking.save(path)
    loaded = AcipRanking.load(path)
    assert loaded.removal == ranking.removal and loaded.max_ranks == ranking.max_ranks
    assert loaded.plan(layers, 0.5).to_json() == ranking.plan(layers, 0.5).to_json()
    other_seed = acip_ranking(model, _feeds(), options=OPTIONS, seed=1)  # other batches: another trajectory
    assert other_seed.history != ranking.history and other_seed.options["seed"] == 1


def test_ranking_refuses_another_model_and_bad_files(planted, tmp_path):
    _, _, ranking = planted
    other = mlp(seed=0, n_in=12)
    with pytest.raises(InputError, match="does not match"):
        ranking.plan(find_layers(other), 0.5)
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="format"):
        AcipRanking.load(tmp_path / "bad.json")


def test_acip_search_returns_a_plan():
    model = mlp(seed=3)
    layers = find_layers(model)
    plan = acip_search(model, layers, 0.5, _feeds(64, seed=1), AcipOptions(steps=20, batch_size=32, min_params=0))
    assert plan.method == "acip" and set(plan.layers) == {"fc1", "fc2"}
    assert plan.factorized()
