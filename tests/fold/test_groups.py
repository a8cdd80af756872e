"""Detection of foldable groups, and the reasons coupled or mixed channel sets are left alone."""

from __future__ import annotations

import numpy as np
import pytest
from fold_helpers import SAMPLES, initializer, make_model, mlp, tensor, value
from onnx import helper

from onnx_lowrank.fold import find_groups, fold_model, inspect_groups
from onnx_lowrank.model import load_model


def _by_name(groups):
    return {group.name: group for group in groups}


def _conv(rng, name, cin, cout):
    return tensor(name, rng.standard_normal((cout, cin, 3, 3)).astype(np.float32))


def test_residual_add_is_coupled_and_left_alone():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["s"]),
        helper.make_node("Conv", ["s", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "s"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["out"]),
        helper.make_node("GlobalAveragePool", ["out"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc", transB=1),
    ]
    inits = [_conv(rng, "w0", 2, 6), _conv(rng, "w1", 6, 6), _conv(rng, "w2", 6, 6)]
    inits.append(tensor("fc_w", rng.standard_normal((3, 6)).astype(np.float32)))
    model = make_model(nodes, [value("x", ["batch", 2, 5, 5])], [value("y", ["batch", 3])], inits)
    groups = _by_name(find_groups(model))
    assert groups["stem"].skip.code == "residual_add"
    assert groups["conv2"].skip.code == "residual_add"
    assert "residual" in groups["conv2"].skip.message
    assert groups["conv1"].foldable and [c.layer for c in groups["conv1"].consumers] == ["conv2"]
    assert groups["fc"].skip.code == "graph_output"

    folded, report = fold_model(model, keep=0.5)
    assert [g.name for g in report.groups] == ["conv1"]
    assert {s["name"]: s["reason"] for s in report.skipped} == {
        "stem": "residual_add",
        "conv2": "residual_add",
        "fc": "graph_output",
    }
    # the coupled producers keep every output channel (conv2 only loses input channels)
    np.testing.assert_array_equal(initializer(folded, "w0"), initializer(model, "w0"))
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    assert initializer(folded, conv2.input[1]).shape == (6, 3, 3, 3)


def _chain(op_nodes, extra_inits=(), *, width=6, out_shape=("batch", 4)):
    """Gemm(4 -> width) -> <op_nodes reading "h", writing "z"> -> Gemm(width -> 4)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1), *op_nodes]
    nodes.append(helper.make_node("Gemm", ["z", "w2"], ["y"], name="fc2", transB=1))
    inits = [
        tensor("w1", rng.standard_normal((width, 4)).astype(np.float32)),
        tensor("w2", rng.standard_normal((4, width)).astype(np.float32)),
        *extra_inits,
    ]
    return make_model(nodes, [value("x", ["batch", 4])], [value("y", list(out_shape))], inits)


@pytest.mark.parametrize(
    ("op_nodes", "extra", "code"),
    [
        ([helper.make_node("LayerNormalization", ["h", "ln_g", "ln_b"], ["z"], axis=-1)],
         [tensor("ln_g", np.ones(6, np.float32)), tensor("ln_b", np.zeros(6, np.float32))], "mixes_channels"),
        ([helper.make_node("Softmax", ["h"], ["z"], axis=1)], [], "mixes_channels"),
        ([helper.make_node("Mul", ["h", "scale"], ["z"])], [tensor("scale", np.arange(6, dtype=np.float32))],
         "per_channel_params"),
        ([helper.make_node("Concat", ["h", "h"], ["cat"], axis=1), helper.make_node("Slice", ["cat", "st", "en", "ax"], ["z"])],
         [tensor("st", np.array([0])), tensor("en", np.array([6])), tensor("ax", np.array([1]))], "concat"),
        ([helper.make_node("Split", ["h"], ["s1", "s2"], axis=1), helper.make_node("Concat", ["s1", "s2"], ["z"], axis=1)],
         [], "split"),
        ([helper.make_node("Mul", ["h", "x6"], ["z"])], [], "coupled_elementwise"),
        ([helper.make_node("Shape", ["h"], ["shp"]), helper.make_node("Relu", ["h"], ["z"])], [], "unknown_op"),
    ],
    ids=["layernorm", "softmax", "per_channel_mul", "concat", "split", "gated", "unknown"],
)
def test_breaking_ops_leave_the_group_alone_with_a_reason(op_nodes, extra, code):
    if code == "coupled_elementwise":  # another producer's channels multiply these: a gated unit
        op_nodes = [helper.make_node("Gemm", ["x", "w3"], ["x6"], name="gate", transB=1), *op_nodes]
        extra = [tensor("w3", np.ones((6, 4), np.float32))]
    model = _chain(op_nodes, extra)
    groups = _by_name(find_groups(model))
    assert groups["fc1"].skip.code == code, groups["fc1"].skip
    assert groups["fc1"].skip.message
    folded, report = fold_model(model, keep=0.5)
    assert "fc1" not in {g.name for g in report.groups}
    np.testing.assert_array_equal(initializer(folded, "w1"), initializer(model, "w1"))


def test_graph_output_on_the_path_is_coupled():
    rng = np.random.default_rng(2)
    model = mlp(rng, trans_b=True)
    model.graph.output.append(value("a", ["batch", 16]))  # the activation is also a model output
    groups = _by_name(find_groups(model))
    assert groups["fc1"].skip.code == "graph_output"


def test_inspect_groups_lists_sizes_and_reasons():
    rng = np.random.default_rng(3)
    listing = inspect_groups(mlp(rng, trans_b=True, width=16, n_in=8, n_out=4))
    rows = {row["name"]: row for row in listing["groups"]}
    assert rows["fc1"] == {
        "name": "fc1",
        "op": "Gemm",
        "width": 16,
        "foldable": True,
        "path": ["Relu"],
        "consumers": ["fc2"],
        "batchnorm": None,
        "bias": True,
        "params": 16 * 8 + 4 * 16,
    }
    assert rows["fc2"]["reason"] == "graph_output" and not rows["fc2"]["foldable"]
    assert listing["totals"] == {
        "groups": 2,
        "foldable_groups": 1,
        "foldable_channels": 16,
        "foldable_layer_params": 16 * 8 + 4 * 16,
    }


def test_real_exports_groups():
    """The sample exports: MLP/CNN chains, ResNet's coupled residual sets, the transformer's FFN."""
    expect = {
        "digits_mlp": {"/fc1/Gemm": None, "/fc2/Gemm": None, "/fc3/Gemm": "graph_output"},
        "digits_cnn": {"/conv1/Conv": None, "/conv2/Conv": None, "/fc1/Gemm": None, "/fc2/Gemm": "graph_output"},
        "digits_resnet": {
            "/stem/stem.0/Conv": "residual_add",
            "/block1/conv1/Conv": None,
            "/block1/conv2/Conv": "residual_add",
            "/block2/conv1/Conv": None,
            "/block2/conv2/Conv": "residual_add",
            "/block2/shortcut/shortcut.0/Conv": "residual_add",
            "/fc/Gemm": "graph_output",
        },
    }
    for name, codes in expect.items():
        groups = find_groups(load_model(SAMPLES / f"{name}.onnx"))
        assert {g.name: (g.skip.code if g.skip else None) for g in groups} == codes
    cnn = _by_name(find_groups(load_model(SAMPLES / "digits_cnn.onnx")))
    assert cnn["/conv2/Conv"].path == ("BatchNormalization", "Relu", "MaxPool", "Flatten")
    assert cnn["/conv2/Conv"].consumers[0].block == 9  # 3x3 pooled map per channel

    groups = _by_name(find_groups(load_model(SAMPLES / "digits_transformer.onnx")))
    foldable = sorted(name for name, g in groups.items() if g.foldable)
    assert foldable == ["/layers.0/ff1/MatMul", "/layers.1/ff1/MatMul"]
    ffn = groups["/layers.0/ff1/MatMul"]
    assert ffn.width == 256 and ffn.bias is not None and ffn.bias.input_index == 0  # torch puts the bias first
    assert ffn.path == ("Add(bias)", "Div", "Erf", "Add", "Mul", "Mul")
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert groups[f"/layers.0/attn/{proj}/MatMul"].skip.code == "layout_change"
    assert groups["/layers.0/attn/out_proj/MatMul"].skip.code == "residual_add"
    assert groups["/layers.1/ff2/MatMul"].skip.code == "residual_add"
    assert groups["/head/Gemm"].skip.code == "graph_output"
    assert "/layers.0/attn/MatMul" not in groups  # activation @ activation is not a layer
