"""Cleanup pass: drop the weights a rewrite orphaned, and the Constant/Identity/Transpose nodes behind them.

Only tensors the rewrite names are considered, so unrelated parts of the graph (even dead
ones the exporter left) stay exactly as they were.
"""

from __future__ import annotations

import logging

import onnx

from onnx_lowrank import graph as g

log = logging.getLogger(__name__)

_PASS_THROUGH = {"Constant", "Identity", "Transpose"}


def remove_unused(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """Remove every tensor in ``names`` that nothing reads any more; return what was removed.

    An unread initializer is deleted (with its legacy graph-input entry); an unread
    Constant/Identity output deletes that node and, for Identity, re-examines its input.
    """
    removed: set[str] = set()
    pending = set(names)
    while pending:
        name = pending.pop()
        if _is_read(model, name):
            continue
        for scope in g.iter_scopes(model):
            graph = scope.graph
            for index, init in enumerate(graph.initializer):
                if init.name == name:
                    del graph.initializer[index]
                    _drop_graph_input(graph, name)
                    removed.add(name)
                    break
            for index, node in enumerate(graph.node):
                if node.op_type in _PASS_THROUGH and list(node.output) == [name]:
                    if node.op_type in ("Identity", "Transpose"):
                        pending.add(node.input[0])
                    del graph.node[index]
                    removed.add(name)
                    break
    if removed:
        log.debug("removed %d orphaned tensors", len(removed))
    return removed


def _is_read(model: onnx.ModelProto, name: str) -> bool:
    for scope in g.iter_scopes(model):
        if any(o.name == name for o in scope.graph.output):
            return True
        if any(name in node.input for node in scope.graph.node):
            return True
    return False


def _drop_graph_input(graph: onnx.GraphProto, name: str) -> None:
    for index, value in enumerate(graph.input):
        if value.name == name:
            del graph.input[index]
            return
