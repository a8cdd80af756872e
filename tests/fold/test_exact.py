"""Folding duplicated neurons to the number of distinct neurons reproduces the outputs exactly."""

from __future__ import annotations

import numpy as np
import pytest
from fold_helpers import (
    SAMPLES,
    duplicated,
    make_model,
    mlp,
    node_input,
    rel_error,
    run,
    tensor,
    value,
)
from onnx import helper

from onnx_lowrank.fold import fold_model
from onnx_lowrank.model import check_model, load_model

TOL = 1e-5


def _fold_exact(model, feeds, distinct, width, **kw):
    folded, report = fold_model(model, keep=distinct / width, **kw)
    check_model(folded)
    expected = run(model, feeds)[0]
    actual = run(folded, feeds)[0]
    assert rel_error(actual, expected) < TOL
    return folded, report


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("repair", [True, False])
def test_mlp_gemm_duplicates_fold_exactly(trans_b, repair):
    rng = np.random.default_rng(0)
    model = mlp(rng, trans_b=trans_b, distinct=5, width=16)
    x = rng.standard_normal((7, 8)).astype(np.float32)
    folded, report = _fold_exact(model, {"x": x}, 5, 16, repair=repair)
    (group,) = report.groups
    assert (group.name, group.width, group.kept, group.action) == ("fc1", 16, 5, "fold")
    assert group.rel_error < 1e-12
    w1 = node_input(folded, "fc1", 1)
    assert w1.shape == ((5, 8) if trans_b else (8, 5))
    assert node_input(folded, "fc2", 1).shape == ((4, 5) if trans_b else (5, 4))
    assert report.layer_params_after == 5 * 8 + 4 * 5
    assert report.skipped[0]["reason"] == "graph_output"


def test_gemm_alpha_beta_and_scalar_bias():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((3, 6)).astype(np.float32)
    index = duplicated(rng, 3, 9)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2", transB=1, alpha=1.5),
    ]
    inits = [
        tensor("w1", rows[index]),
        tensor("b1", np.array([0.25], dtype=np.float32)),  # broadcast to every channel
        tensor("w2", rng.standard_normal((2, 9)).astype(np.float32)),
    ]
    model = make_model(nodes, [value("x", ["batch", 6])], [value("y", ["batch", 2])], inits)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    folded, _ = _fold_exact(model, {"x": x}, 3, 9)
    assert node_input(folded, "fc1", 2).shape == (3,)


def _transformer_ffn(rng, *, bias_first: bool, distinct=6, width=20, d=8):
    """MatMul -> Add(bias) -> GELU as torch exports it (Div, Erf, Add, Mul, Mul) -> MatMul -> Add."""
    rows = rng.standard_normal((distinct, d)).astype(np.float32)
    biases = rng.standard_normal(distinct).astype(np.float32)
    index = duplicated(rng, distinct, width)
    w1, b1 = rows[index].T, biases[index]
    w2 = rng.standard_normal((width, d)).astype(np.float32)

    def add(bias, x, out, name):
        inputs = [bias, x] if bias_first else [x, bias]
        return helper.make_node("Add", inputs, [out], name=name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"], name="ff1"),
        add("b1", "mm1", "h", "ff1_bias"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["mm2"], name="ff2"),
        add("b2", "mm2", "y", "ff2_bias"),
    ]
    inits = [
        tensor("w1", w1),
        tensor("b1", b1),
        tensor("w2", w2),
        tensor("b2", rng.standard_normal(d).astype(np.float32)),
        tensor("sqrt2", np.array(1.4142135, dtype=np.float32)),
        tensor("one", np.array(1.0, dtype=np.float32)),
        tensor("half", np.array(0.5, dtype=np.float32)),
    ]
    return make_model(nodes, [value("x", ["batch", 5, d])], [value("y", ["batch", 5, d])], inits)


@pytest.mark.parametrize("bias_first", [True, False])
def test_matmul_bias_add_either_order_with_torch_gelu(bias_first):
    rng = np.random.default_rng(2)
    model = _transformer_ffn(rng, bias_first=bias_first)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    folded, report = _fold_exact(model, {"x": x}, 6, 20)
    assert [g.name for g in report.groups] == ["ff1"]
    assert node_input(folded, "ff1_bias", 0 if bias_first else 1).shape == (6,)
    assert node_input(folded, "ff1", 1).shape == (8, 6)
    assert node_input(folded, "ff2", 1).shape == (6, 8)


def _conv_bn_relu_conv(rng, *, distinct=4, width=12, cin=3, conv_bias=False):
    """Conv -> BN -> Relu -> Conv; duplicates are equal *after* BN (stored kernels differ by 2x)."""
    kernels = rng.standard_normal((distinct, cin, 3, 3)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, distinct).astype(np.float32)
    beta = rng.standard_normal(distinct).astype(np.float32)
    mean = rng.standard_normal(distinct).astype(np.float32)
    var = rng.uniform(0.5, 2.0, distinct).astype(np.float32)
    index = duplicated(rng, distinct, width)
    # every other copy stores 2x the kernel, 2x the mean and half the gamma: the same effective neuron
    twice = (np.arange(width) % 2).astype(np.float32) + 1.0
    w1 = kernels[index] * twice[:, None, None, None]
    nodes = [
        helper.make_node("Conv", ["x", "w1"] + (["b1"] if conv_bias else []), ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "bias2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [
        tensor("w1", w1),
        tensor("g", gamma[index] / twice),
        tensor("be", beta[index]),
        tensor("mu", mean[index] * twice),
        tensor("var", var[index]),
        tensor("w2", rng.standard_normal((5, width, 3, 3)).astype(np.float32)),
        tensor("bias2", rng.standard_normal(5).astype(np.float32)),
    ]
    if conv_bias:
        inits.append(tensor("b1", np.zeros(width, dtype=np.float32)))
    shape_in, shape_out = ["batch", cin, 6, 6], ["batch", 5, 6, 6]
    return make_model(nodes, [value("x", shape_in)], [value("y", shape_out)], inits)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("repair", [True, False])
def test_conv_bn_relu_conv_duplicates_fold_exactly(conv_bias, repair):
    rng = np.random.default_rng(3)
    model = _conv_bn_relu_conv(rng, conv_bias=conv_bias)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    folded, report = _fold_exact(model, {"x": x}, 4, 12, repair=repair)
    (group,) = report.groups
    assert group.kept == 4 and group.rel_error < 1e-12
    assert node_input(folded, "conv1", 1).shape == (4, 3, 3, 3)
    assert node_input(folded, "bn1", 3).shape == (4,)
    assert node_input(folded, "conv2", 1).shape == (5, 4, 3, 3)


def _conv_flatten_gemm(rng, *, reshape: bool, distinct=3, width=8):
    kernels = rng.standard_normal((distinct, 2, 3, 3)).astype(np.float32)
    biases = rng.standard_normal(distinct).astype(np.float32)
    index = duplicated(rng, distinct, width)
    spatial = 2 * 2  # 4x4 input, MaxPool 2 -> 2x2
    if reshape:
        flatten = helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat")
    else:
        flatten = helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        flatten,
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = [
        tensor("w1", kernels[index]),
        tensor("b1", biases[index]),
        tensor("w2", rng.standard_normal((3, width * spatial)).astype(np.float32)),
        tensor("b2", rng.standard_normal(3).astype(np.float32)),
    ]
    if reshape:
        inits.append(tensor("shape", np.array([-1, width * spatial], dtype=np.int64)))
    # a stale shape annotation on the path must not survive the rewrite
    info = [value("f", ["batch", width * spatial])]
    return make_model(nodes, [value("x", ["batch", 2, 4, 4])], [value("y", ["batch", 3])], inits, value_info=info)


@pytest.mark.parametrize("reshape", [False, True])
def test_conv_flatten_gemm_blocks_fold_exactly(reshape):
    rng = np.random.default_rng(4)
    model = _conv_flatten_gemm(rng, reshape=reshape)
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    folded, report = _fold_exact(model, {"x": x}, 3, 8)
    assert report.groups[0].kept == 3
    assert node_input(folded, "fc", 1).shape == (3, 3 * 4)
    if reshape:
        assert node_input(folded, "flat", 1).tolist() == [-1, 12]
    assert all(v.name != "f" for v in folded.graph.value_info)


def test_gemm_batchnorm1d_exact():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((4, 6)).astype(np.float32)
    index = duplicated(rng, 4, 10)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
    ]
    bn = {k: rng.uniform(0.5, 1.5, 4).astype(np.float32)[index] for k in ("g", "be", "mu", "var")}
    inits = [tensor("w1", rows[index]), tensor("b1", rng.standard_normal(4).astype(np.float32)[index])]
    inits += [tensor(k, v) for k, v in bn.items()]
    inits.append(tensor("w2", rng.standard_normal((3, 10)).astype(np.float32)))
    model = make_model(nodes, [value("x", ["batch", 6])], [value("y", ["batch", 3])], inits)
    _fold_exact(model, {"x": rng.standard_normal((5, 6)).astype(np.float32)}, 4, 10)


def test_sample_models_fold_to_valid_models():
    """Every sample model folds to a checked model that runs and keeps its output shape."""
    data = np.load(SAMPLES / "digits_test.npz")
    for name, key in (("digits_cnn", "input_image"), ("digits_transformer", "input_image")):
        model = load_model(SAMPLES / f"{name}.onnx")
        folded, report = fold_model(model, keep=0.5)
        check_model(folded)
        assert report.modified and report.model_params_after < report.model_params_before
        logits = run(folded, {"input": data[key][:16]})[0]
        assert logits.shape == (16, 10) and np.isfinite(logits).all()
