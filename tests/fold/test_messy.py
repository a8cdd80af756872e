"""Real-export forms: weights in Constant nodes / behind Identity, float16, legacy IR 3, subgraphs."""

from __future__ import annotations

import numpy as np
from fold_helpers import duplicated, make_model, rel_error, run, tensor, value
from onnx import TensorProto, helper

from onnx_lowrank.fold import find_groups, fold_model
from onnx_lowrank.model import check_model


def _dup_rows(rng, distinct, width, cols, dtype=np.float32):
    return rng.standard_normal((distinct, cols)).astype(dtype)[duplicated(rng, distinct, width)]


def test_weights_in_constant_nodes_and_behind_identity():
    rng = np.random.default_rng(0)
    w1 = _dup_rows(rng, 3, 8, 5)
    w2 = rng.standard_normal((2, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=tensor("W1v", w1)),
        helper.make_node("Constant", [], ["W2raw"], value=tensor("W2v", w2)),
        helper.make_node("Identity", ["W2raw"], ["W2"]),
        helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
        helper.make_node("Sigmoid", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "W2"], ["y"], name="fc2", transB=1),
    ]
    model = make_model(nodes, [value("x", ["batch", 5])], [value("y", ["batch", 2])])
    folded, report = fold_model(model, keep=3 / 8)
    check_model(folded)
    assert report.groups[0].kept == 3
    assert {n.op_type for n in folded.graph.node} == {"Gemm", "Sigmoid"}  # orphaned holders removed
    x = rng.standard_normal((4, 5)).astype(np.float32)
    assert rel_error(run(folded, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_float16_weights_keep_their_type():
    rng = np.random.default_rng(1)
    w1 = _dup_rows(rng, 4, 12, 6, np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="ff1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="ff2"),
    ]
    inits = [
        tensor("w1", w1.T),
        tensor("b1", np.zeros(12, np.float16)),
        tensor("w2", rng.standard_normal((12, 3)).astype(np.float16)),
    ]
    model = make_model(
        nodes, [value("x", ["batch", 6], TensorProto.FLOAT16)], [value("y", ["batch", 3], TensorProto.FLOAT16)], inits
    )
    folded, _ = fold_model(model, keep=4 / 12)
    types = {i.name: i.data_type for i in folded.graph.initializer}
    assert set(types.values()) == {TensorProto.FLOAT16}
    x = rng.standard_normal((5, 6)).astype(np.float16)
    assert rel_error(run(folded, {"x": x})[0], run(model, {"x": x})[0]) < 2e-3  # fp16 rounding of summed columns


def test_legacy_ir3_keeps_ir_and_opset():
    rng = np.random.default_rng(2)
    neurons = _dup_rows(rng, 3, 9, 5)  # weight row and bias duplicated together
    w1, b1 = np.ascontiguousarray(neurons[:, :4]), np.ascontiguousarray(neurons[:, 4])
    inits = [tensor("w1", w1), tensor("b1", b1), tensor("w2", rng.standard_normal((2, 9)).astype(np.float32))]
    inits.append(tensor("b2", np.zeros(2, np.float32)))
    nodes = [  # opset 9 Gemm needs C
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inputs = [value("x", [3, 4]), value("w1", [9, 4]), value("b1", [9]), value("w2", [2, 9]), value("b2", [2])]
    graph = helper.make_graph(nodes, "legacy", inputs, [value("y", [3, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    folded, report = fold_model(model, keep=3 / 9)
    assert folded.ir_version == 3 and folded.opset_import[0].version == 9
    assert report.groups[0].kept == 3
    initializers = {i.name for i in folded.graph.initializer}
    assert {v.name for v in folded.graph.input} == {"x"} | initializers  # IR 3: every weight is an input
    x = rng.standard_normal((3, 4)).astype(np.float32)
    assert rel_error(run(folded, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_layers_inside_subgraphs_and_tensors_read_there_are_left_alone():
    rng = np.random.default_rng(3)
    then_graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "w_in"], ["t"], name="inner", transB=1)],
        "then",
        [],
        [value("t", ["batch", 2])],
        [tensor("w_in", rng.standard_normal((2, 6)).astype(np.float32))],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "w2"], ["e"], name="other", transB=1)], "else", [], [value("e", ["batch", 2])]
    )
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    inits = [tensor("w1", rng.standard_normal((6, 3)).astype(np.float32)), tensor("w2", np.ones((2, 6), np.float32))]
    model = make_model(
        nodes, [value("x", ["batch", 3]), value("cond", [], TensorProto.BOOL)], [value("y", ["batch", 2])], inits
    )
    groups = {g.name: g for g in find_groups(model)}
    assert groups["fc1"].skip.code == "subgraph_use"
    assert groups["branch/then_branch/inner"].skip.code == "subgraph"
    folded, report = fold_model(model, keep=0.5)
    assert not report.modified and folded.SerializeToString() == model.SerializeToString()
