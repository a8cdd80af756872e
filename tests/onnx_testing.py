"""Tiny ONNX graphs built inline, and a reference onnxruntime run, for every test area."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 9  # onnx 1.23 stamps IR 14, which onnxruntime 1.31 refuses
SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def make_model(nodes, inputs, outputs, initializers=(), *, opset=17, ir_version=IR_VERSION, check=True, **graph_kw):
    """A model of one graph; checked with onnx's full checker unless ``check`` is False."""
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers), **graph_kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name, array):
    """An initializer; 0-d arrays stay 0-d."""
    return numpy_helper.from_array(np.array(array, order="C"), name)


def value(name, shape, elem_type=TensorProto.FLOAT):
    """A tensor value info; an int ``shape`` means that rank with unknown (symbolic) dims."""
    if isinstance(shape, int):
        shape = [f"{name}_d{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, elem_type, shape)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """All outputs on onnxruntime's CPU EP, graph optimizations off (the reference run)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual = actual.astype(np.float64)
    expected = expected.astype(np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))
