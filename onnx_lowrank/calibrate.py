"""Feed calibration inputs through onnxruntime and capture what calibrated searches need.

- :func:`load_calibration` / :func:`random_calibration`: the inputs, as a
  :class:`~onnx_lowrank.validate.data.Dataset` (read and matched to the model's inputs by
  :mod:`onnx_lowrank.validate.data`, like ``validate --data``) whose ``sha256`` plans record.
- :func:`capture_covariances`: each candidate layer's input covariance ``C = X^T X / n``
  (``X`` = one row per token, per output position of a Conv as its im2col patch), accumulated
  batch by batch in float64 so memory stays bounded by one batch's activations.
- :class:`OutputProbe`: runs the model with chosen weights overridden (one session, the
  weights fed as inputs) and measures how far the outputs move: the measured sensitivity.

Sessions are :class:`onnx_lowrank.validate.capture.CaptureSession` on the CPU provider.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.layers import Layer, weight_source
from onnx_lowrank.validate.capture import CaptureSession
from onnx_lowrank.validate.data import Dataset, load_dataset, random_dataset
from onnx_lowrank.validate.runtime import input_specs

log = logging.getLogger(__name__)

_ROWS_PER_CHUNK = 1 << 16  # rows of X multiplied at once when accumulating X^T X


# ---------------------------------------------------------------------------------------------
# calibration data


def load_calibration(
    path: str | os.PathLike,
    model: onnx.ModelProto,
    *,
    input_map: dict[str, str] | None = None,
    flag: str = "--calib",
) -> Dataset:
    """Read a ``.npz`` of calibration inputs matched to ``model``'s inputs (labels dropped).

    The matching, casting and error rules are :func:`onnx_lowrank.validate.data.load_dataset`'s;
    errors name ``flag``. Which array each input took is logged.
    """
    data = load_dataset(path, input_specs(model), input_map=input_map, want_labels=False, flag=flag)
    for note in data.notes:
        log.info("calibration: %s", note)
    return data


def random_calibration(
    model: onnx.ModelProto,
    samples: int,
    *,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Dataset:
    """``samples`` seeded random inputs (:func:`onnx_lowrank.validate.data.random_dataset`).

    A weak proxy for real data (the activations' covariance is what calibration measures).
    """
    return random_dataset(input_specs(model), samples, shapes=input_shapes, seed=seed, flag="--calib-random")


# ---------------------------------------------------------------------------------------------
# covariance capture


def activation_name(node: onnx.NodeProto, layer: Layer) -> str:
    """The tensor a layer's weight multiplies: x in x @ W, Gemm(x, W), Conv(x, W); W @ x's x."""
    return node.input[1] if layer.form == "left" else node.input[0]


def layer_nodes(model: onnx.ModelProto, layer: Layer) -> list[onnx.NodeProto]:
    """The nodes of a main-graph layer (empty for layers inside subgraphs)."""
    if layer.scope:
        return []
    labels = {g.node_label(node, i): node for i, node in enumerate(model.graph.node)}
    return [labels[name] for name in layer.nodes if name in labels]


def capture_covariances(
    model: onnx.ModelProto,
    layers: list[Layer],
    data: Dataset,
    *,
    batch_size: int = 32,
    on_batch: Callable[..., None] | None = None,
) -> dict[str, np.ndarray]:
    """Input covariance ``X^T X / n`` (float64, (in, in)) of each layer, keyed by layer name.

    ``X`` stacks every vector the canonical matrix multiplies: tokens of a MatMul/Gemm input
    (all leading dimensions flattened), columns of ``W @ x``, im2col patches of a Conv in the
    kernel's (Cin, *k) order. Layers inside subgraphs are not captured (absent from the result).
    """
    wanted: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
    for layer in layers:
        nodes = layer_nodes(model, layer)
        if nodes:
            wanted[layer.name] = [(node, activation_name(node, layer)) for node in nodes]
        else:
            log.info("calibration: %s is inside a subgraph; its covariance is not captured", layer.name)
    by_name = {layer.name: layer for layer in layers}
    tensors = sorted({name for pairs in wanted.values() for _, name in pairs})
    session = CaptureSession(model, tensors, label="calibration capture")
    sums = {name: np.zeros((by_name[name].in_features,) * 2) for name in wanted}
    counts = dict.fromkeys(wanted, 0)
    for fetched in session.batches(data, batch_size):
        for name, pairs in wanted.items():
            for node, tensor in pairs:
                rows = activation_rows(fetched[tensor], node, by_name[name])
                _accumulate(sums[name], rows)
                counts[name] += rows.shape[0]
        if on_batch is not None:
            on_batch()
    return {name: sums[name] / max(counts[name], 1) for name in wanted}


def activation_rows(x: np.ndarray, node: onnx.NodeProto, layer: Layer) -> np.ndarray:
    """The vectors (one per row) that the layer's canonical matrix multiplies."""
    x = np.asarray(x)
    n = layer.in_features
    if layer.op_type == "Conv":
        return conv_patches(x, node, layer.weight_shape)
    if layer.form == "left":  # W @ x: x is (..., n, T); every column is one vector
        return np.swapaxes(x.reshape(-1, n, x.shape[-1]), 1, 2).reshape(-1, n)
    return x.reshape(-1, n)


def conv_patches(x: np.ndarray, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> np.ndarray:
    """im2col: one row per output position, ``Cin * prod(kernel)`` values in the kernel's order."""
    kernel = tuple(weight_shape[2:])
    spatial = x.shape[2:]
    dims = len(kernel)
    strides = tuple(g.attribute(node, "strides", None) or (1,) * dims)
    dilations = tuple(g.attribute(node, "dilations", None) or (1,) * dims)
    begins, ends = _conv_pads(node, spatial, kernel, strides, dilations)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begins, ends)])
    out = [
        (padded.shape[2 + d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1 for d in range(dims)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(offset[d] * dilations[d], offset[d] * dilations[d] + strides[d] * (out[d] - 1) + 1, strides[d])
            for d in range(dims)
        )
        slices.append(padded[(slice(None), slice(None), *index)])
    stacked = np.stack(slices, axis=2)  # (B, Cin, K, *out)
    order = (0, *range(3, 3 + dims), 1, 2)  # (B, *out, Cin, K)
    return np.transpose(stacked, order).reshape(-1, x.shape[1] * len(slices))


def _conv_pads(node, spatial, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    dims = len(kernel)
    auto_pad = g.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for d in range(dims):
            out = -(-spatial[d] // strides[d])
            total = max((out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - spatial[d], 0)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins, ends
    if auto_pad == "VALID":
        return [0] * dims, [0] * dims
    pads = list(g.attribute(node, "pads", None) or [0] * (2 * dims))
    return pads[:dims], pads[dims:]


def _accumulate(total: np.ndarray, rows: np.ndarray) -> None:
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = rows[start : start + _ROWS_PER_CHUNK].astype(np.float64)
        total += chunk.T @ chunk


# ---------------------------------------------------------------------------------------------
# measured sensitivity


class OutputProbe:
    """The model's outputs on calibration data, and how far they move when weights change.

    One onnxruntime session serves every measurement: the candidate layers' weights are made
    overridable graph inputs, so substituting a layer's weight is a feed, not a new model.
    Layers whose weight is not a main-graph initializer cannot be substituted
    (:meth:`can_substitute` is False).
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], data: Dataset, *, batch_size: int = 64):
        self._weights: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        for layer in layers:
            source = weight_source(model, layer)
            if source.kind != "initializer" or source.scope.path != "" or source.transposed:
                continue  # only a main-graph initializer stored as the layer reads it can be fed
            self._weights[layer.name] = (source.stored_name, layer.form, layer.weight_shape)
        outputs = [o.name for o in model.graph.output]
        overridable = sorted({stored for stored, _, _ in self._weights.values()})
        self._session = CaptureSession(model, outputs, overridable=overridable, label="calibration probe")
        self._batches = [feeds for feeds, _ in data.batches(batch_size)]
        self._reference = [self._run(batch, {}) for batch in self._batches]
        self._norm = sum(_sq_norm(y) for outs in self._reference for y in outs) or 1.0
        self.runs = 0

    def _run(self, batch: dict[str, np.ndarray], overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        fetched = self._session.run(batch, overrides)
        return [fetched[name] for name in self._session.tensors]

    def can_substitute(self, layer_name: str) -> bool:
        return layer_name in self._weights

    @property
    def output_names(self) -> list[str]:
        """The model's output names, in the order :meth:`outputs` returns them."""
        return list(self._session.tensors)

    def reference(self) -> dict[str, np.ndarray]:
        """The unmodified model's outputs on every probe sample (batches concatenated)."""
        return _concatenate(self.output_names, self._reference)

    def outputs(self, substitutions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs on every probe sample (batches concatenated) with the layers'
        canonical (out, in) matrices replaced by ``substitutions``; counts as one run."""
        overrides = self._overrides(substitutions)
        results = [self._run(batch, overrides) for batch in self._batches]
        self.runs += 1
        return _concatenate(self.output_names, results)

    def _overrides(self, substitutions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Canonical (out, in) matrices as the stored weights they replace."""
        overrides = {}
        for name, matrix in substitutions.items():
            stored, form, shape = self._weights[name]
            overrides[stored] = (matrix.T if form == "in_out" else matrix).reshape(shape)
        return overrides

    def relative_error(self, substitutions: dict[str, np.ndarray]) -> float:
        """``sum ||y - y0||^2 / sum ||y0||^2`` over every output and sample, with the layers'
        canonical (out, in) matrices replaced by ``substitutions``."""
        overrides = self._overrides(substitutions)
        total = 0.0
        for batch, reference in zip(self._batches, self._reference):
            outputs = self._run(batch, overrides)
            total += sum(_sq_norm(y - y0) for y, y0 in zip(outputs, reference))
        self.runs += 1
        return float(total / self._norm)


def _concatenate(names: list[str], batches: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([np.atleast_1d(b[i]) for b in batches], axis=0) for i, name in enumerate(names)}


def _sq_norm(array: np.ndarray) -> float:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return 0.0
    return float(np.sum(np.square(array.astype(np.float64))))
