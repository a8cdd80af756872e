"""Tiny ONNX graphs with planted duplicate neurons, built inline, and helpers to run them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx_testing import SAMPLES, make_model, rel_error, run, tensor, value  # noqa: F401 (re-exported)


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
