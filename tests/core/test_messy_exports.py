"""Weights in Constant nodes, behind Identity, in subgraphs, shared, legacy IR 3, quantized."""

from __future__ import annotations

import numpy as np
from builders import full_rank, make_model, rel_error, run, tensor, value
from onnx import TensorProto, helper

from onnx_lowrank.layers import find_layers


def _skips(model, **kw):
    return {layer.name: (layer.skip.code if layer.skip else None) for layer in find_layers(model, **kw)}


def test_weight_in_constant_node_and_behind_identity():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((10, 12)).astype(np.float32)
    w2 = rng.standard_normal((12, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=tensor("W1v", w1)),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Identity", ["W2raw"], ["W2"], name="id"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    model = make_model(nodes, [value("x", [3, 10])], [value("y", [3, 6])], [tensor("W2raw", w2)])
    assert _skips(model) == {"mm1": None, "mm2": None}
    rewritten = full_rank(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Constant" not in ops and "Identity" not in ops  # orphaned weight holders removed
    assert not any(i.name in ("W2raw",) for i in rewritten.graph.initializer)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_weight_inside_if_subgraph():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wsub"], ["t"], name="sub_mm")],
        "then",
        [],
        [value("t", [2, 5])],
        [tensor("Wsub", w)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wouter"], ["e"], name="outer_mm")], "else", [], [value("e", [2, 5])]
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    model = make_model(
        nodes,
        [value("cond", [], TensorProto.BOOL), value("x", [2, 8])],
        [value("y", [2, 5])],
        [tensor("Wouter", w * 2)],
    )
    skips = _skips(model)
    assert skips == {"branch/then_branch/sub_mm": None, "branch/else_branch/outer_mm": None}
    rewritten = full_rank(model)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert rel_error(run(rewritten, feeds)[0], run(model, feeds)[0]) < 1e-5


def test_shared_weight_factorized_once():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="second"),
    ]
    model = make_model(nodes, [value("x", [4, 16])], [value("y", [4, 16])], [tensor("W", w)])
    layers = find_layers(model)
    assert len(layers) == 1 and layers[0].nodes == ("first", "second")
    assert layers[0].flops == 2 * 2 * 4 * 16 * 16  # both uses counted
    rewritten = full_rank(model)
    assert len(rewritten.graph.initializer) == 2  # one pair of factors, reused
    x = rng.standard_normal((4, 16)).astype(np.float32)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_weight_aliased_through_identity_is_one_layer():
    """torch's exporter deduplicates equal weights: later layers read Identity(first layer's weight)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="layer0"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Identity", ["W"], ["layer1.weight"], name="alias"),
        helper.make_node("MatMul", ["r", "layer1.weight"], ["y"], name="layer1"),
    ]
    model = make_model(nodes, [value("x", [4, 16])], [value("y", [4, 16])], [tensor("W", w)])
    layers = find_layers(model)
    assert [(layer.nodes, layer.skip) for layer in layers] == [(("layer0", "layer1"), None)]
    assert layers[0].flops == 2 * 2 * 4 * 16 * 16
    rewritten = full_rank(model)
    assert "Identity" not in [n.op_type for n in rewritten.graph.node]  # the alias went with the weight
    assert len(rewritten.graph.initializer) == 2  # one pair of factors, read by both layers
    x = rng.standard_normal((4, 16)).astype(np.float32)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_weight_shared_with_a_gather_is_left_alone():
    """Tied embeddings: the same matrix feeds a Gather and a MatMul."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((20, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["emb", "E_T"], ["y"], name="head"),
        helper.make_node("MatMul", ["emb", "Et"], ["y2"], name="head_dynamic"),
    ]
    model = make_model(
        nodes,
        [value("ids", [3], TensorProto.INT64)],
        [value("y", [3, 20]), value("y2", [3, 20])],
        [tensor("E", table), tensor("E_T", table.T.copy())],
    )
    skips = _skips(model)
    assert skips["head"] is None  # its own copy of the table
    assert skips["head_dynamic"] == "shared_weight_other_use"  # reads E (through a Transpose), as the Gather does


def test_legacy_ir3_opset9_weights_listed_as_inputs():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 9)).astype(np.float32)
    c = rng.standard_normal(9).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes,
        "legacy",
        [value("x", [2, 12]), value("W", [12, 9]), value("C", [9])],
        [value("y", [2, 9])],
        [tensor("W", w), tensor("C", c)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    assert _skips(model) == {"fc": None}  # IR 3 had to list initializers as inputs: still constants
    rewritten = full_rank(model)
    assert rewritten.ir_version == 3 and rewritten.opset_import[0].version == 9
    initializers = {i.name for i in rewritten.graph.initializer}
    inputs = {i.name for i in rewritten.graph.input}
    assert initializers <= inputs and "W" not in inputs  # factors declared as inputs, old weight gone
    x = rng.standard_normal((2, 12)).astype(np.float32)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_overridable_weight_input_needs_opt_in():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 7)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [value("x", [2, 6]), value("W", [6, 7])], [value("y", [2, 7])], [tensor("W", w)])
    assert _skips(model) == {"mm": "weight_is_graph_input"}
    assert _skips(model, treat_inputs_as_constants=True) == {"mm": None}


def test_unsupported_layers_carry_reasons():
    rng = np.random.default_rng(6)
    grouped = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    qweight = rng.integers(-8, 8, (8, 8)).astype(np.int8)
    nodes = [
        helper.make_node("Conv", ["x", "Wg"], ["c"], name="grouped", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], axis=1),
        helper.make_node("DequantizeLinear", ["Wq", "scale"], ["Wdq"]),
        helper.make_node("MatMul", ["v", "Wdq"], ["q"], name="dequantized"),
        helper.make_node("MatMul", ["v", "v2"], ["act"], name="activations"),
        helper.make_node("ConvTranspose", ["x", "Wt"], ["ct"], name="deconv"),
    ]
    model = make_model(
        nodes,
        [value("x", [1, 8, 5, 5]), value("v", [2, 8]), value("v2", [8, 2])],
        [value("f", [1, 200]), value("q", [2, 8]), value("act", [2, 2]), value("ct", [1, 3, 7, 7])],
        [
            tensor("Wg", grouped),
            tensor("Wq", qweight),
            tensor("scale", np.float32(0.1)),
            tensor("Wt", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
        ],
    )
    assert _skips(model) == {
        "grouped": "grouped_conv",
        "dequantized": "quantized",
        "activations": "weight_not_constant",
        "deconv": "unsupported_op",
    }


def test_weight_behind_a_transpose_as_exports_without_constant_folding_write_it():
    """x @ W.T with W an initializer: torch exports MatMul(x, Transpose(W)) when not folding."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((12, 20)).astype(np.float32)  # stored (out, in)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [value("x", [3, 20])], [value("y", [3, 12])], [tensor("W", w)])
    (layer,) = find_layers(model)
    assert layer.skip is None and layer.weight_shape == (20, 12)
    rewritten = full_rank(model)
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "MatMul"]  # Transpose and W are gone
    assert not any(i.name == "W" for i in rewritten.graph.initializer)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    assert rel_error(run(rewritten, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def _reshape_to_computed_shape():
    """x [batch, 2, 8] -> Reshape to a target computed from the data (Where on a reduction of x),
    as exports compute reshape targets and position ids at run time -> MatMul(8 x 16)."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "floor"], ["cond"]),
        helper.make_node("Where", ["cond", "target", "target"], ["shape"]),
        helper.make_node("Reshape", ["x", "shape"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    inits = [tensor("floor", np.array(-1e30, np.float32)), tensor("target", np.array([-1, 8], np.int64)),
             tensor("w", rng.standard_normal((8, 16)).astype(np.float32))]
    return make_model(nodes, [value("x", ["batch", 2, 8])], [value("y", ["n", 16])], inits)


def test_shapes_static_inference_cannot_follow_are_measured_by_running_the_model():
    from onnx_lowrank.shapes import infer_shapes

    model = _reshape_to_computed_shape()
    assert infer_shapes(model, {"x": (3, 2, 8)}, measure_missing=False)["h"] == (None, None)
    assert infer_shapes(model, {"x": (3, 2, 8)})["h"] == (6, 8)
    (layer,) = find_layers(model, {"x": (3, 2, 8)})
    assert layer.tokens == 6 and layer.flops == 2 * 6 * 8 * 16  # FLOPs (and the latency guard) need them


def test_replayed_plan_counts_flops_at_this_models_shapes():
    """A plan made at 128 tokens (its predicted FLOPs) replayed at 3: FLOPs before and after are
    both counted at 3 tokens, not one at each."""
    from onnx_lowrank.compress import apply_plan
    from onnx_lowrank.search.plan import LayerDecision, RankPlan

    rng = np.random.default_rng(7)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    model = make_model([node], [value("x", ["batch", 3, 32])], [value("y", ["batch", 3, 32])],
                       [tensor("w", rng.standard_normal((32, 32)).astype(np.float32))])
    layers = find_layers(model)
    stale = {"params": 512, "flops": 2 * 128 * 512}  # predicted at 128 tokens
    plan = RankPlan({"proj": LayerDecision("factorize", "svd", rank=8, predicted=stale)})
    totals = apply_plan(model, layers, plan).totals
    assert totals["layer_flops_before"] == 2 * 3 * 32 * 32
    assert totals["layer_flops_after"] == 2 * 3 * 8 * (32 + 32)
