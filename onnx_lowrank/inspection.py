"""What ``inspect`` reports: every candidate layer with its size, cost and compressibility."""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

from onnx_lowrank.compress import count_params
from onnx_lowrank.decompose.svd import spectrum
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.search.error_bound import METHODS, choose, layer_options, methods_for

ENERGY_LEVELS = (0.90, 0.99)


def params_by_method(model: onnx.ModelProto, layer: Layer) -> dict[str, dict[str, int | None]]:
    """Values each decomposition stores to keep 90% / 99% of the weight's energy.

    Energy E means a relative Frobenius error of sqrt(1 - E). None: no factorization of that
    kind reaches it with fewer values than the dense weight.
    """
    result: dict[str, dict[str, int | None]] = {}
    for method in methods_for(layer, METHODS):
        options = layer_options(model, layer, (method,))
        result[method] = {}
        for level in ENERGY_LEVELS:
            option = choose(layer, options, math.sqrt(1 - level), "params")
            result[method][str(round(level * 100))] = option.params if option else None
    return result


def inspect_model(
    model: onnx.ModelProto,
    layers: list[Layer],
    *,
    spectra: bool = True,
    on_layer: Callable[[Layer], None] | None = None,
) -> dict:
    """A JSON-ready description of the model's candidate layers and totals.

    Per layer: op, weight shape, params, FLOPs per inference, break-even rank (largest rank
    that still stores fewer values than the weight), and with ``spectra`` the ranks keeping
    90% / 99% of the squared singular values. Unsupported layers carry their reason.
    """
    rows = []
    for layer in layers:
        row = {
            "name": layer.name,
            "op": layer.op_type,
            "weight": layer.weight,
            "weight_shape": list(layer.weight_shape),
            "dtype": layer.dtype,
            "params": layer.params,
            "flops": layer.flops,
            "supported": layer.supported,
        }
        if layer.scope:
            row["scope"] = layer.scope
        if len(layer.nodes) > 1:
            row["shared_by"] = list(layer.nodes)
        if layer.supported:
            row["matrix_shape"] = [layer.out_features, layer.in_features]
            row["break_even_rank"] = max(0, math.ceil(layer.break_even_rank) - 1)
            row["full_rank"] = layer.max_rank
            if spectra:
                values = spectrum(weight_matrix(model, layer))
                for level in ENERGY_LEVELS:
                    row[f"rank_energy_{round(level * 100)}"] = values.rank_for_energy(level)
                row["params_at_energy"] = params_by_method(model, layer)
        else:
            row["reason"] = layer.skip.code
            row["detail"] = layer.skip.message
        rows.append(row)
        if on_layer is not None:
            on_layer(layer)
    supported = [layer for layer in layers if layer.supported]
    totals = {
        "model_params": count_params(model),
        "layers": len(layers),
        "layers_supported": len(supported),
        "supported_params": sum(layer.params for layer in supported),
        "supported_flops": (
            sum(layer.flops for layer in supported) if all(layer.flops is not None for layer in supported) else None
        ),
    }
    return {"layers": rows, "totals": totals}
