"""Find the layers whose constant weights can be factorized.

Every layer is described by a canonical matrix view ``M`` of shape (out, in) with
``y = M @ x`` per token (a Conv kernel (Cout, Cin, *k) is viewed as (Cout, Cin * prod(k))), so
that the decompositions never see ONNX. A layer that cannot be factorized is still returned,
with a :class:`Skip` reason that ``inspect`` and the report show.

One describer per op type lives in ``_DESCRIBERS``; adding an op type is one function and one
table entry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.shapes import Shape, infer_shapes

log = logging.getLogger(__name__)

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
QUANTIZED_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm"}
QUANTIZED_PRODUCERS = {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}


@dataclasses.dataclass(frozen=True)
class Skip:
    """Why a layer is left alone: a stable code (for tests and tools) and a sentence."""

    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class Layer:
    """A candidate layer: one weight tensor and the node(s) that use it.

    Attributes:
        name: the first consuming node's name (unique in the model); the key in plans.
        op_type: "Gemm", "MatMul" or "Conv" (or the unsupported op it is).
        scope: "" for the main graph, else the subgraph path.
        nodes: names of every node that uses this weight in the same role.
        weight: tensor name of the weight, None if it has none.
        form: how the canonical matrix maps onto the stored weight:
            "out_in" (stored as (out, in): Gemm transB=1), "in_out" (stored (in, out): Gemm
            transB=0, MatMul x @ W), "left" (MatMul W @ x, stored (out, in)), "conv".
        weight_shape: the stored weight's shape.
        dtype: the weight's ONNX element type name ("FLOAT", "FLOAT16", ...).
        out_features, in_features: the canonical matrix shape (m, n).
        params: weight elements (bias excluded).
        flops: floating-point operations per inference (2 x multiply-adds) of all nodes that
            share the weight, for the pinned input shapes; None when shapes are unknown.
        tokens: how many input vectors the weight is applied to per inference (flops /
            (2 * params)); None when unknown.
        skip: why it cannot be factorized, or None.
    """

    name: str
    op_type: str
    scope: str
    nodes: tuple[str, ...]
    weight: str | None
    form: str
    weight_shape: tuple[int, ...]
    dtype: str
    out_features: int
    in_features: int
    params: int
    flops: int | None
    tokens: int | None
    skip: Skip | None = None

    @property
    def supported(self) -> bool:
        return self.skip is None

    @property
    def max_rank(self) -> int:
        """Full rank of the canonical matrix: min(out, in)."""
        return min(self.out_features, self.in_features)

    @property
    def break_even_rank(self) -> float:
        """Rank at which the two factors hold as many values as the weight: m*n/(m+n).

        A rank r pays only when r < break_even_rank.
        """
        m, n = self.out_features, self.in_features
        return m * n / (m + n) if m + n else 0.0

    def factor_params(self, rank: int) -> int:
        """Values stored by an SVD factorization at ``rank``: r * (m + n)."""
        return rank * (self.out_features + self.in_features)

    def factor_flops(self, rank: int) -> int | None:
        """FLOPs of the factorized layer at ``rank`` (2 * tokens * r * (m + n))."""
        if self.tokens is None:
            return None
        return 2 * self.tokens * self.factor_params(rank)


@dataclasses.dataclass
class _Context:
    model: onnx.ModelProto
    opset: int
    shapes: dict[str, Shape]
    treat_inputs_as_constants: bool


_Described = tuple[str | None, str, tuple[int, int], int | None] | Skip
# (weight name, form, (out, in), tokens) or a Skip.


def find_layers(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    treat_inputs_as_constants: bool = False,
) -> list[Layer]:
    """Every Gemm / MatMul / Conv (and quantized look-alike) of the model, in graph order.

    ``input_shapes`` pins dynamic input dimensions for FLOP counts (default 1).
    ``treat_inputs_as_constants``: factorize weights that are also graph inputs in models of
    IR version >= 4 (where that marks a weight the caller may override at run time). In IR 3
    every initializer had to be listed as an input, so there they count as constants anyway.
    """
    ctx = _Context(
        model=model,
        opset=g.opset_version(model),
        shapes=infer_shapes(model, input_shapes),
        treat_inputs_as_constants=treat_inputs_as_constants or model.ir_version < 4,
    )
    candidates: list[tuple[g.Scope, onnx.NodeProto, str, _Described]] = []
    for scope in g.iter_scopes(model):
        for index, node in enumerate(scope.graph.node):
            describer = _DESCRIBERS.get(node.op_type)
            if describer is None:
                continue
            label = g.node_label(node, index)
            name = f"{scope.path}/{label}" if scope.path else label
            candidates.append((scope, node, name, describer(node, scope, ctx)))
    return _group_shared_weights(candidates, g.consumers_by_name(model), ctx)


def weight_matrix(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    """The layer's canonical (out, in) matrix as a float array in the weight's own dtype."""
    source = weight_source(model, layer)
    array = source.array()
    if layer.form == "in_out":
        return array.T
    if layer.form == "conv":
        return array.reshape(array.shape[0], -1)
    return array


def weight_source(model: onnx.ModelProto, layer: Layer) -> g.ConstantSource:
    """Where the layer's weight is stored."""
    for scope in g.iter_scopes(model):
        if scope.path == layer.scope:
            source = g.find_constant(layer.weight, scope, opset=0)
            if source is not None:
                return source
    raise KeyError(f"weight {layer.weight!r} of layer {layer.name!r} not found")


def _group_shared_weights(candidates, users, ctx: _Context) -> list[Layer]:
    """One Layer per weight: nodes sharing a weight in the same role become one layer."""
    by_weight: dict[tuple[str, str], list] = {}
    layers: list[Layer] = []
    order: list[tuple[str, str] | int] = []
    for position, (scope, node, name, described) in enumerate(candidates):
        if isinstance(described, Skip) or described[0] is None:
            order.append(position)
            continue
        # Exporters alias deduplicated weights through Identity: one stored weight, one layer.
        key = (scope.path, _identity_root(described[0], scope))
        if key not in by_weight:
            order.append(key)
        by_weight.setdefault(key, []).append((scope, node, name, described))
    for entry in order:
        if isinstance(entry, int):
            scope, node, name, described = candidates[entry]
            layers.append(_unsupported_layer(node, name, scope, described, ctx))
            continue
        group = by_weight[entry]
        layers.append(_shared_layer(group, users, ctx))
    return layers


def _shared_layer(group, users, ctx: _Context) -> Layer:
    scope, node, name, (weight, form, (m, n), tokens) = group[0]
    source = g.find_constant(weight, scope, opset=ctx.opset)
    weight_proto_type, weight_shape = _constant_type_and_shape(source)
    total_tokens = None
    if all(d[3] is not None for _, _, _, d in group):
        total_tokens = sum(d[3] for _, _, _, d in group)
    params = int(np.prod(weight_shape)) if weight_shape else 0
    skip = None
    forms = {(d[1], d[2]) for _, _, _, d in group}
    # Readers of the weight, or of what it is derived from (Identity / Transpose chain), other
    # than this group and that chain: e.g. a Gather on a tied embedding table.
    chain_names, chain_nodes = [], []
    for alias in dict.fromkeys(d[0] for _, _, _, d in group):
        names, nodes = _pass_through_chain(alias, scope)
        chain_names += names
        chain_nodes += nodes
    known = {_node_key(n) for _, n, _, _ in group} | {_node_key(n) for n in chain_nodes}
    other_users = [
        user for name in chain_names for _, user in users.get(name, []) if _node_key(user) not in known
    ]
    if len(forms) > 1:
        skip = Skip("shared_weight_conflict", f"weight {weight} is used in different layouts by {len(group)} nodes")
    elif other_users:
        ops = sorted({u.op_type for u in other_users})
        skip = Skip(
            "shared_weight_other_use",
            f"weight {weight} is also read by {', '.join(ops)}; factorizing it would change that use",
        )
    elif source.is_graph_input and not ctx.treat_inputs_as_constants:
        skip = Skip(
            "weight_is_graph_input",
            f"weight {weight} is also a graph input and may be overridden at run time "
            "(pass --inputs-as-constants to factorize it anyway)",
        )
    elif weight_proto_type not in FLOAT_TYPES:
        skip = Skip("unsupported_dtype", f"weight {weight} is {_type_name(weight_proto_type)}, not a float type")
    flops = 2 * total_tokens * params if total_tokens is not None else None
    return Layer(
        name=name,
        op_type=node.op_type,
        scope=scope.path,
        nodes=tuple(n for _, _, n, _ in group),
        weight=weight,
        form=form,
        weight_shape=tuple(weight_shape),
        dtype=_type_name(weight_proto_type),
        out_features=m,
        in_features=n,
        params=params,
        flops=flops,
        tokens=total_tokens,
        skip=skip,
    )


def _node_key(node: onnx.NodeProto) -> tuple:
    return node.op_type, tuple(node.input), tuple(node.output)


def _pass_through_chain(name: str, scope: g.Scope) -> tuple[list[str], list[onnx.NodeProto]]:
    """The tensor names from ``name`` back to its stored constant through Identity/Transpose."""
    names, nodes = [name], []
    producer = _producer(name, scope)
    while producer is not None and producer.op_type in ("Identity", "Transpose"):
        nodes.append(producer)
        names.append(producer.input[0])
        producer = _producer(producer.input[0], scope)
    return names, nodes


def _identity_root(name: str, scope: g.Scope) -> str:
    """The tensor an Identity chain ending in ``name`` starts from (``name`` itself if none)."""
    producer = _producer(name, scope)
    while producer is not None and producer.op_type == "Identity":
        name = producer.input[0]
        producer = _producer(name, scope)
    return name


def _unsupported_layer(node, name, scope, skip: Skip, ctx: _Context) -> Layer:
    shape: tuple[int, ...] = ()
    dtype = ""
    weight_index = 0 if node.op_type == "MatMul" else 1
    weight = node.input[weight_index] if len(node.input) > weight_index else None
    if node.op_type in {"QLinearConv", "QLinearMatMul"}:
        weight = node.input[3] if len(node.input) > 3 else None
    source = g.find_constant(weight, scope, opset=ctx.opset) if weight else None
    if source is not None:
        proto_type, shape = _constant_type_and_shape(source)
        dtype = _type_name(proto_type)
    elif weight in ctx.shapes:
        shape = tuple(d or 0 for d in ctx.shapes[weight])
    params = int(np.prod(shape)) if shape else 0
    m = shape[0] if shape else 0
    n = params // m if m else 0
    return Layer(
        name=name,
        op_type=node.op_type,
        scope=scope.path,
        nodes=(name,),
        weight=weight,
        form="",
        weight_shape=tuple(shape),
        dtype=dtype,
        out_features=m,
        in_features=n,
        params=params,
        flops=None,
        tokens=None,
        skip=skip,
    )


def _constant_type_and_shape(source: g.ConstantSource) -> tuple[int, tuple[int, ...]]:
    """Element type and (logical, i.e. after any Transpose) shape of a constant, without copying it."""
    proto_type, dims = _stored_type_and_shape(source)
    return proto_type, tuple(reversed(dims)) if source.transposed else dims


def _stored_type_and_shape(source: g.ConstantSource) -> tuple[int, tuple[int, ...]]:
    graph = source.scope.graph
    if source.kind == "initializer":
        for init in graph.initializer:
            if init.name == source.stored_name:
                return init.data_type, tuple(init.dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == source.stored_name:
            for attr in node.attribute:
                if attr.name == "value":
                    return attr.t.data_type, tuple(attr.t.dims)
            value = g.constant_node_value(node)
            return onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
    raise KeyError(source.stored_name)

def _type_name(proto_type: int) -> str:
    return onnx.TensorProto.DataType.Name(proto_type) if proto_type else ""


def _weight_or_skip(name: str, scope: g.Scope, ctx: _Context, role: str) -> g.ConstantSource | Skip:
    """The constant behind input ``name``, or the reason it is not usable as a weight."""
    if not name:
        return Skip("no_weight", f"{role} input is missing")
    source = g.find_constant(name, scope, opset=ctx.opset)
    if source is not None:
        return source
    producer = _producer(name, scope)
    if producer is not None and producer.op_type in QUANTIZED_PRODUCERS:
        return Skip("quantized", f"{role} {name} comes from {producer.op_type} (quantized weights are not factorized)")
    return Skip("weight_not_constant", f"{role} {name} is computed at run time, not a constant")


def _producer(name: str, scope: g.Scope) -> onnx.NodeProto | None:
    current: g.Scope | None = scope
    while current is not None:
        for node in current.graph.node:
            if name in node.output:
                return node
        current = current.parent
    return None


def _tokens(shape: Shape | None, drop_last: int) -> int | None:
    """Product of a shape's leading dimensions (all but the last ``drop_last``)."""
    if shape is None or len(shape) < drop_last:
        return None
    lead = shape[: len(shape) - drop_last]
    if any(d is None for d in lead):
        return None
    return int(math.prod(lead)) if lead else 1


def _describe_gemm(node: onnx.NodeProto, scope: g.Scope, ctx: _Context) -> _Described:
    if g.attribute(node, "transA", 0):
        return Skip("gemm_transposed_a", "Gemm with transA=1 is not supported")
    source = _weight_or_skip(node.input[1], scope, ctx, "B")
    if isinstance(source, Skip):
        return source
    shape = _constant_type_and_shape(source)[1]
    if len(shape) != 2:
        return Skip("weight_not_2d", f"Gemm weight has shape {shape}")
    trans_b = bool(g.attribute(node, "transB", 0))
    out_f, in_f = (shape[0], shape[1]) if trans_b else (shape[1], shape[0])
    rows = ctx.shapes.get(node.input[0])
    tokens = rows[0] if rows and len(rows) == 2 else None
    return node.input[1], "out_in" if trans_b else "in_out", (out_f, in_f), tokens


def _describe_matmul(node: onnx.NodeProto, scope: g.Scope, ctx: _Context) -> _Described:
    left = g.find_constant(node.input[0], scope, opset=ctx.opset)
    right = g.find_constant(node.input[1], scope, opset=ctx.opset)
    if left is not None and right is not None:
        return Skip("both_inputs_constant", "both MatMul inputs are constants (a constant-folding case)")
    if right is None and left is None:
        for name in node.input:
            found = _weight_or_skip(name, scope, ctx, "weight")
            if isinstance(found, Skip) and found.code == "quantized":
                return found
        return Skip("weight_not_constant", "neither MatMul input is a constant")
    if right is not None:
        shape = _constant_type_and_shape(right)[1]
        if len(shape) != 2:
            return Skip("weight_not_2d", f"MatMul weight has shape {shape} (batched weights are not factorized)")
        tokens = _tokens(ctx.shapes.get(node.input[0]), 1)
        return node.input[1], "in_out", (shape[1], shape[0]), tokens
    shape = _constant_type_and_shape(left)[1]
    if len(shape) != 2:
        return Skip("weight_not_2d", f"MatMul weight has shape {shape} (batched weights are not factorized)")
    x_shape = ctx.shapes.get(node.input[1])
    tokens = None
    if x_shape is not None and len(x_shape) >= 2 and all(d is not None for d in x_shape):
        tokens = int(math.prod(x_shape[:-2])) * x_shape[-1]
    return node.input[0], "left", (shape[0], shape[1]), tokens


def _describe_conv(node: onnx.NodeProto, scope: g.Scope, ctx: _Context) -> _Described:
    source = _weight_or_skip(node.input[1], scope, ctx, "W")
    if isinstance(source, Skip):
        return source
    shape = _constant_type_and_shape(source)[1]
    group = g.attribute(node, "group", 1)
    if group != 1:
        kind = "depthwise" if shape and shape[1] == 1 else "grouped"
        return Skip("grouped_conv", f"{kind} Conv (group={group}) is not factorized")
    if len(shape) < 3:
        return Skip("weight_not_2d", f"Conv weight has shape {shape}")
    out_shape = ctx.shapes.get(node.output[0])
    tokens = _tokens(out_shape, 0)
    if tokens is not None and out_shape is not None:
        tokens //= out_shape[1] or 1  # per output position, not per output channel
    return node.input[1], "conv", (shape[0], int(math.prod(shape[1:]))), tokens


def _describe_quantized(node: onnx.NodeProto, scope: g.Scope, ctx: _Context) -> _Described:
    del scope, ctx
    return Skip("quantized", f"{node.op_type} is a quantized op (quantized weights are not factorized)")


def _describe_conv_transpose(node: onnx.NodeProto, scope: g.Scope, ctx: _Context) -> _Described:
    del scope, ctx
    return Skip("unsupported_op", "ConvTranspose is not factorized yet")


_DESCRIBERS: dict[str, Callable[[onnx.NodeProto, g.Scope, _Context], _Described]] = {
    "Gemm": _describe_gemm,
    "MatMul": _describe_matmul,
    "Conv": _describe_conv,
    "ConvTranspose": _describe_conv_transpose,
    **{op: _describe_quantized for op in QUANTIZED_OPS},
}
