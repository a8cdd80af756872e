"""Fold pass: rewrite a model's weights so each folded group has k channels instead of C.

Per folded group (see :mod:`onnx_lowrank.fold.merge` for the arithmetic):

- the producer's weight rows, its bias (own C/B input or the bias Add) and the BatchNorm right
  after it shrink to k channels;
- every consumer's input columns shrink to k blocks;
- a Reshape on the path with a constant target shape gets the new channel dimension;
- shape annotations (``value_info``) of the tensors on the path are dropped, since their
  channel dimension changed (shape inference recomputes them).

Every changed tensor is written as a new initializer (named ``<old>.fold``) and only the node
that read the old one is redirected, so tensors shared with unrelated nodes are never changed;
the old tensors are removed once nothing reads them. A weight that is both the producer of one
group and the consumer of another is rewritten once, with both changes. Untouched parts of the
graph stay byte-identical.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.fold.groups import FoldGroup
from onnx_lowrank.fold.merge import BatchNormParams, MergedNeurons, Neurons, merge_columns
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.passes import cleanup
from onnx_lowrank.passes.rewrite import NameAllocator, PassResult, add_initializer

log = logging.getLogger(__name__)

_BN_FIELDS = ("scale", "bias", "mean", "var")  # BatchNormalization inputs 1..4


def read_neurons(model: onnx.ModelProto, group: FoldGroup, layer: Layer) -> Neurons:
    """A foldable group's producer rows, bias and BatchNorm as float64 arrays."""
    root = g.Scope("", model.graph, None)
    node = model.graph.node[group.node_index]
    weight = weight_matrix(model, layer).astype(np.float64)
    alpha = float(g.attribute(node, "alpha", 1.0)) if layer.op_type == "Gemm" else 1.0
    bias = None
    beta = 1.0
    if group.bias is not None:
        stored = _constant(root, group.bias.tensor).astype(np.float64)
        bias = np.broadcast_to(stored.reshape(-1), (group.width,)).copy() if stored.size == 1 else stored.reshape(-1)
        beta = group.bias.scale
    bn = None
    if group.batchnorm is not None:
        bn_node = model.graph.node[group.batchnorm.node_index]
        arrays = {f: _constant(root, bn_node.input[i + 1]).astype(np.float64) for i, f in enumerate(_BN_FIELDS)}
        bn = BatchNormParams(epsilon=group.batchnorm.epsilon, **arrays)
    return Neurons(weight=weight, bias=bias, alpha=alpha, beta=beta, bn=bn)


def apply_folds(
    model: onnx.ModelProto,
    groups: list[FoldGroup],
    layers: list[Layer],
    merged: dict[str, MergedNeurons],
) -> PassResult:
    """A copy of ``model`` with every group named in ``merged`` folded; the input is not modified."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    root = g.Scope("", graph, None)
    names = NameAllocator(result)
    by_name = {layer.name: layer for layer in layers}
    matrices: dict[str, np.ndarray] = {}
    orphaned: set[str] = set()
    dropped_shapes: set[str] = set()

    def matrix(layer_name: str) -> np.ndarray:
        if layer_name not in matrices:
            matrices[layer_name] = weight_matrix(model, by_name[layer_name]).astype(np.float64)
        return matrices[layer_name]

    def replace_input(node_index: int, input_index: int, array: np.ndarray, elem_type: int) -> None:
        node = graph.node[node_index]
        old = node.input[input_index]
        new = names(f"{old}.fold")
        add_initializer(result, graph, new, array, elem_type)
        node.input[input_index] = new
        orphaned.add(old)

    for group in groups:
        change = merged.get(group.name)
        if change is None:
            continue
        matrices[group.name] = change.rows @ matrix(group.name)
        for consumer in group.consumers:
            matrices[consumer.layer] = merge_columns(matrix(consumer.layer), change.columns, consumer.block)
        if group.bias is not None:
            ref = group.bias
            stored = _constant(root, ref.tensor)
            shape = list(ref.shape) if ref.axis is not None else [change.k]
            if ref.axis is not None:
                shape[ref.axis] = change.k
            replace_input(ref.node_index, ref.input_index, change.bias.reshape(shape), _elem_type(stored))
        if group.batchnorm is not None:
            bn_node = graph.node[group.batchnorm.node_index]
            for position, field in enumerate(_BN_FIELDS, start=1):
                stored = _constant(root, bn_node.input[position])
                replace_input(group.batchnorm.node_index, position, getattr(change.bn, field), _elem_type(stored))
        for reshape in group.reshapes:
            target = _constant(root, graph.node[reshape.node_index].input[1]).astype(np.int64).reshape(-1).copy()
            target[reshape.position] = change.k * reshape.block
            replace_input(reshape.node_index, 1, target, onnx.TensorProto.INT64)
        dropped_shapes.update(group.tensors)
        log.info("folded %s: %d -> %d channels", group.name, group.width, change.k)

    for layer_name, array in matrices.items():
        layer = by_name[layer_name]
        node_index = _node_index(graph, layer)
        replace_input(node_index, 1 if layer.form != "left" else 0, _stored(layer, array), getattr(onnx.TensorProto, layer.dtype))
    kept = [v for v in graph.value_info if v.name not in dropped_shapes]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    cleanup.remove_unused(result, orphaned)
    return PassResult(result, bool(merged))


def _stored(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """The canonical (out, in) matrix back in the layer's stored layout."""
    if layer.form == "in_out":
        return matrix.T
    if layer.form == "conv":
        taps = math.prod(layer.weight_shape[2:])
        return matrix.reshape(matrix.shape[0], matrix.shape[1] // taps, *layer.weight_shape[2:])
    return matrix


def _node_index(graph: onnx.GraphProto, layer: Layer) -> int:
    for index, node in enumerate(graph.node):
        if g.node_label(node, index) == layer.nodes[0]:
            return index
    raise KeyError(layer.nodes[0])


def _constant(root: g.Scope, name: str) -> np.ndarray:
    source = g.find_constant(name, root, opset=0)
    if source is None:
        raise KeyError(f"constant {name!r} not found")
    return source.array()


def _elem_type(array: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
