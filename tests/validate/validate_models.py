"""Tiny models with planted behaviour for the validation, latency and gate tests (imported by them)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.validate.runtime import cuda_session_works

IN, HIDDEN, CLASSES = 16, 32, 4


def mlp(
    seed: int = 0,
    *,
    scale: float | None = None,
    offset: np.ndarray | None = None,
    slow: int = 0,
    ir_version: int = 8,
) -> onnx.ModelProto:
    """Gemm-Relu-Gemm classifier [batch, 16] -> [batch, 4], same weights for the same seed.

    ``scale``: multiply the logits by it (a planted relative error of |scale - 1|).
    ``offset``: add this [4] vector to the logits (a planted max absolute error).
    ``slow``: add that many 512x512 MatMuls on the input whose result is multiplied by 0 and
    added to the logits: same outputs, many times the work.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((HIDDEN, IN)).astype(np.float32) / 4
    b1 = rng.standard_normal(HIDDEN).astype(np.float32) / 10
    w2 = rng.standard_normal((CLASSES, HIDDEN)).astype(np.float32) / 4
    b2 = rng.standard_normal(CLASSES).astype(np.float32) / 10
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["z0"], transB=1, name="fc2"),
    ]
    current = "z0"
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
        nodes.append(helper.make_node("Mul", [current, "scale"], ["z1"], name="scale"))
        current = "z1"
    if offset is not None:
        inits.append(numpy_helper.from_array(np.asarray(offset, np.float32), "offset"))
        nodes.append(helper.make_node("Add", [current, "offset"], ["z2"], name="offset"))
        current = "z2"
    if slow:
        width = 512
        inits.append(numpy_helper.from_array(rng.standard_normal((IN, width)).astype(np.float32) / 4, "p"))
        nodes.append(helper.make_node("MatMul", ["input", "p"], ["s0"], name="slow_in"))
        for i in range(slow):
            q = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)  # keeps the scale
            inits.append(numpy_helper.from_array(q, f"q{i}"))
            nodes.append(helper.make_node("MatMul", [f"s{i}", f"q{i}"], [f"s{i + 1}"], name=f"slow_{i}"))
        inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
        nodes += [
            helper.make_node("ReduceMean", [f"s{slow}"], ["sm"], keepdims=1, axes=[1], name="slow_mean"),
            helper.make_node("Mul", ["sm", "zero"], ["sz"], name="slow_zero"),
            helper.make_node("Add", [current, "sz"], ["z3"], name="slow_add"),
        ]
        current = "z3"
    nodes[-1].output[0] = "logits"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", IN])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])
    graph = helper.make_graph(nodes, "mlp", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


def write(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


def inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from onnx_lowrank.validate.runtime import RuntimeOptions, create_session

    return create_session(model, RuntimeOptions()).run({"input": x})["logits"]


run_model = _run


def gpu_test(func):
    """Mark a test as needing the CUDA EP and skip it where a CUDA session cannot be created."""
    skip = pytest.mark.skipif(not cuda_session_works(), reason="CUDAExecutionProvider cannot create a session here")
    return pytest.mark.gpu(skip(func))
