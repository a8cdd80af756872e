"""Tiny ONNX graphs built inline for the core tests, and helpers to run them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import FullRankRequest, plan_for

IR_VERSION = 9  # onnx 1.23 stamps IR 14, which onnxruntime 1.31 refuses


def make_model(nodes, inputs, outputs, initializers=(), *, opset=17, ir_version=IR_VERSION, **graph_kw):
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers), **graph_kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def value(name, shape, elem_type=TensorProto.FLOAT):
    """A tensor value info; an int ``shape`` means that rank with unknown (symbolic) dims."""
    if isinstance(shape, int):
        shape = [f"{name}_d{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, elem_type, shape)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def full_rank(model: onnx.ModelProto, **find_kw) -> onnx.ModelProto:
    """The model with every supported layer factorized at full rank."""
    layers = find_layers(model, **find_kw)
    plan = plan_for(model, layers, FullRankRequest(), min_params=0)
    return apply_plan(model, layers, plan).model


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = actual.astype(np.float64)
    expected = expected.astype(np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))
