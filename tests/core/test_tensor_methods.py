"""Tucker-2 and tensor-train rewrites: exact at full rank, budgets met, auto picks the cheapest."""

from __future__ import annotations

import numpy as np
import pytest
from builders import make_model, rel_error, run, tensor, value
from onnx import helper

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import BudgetRequest, EnergyRequest, FullRankRequest
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.search.error_bound import plan_with_methods


def _compress(model, request, methods, min_params=0):
    layers = find_layers(model)
    plan = plan_with_methods(model, layers, request, methods, min_params=min_params)
    return apply_plan(model, layers, plan), plan


CONVS = [
    # spatial, kernel, attrs
    ((9, 10), (3, 3), {"pads": [1, 1, 1, 1]}),
    ((11, 12), (5, 3), {"strides": [2, 1], "pads": [2, 1, 1, 0], "dilations": [1, 2]}),
    ((13,), (3,), {"strides": [2], "auto_pad": "SAME_UPPER"}),
]


@pytest.mark.parametrize("method", ["tucker", "tt"])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_conv_chain_exact_at_full_rank(method, case):
    spatial, kernel, attrs = CONVS[case]
    rng = np.random.default_rng(case)
    cin, cout = 6, 10
    w = rng.standard_normal((cout, cin, *kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", kernel_shape=list(kernel), **attrs)
    model = make_model([node], [value("x", [2, cin, *spatial])], [value("y", 2 + len(spatial))], [tensor("W", w), tensor("b", b)])
    result, _ = _compress(model, FullRankRequest(), (method,))
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv", "Conv"]
    x = rng.standard_normal((2, cin, *spatial)).astype(np.float32)
    assert rel_error(run(result.model, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("trans_b", [0, 1])
def test_tt_gemm_exact_with_alpha_beta_bias(trans_b):
    rng = np.random.default_rng(trans_b)
    w = rng.standard_normal((24, 36) if trans_b else (36, 24)).astype(np.float32)
    c = rng.standard_normal(24).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)
    model = make_model([node], [value("x", ["n", 36])], [value("y", ["n", 24])], [tensor("W", w), tensor("C", c)])
    result, plan = _compress(model, FullRankRequest(), ("tt",))
    decision = plan.layers["fc"]
    assert decision.method == "tt" and decision.options["out_dims"] and decision.options["in_dims"]
    x = rng.standard_normal((5, 36)).astype(np.float32)
    assert rel_error(run(result.model, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_tt_matmul_keeps_leading_dims():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")
    model = make_model([node], [value("x", ["b", "s", 48])], [value("y", ["b", "s", 32])], [tensor("W", w)])
    result, _ = _compress(model, FullRankRequest(), ("tt",))
    for shape in ((2, 3, 48), (1, 7, 48)):
        x = rng.standard_normal(shape).astype(np.float32)
        out = run(result.model, {"x": x})[0]
        assert out.shape == shape[:2] + (32,)
        assert rel_error(out, run(model, {"x": x})[0]) < 1e-5


def _planted_tucker_conv(rng, cout=64, cin=64, r=2):
    core = rng.standard_normal((r, r, 3, 3))
    u_out, u_in = rng.standard_normal((cout, r)), rng.standard_normal((cin, r))
    return np.einsum("oiab,Oo,Ii->OIab", core, u_out, u_in).astype(np.float32)


def test_auto_picks_tucker_for_a_tucker_low_rank_kernel_and_is_near_exact():
    rng = np.random.default_rng(4)
    w = _planted_tucker_conv(rng)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = make_model([node], [value("x", [1, 64, 6, 6])], [value("y", [1, 64, 6, 6])], [tensor("W", w)])
    result, plan = _compress(model, EnergyRequest(1 - 1e-10), ("svd", "tucker", "tt"))
    decision = plan.layers["conv"]
    assert decision.method in ("tucker", "tt") and tuple(decision.ranks) == (2, 2)
    assert result.totals["layer_params_after"] == 64 * 2 + 2 * 2 * 9 + 64 * 2  # vs SVD's 2 * (64 + 576)
    x = rng.standard_normal((1, 64, 6, 6)).astype(np.float32)
    assert rel_error(run(result.model, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4


@pytest.mark.parametrize("methods", [("tucker",), ("tt",), ("svd", "tucker", "tt")])
def test_budget_met_for_every_method(methods):
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["h"], ["f"]),
        helper.make_node("Gemm", ["f", "W2"], ["y"], name="fc", transB=1),
    ]
    inits = [
        tensor("W1", rng.standard_normal((32, 16, 3, 3)).astype(np.float32)),
        tensor("W2", rng.standard_normal((20, 32 * 4 * 4)).astype(np.float32)),
    ]
    model = make_model(nodes, [value("x", [1, 16, 4, 4])], [value("y", [1, 20])], inits)
    result, _ = _compress(model, BudgetRequest(fraction_budget("params", 0.3, flag="t")), methods)
    totals = result.totals
    assert totals["layer_params_after"] <= 0.3 * totals["layer_params_before"]
    x = rng.standard_normal((1, 16, 4, 4)).astype(np.float32)
    assert run(result.model, {"x": x})[0].shape == (1, 20)
