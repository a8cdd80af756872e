"""A planted model for the floor tests: one exactly low-rank layer, one fragile layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.validate.data import Dataset


def planted_floor_model() -> onnx.ModelProto:
    """x[n,64] -> MatMul(low: exact rank 4) -> Relu -> MatMul(frag: orthogonal, flat spectrum)
    -> Relu -> MatMul(head 64x10, below min_params) -> logits[n,10]."""
    rng = np.random.default_rng(0)
    low = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 64)) / 4
    frag = np.linalg.qr(rng.standard_normal((64, 64)))[0] * 2
    head = rng.standard_normal((64, 10))
    weights = {"W_low": low, "W_frag": frag, "W_head": head}
    nodes = [
        helper.make_node("MatMul", ["x", "W_low"], ["h1"], name="low"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W_frag"], ["h2"], name="frag"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W_head"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "floor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def planted_data(n: int = 200) -> Dataset:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    return Dataset({"x": x}, rng.integers(0, 10, n), source="planted")


@pytest.fixture
def planted(tmp_path):
    """(model path, data .npz path, model, dataset)."""
    model = planted_floor_model()
    data = planted_data()
    model_path = tmp_path / "planted.onnx"
    onnx.save(model, model_path)
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=data.feeds["x"], labels=data.labels)
    return model_path, data_path, model, data
