"""The torch interpreter against onnxruntime: sample models, opset-dependent ops, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402
from torch_helpers import make_model, mlp, ort_run, tensor, value  # noqa: E402

from onnx_lowrank.errors import InputError, UnsupportedError  # noqa: E402
from onnx_lowrank.model import load_model  # noqa: E402
from onnx_lowrank.torch import interpreter  # noqa: E402
from onnx_lowrank.torch.interpreter import OnnxModule, verify_against_onnxruntime  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
F = TensorProto.FLOAT
I64 = TensorProto.INT64


@pytest.mark.parametrize("name,key", [
    ("digits_mlp", "input_flat"), ("digits_cnn", "input_image"),
    ("digits_resnet", "input_image"), ("digits_transformer", "input_image"),
])
def test_sample_models_match_onnxruntime(name, key):
    model = load_model(SAMPLES / f"{name}.onnx")
    inputs = np.load(SAMPLES / "digits_test.npz")[key][:40]
    verification = verify_against_onnxruntime(model, {"input": inputs}, rtol=1e-5)
    assert verification.ok and verification.worst < 1e-5
    with torch.no_grad():
        logits = OnnxModule(model)(inputs).numpy()
    expected = ort_run(model, {"input": inputs})[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def _rng(seed=0):
    return np.random.default_rng(seed)


def _single(op, feeds, *, consts=None, inputs=None, opset=17, outputs=1, out_type=F, domain="", **attrs):
    """One ``op`` node reading ``inputs`` (default: feeds then consts in order)."""
    consts = consts or {}
    names = inputs if inputs is not None else list(feeds) + list(consts)
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, name=f"{op}_node", **attrs)
    graph_inputs = [
        value(k, list(v.shape), helper.np_dtype_to_tensor_dtype(v.dtype)) for k, v in feeds.items()
    ]
    graph_outputs = [value(o, None, out_type) for o in outs]
    inits = [tensor(k, v) for k, v in consts.items()]
    # Outputs carry no shape (the checker insists on one); onnxruntime validates the graph instead.
    return make_model([node], graph_inputs, graph_outputs, inits, opset=opset, check=False), feeds


def _x(*shape, seed=0):
    return _rng(seed).standard_normal(shape).astype(np.float32)


def _i(values):
    return np.array(values, dtype=np.int64)


CASES = {
    # axes: attribute before opset 13, input after
    "squeeze_attr_11": lambda: _single("Squeeze", {"x": _x(2, 1, 3, 1)}, opset=11, axes=[1, -1]),
    "squeeze_input_13": lambda: _single("Squeeze", {"x": _x(2, 1, 3, 1)}, consts={"axes": _i([1])}, opset=13),
    "squeeze_all_13": lambda: _single("Squeeze", {"x": _x(2, 1, 3, 1)}, opset=13),
    "unsqueeze_attr_11": lambda: _single("Unsqueeze", {"x": _x(2, 3)}, opset=11, axes=[0, -1]),
    "unsqueeze_input_13": lambda: _single("Unsqueeze", {"x": _x(2, 3)}, consts={"axes": _i([3, 0])}, opset=13),
    "reducemean_attr_13": lambda: _single("ReduceMean", {"x": _x(2, 3, 4)}, opset=13, axes=[1], keepdims=0),
    "reducemean_input_18": lambda: _single("ReduceMean", {"x": _x(2, 3, 4)}, consts={"axes": _i([-1, 0])}, opset=18),
    "reducemean_all_18": lambda: _single("ReduceMean", {"x": _x(2, 3, 4)}, opset=18, keepdims=1),
    "reducesum_attr_11": lambda: _single("ReduceSum", {"x": _x(2, 3, 4)}, opset=11, axes=[2]),
    "reducesum_input_13": lambda: _single("ReduceSum", {"x": _x(2, 3, 4)}, consts={"axes": _i([1])}, opset=13, keepdims=0),
    "reducesum_noop_13": lambda: _single("ReduceSum", {"x": _x(2, 3, 4)}, opset=13, noop_with_empty_axes=1),
    "reducemax_attr_13": lambda: _single("ReduceMax", {"x": _x(2, 3, 4)}, opset=13, axes=[0, 2]),
    "reducemax_input_18": lambda: _single("ReduceMax", {"x": _x(2, 3, 4)}, consts={"axes": _i([1])}, opset=18),
    "split_attr_11": lambda: _single("Split", {"x": _x(3, 6)}, opset=11, outputs=2, axis=1, split=[2, 4]),
    "split_input_13": lambda: _single("Split", {"x": _x(5, 2)}, consts={"s": _i([1, 4])}, opset=13, outputs=2),
    "split_equal_13": lambda: _single("Split", {"x": _x(6, 2)}, opset=13, outputs=3),
    "split_uneven_18": lambda: _single("Split", {"x": _x(7, 2)}, opset=18, outputs=3, num_outputs=3),
    "clip_attrs_6": lambda: _single("Clip", {"x": _x(4, 5)}, opset=6, min=-0.5, max=0.7),
    "clip_inputs_13": lambda: _single(
        "Clip", {"x": _x(4, 5)}, consts={"lo": np.array(-0.3, np.float32), "hi": np.array(0.2, np.float32)}, opset=13
    ),
    "clip_min_only_13": lambda: _single(
        "Clip", {"x": _x(4, 5)}, consts={"lo": np.array(0.1, np.float32)}, inputs=["x", "lo", ""], opset=13
    ),
    "slice_attrs_9": lambda: _single("Slice", {"x": _x(5, 6)}, opset=9, starts=[1, -4], ends=[4, 100], axes=[0, 1]),
    "slice_inputs_13": lambda: _single(
        "Slice", {"x": _x(5, 6, 4)},
        consts={"s": _i([-1, 1]), "e": _i([-100, 5]), "a": _i([1, 2]), "st": _i([-2, 2])}, opset=13,
    ),
    "slice_defaults_13": lambda: _single("Slice", {"x": _x(5, 6)}, consts={"s": _i([2]), "e": _i([2**62])}, opset=13),
    "softmax_coerced_11": lambda: _single("Softmax", {"x": _x(2, 3, 4)}, opset=11, axis=1),
    "softmax_axis_13": lambda: _single("Softmax", {"x": _x(2, 3, 4)}, opset=13, axis=1),
    "logsoftmax_default_11": lambda: _single("LogSoftmax", {"x": _x(2, 3, 4)}, opset=11),
    "logsoftmax_13": lambda: _single("LogSoftmax", {"x": _x(2, 3, 4)}, opset=13),
    "pad_attrs_2": lambda: _single("Pad", {"x": _x(2, 3)}, opset=2, pads=[0, 1, 1, 2], value=1.5),
    "pad_constant_11": lambda: _single(
        "Pad", {"x": _x(2, 3, 4)}, consts={"p": _i([0, 1, 2, 1, 0, -1]), "v": np.array(0.5, np.float32)}, opset=11
    ),
    "pad_reflect_13": lambda: _single("Pad", {"x": _x(1, 2, 5)}, consts={"p": _i([0, 0, 2, 0, 0, 3])}, opset=13, mode="reflect"),
    "pad_edge_13": lambda: _single("Pad", {"x": _x(1, 2, 5)}, consts={"p": _i([0, 1, 2, 0, 1, 3])}, opset=13, mode="edge"),
    "pad_axes_18": lambda: _single(
        "Pad", {"x": _x(2, 3, 4)}, consts={"p": _i([1, 2, 0, 1]), "v": np.array(0.0, np.float32), "a": _i([-1, 0])},
        opset=18,
    ),
    "pad_wrap_19": lambda: _single("Pad", {"x": _x(2, 4)}, consts={"p": _i([0, 2, 0, 1])}, opset=19, mode="wrap"),
    "reshape_zero_13": lambda: _single("Reshape", {"x": _x(2, 3, 4)}, consts={"s": _i([0, -1])}, opset=13),
    "reshape_keepzero_14": lambda: _single("Reshape", {"x": _x(2, 3, 4)}, consts={"s": _i([0, 4, -1])}, opset=14),
    "reshape_allowzero_14": lambda: _single("Reshape", {"x": _x(0, 3)}, consts={"s": _i([3, 0])}, opset=14, allowzero=1),
    # convolutions and pooling
    "conv1d": lambda: _single(
        "Conv", {"x": _x(2, 3, 11)}, consts={"w": _x(4, 3, 3, seed=1), "b": _x(4, seed=2)},
        strides=[2], dilations=[2], pads=[1, 2],
    ),
    "conv2d_group_same_upper": lambda: _single(
        "Conv", {"x": _x(1, 4, 7, 6)}, consts={"w": _x(6, 2, 3, 3, seed=1)}, group=2, strides=[2, 2], auto_pad="SAME_UPPER",
    ),
    "conv2d_same_lower": lambda: _single(
        "Conv", {"x": _x(1, 2, 6, 6)}, consts={"w": _x(3, 2, 2, 2, seed=1)}, strides=[1, 1], auto_pad="SAME_LOWER",
    ),
    "conv2d_asymmetric_pads": lambda: _single(
        "Conv", {"x": _x(2, 2, 5, 5)}, consts={"w": _x(3, 2, 3, 2, seed=1), "b": _x(3, seed=2)}, pads=[0, 1, 2, 0],
    ),
    "conv2d_depthwise_valid": lambda: _single(
        "Conv", {"x": _x(1, 3, 6, 6)}, consts={"w": _x(3, 1, 3, 3, seed=1)}, group=3, auto_pad="VALID",
    ),
    "maxpool_pads_ceil": lambda: _single(
        "MaxPool", {"x": _x(1, 2, 7, 7)}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
    ),
    "maxpool_1d_same": lambda: _single("MaxPool", {"x": _x(2, 3, 9)}, kernel_shape=[2], strides=[2], auto_pad="SAME_UPPER"),
    "avgpool_exclude_pad": lambda: _single(
        "AveragePool", {"x": _x(1, 2, 6, 6)}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
    ),
    "avgpool_include_pad": lambda: _single(
        "AveragePool", {"x": _x(1, 2, 6, 6)}, kernel_shape=[3, 3], pads=[1, 0, 1, 2], count_include_pad=1,
    ),
    "avgpool_1d": lambda: _single("AveragePool", {"x": _x(2, 3, 8)}, kernel_shape=[3], strides=[2], pads=[1, 1]),
    "global_average_pool": lambda: _single("GlobalAveragePool", {"x": _x(2, 3, 4, 5)}),
    # linear algebra and normalization
    "gemm_trans_alpha_beta": lambda: _single(
        "Gemm", {"a": _x(4, 3)}, consts={"b": _x(5, 4, seed=1), "c": _x(5, seed=2)}, transA=1, transB=1, alpha=0.5, beta=2.0,
    ),
    "matmul_batched": lambda: _single("MatMul", {"a": _x(2, 3, 4, 5), "b": _x(2, 3, 5, 2, seed=1)}),
    "einsum": lambda: _single("Einsum", {"a": _x(2, 3, 4), "b": _x(2, 4, 5, seed=1)}, equation="bij, bjk -> bik"),
    "layernorm_last": lambda: _single("LayerNormalization", {"x": _x(2, 3, 8)}, consts={"s": _x(8, seed=1), "b": _x(8, seed=2)}),
    "layernorm_axis1": lambda: _single("LayerNormalization", {"x": _x(2, 3, 4)}, consts={"s": _x(3, 4, seed=1)}, axis=1, epsilon=1e-3),
    "batchnorm": lambda: _single(
        "BatchNormalization", {"x": _x(2, 3, 4, 4)},
        consts={"s": _x(3, seed=1), "b": _x(3, seed=2), "m": _x(3, seed=3), "v": np.abs(_x(3, seed=4)) + 0.5},
    ),
    "gelu_20": lambda: _single("Gelu", {"x": _x(3, 4)}, opset=20),
    "gelu_tanh_20": lambda: _single("Gelu", {"x": _x(3, 4)}, opset=20, approximate="tanh"),
    # indexing and shapes
    "gather_negative": lambda: _single("Gather", {"x": _x(3, 5)}, consts={"i": _i([[0, -1], [2, -3]])}, axis=1),
    "gather_scalar": lambda: _single("Gather", {"x": _x(4, 5)}, consts={"i": np.array(-2, np.int64)}),
    "gather_scalar_from_1d": lambda: _single("Gather", {"x": _x(6)}, consts={"i": np.array(-1, np.int64)}),
    "mod_int": lambda: _single("Mod", {}, consts={"a": _i([7, -7, 9]), "b": _i([3, 3, -4])}, out_type=I64),
    "fmod_float": lambda: _single("Mod", {"a": _x(3, 4) * 5}, consts={"b": np.array(1.5, np.float32)}, fmod=1),
    "expand": lambda: _single("Expand", {"x": _x(3, 1)}, consts={"s": _i([2, 1, 4])}),
    "tile": lambda: _single("Tile", {"x": _x(2, 3)}, consts={"r": _i([2, 1])}),
    "range_float": lambda: _single(
        "Range", {}, consts={"a": np.array(0.5, np.float32), "b": np.array(3.0, np.float32), "d": np.array(0.75, np.float32)}
    ),
    "range_int": lambda: _single("Range", {}, consts={"a": _i(10), "b": _i(1), "d": _i(-3)}, out_type=I64),
    "shape_start_end_15": lambda: _single("Shape", {"x": _x(2, 3, 4)}, opset=15, out_type=I64, start=1, end=-1),
    "constant_of_shape": lambda: _single(
        "ConstantOfShape", {}, consts={"s": _i([2, 3])}, value=helper.make_tensor("v", F, [1], [1.25]),
    ),
    "cast_to_int": lambda: _single("Cast", {"x": _x(3, 3) * 4}, out_type=I64, to=I64),
    "transpose": lambda: _single("Transpose", {"x": _x(2, 3, 4)}, perm=[2, 0, 1]),
    "flatten_axis2": lambda: _single("Flatten", {"x": _x(2, 3, 4, 5)}, axis=2),
    "concat": lambda: _single("Concat", {"a": _x(2, 3), "b": _x(2, 1, seed=1)}, axis=-1),
    "sum3": lambda: _single("Sum", {"a": _x(2, 3), "b": _x(3, seed=1), "c": _x(2, 1, seed=2)}),
    "pow": lambda: _single("Pow", {"a": np.abs(_x(2, 3)) + 0.1}, consts={"p": np.array(1.5, np.float32)}),
    "leaky_relu": lambda: _single("LeakyRelu", {"x": _x(3, 4)}, alpha=0.2),
    "div_int": lambda: _single("Div", {}, consts={"a": _i([7, -7, 9]), "b": _i([2, 2, -4])}, out_type=I64),
    "dropout_inference": lambda: _single("Dropout", {"x": _x(3, 4)}),
}
for _op in ("Sqrt", "Exp", "Log", "Erf", "Neg", "Relu", "Sigmoid", "Tanh", "Identity"):
    CASES[_op.lower()] = (lambda op: lambda: _single(op, {"x": np.abs(_x(3, 4)) + 0.1}))(_op)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inline_ops_match_onnxruntime(case):
    model, feeds = CASES[case]()
    expected = ort_run(model, feeds)
    module = OnnxModule(model)
    with torch.no_grad():
        actual = module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for name, want in zip(module.output_names, expected):
        got = actual[name].numpy()
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_where_equal_and_constant_nodes():
    """A weight in a Constant node (tf2onnx style) becomes a parameter; bool ops run."""
    rng = _rng(3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=tensor("w", rng.standard_normal((4, 3)).astype(np.float32))),
        helper.make_node("Constant", [], ["zero"], value_float=0.0),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Greater", ["h", "zero"], ["positive"]),
        helper.make_node("Equal", ["positive", "flag"], ["same"]),
        helper.make_node("Where", ["same", "h", "zero"], ["y"]),
    ]
    model = make_model(
        nodes, [value("x", ["n", 4]), value("flag", ["n", 3], TensorProto.BOOL)], [value("y", ["n", 3])]
    )
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "flag": rng.random((5, 3)) < 0.5}
    module = OnnxModule(model, lambda name: name == "w")
    assert set(module.named_onnx_parameters()) == {"w"}
    with torch.no_grad():
        got = module(**feeds).numpy()
    np.testing.assert_allclose(got, ort_run(model, feeds)[0], rtol=1e-6)


def test_parameters_buffers_and_calling_conventions():
    model = mlp(seed=1)
    module = OnnxModule(model, lambda name: name.startswith("W"))
    assert set(module.named_onnx_parameters()) == {"W1", "W2"}
    assert set(module.named_onnx_parameters(trainable_only=False)) == {"W1", "b1", "W2", "b2"}
    x = _x(3, 16)
    expected = ort_run(model, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(module(x=x).numpy(), expected, rtol=1e-5, atol=1e-6)
    module(torch.from_numpy(x)).sum().backward()
    assert module.tensor("W1").grad is not None and module.tensor("W1").grad.abs().sum().item() > 0
    assert module.tensor("b1").grad is None  # frozen
    with pytest.raises(InputError, match="unknown input"):
        module(x=x, z=x)
    new = module.replace_tensor("W1", torch.zeros(32, 16))
    assert new.requires_grad and module.tensor("W1").detach().abs().sum().item() == 0


def test_default_predicate_trains_lowrank_factors_only():
    from onnx_lowrank.compress import apply_plan
    from onnx_lowrank.layers import find_layers
    from onnx_lowrank.search import RankRequest, plan_for

    model = mlp(seed=2)
    layers = find_layers(model)
    compressed = apply_plan(model, layers, plan_for(model, layers, RankRequest(4), min_params=0)).model
    names = set(OnnxModule(compressed).named_onnx_parameters())
    assert names and all(".lowrank." in name for name in names)
    assert names == {i.name for i in compressed.graph.initializer if ".lowrank." in i.name}


def test_unsupported_ops_are_listed_all_at_once(monkeypatch):
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [value("t", None)])
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "idx"], axis=-1),
        helper.make_node("ScatterND", ["x", "idx2", "v"], ["s"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=then),
        helper.make_node("Foo", ["s"], ["y"], domain="com.example"),
        helper.make_node("Relu", ["y"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "bad", [value("x", [2, 3]), value("cond", [], TensorProto.BOOL)], [value("out", None)],
        [tensor("k", _i([1])), tensor("idx2", _i([[0]]))],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=9
    )
    converted = []
    monkeypatch.setattr(interpreter, "_tensor_from_proto", lambda proto: converted.append(proto.name))
    with pytest.raises(UnsupportedError) as error:
        OnnxModule(model)
    message = str(error.value)
    assert "4 op type(s)" in message
    for op in ("TopK", "ScatterND", "If", "com.example:Foo"):
        assert op in message
    assert "Relu" not in message and "subgraphs" in message
    assert converted == []  # refused before any weight was converted
    assert interpreter.unsupported_ops(model) == ["If", "ScatterND", "TopK", "com.example:Foo"]


def test_verification_refuses_an_interpreter_that_disagrees(monkeypatch):
    model = mlp(seed=4)
    feeds = {"x": _x(8, 16)}
    assert verify_against_onnxruntime(model, feeds, rtol=1e-5).ok
    monkeypatch.setitem(interpreter.OPS, "Relu", lambda node, inputs: torch.nn.functional.gelu(inputs[0]))
    with pytest.raises(UnsupportedError, match="disagrees with onnxruntime on output 'y'.*would pass"):
        verify_against_onnxruntime(model, feeds, rtol=1e-5)


def test_missing_producer_is_an_input_error():
    nodes = [helper.make_node("Relu", ["ghost"], ["y"])]
    graph = helper.make_graph(nodes, "g", [value("x", [2])], [value("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(InputError, match="ghost"):
        OnnxModule(model)
