"""fold --method regress: activation-ranked pruning + least-squares fold of the dropped channels."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from fold_helpers import duplicated, make_model, mlp, rel_error, run, tensor, value
from onnx import helper

from onnx_lowrank.cli import main
from onnx_lowrank.errors import OptionError
from onnx_lowrank.fold import fold_model
from onnx_lowrank.fold.merge import Neurons
from onnx_lowrank.fold.regress import regress_neurons, regression_error_curve, relative_error, select
from onnx_lowrank.validate.data import Dataset


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_dropped_channel_that_is_a_combination_of_kept_ones_folds_exactly():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(500, 4))
    acts = np.hstack([acts, acts @ np.array([[1.0], [-2.0], [0.5], [0.0]])])  # channel 4 = combo of 0..3
    consumer = rng.normal(size=(3, 5))
    clustering = select(acts, np.array([1, 1, 1, 1, 1e-3]), 4)
    assert list(clustering.labels) == [0, 1, 2, 3, -1]
    change = regress_neurons(Neurons(weight=rng.normal(size=(5, 6))), clustering, acts, ridge=0.0)
    np.testing.assert_allclose(acts[:, :4] @ (consumer @ change.columns).T, acts @ consumer.T, atol=1e-8)
    np.testing.assert_array_equal(change.rows, np.eye(5)[:4])
    norms = np.array([1, 1, 1, 1, 1e-3])
    assert relative_error(acts, norms, clustering, ridge=0.0) < 1e-12  # what fold reports: exact here
    assert relative_error(acts, norms, select(acts, norms, 2), ridge=0.0) > 0.1


def test_regression_error_curve_is_zero_where_the_dropped_channels_are_combinations():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(400, 3))
    acts = np.hstack([base * [3.0, 2.0, 1.5], base @ rng.normal(size=(3, 3)) * 0.1])  # 3 real + 3 derived
    curve = regression_error_curve(acts, np.ones(6), ridge=0.0, points=6)
    assert curve[0] == 1.0 and curve[6] == 0.0
    assert np.all(np.diff(curve) <= 0)  # keeping more never costs more
    assert curve[3] < 1e-9 < curve[2]  # the 3 most important channels carry everything


def test_selection_ranks_by_activation_times_consumer_norm():
    acts = np.array([[1.0, 10.0, 0.0], [1.0, 10.0, 0.0]])
    assert list(select(acts, np.array([100.0, 1.0, 1e6]), 1).labels) == [0, -1, -1]


def test_regress_needs_calibration():
    model = mlp(np.random.default_rng(0), trans_b=True, distinct=4, width=16)
    with pytest.raises(OptionError, match="calibration"):
        fold_model(model, keep=0.5, method="regress")


def _near_duplicate_mlp(rng, *, distinct=12, width=36, n_in=8, n_out=5, noise=0.05):
    """Gemm(n_in -> width) -> Relu -> Gemm(width -> n_out) whose hidden units are noisy, scaled
    copies of ``distinct`` sources (so weight norms say little about what a unit carries)."""
    rows = rng.standard_normal((distinct, n_in))
    biases = rng.standard_normal(distinct) * 0.1
    index = duplicated(rng, distinct, width)
    scale = rng.uniform(0.2, 3.0, width)
    w1 = (rows[index] + noise * rng.standard_normal((width, n_in))) * scale[:, None]
    b1 = biases[index] * scale
    w2 = rng.standard_normal((n_out, width)) / np.sqrt(width)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [tensor(n, a.astype(np.float32)) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", np.zeros(n_out)))]
    return make_model(nodes, [value("x", ["batch", n_in])], [value("y", ["batch", n_out])], inits)


def test_regress_beats_magnitude_on_held_out_inputs():
    rng = np.random.default_rng(3)
    model = _near_duplicate_mlp(rng)
    calibration = Dataset({"x": rng.standard_normal((512, 8)).astype(np.float32)}, source="calibration")
    held_out = {"x": rng.standard_normal((256, 8)).astype(np.float32)}
    expected = run(model, held_out)[0]
    errors = {}
    for method in ("regress", "magnitude", "kmeans"):
        folded, report = fold_model(model, keep=18 / 36, method=method, calibration=calibration, width_multiple=1)
        assert report.groups[0].kept == 18, report.groups[0]
        onnx.checker.check_model(folded, full_check=True)
        errors[method] = rel_error(run(folded, held_out)[0], expected)
    # Pruning drops what the removed copies carried; regress folds it back (as k-means, made
    # for duplicates, does; on MiniLM regress is far ahead of both: benchmarks/fold.py --minilm).
    assert errors["regress"] < 0.5 * errors["magnitude"], errors
    assert errors["regress"] <= 1.05 * errors["kmeans"], errors
    again, _ = fold_model(model, keep=18 / 36, method="regress", calibration=calibration, width_multiple=1)
    assert again.SerializeToString() == fold_model(model, keep=18 / 36, method="regress", calibration=calibration, width_multiple=1)[0].SerializeToString()


def test_cli_regress_with_calib(tmp_path):
    rng = np.random.default_rng(4)
    model_path = tmp_path / "m.onnx"
    onnx.save_model(_near_duplicate_mlp(rng), model_path)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((128, 8)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    done = invoke("fold", model_path, "--keep", 0.5, "--method", "regress", "--calib", tmp_path / "calib.npz",
                  "-o", out, "--report", report, "--quiet")
    assert done.exit_code == 0, done.output
    data = json.loads(report.read_text())
    assert data["method"] == "regress" and [g["action"] for g in data["groups"]] == ["regress"]
    assert onnx.load(str(out)).graph.input[0].name == "x"
    for args, message in (
        (["--method", "regress"], "--method regress needs --calib"),
        (["--method", "regress", "--magnitude-prune", "--calib", tmp_path / "calib.npz"], "contradicts"),
        (["--method", "regress", "--calib", tmp_path / "calib.npz", "--ridge", -1], "--ridge must be >= 0"),
    ):
        bad = invoke("fold", model_path, "--keep", 0.5, "-o", tmp_path / "bad.onnx", *args)
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "bad.onnx").exists()
    noted = invoke("fold", model_path, "--keep", 0.5, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "k.onnx")
    assert noted.exit_code == 0 and "data-free" in noted.output


def _masked_token_model(rng, tokens=6, features=8, hidden=32):
    """x [n, T, F] -> MatMul(F x hidden) -> Relu -> MatMul(hidden x F) -> times mask [n, T]: padded
    positions are computed and then zeroed, as in a padded encoder batch."""
    sources = rng.standard_normal((8, features))
    w1 = (sources[duplicated(rng, 8, hidden)] + 0.05 * rng.standard_normal((hidden, features))).T
    w2 = rng.standard_normal((hidden, features)) / np.sqrt(hidden)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Cast", ["mask"], ["m"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["o", "m3"], ["y"]),
    ]
    inits = [tensor("w1", w1.astype(np.float32)), tensor("w2", w2.astype(np.float32)),
             tensor("axes", np.array([2], np.int64))]
    inputs = [value("x", ["n", tokens, features]), value("mask", ["n", tokens], onnx.TensorProto.INT64)]
    return make_model(nodes, inputs, [value("y", ["n", tokens, features])], inits)


def test_mask_input_keeps_padding_out_of_the_regression():
    rng = np.random.default_rng(8)
    model = _masked_token_model(rng)
    x = rng.standard_normal((64, 6, 8)).astype(np.float32)
    mask = np.ones((64, 6), np.int64)
    mask[:, 3:] = 0
    x[:, 3:] = 3 + 0.1 * rng.standard_normal(x[:, 3:].shape)  # padding: one repeated token, off distribution
    calibration = Dataset({"x": x, "mask": mask}, source="padded calibration")
    held_out = {"x": rng.standard_normal((32, 6, 8)).astype(np.float32), "mask": np.ones((32, 6), np.int64)}
    expected = run(model, held_out)[0]
    errors = {}
    for mask_input in (None, "mask"):
        folded, _ = fold_model(model, keep=0.5, method="regress", calibration=calibration, mask_input=mask_input)
        errors[mask_input] = rel_error(run(folded, held_out)[0], expected)
    assert errors["mask"] < 0.5 * errors[None], errors
    with pytest.raises(OptionError, match="is not an input of the model"):
        fold_model(model, keep=0.5, method="regress", calibration=calibration, mask_input="attention_mask")
    with pytest.raises(OptionError, match="--mask-input goes with --method regress"):
        fold_model(model, keep=0.5, method="magnitude", mask_input="mask")
