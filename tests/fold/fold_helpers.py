"""Tiny ONNX graphs with planted duplicate neurons, built inline, and helpers to run them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 9  # onnx 1.23 stamps IR 14, which onnxruntime 1.31 refuses
SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "sample_models"


def make_model(nodes, inputs, outputs, initializers=(), *, opset=17, value_info=()):
    graph = helper.make_graph(
        list(nodes), "fold_test", list(inputs), list(outputs), list(initializers), value_info=list(value_info)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def value(name, shape, elem_type=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, shape)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = actual.astype(np.float64)
    expected = expected.astype(np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def duplicated(rng: np.random.Generator, distinct: int, width: int) -> np.ndarray:
    """An index map of length ``width`` using each of ``distinct`` sources at least once, shuffled."""
    index = np.concatenate([np.arange(distinct), rng.integers(0, distinct, width - distinct)])
    return rng.permutation(index)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def node_input(model: onnx.ModelProto, node_name: str, position: int) -> np.ndarray:
    """The constant a named node reads at ``position`` (after any rewrite renamed it)."""
    for node in model.graph.node:
        if node.name == node_name:
            return initializer(model, node.input[position])
    raise KeyError(node_name)


def mlp(rng, *, trans_b: bool, distinct: int = 5, width: int = 16, n_in: int = 8, n_out: int = 4):
    """Gemm(n_in -> width, duplicated neurons) -> Relu -> Gemm(width -> n_out)."""
    rows = rng.standard_normal((distinct, n_in)).astype(np.float32)
    biases = rng.standard_normal(distinct).astype(np.float32)
    index = duplicated(rng, distinct, width)
    w1, b1 = rows[index], biases[index]
    w2 = rng.standard_normal((n_out, width)).astype(np.float32)
    b2 = rng.standard_normal(n_out).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=int(trans_b)),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=int(trans_b)),
    ]
    inits = [
        tensor("w1", w1 if trans_b else w1.T),
        tensor("b1", b1),
        tensor("w2", w2 if trans_b else w2.T),
        tensor("b2", b2),
    ]
    return make_model(nodes, [value("x", ["batch", n_in])], [value("y", ["batch", n_out])], inits)
