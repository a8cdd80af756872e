"""The compress job as a library call: model + plan -> checked, smaller model + report.

    model -> find layers -> plan -> factorize -> check -> (caller saves) -> report
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.layers import Layer
from onnx_lowrank.model import check_model
from onnx_lowrank.passes.factorize import FactorizeReport, factorize
from onnx_lowrank.search.plan import RankPlan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompressResult:
    """The compressed model and the figures the report shows."""

    model: onnx.ModelProto
    plan: RankPlan
    factorize_report: FactorizeReport
    layers: list[dict]
    totals: dict
    seconds: float


def apply_plan(
    model: onnx.ModelProto,
    layers: list[Layer],
    plan: RankPlan,
    *,
    on_layer: Callable[[Layer], None] | None = None,
    decomposers: dict | None = None,
) -> CompressResult:
    """Factorize ``model`` per ``plan``, check the result and collect before/after figures.

    ``decomposers``: data-dependent methods, see :func:`onnx_lowrank.passes.factorize.factorize`.
    """
    started = time.perf_counter()
    result, report = factorize(model, layers, plan, on_layer=on_layer, decomposers=decomposers)
    if result.modified:
        verify(model, result.model)
    seconds = time.perf_counter() - started
    rows = layer_rows(layers, plan, report)
    totals = {
        "model_params_before": count_params(model),
        "model_params_after": count_params(result.model),
        "layer_params_before": sum(r["params_before"] for r in rows if r["supported"]),
        "layer_params_after": sum(r["params_after"] for r in rows if r["supported"]),
        "layers_factorized": len(report.applied),
        "layers_supported": sum(1 for layer in layers if layer.supported),
        "layers_total": len(layers),
    }
    flops = [r for r in rows if r["supported"] and r["flops_before"] is not None]
    if flops and len(flops) == totals["layers_supported"]:
        totals["layer_flops_before"] = sum(r["flops_before"] for r in flops)
        totals["layer_flops_after"] = sum(r["flops_after"] for r in flops)
    return CompressResult(result.model, plan, report, rows, totals, seconds)


def verify(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """Run the full ONNX checker on the result and confirm graph inputs/outputs are unchanged.

    If the original model itself fails the full check (some exporters write models that
    do), only the structural check is required of the result.
    """
    if _data_io(original) != _data_io(rewritten):
        raise RuntimeError("internal error: the rewrite changed the graph's inputs or outputs")
    try:
        check_model(rewritten)
    except Exception as exc:  # onnx raises ValidationError, InferenceError, ...
        try:
            check_model(original)
        except Exception:
            log.warning("the input model fails onnx's full check too; checked structure only")
            onnx.checker.check_model(rewritten)
            return
        raise RuntimeError(f"internal error: the rewritten model fails the ONNX checker: {exc}") from exc


def _data_io(model: onnx.ModelProto) -> tuple:
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(v.SerializeToString() for v in model.graph.input if v.name not in initializers)
    outputs = tuple(v.SerializeToString() for v in model.graph.output)
    return inputs, outputs


def layer_rows(layers: list[Layer], plan: RankPlan, report: FactorizeReport) -> list[dict]:
    """One JSON-ready row per layer: shapes, action, rank, params and FLOPs before/after."""
    rows = []
    for layer in layers:
        decision = report.applied.get(layer.name)
        planned = plan.layers.get(layer.name)
        row = {
            "name": layer.name,
            "op": layer.op_type,
            "weight_shape": list(layer.weight_shape),
            "supported": layer.supported,
            "params_before": layer.params,
            "params_after": layer.params,
            "flops_before": layer.flops,
            "flops_after": layer.flops,
            "action": "keep",
        }
        if decision is not None:
            row.update(action="factorize", method=decision.method, rank=decision.rank)
            if decision.ranks is not None:
                row["ranks"] = list(decision.ranks)
            stored = report.stored_values.get(layer.name, decision.predicted.get("params", 0))
            row["params_after"] = int(stored)
            # FLOPs: an SVD pair applies every stored value once per token (or output position), at
            # this model's shapes; other methods' chains are the search's prediction.
            flops = decision.predicted.get("flops")
            if layer.tokens is not None and (flops is None or decision.method in ("svd", "svd-whitened")):
                flops = 2 * layer.tokens * stored
            row["flops_after"] = flops
            if "rel_error" in decision.predicted:
                row["weight_rel_error"] = decision.predicted["rel_error"]
        else:
            reason = report.not_applied.get(layer.name)
            if reason is None and planned is not None:
                reason = planned.reason
            if reason is None and layer.skip is not None:
                reason = layer.skip.code
            row["reason"] = reason or "not_in_plan"
            if layer.skip is not None:
                row["detail"] = layer.skip.message
        rows.append(row)
    return rows


def count_params(model: onnx.ModelProto) -> int:
    """Floating-point values stored in the model (initializers and Constant nodes, all scopes)."""
    total = 0
    for scope in g.iter_scopes(model):
        for init in scope.graph.initializer:
            if init.data_type in _FLOAT_TYPES:
                total += int(np.prod(init.dims)) if init.dims else 1
        for node in scope.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                        total += int(np.prod(attr.t.dims)) if attr.t.dims else 1
    return total


_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
