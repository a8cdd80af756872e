"""Ops that the torch export of all-MiniLM-L6-v2 needs beyond the sample models: IsNaN."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnx import helper  # noqa: E402
from torch_helpers import make_model, ort_run, tensor, value  # noqa: E402

from onnx_lowrank.torch.interpreter import OnnxModule, check_supported  # noqa: E402


def _nan_guard():
    """Where(IsNaN(x), 0, x): how HF's exported attention mask clears NaN scores."""
    nodes = [
        helper.make_node("IsNaN", ["x"], ["nan"], name="isnan"),
        helper.make_node("Where", ["nan", "zero", "x"], ["y"], name="where"),
    ]
    return make_model(
        nodes, [value("x", ["batch", 5])], [value("y", ["batch", 5])], [tensor("zero", np.float32(0.0))]
    )


def test_isnan_matches_onnxruntime():
    model = _nan_guard()
    check_supported(model)  # raises UnsupportedError when an op is missing
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    x[0, 1] = x[2, 4] = x[3, 0] = np.nan
    with torch.no_grad():
        got = OnnxModule(model)(x).numpy()
    expected = ort_run(model, {"x": x})[0]
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, expected)
    assert got[0, 1] == 0.0 and got[1, 1] == x[1, 1]
