"""Shared plumbing for graph rewrites: unique names, new initializers, node replacement.

Rewrites edit a copy of the ONNX protobuf directly, so every part of the graph they do not
touch (node order, value_info, metadata, doc strings, legacy graph inputs) stays byte-identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank import graph as g


@dataclasses.dataclass(frozen=True)
class PassResult:
    """The rewritten model and whether anything changed (onnx-ir's pass convention)."""

    model: onnx.ModelProto
    modified: bool


class NameAllocator:
    """Hands out tensor and node names that do not clash with any name in the model."""

    def __init__(self, model: onnx.ModelProto):
        self._taken: set[str] = set()
        for scope in g.iter_scopes(model):
            graph = scope.graph
            self._taken.update(i.name for i in graph.initializer)
            self._taken.update(v.name for v in graph.input)
            self._taken.update(v.name for v in graph.output)
            self._taken.update(v.name for v in graph.value_info)
            for node in graph.node:
                self._taken.add(node.name)
                self._taken.update(node.output)
                self._taken.update(node.input)

    def __call__(self, hint: str) -> str:
        name, suffix = hint, 1
        while name in self._taken:
            suffix += 1
            name = f"{hint}_{suffix}"
        self._taken.add(name)
        return name


def add_initializer(
    model: onnx.ModelProto, graph: onnx.GraphProto, name: str, array: np.ndarray, elem_type: int
) -> None:
    """Store ``array`` as an initializer of ``graph`` in ONNX type ``elem_type``.

    In IR version < 4 every initializer must also be a graph input, so it is declared there
    too (always in the main graph: a subgraph's inputs have a meaning of their own).
    """
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    tensor = numpy_helper.from_array(np.ascontiguousarray(array.astype(np_type)), name)
    if model.ir_version < 4:
        graph = model.graph
        graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, array.shape))
    graph.initializer.append(tensor)


def replace_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace the node at each index by its list of nodes, keeping the graph's order.

    Rebuilding the repeated field copies the nodes, so callers must rewrite subgraphs before
    the graphs that contain them.
    """
    if not replacements:
        return
    rebuilt: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        rebuilt.extend(replacements.get(index, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)


def copy_attributes(node: onnx.NodeProto, *, drop: set[str] = frozenset()) -> dict:
    """A node's attributes as keyword arguments for ``onnx.helper.make_node``."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}
