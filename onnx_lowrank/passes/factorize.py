"""Factorize pass: replace each planned layer's weight by low-rank factors.

Rewrites (M is the layer's canonical (out, in) matrix, M ~= L @ R with rank r):

- ``Gemm(x, W, C)``  -> ``MatMul(x, alpha * R^T)`` then ``Gemm(h, L^T, C, beta)`` (or a
  second MatMul when there is no C);
- ``MatMul(x, W)``   -> ``MatMul(MatMul(x, R^T), L^T)``;
- ``MatMul(W, x)``   -> ``MatMul(L, MatMul(R, x))``;
- ``Conv(x, W, b)``  -> ``Conv(x, R as (r, Cin, *k))`` with the original geometry, then a
  1x1 ``Conv(h, L as (Cout, r, 1..1), b)``.

The last node keeps the original output name, so downstream fusions and consumers are
untouched. Factors are stored in the weight's own element type and named after the weight
(``<weight>.lowrank.0`` is applied first). A weight shared by several nodes is factorized once.
Lowerings are looked up in a table keyed by (op type, method): adding a decomposition or an op
type is one function and one entry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.decompose.svd import SVDFactors, truncated_svd
from onnx_lowrank.errors import InputError
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.passes import cleanup, tensor_lowerings
from onnx_lowrank.passes.rewrite import NameAllocator, PassResult, add_initializer, copy_attributes, replace_nodes
from onnx_lowrank.search.plan import LayerDecision, RankPlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoweringContext:
    """What a lowering needs: the model being edited, names, and memoized factor storage."""

    model: onnx.ModelProto
    graph: onnx.GraphProto
    layer: Layer
    names: NameAllocator
    elem_type: int
    _stored: dict = dataclasses.field(default_factory=dict)

    def initializer(self, key: str, array: np.ndarray, elem_type: int | None = None) -> str:
        """Store ``array`` once per ``key`` (in the weight's type unless ``elem_type``); return its name."""
        if key not in self._stored:
            name = self.names(f"{self.layer.weight}.lowrank.{key}")
            add_initializer(self.model, self.graph, name, array, elem_type or self.elem_type)
            self._stored[key] = name
        return self._stored[key]

    def node_name(self, node: onnx.NodeProto, part: int) -> str:
        base = node.name or self.layer.name.rsplit("/", 1)[-1]
        return self.names(f"{base}.lowrank.{part}")

    def hidden(self, node: onnx.NodeProto) -> str:
        return self.names(f"{node.output[0]}.lowrank.hidden")


Lowering = Callable[[LoweringContext, onnx.NodeProto, object], list[onnx.NodeProto]]
Decomposer = Callable[[np.ndarray, Layer, LayerDecision], object]


def _lower_gemm_svd(ctx: LoweringContext, node: onnx.NodeProto, factors: SVDFactors) -> list[onnx.NodeProto]:
    alpha = float(g.attribute(node, "alpha", 1.0))
    first = ctx.initializer(f"0_alpha{alpha:g}" if alpha != 1.0 else "0", factors.right.T * alpha)
    second = ctx.initializer("1", factors.left.T)
    hidden = ctx.hidden(node)
    nodes = [onnx.helper.make_node("MatMul", [node.input[0], first], [hidden], name=ctx.node_name(node, 0))]
    if len(node.input) > 2 and node.input[2]:
        attrs = copy_attributes(node, drop={"alpha", "transA", "transB"})
        nodes.append(
            onnx.helper.make_node(
                "Gemm", [hidden, second, node.input[2]], list(node.output), name=ctx.node_name(node, 1), **attrs
            )
        )
    else:
        nodes.append(onnx.helper.make_node("MatMul", [hidden, second], list(node.output), name=ctx.node_name(node, 1)))
    return nodes


def _lower_matmul_svd(ctx: LoweringContext, node: onnx.NodeProto, factors: SVDFactors) -> list[onnx.NodeProto]:
    hidden = ctx.hidden(node)
    if ctx.layer.form == "left":  # y = M @ x = L @ (R @ x)
        first = ctx.initializer("0", factors.right)
        second = ctx.initializer("1", factors.left)
        return [
            onnx.helper.make_node("MatMul", [first, node.input[1]], [hidden], name=ctx.node_name(node, 0)),
            onnx.helper.make_node("MatMul", [second, hidden], list(node.output), name=ctx.node_name(node, 1)),
        ]
    first = ctx.initializer("0", factors.right.T)
    second = ctx.initializer("1", factors.left.T)
    return [
        onnx.helper.make_node("MatMul", [node.input[0], first], [hidden], name=ctx.node_name(node, 0)),
        onnx.helper.make_node("MatMul", [hidden, second], list(node.output), name=ctx.node_name(node, 1)),
    ]


def _lower_conv_svd(ctx: LoweringContext, node: onnx.NodeProto, factors: SVDFactors) -> list[onnx.NodeProto]:
    kernel_shape = ctx.layer.weight_shape[2:]
    cin = ctx.layer.weight_shape[1]
    rank = factors.rank
    first = ctx.initializer("0", factors.right.reshape(rank, cin, *kernel_shape))
    second = ctx.initializer("1", factors.left.reshape(ctx.layer.weight_shape[0], rank, *([1] * len(kernel_shape))))
    hidden = ctx.hidden(node)
    first_attrs = copy_attributes(node)
    inputs = [hidden, second] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    return [
        onnx.helper.make_node("Conv", [node.input[0], first], [hidden], name=ctx.node_name(node, 0), **first_attrs),
        onnx.helper.make_node(
            "Conv", inputs, list(node.output), name=ctx.node_name(node, 1), kernel_shape=[1] * len(kernel_shape)
        ),
    ]


def _decompose_svd(matrix: np.ndarray, layer: Layer, decision: LayerDecision) -> SVDFactors:
    del layer
    return truncated_svd(matrix, decision.rank)


# Methods whose factors need per-run data (calibration covariances): the caller passes their
# decomposer to :func:`factorize`; they lower like the method they produce factors for.
DATA_DEPENDENT = {"svd-whitened": "svd"}

DECOMPOSERS: dict[str, Decomposer] = {"svd": _decompose_svd, **tensor_lowerings.DECOMPOSERS}
LOWERINGS: dict[tuple[str, str], Lowering] = {
    ("Gemm", "svd"): _lower_gemm_svd,
    ("MatMul", "svd"): _lower_matmul_svd,
    ("Conv", "svd"): _lower_conv_svd,
    **tensor_lowerings.LOWERINGS,
}
for _method, _base in DATA_DEPENDENT.items():
    for _op in ("Gemm", "MatMul", "Conv"):
        LOWERINGS[(_op, _method)] = LOWERINGS[(_op, _base)]


@dataclasses.dataclass(frozen=True)
class FactorizeReport:
    """What the pass did: the decisions it applied and the ones it could not, with reasons."""

    applied: dict[str, LayerDecision]
    not_applied: dict[str, str]
    stored_values: dict[str, int] = dataclasses.field(default_factory=dict)  # per layer, in its factors


def factorize(
    model: onnx.ModelProto,
    layers: list[Layer],
    plan: RankPlan,
    *,
    on_layer: Callable[[Layer], None] | None = None,
    decomposers: dict[str, Decomposer] | None = None,
) -> tuple[PassResult, FactorizeReport]:
    """Apply ``plan`` to a copy of ``model``; the input model is not modified.

    ``decomposers`` adds data-dependent methods (e.g. ``svd-whitened`` with the calibration
    covariances) to the built-in table.

    Raises :class:`InputError` when the plan asks for an impossible rank or an unknown
    method; layers the plan names but the model lacks (or cannot factorize) are reported in
    ``not_applied`` rather than failing, so a plan can be re-applied to a re-export.
    """
    available = {**DECOMPOSERS, **(decomposers or {})}
    by_name = {layer.name: layer for layer in layers}
    applied: dict[str, LayerDecision] = {}
    not_applied: dict[str, str] = {}
    stored_values: dict[str, int] = {}
    work: list[tuple[Layer, LayerDecision]] = []
    for name, decision in plan.factorized().items():
        layer = by_name.get(name)
        if layer is None:
            not_applied[name] = "layer_not_found"
            continue
        if not layer.supported:
            not_applied[name] = layer.skip.code
            continue
        _validate_decision(layer, decision, available)
        work.append((layer, decision))

    result = onnx.ModelProto()
    result.CopyFrom(model)
    names = NameAllocator(result)
    scopes = {scope.path: scope for scope in g.iter_scopes(result)}
    labels = {
        path: {g.node_label(node, i): i for i, node in enumerate(scope.graph.node)}
        for path, scope in scopes.items()
    }
    replacements: dict[str, dict[int, list[onnx.NodeProto]]] = {path: {} for path in scopes}
    orphaned: set[str] = set()
    for layer, decision in work:
        scope = scopes[layer.scope]
        factors = available[decision.method](weight_matrix(result, layer), layer, decision)
        ctx = LoweringContext(
            model=result,
            graph=scope.graph,
            layer=layer,
            names=names,
            elem_type=getattr(onnx.TensorProto, layer.dtype),
        )
        lowering = LOWERINGS[(layer.op_type, decision.method)]
        for node_name in layer.nodes:
            label = node_name[len(layer.scope) + 1 :] if layer.scope else node_name
            index = labels[layer.scope][label]
            replacements[layer.scope][index] = lowering(ctx, scope.graph.node[index], factors)
            orphaned.update(scope.graph.node[index].input)  # the weight, under whichever alias it read
        applied[layer.name] = decision
        stored_values[layer.name] = int(factors.params)
        log.info("factorized %s (%s) at rank %s", layer.name, decision.method, decision.rank or decision.ranks)
        if on_layer is not None:
            on_layer(layer)
    # Children before parents: rebuilding a parent's node list copies its subgraphs.
    for path in sorted(scopes, key=lambda p: p.count("/") if p else -1, reverse=True):
        replace_nodes(scopes[path].graph, replacements[path])
    cleanup.remove_unused(result, orphaned)
    return PassResult(result, bool(applied)), FactorizeReport(applied, not_applied, stored_values)


def _validate_decision(layer: Layer, decision: LayerDecision, available: dict[str, Decomposer]) -> None:
    if decision.method in DATA_DEPENDENT and decision.method not in available:
        raise InputError(
            f"plan layer {layer.name}: method {decision.method} needs the calibration data the plan was made "
            "with (give --calib)"
        )
    if decision.method not in available:
        known = ", ".join(sorted(available))
        raise InputError(f"plan layer {layer.name}: unknown method {decision.method!r} (known: {known})")
    if (layer.op_type, decision.method) not in LOWERINGS:
        raise InputError(f"plan layer {layer.name}: method {decision.method} cannot lower a {layer.op_type}")
    if DATA_DEPENDENT.get(decision.method, decision.method) != "svd":
        if not decision.ranks:
            raise InputError(f"plan layer {layer.name}: {decision.method} needs \"ranks\"")
    else:
        if decision.rank is None:
            raise InputError(f"plan layer {layer.name}: svd needs a \"rank\"")
        if decision.rank > layer.max_rank:
            raise InputError(
                f"plan layer {layer.name}: rank {decision.rank} exceeds its full rank {layer.max_rank}"
            )
