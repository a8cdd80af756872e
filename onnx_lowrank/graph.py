"""Read-only views of an ONNX graph: scopes, constants, producers and consumers.

Real exports keep weights in initializers, in ``Constant`` nodes, behind ``Identity`` nodes,
inside ``If``/``Loop``/``Scan`` subgraphs, and (legacy IR 3) list them as graph inputs. This
module hides those forms behind one lookup so the layer finder and the rewrite passes never
care where a weight lives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

# Node types whose output is a constant tensor we can read.
_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


@dataclasses.dataclass(frozen=True)
class Scope:
    """One graph of the model: the main graph ("") or a subgraph ("If_0/then_branch")."""

    path: str
    graph: onnx.GraphProto
    parent: Scope | None


@dataclasses.dataclass(frozen=True)
class ConstantSource:
    """Where a constant tensor lives: an initializer or a ``Constant`` node's attribute."""

    name: str  # the tensor name consumers refer to (after following Identity nodes)
    stored_name: str  # the initializer or Constant-node output that holds the data
    kind: str  # "initializer" | "constant_node"
    scope: Scope
    is_graph_input: bool
    transposed: bool = False  # reached through a 2-D Transpose: the stored tensor is its transpose

    def array(self) -> np.ndarray:
        """The tensor's values as a numpy array (a copy; the model is not modified)."""
        stored = self._stored_array()
        return stored.T if self.transposed else stored

    def _stored_array(self) -> np.ndarray:
        if self.kind == "initializer":
            for init in self.scope.graph.initializer:
                if init.name == self.stored_name:
                    return numpy_helper.to_array(init)
        for node in self.scope.graph.node:
            if node.op_type == "Constant" and node.output[0] == self.stored_name:
                return constant_node_value(node)
        raise KeyError(self.stored_name)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a ``Constant`` node as a numpy array."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise ValueError(f"Constant node {node.name!r} has no supported value attribute")


def iter_scopes(model: onnx.ModelProto) -> Iterator[Scope]:
    """Every graph of the model, main graph first, then subgraphs depth-first."""
    root = Scope("", model.graph, None)
    yield root
    yield from _iter_subscopes(root)


def _iter_subscopes(scope: Scope) -> Iterator[Scope]:
    for index, node in enumerate(scope.graph.node):
        for attr in node.attribute:
            subgraphs = []
            if attr.type == onnx.AttributeProto.GRAPH:
                subgraphs = [attr.g]
            elif attr.type == onnx.AttributeProto.GRAPHS:
                subgraphs = list(attr.graphs)
            for sub_index, sub in enumerate(subgraphs):
                label = node.name or f"{node.op_type}_{index}"
                suffix = attr.name if len(subgraphs) == 1 else f"{attr.name}[{sub_index}]"
                child = Scope(f"{scope.path}/{label}/{suffix}".lstrip("/"), sub, scope)
                yield child
                yield from _iter_subscopes(child)


def find_constant(name: str, scope: Scope, *, opset: int) -> ConstantSource | None:
    """Resolve ``name`` to a constant visible from ``scope``, following Identity nodes and
    2-D Transposes (``x @ W.T`` exported without constant folding).

    Looks in the scope itself, then in the enclosing scopes (subgraphs may use outer
    weights). Returns None when the tensor is computed at run time.
    """
    del opset  # kept for handlers that will need opset-dependent constant forms
    current: Scope | None = scope
    while current is not None:
        graph = current.graph
        graph_inputs = {i.name for i in graph.input}
        for init in graph.initializer:
            if init.name == name:
                return ConstantSource(name, name, "initializer", current, name in graph_inputs)
        for node in graph.node:
            if name not in node.output:
                continue
            if node.op_type == "Constant" and any(
                a.name in _CONSTANT_VALUE_ATTRS for a in node.attribute
            ):
                return ConstantSource(name, name, "constant_node", current, False)
            if node.op_type == "Identity":
                inner = find_constant(node.input[0], current, opset=0)
                if inner is None:
                    return None
                return dataclasses.replace(inner, name=name)
            if node.op_type == "Transpose" and list(attribute(node, "perm", [1, 0])) == [1, 0]:
                inner = find_constant(node.input[0], current, opset=0)
                if inner is None or inner.array().ndim != 2:
                    return None
                return dataclasses.replace(inner, name=name, transposed=not inner.transposed)
            return None  # produced by a computing node: not a constant
        if name in graph_inputs:
            return None
        current = current.parent
    return None


def consumers_by_name(model: onnx.ModelProto) -> dict[str, list[tuple[Scope, onnx.NodeProto]]]:
    """Map each tensor name to every node (in any scope) that reads it."""
    users: dict[str, list[tuple[Scope, onnx.NodeProto]]] = {}
    for scope in iter_scopes(model):
        for node in scope.graph.node:
            for name in node.input:
                if name:
                    users.setdefault(name, []).append((scope, node))
    return users


def graph_output_names(model: onnx.ModelProto) -> set[str]:
    """Names of the outputs of every graph (a subgraph's outputs are read by its parent node)."""
    return {o.name for scope in iter_scopes(model) for o in scope.graph.output}


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset for ``domain`` ("" and "ai.onnx" are the same domain)."""
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def attribute(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's Python value, or ``default`` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or a stable stand-in for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"
