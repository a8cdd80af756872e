"""Budgets, widths re-application, determinism and the magnitude-pruning baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fold_helpers import SAMPLES, initializer, mlp, node_input, rel_error, run

from onnx_lowrank.errors import BudgetError, InputError, OptionError
from onnx_lowrank.fold import fold_model
from onnx_lowrank.fold.allocate import round_width, uniform_widths
from onnx_lowrank.fold.groups import FoldGroup
from onnx_lowrank.model import load_model


@pytest.fixture(scope="module")
def cnn():
    return load_model(SAMPLES / "digits_cnn.onnx")


def test_uniform_keep_is_the_ceiling_of_keep_times_width():
    groups = [FoldGroup(name=f"g{w}", op_type="Gemm", width=w) for w in (256, 10, 3, 1)]
    assert uniform_widths(groups, 0.7) == {"g256": 180, "g10": 7, "g3": 3, "g1": 1}
    assert uniform_widths(groups, 0.5) == {"g256": 128, "g10": 5, "g3": 2, "g1": 1}
    assert uniform_widths(groups, 0.01) == {"g256": 3, "g10": 1, "g3": 1, "g1": 1}
    # rounded up to channel blocks of 8; groups no wider than a block keep the exact count
    assert uniform_widths(groups, 0.7, 8) == {"g256": 184, "g10": 8, "g3": 3, "g1": 1}
    assert uniform_widths(groups, 0.01, 8) == {"g256": 8, "g10": 8, "g3": 1, "g1": 1}


def test_round_width_never_exceeds_the_group():
    assert round_width(64, 45, 8) == 48 and round_width(64, 63, 8) == 64 and round_width(60, 57, 8) == 60
    assert round_width(8, 3, 8) == 3 and round_width(100, 3, 1) == 3


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5, 0.3])
@pytest.mark.parametrize("multiple", [1, 8])
def test_keep_sets_every_group_width(cnn, keep, multiple):
    folded, report = fold_model(cnn, keep=keep, width_multiple=multiple)
    for group in report.groups:
        assert group.kept == round_width(group.width, math.ceil(keep * group.width - 1e-9), multiple)
        assert multiple == 1 or group.kept % multiple == 0
    widths = {g.name: g.kept for g in report.groups}
    assert node_input(folded, "/conv1/Conv", 1).shape[0] == widths["/conv1/Conv"]
    assert node_input(folded, "/conv2/Conv", 1).shape[:2] == (widths["/conv2/Conv"], widths["/conv1/Conv"])
    assert node_input(folded, "/fc1/Gemm", 1).shape == (widths["/fc1/Gemm"], 9 * widths["/conv2/Conv"])


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2])
@pytest.mark.parametrize("method", ["kmeans", "magnitude"])
def test_keep_params_budget_is_met(cnn, fraction, method):
    folded, report = fold_model(cnn, keep_params=fraction, method=method, width_multiple=1)
    assert report.layer_params_after <= fraction * report.layer_params_before
    # the greedy stops as soon as the budget is met: one channel fewer would be too many
    assert report.layer_params_after > (fraction - 0.05) * report.layer_params_before
    blocks = fold_model(cnn, keep_params=fraction, method=method)[1]  # default: steps of 8 channels
    assert blocks.layer_params_after <= fraction * blocks.layer_params_before
    assert all(g.kept % 8 == 0 for g in blocks.groups if g.width > 8)
    weights = sum(
        node_input(folded, name, 1).size for name in ("/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm")
    )
    assert weights == report.layer_params_after


def test_unreachable_budget_raises(cnn):
    with pytest.raises(BudgetError, match="--keep-params"):
        fold_model(cnn, keep_params=0.0001)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"keep": 0.5, "keep_params": 0.5}, {"keep": 0.0}, {"keep": 1.5}, {"keep_params": -1.0}, {"keep": 0.5, "method": "x"}],
)
def test_bad_options_raise_option_error(cnn, kwargs):
    with pytest.raises(OptionError):
        fold_model(cnn, **kwargs)


def test_widths_reapply_reproduces_the_model(cnn):
    folded, report = fold_model(cnn, keep_params=0.4, seed=3)
    widths = report.widths()
    assert set(widths["groups"]) == {"/conv1/Conv", "/conv2/Conv", "/fc1/Gemm"}
    again, report2 = fold_model(cnn, widths=widths, seed=3)
    assert again.SerializeToString() == folded.SerializeToString()
    assert report2.widths() == widths
    # shorthand values and unknown names
    partial, report3 = fold_model(cnn, widths={"/fc1/Gemm": 64, "/nope": 3, "/fc2/Gemm": 5})
    assert {g.name: g.kept for g in report3.groups} == {"/conv1/Conv": 32, "/conv2/Conv": 64, "/fc1/Gemm": 64}
    assert report3.not_applied == {"/nope": "group_not_found", "/fc2/Gemm": "graph_output"}
    np.testing.assert_array_equal(node_input(partial, "/conv1/Conv", 1), initializer(cnn, "conv1.weight"))


@pytest.mark.parametrize(
    "widths",
    [
        {"groups": {"/fc1/Gemm": {"keep": 64, "of": 100}}},
        {"groups": {"/fc1/Gemm": {"keep": 0}}},
        {"groups": {"/fc1/Gemm": 500}},
        {"groups": {"/fc1/Gemm": "half"}},
        {"groups": ["/fc1/Gemm"]},
    ],
)
def test_bad_widths_raise_input_error(cnn, widths):
    with pytest.raises(InputError):
        fold_model(cnn, widths=widths)


@pytest.mark.parametrize("method", ["kmeans", "magnitude"])
def test_same_seed_gives_byte_identical_models(cnn, method):
    first, report1 = fold_model(cnn, keep=0.5, method=method, seed=7)
    second, report2 = fold_model(cnn, keep=0.5, method=method, seed=7)
    assert first.SerializeToString() == second.SerializeToString()
    assert report1.widths() == report2.widths()


def test_magnitude_prune_keeps_the_top_l1_channels():
    rng = np.random.default_rng(0)
    model = mlp(rng, trans_b=True, distinct=16, width=16)
    w1, b1, w2 = (initializer(model, n) for n in ("w1", "b1", "w2"))
    folded, report = fold_model(model, keep=0.25, method="magnitude", width_multiple=1)
    top = np.sort(np.argsort(-np.abs(w1).sum(axis=1), kind="stable")[:4])
    np.testing.assert_array_equal(node_input(folded, "fc1", 1), w1[top])
    np.testing.assert_array_equal(node_input(folded, "fc1", 2), b1[top])
    np.testing.assert_array_equal(node_input(folded, "fc2", 1), w2[:, top])
    assert report.groups[0].action == "prune" and not report.repair
    # the pruned model is the original with the other channels' contributions removed
    x = rng.standard_normal((5, 8)).astype(np.float32)
    hidden = np.maximum(x @ w1[top].T + b1[top], 0)
    expected = hidden @ w2[:, top].T + initializer(model, "b2")
    assert rel_error(run(folded, {"x": x})[0], expected) < 1e-6


def test_keep_one_changes_nothing(cnn):
    folded, report = fold_model(cnn, keep=1.0)
    assert not report.modified
    assert folded.SerializeToString() == cnn.SerializeToString()
