"""At full rank every rewrite reproduces the original outputs (float32: < 1e-5 relative)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import full_rank, make_model, rel_error, run, tensor, value
from onnx import TensorProto, helper

from onnx_lowrank.layers import find_layers

TOL = 1e-5


def _op_types(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_gemm(trans_b, with_bias, seed):
    rng = np.random.default_rng(seed)
    m, k, n = (int(v) for v in rng.integers([2, 5, 5], [9, 40, 40]))
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [tensor("W", w)]
    inputs = ["x", "W"]
    if with_bias:
        inits.append(tensor("C", rng.standard_normal(n).astype(np.float32)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=0.7, beta=1.3)
    model = make_model([node], [value("x", ["batch", k])], [value("y", ["batch", n])], inits)
    x = rng.standard_normal((m, k)).astype(np.float32)
    rewritten = full_rank(model)
    assert "Gemm" not in _op_types(rewritten) or with_bias
    assert _op_types(rewritten).count("MatMul") >= 1
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < TOL


@pytest.mark.parametrize("x_shape", [(7,), (3, 7), (2, 5, 7), (2, 3, 4, 7)])
def test_matmul_weight_right(x_shape):
    rng = np.random.default_rng(len(x_shape))
    w = rng.standard_normal((7, 11)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")
    model = make_model([node], [value("x", list(x_shape))], [value("y", len(x_shape))], [tensor("W", w)])
    x = rng.standard_normal(x_shape).astype(np.float32)
    rewritten = full_rank(model)
    assert _op_types(rewritten) == ["MatMul", "MatMul"]
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < TOL


def test_matmul_weight_left():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((9, 6)).astype(np.float32)
    node = helper.make_node("MatMul", ["W", "x"], ["y"], name="left")
    model = make_model([node], [value("x", [2, 6, 5])], [value("y", [2, 9, 5])], [tensor("W", w)])
    x = rng.standard_normal((2, 6, 5)).astype(np.float32)
    layers = find_layers(model)
    assert layers[0].form == "left" and layers[0].tokens == 10
    rewritten = full_rank(model)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < TOL


CONV_CASES = [
    # (spatial input, kernel, strides, pads, dilations, auto_pad)
    ((9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), None),
    ((10, 9), (5, 3), (2, 1), (2, 0, 1, 1), (1, 1), None),
    ((12, 12), (3, 3), (1, 2), (0, 0, 0, 0), (2, 2), None),
    ((11, 8), (3, 1), (1, 1), None, (1, 1), "SAME_UPPER"),
    ((13,), (5,), (2,), (2, 1), (1,), None),
    ((16,), (3,), (1,), None, (3,), "VALID"),
    ((5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), None),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{len(c[0])}d_{i}" for i, c in enumerate(CONV_CASES)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv(case, with_bias):
    spatial, kernel, strides, pads, dilations, auto_pad = case
    rng = np.random.default_rng(len(spatial) * 10 + len(kernel))
    cin, cout = int(rng.integers(2, 7)), int(rng.integers(3, 9))
    w = rng.standard_normal((cout, cin, *kernel)).astype(np.float32)
    inits = [tensor("W", w)]
    inputs = ["x", "W"]
    if with_bias:
        inits.append(tensor("B", rng.standard_normal(cout).astype(np.float32)))
        inputs.append("B")
    attrs = {"strides": list(strides), "dilations": list(dilations), "kernel_shape": list(kernel)}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    model = make_model([node], [value("x", [2, cin, *spatial])], [value("y", 2 + len(spatial))], inits)
    x = rng.standard_normal((2, cin, *spatial)).astype(np.float32)
    rewritten = full_rank(model)
    assert _op_types(rewritten) == ["Conv", "Conv"]
    second = rewritten.graph.node[1]
    assert [a.ints for a in second.attribute if a.name == "kernel_shape"][0] == [1] * len(kernel)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < TOL


@pytest.mark.parametrize("elem_type,np_type,tol", [
    (TensorProto.FLOAT16, np.float16, 2e-3),
    (TensorProto.DOUBLE, np.float64, 1e-10),
])
def test_other_float_types(elem_type, np_type, tol):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((16, 24)) * 0.2).astype(np_type)
    b = rng.standard_normal(24).astype(np_type)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc")]
    model = make_model(
        nodes, [value("x", [4, 16], elem_type)], [value("y", [4, 24], elem_type)], [tensor("W", w), tensor("b", b)]
    )
    rewritten = full_rank(model)
    stored = {i.name: i.data_type for i in rewritten.graph.initializer}
    assert set(stored.values()) == {elem_type}  # factors stored in the weight's own type
    x = rng.standard_normal((4, 16)).astype(np_type)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < tol


def test_bfloat16_weights_stay_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 12)).astype(ml_dtypes.bfloat16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(
        nodes, [value("x", [2, 8], TensorProto.BFLOAT16)], [value("y", [2, 12], TensorProto.BFLOAT16)], [tensor("W", w)]
    )
    rewritten = full_rank(model)
    factors = [i for i in rewritten.graph.initializer]
    assert len(factors) == 2 and all(f.data_type == TensorProto.BFLOAT16 for f in factors)
    from onnx import numpy_helper

    a, b = (numpy_helper.to_array(f).astype(np.float64) for f in factors)
    assert rel_error(a @ b, w.astype(np.float64)) < 2e-2  # bfloat16 has an 8-bit mantissa


def test_batched_transformer_style_matmul_add():
    """x[b, s, K] @ W[K, N] + bias (bias as input 0, as torch exports it)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 48)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="q_proj"),
        helper.make_node("Add", ["bias", "h"], ["y"], name="q_bias"),
    ]
    model = make_model(
        nodes, [value("x", ["b", "s", 32])], [value("y", ["b", "s", 48])], [tensor("W", w), tensor("bias", bias)]
    )
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    rewritten = full_rank(model)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < TOL
    assert rewritten.graph.node[1].output[0] == "h"  # original output name kept on the last node
