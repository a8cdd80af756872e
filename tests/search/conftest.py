"""Tiny models for the search tests, built inline (IR 9 so onnxruntime accepts them)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def build_model(nodes, inputs, outputs, weights: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    tensors = [
        numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in weights.items()
    ]
    graph = helper.make_graph(nodes, "test", inputs, outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def planted_weights(seed: int = 0, noise: float = 0.0) -> dict[str, np.ndarray]:
    """A large layer of exact rank 4 (128x128, plus optional relative noise) and a full-rank
    small layer (128 -> 32), stored as MatMul (in, out) weights."""
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((128, 4)) @ rng.standard_normal((4, 128)) / 4
    big += noise * np.linalg.norm(big) / 128 * rng.standard_normal(big.shape)
    small = rng.standard_normal((128, 32)) / 8
    return {"W_big": big, "W_small": small}


@pytest.fixture
def planted_model():
    """x[n,128] -> MatMul(big, rank 4) -> Relu -> MatMul(small, full rank) -> y[n,32]."""

    def make(noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
        nodes = [
            helper.make_node("MatMul", ["x", "W_big"], ["h"], name="big"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W_small"], ["y"], name="small"),
        ]
        return build_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
            planted_weights(seed, noise),
        )

    return make


@pytest.fixture
def mlp_model():
    """x[n,32] -> Gemm(64, transB=1) -> Relu -> Gemm(48) -> Relu -> MatMul(10): three layers."""
    rng = np.random.default_rng(1)
    weights = {
        "W1": rng.standard_normal((64, 32)) / 6,
        "b1": rng.standard_normal(64) / 10,
        "W2": rng.standard_normal((64, 48)) / 8,
        "b2": rng.standard_normal(48) / 10,
        "W3": rng.standard_normal((48, 10)) / 7,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W3"], ["y"], name="fc3"),
    ]
    return build_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        weights,
    )


@pytest.fixture
def model_builder():
    """``build_model(nodes, inputs, outputs, weights)`` for tests that need their own graph."""
    return build_model
