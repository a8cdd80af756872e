"""Find foldable channel groups: producer -> per-channel ops -> consumer(s).

A *group* is the set of output channels of one producer (Gemm, MatMul ``x @ W``, Conv with a
constant weight), followed through ops that act on each channel alone to the layers that read
them (Gemm, MatMul, Conv). Merging channels of the producer is exact for duplicated neurons
only if every op on the way is per-channel, so the walk is strict:

- right after the producer, a bias ``Add`` (either input order) and a ``BatchNormalization``
  are part of the neuron (folded with it); each must be the sole reader of its input;
- then elementwise ops (unary activations, binary ops whose other operand is a constant or a
  tensor that is the same along the channel axis, or another tensor of the same group, as in
  the Div/Erf/Add/Mul/Mul GELU that torch exports), pooling, Dropout/Identity/Cast;
- layout ops that keep each channel's values together: ``Flatten``/``Reshape`` merging the
  channel axis with the axes after it (each channel then owns a contiguous block of columns),
  ``Transpose``, ``Squeeze``/``Unsqueeze``, reductions over other axes;
- a consumer must read the group as its data input, with a constant weight of its own.

Anything else leaves the group alone with a :class:`~onnx_lowrank.layers.Skip` reason:
channels tied to other channels (``residual_add``, ``concat``, ``split``,
``coupled_elementwise``), seen outside (``graph_output``, ``subgraph_use``), mixed
(``mixes_channels``: LayerNorm/Softmax over the channel axis, a MatMul of two activations),
re-laid out (``layout_change``: e.g. a Reshape into attention heads), per-channel parameters
other than the first BN or bias (``per_channel_params``), or an op the walk does not know
(``unknown_op``). Coupled sets are never folded in this version, so they are never folded
inconsistently.

Each op type has one rule in ``_RULES``; adding an op is one function and one entry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.layers import Layer, Skip, find_layers
from onnx_lowrank.shapes import Shape, infer_shapes

log = logging.getLogger(__name__)

PRODUCERS = ("Gemm", "MatMul", "Conv")
_NOT_A_LAYER = ("weight_not_constant", "both_inputs_constant", "no_weight")
MIN_WIDTH = 2  # a group of one channel has nothing to merge


@dataclasses.dataclass(frozen=True)
class ChannelState:
    """Where a group's channels sit in a tensor.

    ``axis`` is the channel axis counted from the end (-1 = last), which broadcasting never
    moves; ``block`` is how many consecutive entries along that axis each channel owns (1,
    or the spatial size after a Flatten); ``rank`` the tensor's rank when known.
    """

    axis: int
    block: int
    rank: int | None

    def position(self) -> int | None:
        """The channel axis counted from the front, when the rank is known."""
        return None if self.rank is None else self.rank + self.axis


@dataclasses.dataclass(frozen=True)
class BiasRef:
    """A per-channel bias folded with the producer.

    ``node_index``/``input_index``: where it is read (the producer's own C/B input, or a bias
    Add). ``axis``: the stored array's channel axis, None for a bias broadcast to every channel
    (a scalar), which is rewritten as a (k,) vector. ``scale``: Gemm's beta (else 1).
    """

    node_index: int
    input_index: int
    tensor: str
    shape: tuple[int, ...]
    axis: int | None
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class BatchNormRef:
    """The BatchNormalization right after the producer (inputs 1..4: scale, B, mean, var)."""

    node_index: int
    name: str
    epsilon: float


@dataclasses.dataclass(frozen=True)
class ConsumerRef:
    """A layer reading the group: ``block`` canonical columns per channel (1 for a plain
    Gemm/MatMul, the spatial size after a Flatten, the kernel taps for a Conv)."""

    layer: str
    node_index: int
    block: int


@dataclasses.dataclass(frozen=True)
class ReshapeRef:
    """A Reshape with a constant target shape whose channel dimension must shrink.

    ``position`` is the index in the shape vector holding ``C * block``.
    """

    node_index: int
    position: int
    block: int


@dataclasses.dataclass(frozen=True)
class FoldGroup:
    """One producer's output channels and everything tied to them.

    ``name`` is the producer layer's name (its node name), the key of widths and reports.
    A group with ``skip`` set is listed but never folded.
    """

    name: str
    op_type: str
    width: int
    node_index: int | None = None
    bias: BiasRef | None = None
    batchnorm: BatchNormRef | None = None
    consumers: tuple[ConsumerRef, ...] = ()
    path: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    reshapes: tuple[ReshapeRef, ...] = ()
    skip: Skip | None = None

    @property
    def foldable(self) -> bool:
        return self.skip is None


def find_groups(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    layers: list[Layer] | None = None,
) -> list[FoldGroup]:
    """One :class:`FoldGroup` per Gemm/MatMul/Conv layer of the model, in graph order.

    ``input_shapes`` pins dynamic input dimensions (needed only where a Flatten/Reshape or a
    pooling op sits on the path). ``layers`` may pass :func:`find_layers`' result if the
    caller has it.
    """
    if layers is None:
        layers = find_layers(model, input_shapes)
    walk = _Walk.build(model, input_shapes, layers)
    groups = []
    for layer in layers:
        if layer.skip is not None and layer.skip.code in _NOT_A_LAYER:
            continue  # e.g. attention's activation @ activation: no weight, no channel group
        group = _group_for(walk, layer)
        if group.skip is not None:
            log.debug("group %s left alone: %s (%s)", group.name, group.skip.code, group.skip.message)
        groups.append(group)
    return groups


def inspect_groups(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    groups: list[FoldGroup] | None = None,
    layers: list[Layer] | None = None,
) -> dict:
    """A JSON-ready listing of every channel group: width, path, consumers, or why it is left alone.

    ``params`` counts the weight values (producer and consumers) the group's width scales.
    """
    if layers is None:
        layers = find_layers(model, input_shapes)
    if groups is None:
        groups = find_groups(model, input_shapes, layers=layers)
    by_name = {layer.name: layer for layer in layers}
    rows = []
    for group in groups:
        row: dict = {"name": group.name, "op": group.op_type, "width": group.width, "foldable": group.foldable}
        if group.foldable:
            row["path"] = list(group.path)
            row["consumers"] = [c.layer for c in group.consumers]
            row["batchnorm"] = group.batchnorm.name if group.batchnorm else None
            row["bias"] = group.bias is not None
            row["params"] = by_name[group.name].params + sum(by_name[c.layer].params for c in group.consumers)
        else:
            row["reason"] = group.skip.code
            row["detail"] = group.skip.message
        rows.append(row)
    foldable = [r for r in rows if r["foldable"]]
    touched = {g.name for g in groups if g.foldable} | {c.layer for g in groups if g.foldable for c in g.consumers}
    totals = {
        "groups": len(rows),
        "foldable_groups": len(foldable),
        "foldable_channels": sum(r["width"] for r in foldable),
        "foldable_layer_params": sum(by_name[name].params for name in touched),
    }
    return {"groups": rows, "totals": totals}


# --- the walk -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Walk:
    """Read-only facts about the main graph that every rule needs."""

    model: onnx.ModelProto
    graph: onnx.GraphProto
    root: g.Scope
    opset: int
    shapes: dict[str, Shape]
    readers: dict[str, list[int]]  # tensor -> indices of main-graph nodes reading it
    subgraph_reads: set[str]  # tensors read from inside a subgraph
    outputs: set[str]
    index_of: dict[str, int]  # layer (node label) -> node index
    layer_at: dict[int, Layer]

    @classmethod
    def build(cls, model, input_shapes, layers: list[Layer]) -> _Walk:
        graph = model.graph
        root = g.Scope("", graph, None)
        readers: dict[str, list[int]] = {}
        for index, node in enumerate(graph.node):
            for name in dict.fromkeys(node.input):
                if name:
                    readers.setdefault(name, []).append(index)
        subgraph_reads = {
            name
            for scope in g.iter_scopes(model)
            if scope.path
            for node in scope.graph.node
            for name in node.input
        }
        index_of = {}
        for index, node in enumerate(graph.node):
            index_of.setdefault(g.node_label(node, index), index)
        layer_at = {}
        for layer in layers:
            if layer.scope:
                continue
            for name in layer.nodes:
                if name in index_of:
                    layer_at[index_of[name]] = layer
        return cls(
            model=model,
            graph=graph,
            root=root,
            opset=g.opset_version(model),
            shapes=infer_shapes(model, input_shapes),
            readers=readers,
            subgraph_reads=subgraph_reads,
            outputs={o.name for o in graph.output},
            index_of=index_of,
            layer_at=layer_at,
        )

    def constant(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        source = g.find_constant(name, self.root, opset=self.opset)
        return None if source is None else source.array()

    def shape(self, name: str) -> Shape | None:
        value = self.constant(name)
        if value is not None:
            return tuple(value.shape)
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def label(self, index: int) -> str:
        return g.node_label(self.graph.node[index], index)

    def sole_reader(self, name: str) -> int | None:
        """The index of the only node reading ``name``, if exactly one does and nothing else sees it."""
        users = self.readers.get(name, [])
        if len(users) != 1 or name in self.outputs or name in self.subgraph_reads:
            return None
        return users[0]

    def exposure(self, name: str) -> Skip | None:
        """Why ``name`` cannot change width because something outside the group sees it."""
        if name in self.outputs:
            return Skip("graph_output", f"channels reach graph output {name!r}; its shape must not change")
        if name in self.subgraph_reads:
            return Skip("subgraph_use", f"tensor {name!r} is read inside an If/Loop/Scan body")
        return None


@dataclasses.dataclass(frozen=True)
class _Pass:
    """The op keeps the group per-channel; its first output carries ``state``."""

    state: ChannelState
    reshape: ReshapeRef | None = None


_Outcome = _Pass | ConsumerRef | Skip
_Rule = Callable[[_Walk, int, onnx.NodeProto, dict[str, ChannelState]], _Outcome]


def _group_for(walk: _Walk, layer: Layer) -> FoldGroup:
    base = FoldGroup(name=layer.name, op_type=layer.op_type, width=layer.out_features)
    skip = _producer_skip(walk, layer)
    if skip is not None:
        return dataclasses.replace(base, skip=skip)
    index = walk.index_of[layer.name]
    return _trace(walk, layer, index, dataclasses.replace(base, node_index=index))


def _producer_skip(walk: _Walk, layer: Layer) -> Skip | None:
    if layer.scope:
        return Skip("subgraph", "folding inside If/Loop/Scan bodies is not supported")
    if not layer.supported:
        return layer.skip
    if layer.op_type not in PRODUCERS:
        return Skip("unsupported_op", f"{layer.op_type} is not a foldable producer")
    if len(layer.nodes) > 1:
        return Skip("shared_weight", f"weight {layer.weight} is used by {len(layer.nodes)} nodes")
    if layer.form == "left":
        return Skip("unsupported_producer", "MatMul W @ x (weight on the left) is not folded")
    if layer.out_features < MIN_WIDTH:
        return Skip("too_narrow", f"{layer.out_features} output channel(s): nothing to merge")
    if layer.name not in walk.index_of:
        return Skip("unsupported_producer", f"node {layer.name} not found in the main graph")
    return None


def _trace(walk: _Walk, layer: Layer, index: int, group: FoldGroup) -> FoldGroup:
    node = walk.graph.node[index]
    width = layer.out_features
    if layer.op_type == "Conv":
        rank = len(layer.weight_shape)
        state = ChannelState(axis=-(rank - 1), block=1, rank=rank)
    else:
        rank = 2 if layer.op_type == "Gemm" else walk.rank(node.output[0])
        state = ChannelState(axis=-1, block=1, rank=rank)
    tensors = [node.output[0]]
    path: list[str] = []
    handled = {index}

    bias = _own_bias(walk, layer, node, index, width)
    if isinstance(bias, Skip):
        return dataclasses.replace(group, skip=bias)
    current = node.output[0]
    if bias is None:
        found = _bias_add(walk, current, state, width)
        if found is not None:
            bias, current = found
            handled.add(bias.node_index)
            tensors.append(current)
            path.append("Add(bias)")
    batchnorm = _batchnorm(walk, current, state)
    if batchnorm is not None:
        handled.add(batchnorm.node_index)
        current = walk.graph.node[batchnorm.node_index].output[0]
        tensors.append(current)
        path.append("BatchNormalization")
    for name in tensors:
        exposed = walk.exposure(name)
        if exposed is not None:
            return dataclasses.replace(group, skip=exposed)

    states = {current: state}
    consumers: list[ConsumerRef] = []
    reshapes: list[ReshapeRef] = []
    for j in range(index + 1, len(walk.graph.node)):
        if j in handled:
            continue
        other = walk.graph.node[j]
        if not any(name in states for name in other.input):
            continue
        rule = _RULES.get(other.op_type, _rule_unknown)
        if rule in _DATA_INPUT_RULES and (
            other.input[0] not in states or any(name in states for name in other.input[1:])
        ):
            rule = _rule_unknown  # the channels arrive as a shape, axes or parameter input
        outcome = rule(walk, j, other, states)
        if isinstance(outcome, Skip):
            return dataclasses.replace(group, skip=outcome)
        if isinstance(outcome, ConsumerRef):
            if walk.layer_at[j].in_features != width * outcome.block:
                return dataclasses.replace(
                    group,
                    skip=Skip(
                        "shape_mismatch",
                        f"{walk.label(j)} reads {walk.layer_at[j].in_features} input features, "
                        f"expected {width} channels x {outcome.block}",
                    ),
                )
            consumers.append(outcome)
            continue
        extra = [o for o in other.output[1:] if o and (o in walk.readers or o in walk.outputs)]
        if extra:
            return dataclasses.replace(
                group, skip=Skip("unknown_op", f"{other.op_type} {walk.label(j)}: its output {extra[0]} is used")
            )
        out = other.output[0]
        exposed = walk.exposure(out)
        if exposed is not None:
            return dataclasses.replace(group, skip=exposed)
        states[out] = outcome.state
        tensors.append(out)
        path.append(other.op_type)
        if outcome.reshape is not None:
            reshapes.append(outcome.reshape)
    if not consumers:
        return dataclasses.replace(group, skip=Skip("no_consumer", "no Gemm/MatMul/Conv reads these channels"))
    return dataclasses.replace(
        group,
        bias=bias,
        batchnorm=batchnorm,
        consumers=tuple(consumers),
        path=tuple(path),
        tensors=tuple(tensors),
        reshapes=tuple(reshapes),
    )


def _own_bias(walk: _Walk, layer: Layer, node, index: int, width: int) -> BiasRef | Skip | None:
    """The producer's own bias (Gemm C, Conv B), if it has one."""
    if layer.op_type not in ("Gemm", "Conv") or len(node.input) < 3 or not node.input[2]:
        return None
    name = node.input[2]
    value = walk.constant(name)
    if value is None:
        return Skip("unsupported_bias", f"bias {name} is computed at run time")
    scale = float(g.attribute(node, "beta", 1.0)) if layer.op_type == "Gemm" else 1.0
    if value.size == 1:
        return BiasRef(index, 2, name, tuple(value.shape), None, scale)
    if value.shape[-1] == width and value.size == width:
        return BiasRef(index, 2, name, tuple(value.shape), value.ndim - 1, scale)
    return Skip("unsupported_bias", f"bias {name} has shape {tuple(value.shape)}, not per channel")


def _bias_add(walk: _Walk, current: str, state: ChannelState, width: int) -> tuple[BiasRef, str] | None:
    """A bias ``Add(b, y)`` / ``Add(y, b)`` right after the producer, b constant per channel."""
    reader = walk.sole_reader(current)
    if reader is None:
        return None
    node = walk.graph.node[reader]
    if node.op_type != "Add" or len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    position = 0 if node.input[1] == current else 1
    value = walk.constant(node.input[position])
    if value is None or value.size != width or value.ndim < -state.axis:
        return None
    if value.shape[value.ndim + state.axis] != width:
        return None
    return BiasRef(reader, position, node.input[position], tuple(value.shape), value.ndim + state.axis), node.output[0]


def _batchnorm(walk: _Walk, current: str, state: ChannelState) -> BatchNormRef | None:
    """An inference-mode BatchNormalization on the channel axis right after the producer."""
    reader = walk.sole_reader(current)
    if reader is None:
        return None
    node = walk.graph.node[reader]
    if node.op_type != "BatchNormalization" or node.input[0] != current or len(node.input) != 5:
        return None
    if state.position() != 1 or state.block != 1 or g.attribute(node, "training_mode", 0):
        return None
    if any(o for o in node.output[1:]):
        return None
    if any(walk.constant(name) is None for name in node.input[1:]):
        return None
    return BatchNormRef(reader, walk.label(reader), float(g.attribute(node, "epsilon", 1e-5)))


# --- rules: one per op type ---------------------------------------------------------------


def _rule_unary(walk: _Walk, index: int, node, states) -> _Outcome:
    if node.input[0] not in states or any(name in states for name in node.input[1:]):
        return Skip("unknown_op", f"{node.op_type} {walk.label(index)} reads the channels in an unexpected input")
    return _Pass(states[node.input[0]])


def _rule_elementwise(walk: _Walk, index: int, node, states) -> _Outcome:
    """Binary / variadic elementwise ops: every operand is in the group or the same for each channel."""
    state: ChannelState | None = None
    ranks = []
    for name in node.input:
        if name in states:
            if state is not None and states[name] != state:
                return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} combines two layouts of the channels")
            state = states[name]
            ranks.append(state.rank)
    for name in node.input:
        if not name or name in states:
            continue
        shape = walk.shape(name)
        ranks.append(None if shape is None else len(shape))
        is_constant = walk.constant(name) is not None
        per_channel = shape is None or (len(shape) >= -state.axis and shape[len(shape) + state.axis] != 1)
        if not per_channel:
            continue
        if is_constant:
            return Skip(
                "per_channel_params",
                f"{node.op_type} {walk.label(index)} applies constant {name} of shape {shape} that differs per "
                "channel (only the bias right after the producer is folded)",
            )
        if node.op_type in ("Add", "Sub", "Sum"):
            return Skip(
                "residual_add",
                f"{node.op_type} {walk.label(index)} adds {name} (another branch) channel by channel: the channel "
                "sets are coupled",
            )
        return Skip(
            "coupled_elementwise",
            f"{node.op_type} {walk.label(index)} combines these channels with {name} channel by channel: the "
            "channel sets are coupled",
        )
    rank = max(ranks) if ranks and all(r is not None for r in ranks) else walk.rank(node.output[0])
    return _Pass(dataclasses.replace(state, rank=rank))


def _rule_pool(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states.get(node.input[0])
    if state is None:
        return _rule_unknown(walk, index, node, states)
    rank = state.rank if state.rank is not None else walk.rank(node.input[0])
    if rank is None:
        return Skip("unknown_shape", f"{node.op_type} {walk.label(index)}: input rank unknown")
    if rank + state.axis != 1 or state.block != 1:
        return Skip("layout_change", f"{node.op_type} {walk.label(index)} pools an axis holding the channels")
    return _Pass(dataclasses.replace(state, rank=rank))


def _rule_flatten(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states[node.input[0]]
    dims = walk.shape(node.input[0])
    if dims is None:
        return Skip("unknown_shape", f"Flatten {walk.label(index)}: input shape unknown (pin it with --input-shape)")
    rank = len(dims)
    axis = int(g.attribute(node, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    position = rank + state.axis
    if axis != position:
        return Skip(
            "layout_change",
            f"Flatten {walk.label(index)} (axis {axis}) does not start at the channel axis {position}",
        )
    trailing = dims[position + 1 :]
    if any(d is None for d in trailing):
        return Skip("unknown_shape", f"Flatten {walk.label(index)}: dims after the channel axis are not static")
    return _Pass(ChannelState(axis=-1, block=state.block * math.prod(trailing), rank=2))


def _rule_reshape(walk: _Walk, index: int, node, states) -> _Outcome:
    if node.input[0] not in states or node.input[1] in states:
        return _rule_unknown(walk, index, node, states)
    state = states[node.input[0]]
    label = walk.label(index)
    target = walk.constant(node.input[1])
    if target is None:
        return Skip("layout_change", f"Reshape {label} has a shape computed at run time")
    dims_in, dims_out = walk.shapes.get(node.input[0]), walk.shapes.get(node.output[0])
    if dims_in is None or dims_out is None or any(d is None for d in (*dims_in, *dims_out)):
        return Skip("unknown_shape", f"Reshape {label}: shapes unknown (pin them with --input-shape)")
    position = len(dims_in) + state.axis
    tail = dims_in[position:]
    target = [int(v) for v in target.reshape(-1)]
    if dims_out and dims_out[-1] == math.prod(tail) and math.prod(dims_out[:-1]) == math.prod(dims_in[:position]):
        # the channel axis and every axis after it become the last axis
        new_state = ChannelState(axis=-1, block=state.block * math.prod(tail[1:]), rank=len(dims_out))
    elif len(dims_out) >= len(tail) and tuple(dims_out[len(dims_out) - len(tail) :]) == tuple(tail):
        # the channel axis and the axes after it are kept; only leading axes change
        new_state = ChannelState(axis=state.axis, block=state.block, rank=len(dims_out))
    else:
        return Skip(
            "layout_change",
            f"Reshape {label} to {tuple(dims_out)} splits or moves the channel axis (e.g. into attention heads)",
        )
    out_position = len(dims_out) + new_state.axis
    if len(target) != len(dims_out):
        return Skip("layout_change", f"Reshape {label}: target shape and inferred shape disagree")
    if target[out_position] == 0 and out_position != position:
        return Skip("layout_change", f"Reshape {label} copies another dimension (0) where the channels land")
    if target[out_position] in (-1, 0):
        return _Pass(new_state)
    return _Pass(new_state, ReshapeRef(index, out_position, new_state.block))


def _rule_transpose(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states[node.input[0]]
    rank = state.rank if state.rank is not None else walk.rank(node.input[0])
    if rank is None:
        return Skip("unknown_shape", f"Transpose {walk.label(index)}: input rank unknown")
    perm = g.attribute(node, "perm", None) or list(range(rank))[::-1]
    new_position = list(perm).index(rank + state.axis)
    return _Pass(ChannelState(axis=new_position - rank, block=state.block, rank=rank))


def _axes(walk: _Walk, node) -> list[int] | None:
    axes = g.attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = walk.constant(node.input[1])
        if value is None:
            return None
        axes = [int(v) for v in value.reshape(-1)]
    return list(axes) if axes is not None else []


def _rule_squeeze(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states[node.input[0]]
    dims = walk.shapes.get(node.input[0])
    rank = state.rank if state.rank is not None else (None if dims is None else len(dims))
    axes = _axes(walk, node)
    if rank is None or axes is None:
        return Skip("unknown_shape", f"Squeeze {walk.label(index)}: rank or axes unknown")
    if not axes:
        if dims is None or any(d is None for d in dims):
            return Skip("unknown_shape", f"Squeeze {walk.label(index)}: which axes are squeezed is unknown")
        axes = [i for i, d in enumerate(dims) if d == 1]
    moved = _without_axes(state, rank, axes)
    if moved is None:
        return Skip("layout_change", f"Squeeze {walk.label(index)} removes the channel axis")
    return _Pass(moved)


def _without_axes(state: ChannelState, rank: int, axes: list[int]) -> ChannelState | None:
    """Where the channel axis lands once ``axes`` (of a rank-``rank`` tensor) are removed;
    None when it is one of them."""
    axes = [a + rank if a < 0 else a for a in axes]
    position = rank + state.axis
    if position in axes:
        return None
    new_rank = rank - len(axes)
    new_position = position - sum(1 for a in axes if a < position)
    return ChannelState(axis=new_position - new_rank, block=state.block, rank=new_rank)


def _rule_unsqueeze(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states[node.input[0]]
    rank = state.rank if state.rank is not None else walk.rank(node.input[0])
    axes = _axes(walk, node)
    if rank is None or not axes:
        return Skip("unknown_shape", f"Unsqueeze {walk.label(index)}: rank or axes unknown")
    new_rank = rank + len(axes)
    inserted = sorted(a + new_rank if a < 0 else a for a in axes)
    kept = [i for i in range(new_rank) if i not in inserted]
    new_position = kept[rank + state.axis]
    return _Pass(ChannelState(axis=new_position - new_rank, block=state.block, rank=new_rank))


def _rule_reduce(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states.get(node.input[0])
    if state is None:
        return _rule_unknown(walk, index, node, states)
    rank = state.rank if state.rank is not None else walk.rank(node.input[0])
    axes = _axes(walk, node)
    if rank is None or axes is None:
        return Skip("unknown_shape", f"{node.op_type} {walk.label(index)}: rank or axes unknown")
    if not axes:
        if g.attribute(node, "noop_with_empty_axes", 0):
            return _Pass(state)
        return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} reduces over every axis")
    moved = _without_axes(state, rank, axes)
    if moved is None:
        return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} reduces over the channel axis")
    if g.attribute(node, "keepdims", 1):
        return _Pass(dataclasses.replace(state, rank=rank))
    return _Pass(moved)


def _rule_softmax(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states[node.input[0]]
    rank = state.rank if state.rank is not None else walk.rank(node.input[0])
    if rank is None:
        return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} may normalize over the channel axis")
    position = rank + state.axis
    legacy = walk.opset < 13  # before opset 13 the input is coerced to 2-D at ``axis``
    axis = int(g.attribute(node, "axis", 1 if legacy else -1))
    axis = axis + rank if axis < 0 else axis
    if (legacy and position >= axis) or (not legacy and position == axis):
        return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} normalizes over the channel axis")
    return _Pass(dataclasses.replace(state, rank=rank))


def _rule_layernorm(walk: _Walk, index: int, node, states) -> _Outcome:
    state = states.get(node.input[0])
    rank = None if state is None else (state.rank if state.rank is not None else walk.rank(node.input[0]))
    if state is None or rank is None or any(name in states for name in node.input[1:]):
        return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} may normalize over the channel axis")
    axis = int(g.attribute(node, "axis", -1))
    axis = axis + rank if axis < 0 else axis
    if rank + state.axis >= axis:
        return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} normalizes over the channel axis")
    return _Pass(dataclasses.replace(state, rank=rank))


def _rule_mixes(walk: _Walk, index: int, node, states) -> _Outcome:
    del states
    return Skip("mixes_channels", f"{node.op_type} {walk.label(index)} mixes the channels")


def _rule_channel_params(walk: _Walk, index: int, node, states) -> _Outcome:
    del states
    return Skip(
        "per_channel_params",
        f"{node.op_type} {walk.label(index)} has per-channel parameters that are not folded (only a "
        "BatchNormalization right after the producer is)",
    )


def _rule_concat(walk: _Walk, index: int, node, states) -> _Outcome:
    del states
    return Skip("concat", f"Concat {walk.label(index)} joins these channels with others: the sets are coupled")


def _rule_split(walk: _Walk, index: int, node, states) -> _Outcome:
    del states
    return Skip("split", f"{node.op_type} {walk.label(index)} splits these channels: the parts are coupled")


def _rule_consumer(walk: _Walk, index: int, node, states) -> _Outcome:
    label = walk.label(index)
    layer = walk.layer_at.get(index)
    if node.input[0] not in states or any(name in states for name in node.input[1:]) or layer is None:
        return Skip(
            "mixes_channels",
            f"{node.op_type} {label} does not read these channels as its data input against a constant weight "
            "(e.g. a product of two activations, as in attention)",
        )
    if layer.skip is not None:
        return Skip("unsupported_consumer", f"consumer {label}: {layer.skip.message}")
    if len(layer.nodes) > 1:
        return Skip("shared_weight", f"consumer {label} shares weight {layer.weight} with {len(layer.nodes) - 1} node(s)")
    state = states[node.input[0]]
    if node.op_type == "Conv":
        if state.position() != 1 or state.block != 1:
            return Skip("layout_change", f"Conv {label} does not read the channels on axis 1")
        taps = math.prod(layer.weight_shape[2:])
        return ConsumerRef(layer.name, index, taps)
    if layer.form == "left" or state.axis != -1:
        return Skip("layout_change", f"{node.op_type} {label} does not contract over the channel axis")
    if node.op_type == "Gemm" and state.rank not in (2, None):
        return Skip("layout_change", f"Gemm {label} reads a rank-{state.rank} tensor")
    return ConsumerRef(layer.name, index, state.block)


def _rule_batchnorm(walk: _Walk, index: int, node, states) -> _Outcome:
    if node.input[0] in states:
        return _rule_channel_params(walk, index, node, states)
    return _rule_unknown(walk, index, node, states)


def _rule_unknown(walk: _Walk, index: int, node, states) -> _Outcome:
    del states
    return Skip("unknown_op", f"{node.op_type} {walk.label(index)} is not known to act on each channel alone")


_UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Clip", "Dropout", "Identity",
    "Cast", "Mish", "ThresholdedRelu", "Shrink", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "IsNaN", "IsInf",
    "Not",
)
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Less", "Greater")
_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
_REDUCES = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
)
_MIXERS = ("LRN", "GroupNormalization", "MeanVarianceNormalization", "Einsum", "ConvTranspose", "Gather", "GatherElements")

_RULES: dict[str, _Rule] = {
    **{op: _rule_unary for op in _UNARY},
    **{op: _rule_elementwise for op in _ELEMENTWISE},
    **{op: _rule_pool for op in _POOLS},
    **{op: _rule_reduce for op in _REDUCES},
    **{op: _rule_mixes for op in _MIXERS},
    **{op: _rule_consumer for op in PRODUCERS},
    "Softmax": _rule_softmax,
    "LogSoftmax": _rule_softmax,
    "Hardmax": _rule_softmax,
    "LayerNormalization": _rule_layernorm,
    "InstanceNormalization": _rule_channel_params,
    "BatchNormalization": _rule_batchnorm,
    "Flatten": _rule_flatten,
    "Reshape": _rule_reshape,
    "Transpose": _rule_transpose,
    "Squeeze": _rule_squeeze,
    "Unsqueeze": _rule_unsqueeze,
    "Concat": _rule_concat,
    "Split": _rule_split,
    "SplitToSequence": _rule_split,
}
# Rules that read the channels from the op's first input only.
_DATA_INPUT_RULES = {
    _rule_unary, _rule_pool, _rule_reduce, _rule_flatten, _rule_reshape, _rule_transpose, _rule_squeeze,
    _rule_unsqueeze, _rule_softmax, _rule_layernorm,
}
