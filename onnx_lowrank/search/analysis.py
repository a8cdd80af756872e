"""Per-layer spectral analysis shared by every SVD-based search.

The singular values of each candidate layer are computed once and reused by the allocation,
so one analysis can serve budgets of any size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import onnx

from onnx_lowrank.decompose.svd import Spectrum, spectrum
from onnx_lowrank.layers import Layer, weight_matrix


@dataclasses.dataclass(frozen=True)
class LayerAnalysis:
    """A candidate layer and the singular values of its canonical matrix."""

    layer: Layer
    spectrum: Spectrum


def candidate_layers(layers: Iterable[Layer], *, min_params: int) -> list[Layer]:
    """Supported layers with at least ``min_params`` weight values."""
    return [layer for layer in layers if layer.supported and layer.params >= min_params]


def analyze(
    model: onnx.ModelProto,
    layers: Iterable[Layer],
    *,
    on_layer: Callable[[Layer], None] | None = None,
) -> list[LayerAnalysis]:
    """Singular values of every given layer, in order; ``on_layer`` is called after each."""
    results = []
    for layer in layers:
        results.append(LayerAnalysis(layer, spectrum(weight_matrix(model, layer))))
        if on_layer is not None:
            on_layer(layer)
    return results
