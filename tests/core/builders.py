"""Tiny ONNX graphs built inline for the core tests, and helpers to run them."""

from __future__ import annotations

import onnx
from onnx_testing import IR_VERSION, make_model, rel_error, run, tensor, value  # noqa: F401 (re-exported)

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import FullRankRequest, plan_for


def full_rank(model: onnx.ModelProto, **find_kw) -> onnx.ModelProto:
    """The model with every supported layer factorized at full rank."""
    layers = find_layers(model, **find_kw)
    plan = plan_for(model, layers, FullRankRequest(), min_params=0)
    return apply_plan(model, layers, plan).model
