"""Tiny ONNX graphs for the torch-side tests, and a reference run on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx_testing import make_model, tensor, value  # noqa: F401 (re-exported)
from onnx_testing import run as ort_run  # noqa: F401 (re-exported)


def mlp(seed: int = 0, *, n_in: int = 16, hidden: int = 32, n_out: int = 6, rank: int | None = None) -> onnx.ModelProto:
    """Gemm-Relu-Gemm (transB=1) with biases; with ``rank`` the first weight has exactly that rank."""
    rng = np.random.default_rng(seed)
    if rank is None:
        w1 = rng.standard_normal((hidden, n_in)) / np.sqrt(n_in)
    else:
        w1 = rng.standard_normal((hidden, rank)) @ rng.standard_normal((rank, n_in)) / np.sqrt(n_in * rank)
    w2 = rng.standard_normal((n_out, hidden)) / np.sqrt(hidden)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        tensor("W1", w1.astype(np.float32)),
        tensor("b1", (0.1 * rng.standard_normal(hidden)).astype(np.float32)),
        tensor("W2", w2.astype(np.float32)),
        tensor("b2", (0.1 * rng.standard_normal(n_out)).astype(np.float32)),
    ]
    return make_model(nodes, [value("x", ["batch", n_in])], [value("y", ["batch", n_out])], inits)
