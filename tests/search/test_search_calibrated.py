"""Whitened SVD, activation capture through onnxruntime, and applying calibrated plans."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_lowrank.calibrate import (
    OutputProbe,
    capture_covariances,
    load_calibration,
    random_calibration,
)
from onnx_lowrank.decompose.svd import truncated_svd
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import parse_budget, prepare_search, run_search
from onnx_lowrank.search.calibrated import (
    WHITENED,
    apply_calibrated_plan,
    covariances_for_plan,
    whitened_decomposer,
    whitened_factors,
)
from onnx_lowrank.validate.data import Dataset


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_whitened_svd_is_plain_svd_when_inputs_are_white():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 12))
    for rank in (1, 5, 12):
        plain = truncated_svd(w, rank).reconstruct()
        white = whitened_factors(w, np.eye(12), rank, damping=0.0).reconstruct()
        np.testing.assert_allclose(white, plain, rtol=1e-10, atol=1e-10)
    # Full rank reproduces W whatever the covariance.
    c = np.cov(rng.standard_normal((12, 50)))
    np.testing.assert_allclose(whitened_factors(w, c, 12).reconstruct(), w, rtol=1e-9, atol=1e-9)


def test_whitened_svd_reduces_output_error_on_correlated_inputs():
    rng = np.random.default_rng(1)
    n_in, n_out, samples = 32, 24, 2000
    # Planted anisotropic inputs: most energy in 6 directions that W's top singular vectors miss.
    basis = np.linalg.qr(rng.standard_normal((n_in, n_in)))[0]
    scales = np.concatenate([np.full(6, 10.0), np.full(n_in - 6, 0.3)])
    x = rng.standard_normal((samples, n_in)) * scales @ basis.T
    w = rng.standard_normal((n_out, n_in))
    c = x.T @ x / samples
    for rank in (4, 6, 10):
        plain = truncated_svd(w, rank).reconstruct()
        white = whitened_factors(w, c, rank, damping=1e-6).reconstruct()
        err_plain = np.linalg.norm((w - plain) @ x.T)
        err_white = np.linalg.norm((w - white) @ x.T)
        assert err_white < 0.7 * err_plain, (rank, err_white, err_plain)


def test_whitened_factors_are_deterministic_and_typed():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((10, 8)).astype(np.float32)
    c = np.cov(rng.standard_normal((8, 40)))
    a, b = whitened_factors(w, c, 3), whitened_factors(w, c, 3)
    assert a.left.dtype == np.float32 and a.left.shape == (10, 3) and a.right.shape == (3, 8)
    np.testing.assert_array_equal(a.left, b.left)
    np.testing.assert_array_equal(a.right, b.right)


def _conv_reference(x, w_shape, pads, strides):
    """im2col by explicit loops."""
    cout, cin, kh, kw = w_shape
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out_h = (padded.shape[2] - kh) // strides[0] + 1
    out_w = (padded.shape[3] - kw) // strides[1] + 1
    rows = []
    for b, i, j in itertools.product(range(x.shape[0]), range(out_h), range(out_w)):
        patch = padded[b, :, i * strides[0] : i * strides[0] + kh, j * strides[1] : j * strides[1] + kw]
        rows.append(patch.reshape(-1))
    return np.array(rows, dtype=np.float64)


def test_capture_matches_numpy_reference(model_builder):
    rng = np.random.default_rng(3)
    w_conv = rng.standard_normal((4, 2, 3, 3))
    w_mm = rng.standard_normal((8, 5))  # MatMul x @ W on a 3-D activation
    w_gemm = rng.standard_normal((3, 20))  # Gemm transB=1 on the flattened activation
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1, 0, 1, 1], strides=[2, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape3"], ["r3"], name="reshape3"),
        helper.make_node("Slice", ["r3", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node("MatMul", ["s", "Wm"], ["m"], name="matmul"),
        helper.make_node("Reshape", ["m", "shape2"], ["m2"], name="reshape2"),
        helper.make_node("Slice", ["m2", "starts", "ends20", "axes"], ["m20"], name="slice20"),
        helper.make_node("Gemm", ["m20", "Wg"], ["y"], name="gemm", transB=1),
    ]
    consts = {
        "shape3": np.array([0, -1, 8]), "shape2": np.array([0, -1]), "starts": np.array([0]),
        "ends": np.array([1 << 30]), "ends20": np.array([20]), "axes": np.array([-1]),
    }
    model = model_builder(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        {"Wc": w_conv, "Wm": w_mm, "Wg": w_gemm, **consts},
    )
    x = rng.standard_normal((5, 2, 6, 7)).astype(np.float32)
    layers = [la for la in find_layers(model) if la.supported]
    data = Dataset({"x": x}, source="test")
    covs = capture_covariances(model, layers, data, batch_size=2)  # batches of 2, 2, 1

    patches = _conv_reference(x.astype(np.float64), w_conv.shape, [1, 0, 1, 1], [2, 1])
    np.testing.assert_allclose(covs["conv"], patches.T @ patches / len(patches), rtol=1e-5, atol=1e-6)
    # The later layers' inputs, recomputed in numpy.
    conv_out = np.einsum("pk,ok->po", patches, w_conv.reshape(4, -1)).reshape(5, 3, 6, 4).transpose(0, 3, 1, 2)
    relu = np.maximum(conv_out, 0).reshape(5, -1, 8)  # (5, 9, 8): 9 tokens of 8
    tokens = relu.reshape(-1, 8)
    np.testing.assert_allclose(covs["matmul"], tokens.T @ tokens / len(tokens), rtol=1e-4, atol=1e-5)
    gemm_in = (relu @ w_mm).reshape(5, -1)[:, :20]
    np.testing.assert_allclose(covs["gemm"], gemm_in.T @ gemm_in / 5, rtol=1e-4, atol=1e-4)


def test_output_probe_measures_substitutions(mlp_model):
    layers = [la for la in find_layers(mlp_model) if la.supported]
    rng = np.random.default_rng(4)
    data = Dataset({"x": rng.standard_normal((40, 32)).astype(np.float32)}, source="test")
    probe = OutputProbe(mlp_model, layers, data, batch_size=16)
    from onnx_lowrank.layers import weight_matrix

    same = probe.relative_error({"fc2": weight_matrix(mlp_model, layers[1])})
    assert same == pytest.approx(0.0, abs=1e-12)
    zero = probe.relative_error({"fc3": np.zeros((10, 48), dtype=np.float32)})
    assert zero == pytest.approx(1.0, rel=1e-6)  # fc3 has no bias: zero weights, zero outputs
    low = probe.relative_error({"fc2": truncated_svd(weight_matrix(mlp_model, layers[1]), 4).reconstruct()})
    assert 0 < low < 1


def test_load_calibration_matches_arrays_to_inputs(tmp_path, mlp_model):
    rng = np.random.default_rng(5)
    path = tmp_path / "calib.npz"
    np.savez(path, images=rng.standard_normal((8, 1, 4, 4)), flat=rng.standard_normal((8, 32)), labels=np.arange(8))
    data = load_calibration(path, mlp_model)  # one input: the only array that fits
    assert data.n == 8 and data.feeds["x"].dtype == np.float32
    assert load_calibration(path, mlp_model, input_map={"x": "flat"}).sha256 == data.sha256
    with pytest.raises(OptionError, match="--input-map"):
        load_calibration(path, mlp_model, input_map={"x": "missing"})
    with pytest.raises(InputError, match="does not fit"):
        load_calibration(path, mlp_model, input_map={"x": "images"})
    with pytest.raises(InputError, match="--calib .*: no such data file"):
        load_calibration(tmp_path / "nope.npz", mlp_model)
    other = random_calibration(mlp_model, 8, seed=1)
    assert other.n == 8 and other.sha256 != data.sha256


def test_calibrated_plan_reproduces_whitened_factors(mlp_model):
    layers = find_layers(mlp_model)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    data = Dataset({"x": x}, source="test")
    ctx = prepare_search(mlp_model, layers, min_params=0, calibration=data)
    plan = run_search(ctx, "calibrated", parse_budget("params=0.4"))
    covariances = covariances_for_plan(mlp_model, layers, plan, data)
    assert set(covariances) == {n for n, d in plan.factorized().items() if d.method == WHITENED}
    result = apply_calibrated_plan(mlp_model, layers, plan, covariances)
    assert result.plan == plan
    # The emitted model equals running the original with each weight replaced by L @ R.
    decompose = whitened_decomposer(covariances, plan.options["damping"])
    from onnx_lowrank.calibrate import OutputProbe as Probe
    from onnx_lowrank.layers import weight_matrix

    by_name = {la.name: la for la in layers}
    expected = {
        name: decompose(weight_matrix(mlp_model, by_name[name]), by_name[name], d).reconstruct()
        for name, d in plan.factorized().items()
    }
    probe = Probe(mlp_model, [la for la in layers if la.supported], data)
    reference_error = probe.relative_error(expected)
    got = run(result.model, {"x": x})[0]
    original = run(mlp_model, {"x": x})[0]
    measured = float(np.sum((got - original) ** 2) / np.sum(original**2))
    assert measured == pytest.approx(reference_error, rel=1e-3, abs=1e-7)
    # Other data than the plan's is refused unless asked for.
    other = Dataset({"x": x[:32]}, source="other")
    with pytest.raises(OptionError, match="sha256"):
        covariances_for_plan(mlp_model, layers, plan, other)
    assert covariances_for_plan(mlp_model, layers, plan, other, strict=False)
    with pytest.raises(InputError, match="covariance"):
        apply_calibrated_plan(mlp_model, layers, plan, {})


def test_calibrated_beats_data_free_on_output_error(mlp_model):
    """On inputs confined to a few directions, whitened factors + measured allocation move the
    outputs far less than the data-free global plan at the same budget."""
    layers = find_layers(mlp_model)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((128, 4)) @ rng.standard_normal((4, 32))).astype(np.float32)
    data = Dataset({"x": x}, source="test")
    ctx = prepare_search(mlp_model, layers, min_params=0, calibration=data)
    budget = parse_budget("params=0.3")
    calibrated = apply_calibrated_plan(
        mlp_model, layers, run_search(ctx, "calibrated", budget), ctx.calibration.covariances
    )
    from onnx_lowrank.compress import apply_plan

    data_free = apply_plan(mlp_model, layers, run_search(ctx, "global", budget))
    original = run(mlp_model, {"x": x})[0]

    def error(model):
        return float(np.sum((run(model, {"x": x})[0] - original) ** 2) / np.sum(original**2))

    assert error(calibrated.model) < 0.5 * error(data_free.model)
