"""Run an ONNX graph in torch: a ``torch.nn.Module`` that evaluates the graph node by node.

:class:`OnnxModule` turns every float initializer (and float ``Constant`` node) of the main
graph into an ``nn.Parameter`` (trainable when the ``trainable`` predicate says so, by default
the low-rank factors ``*.lowrank.*``) or a buffer, and evaluates the nodes in graph order with
one torch function per op type from the table ``OPS``. Adding an op is one function and one
table entry. Semantics that changed between opsets (axes as an input or an attribute, Softmax's
2-D coercion before opset 13, Clip's bounds, Split sizes, Slice's inputs, Pad's inputs) are
resolved from the node itself and the model's opset.

A weight can also be *substituted*: ``substitutes`` maps a tensor name to a module whose
``forward()`` computes that tensor (for instance ``U diag(mask * S) V^T``), which is how the
ACIP search trains masks over singular values inside the exported graph.

Unsupported op types (and subgraph ops such as If/Loop/Scan) are reported all at once, before
any weight is converted, as one :class:`~onnx_lowrank.errors.UnsupportedError`.
:func:`verify_against_onnxruntime` checks the interpreter against onnxruntime on real inputs
before anything is trained on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from onnx_lowrank import graph as g
from onnx_lowrank.errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

FACTOR_MARK = ".lowrank."  # the factorize pass names factors "<weight>.lowrank.<key>"


def is_factor(name: str) -> bool:
    """The default ``trainable`` predicate: low-rank factors written by onnx-lowrank."""
    return FACTOR_MARK in name


def train_nothing(name: str) -> bool:
    del name
    return False


def train_everything(name: str) -> bool:
    del name
    return True


# ONNX element type -> torch dtype (the types a graph of float models carries).
TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class Node:
    """One node as the op functions see it: attributes decoded, the model's opset attached."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    opset: int

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    @property
    def label(self) -> str:
        return self.name or f"{self.op_type}({', '.join(self.outputs)})"


Value = torch.Tensor | None
OpFunction = Callable[[Node, list[Value]], "torch.Tensor | tuple[torch.Tensor, ...]"]


# --------------------------------------------------------------------------- helpers


def _ints(value: torch.Tensor | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _scalar(value: torch.Tensor) -> float | int | bool:
    return value.reshape(-1)[0].item()


def _axes(node: Node, inputs: list[Value], index: int) -> list[int] | None:
    """Axes from the ``axes`` attribute (older opsets) or from input ``index`` (newer ones)."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return None


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _same_pads(in_sizes, kernels, strides, upper: bool) -> list[int]:
    """ONNX pads [begins..., ends...] for auto_pad SAME_UPPER / SAME_LOWER."""
    begins, ends = [], []
    for size, kernel, stride in zip(in_sizes, kernels, strides):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def _spatial_pads(node: Node, in_sizes: Sequence[int], kernels: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Explicit ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end] for a conv or pool node.

    ``kernels`` are the effective (dilated) kernel sizes.
    """
    auto_pad = node.attr("auto_pad", "NOTSET")
    spatial = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(in_sizes, kernels, strides, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    return list(node.attr("pads", [0] * (2 * spatial)))


def _torch_pad_list(pads: Sequence[int], spatial: int) -> list[int]:
    """ONNX [begins..., ends...] over the last ``spatial`` dims -> F.pad's (last dim first) list."""
    out: list[int] = []
    for axis in reversed(range(spatial)):
        out += [pads[axis], pads[axis + spatial]]
    return out


def _symmetric(pads: Sequence[int]) -> list[int] | None:
    half = len(pads) // 2
    return list(pads[:half]) if list(pads[:half]) == list(pads[half:]) else None


# --------------------------------------------------------------------------- ops: linear algebra


def _gemm(node: Node, inputs: list[Value]) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attr("transA", 0):
        a = a.transpose(0, 1)
    if node.attr("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _matmul(node: Node, inputs: list[Value]) -> torch.Tensor:
    return torch.matmul(inputs[0], inputs[1])


def _einsum(node: Node, inputs: list[Value]) -> torch.Tensor:
    return torch.einsum(node.attr("equation").replace(" ", ""), *inputs)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv(node: Node, inputs: list[Value]) -> torch.Tensor:
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    spatial = w.dim() - 2
    if spatial not in _CONV:
        raise UnsupportedError(f"Conv {node.label}: {spatial}-D convolution is not supported by the torch interpreter")
    strides = list(node.attr("strides", [1] * spatial))
    dilations = list(node.attr("dilations", [1] * spatial))
    kernels = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    pads = _spatial_pads(node, x.shape[2:], kernels, strides)
    padding = _symmetric(pads)
    if padding is None:
        x = F.pad(x, _torch_pad_list(pads, spatial))
        padding = [0] * spatial
    return _CONV[spatial](
        x, w, bias, stride=strides, padding=padding, dilation=dilations, groups=int(node.attr("group", 1))
    )


# --------------------------------------------------------------------------- ops: pooling


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_SUM_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(node: Node, x: torch.Tensor):
    kernel = list(node.attr("kernel_shape"))
    spatial = len(kernel)
    strides = list(node.attr("strides", [1] * spatial))
    dilations = list(node.attr("dilations", [1] * spatial))
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = _spatial_pads(node, x.shape[2:], effective, strides)
    return kernel, strides, dilations, pads


def _max_pool(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise UnsupportedError(f"MaxPool {node.label}: the Indices output is not supported by the torch interpreter")
    kernel, strides, dilations, pads = _pool_geometry(node, x)
    spatial = len(kernel)
    if any(pads):
        x = F.pad(x, _torch_pad_list(pads, spatial), value=-math.inf)
    return _MAX_POOL[spatial](
        x, kernel, stride=strides, padding=0, dilation=dilations, ceil_mode=bool(node.attr("ceil_mode", 0))
    )


def _average_pool(node: Node, inputs: list[Value]) -> torch.Tensor:
    """Sum-pool the padded input and divide by the count of cells each window covers.

    Windows count padded cells only with ``count_include_pad``; cells a ceil-mode window hangs
    past the padded input never count (onnxruntime's rule).
    """
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_geometry(node, x)
    spatial = len(kernel)
    if any(d != 1 for d in dilations):
        raise UnsupportedError(f"AveragePool {node.label}: dilations are not supported by the torch interpreter")
    lift = spatial == 1  # torch has no divisor_override for 1-D pooling: pool a [.., 1, L] image
    if lift:
        x = x.unsqueeze(-2)
        kernel, strides, pads = [1] + kernel, [1] + strides, [0, pads[0], 0, pads[1]]
        spatial = 2
    if spatial not in _SUM_POOL:
        raise UnsupportedError(f"AveragePool {node.label}: {spatial}-D pooling is not supported")
    pool = _SUM_POOL[spatial]
    ceil_mode = bool(node.attr("ceil_mode", 0))
    pad_list = _torch_pad_list(pads, spatial)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if node.attr("count_include_pad", 0):
        counts_in = F.pad(ones, pad_list, value=1.0)
    else:
        counts_in = F.pad(ones, pad_list, value=0.0)
    sums = pool(F.pad(x, pad_list), kernel, stride=strides, ceil_mode=ceil_mode, divisor_override=1)
    counts = pool(counts_in, kernel, stride=strides, ceil_mode=ceil_mode, divisor_override=1)
    y = sums / counts
    return y.squeeze(-2) if lift else y


def _global_average_pool(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


# --------------------------------------------------------------------------- ops: normalization


def _layer_norm(node: Node, inputs: list[Value]):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = _normalize_axis(int(node.attr("axis", -1)), x.dim())
    eps = float(node.attr("epsilon", 1e-5))
    dims = tuple(range(axis, x.dim()))
    wants_stats = any(node.outputs[1:])
    if not wants_stats and tuple(scale.shape) == tuple(x.shape[axis:]) and (
        bias is None or tuple(bias.shape) == tuple(x.shape[axis:])
    ):
        return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps)
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt((x - mean).pow(2).mean(dim=dims, keepdim=True) + eps)
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv_std) if wants_stats else y


def _batch_norm(node: Node, inputs: list[Value]) -> torch.Tensor:
    if node.attr("training_mode", 0) or any(node.outputs[1:]):
        raise UnsupportedError(f"BatchNormalization {node.label}: training mode is not supported (inference only)")
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(node.attr("epsilon", 1e-5)))


def _softmax_like(fn):
    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        x = inputs[0]
        if node.opset >= 13:
            return fn(x, dim=int(node.attr("axis", -1)))
        # Before opset 13 the input is coerced to 2-D at ``axis`` (default 1).
        axis = _normalize_axis(int(node.attr("axis", 1)), x.dim())
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, -1), dim=1).reshape(x.shape)

    return op


# --------------------------------------------------------------------------- ops: elementwise


def _unary(fn):
    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        del node
        return fn(inputs[0])

    return op


def _binary(fn):
    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        del node
        return fn(inputs[0], inputs[1])

    return op


def _variadic(fn):
    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        del node
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return result

    return op


def _div(node: Node, inputs: list[Value]) -> torch.Tensor:
    a, b = inputs
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # C integer division, as onnxruntime
    return a / b


def _mod(node: Node, inputs: list[Value]) -> torch.Tensor:
    a, b = inputs
    # fmod=1: the sign of the dividend (C fmod); fmod=0 (integers): the sign of the divisor.
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


def _pow(node: Node, inputs: list[Value]) -> torch.Tensor:
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


def _mean(node: Node, inputs: list[Value]) -> torch.Tensor:
    return _variadic(torch.add)(node, inputs) / len(inputs)


def _leaky_relu(node: Node, inputs: list[Value]) -> torch.Tensor:
    return F.leaky_relu(inputs[0], float(node.attr("alpha", 0.01)))


def _elu(node: Node, inputs: list[Value]) -> torch.Tensor:
    return F.elu(inputs[0], float(node.attr("alpha", 1.0)))


def _hard_sigmoid(node: Node, inputs: list[Value]) -> torch.Tensor:
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)


def _gelu(node: Node, inputs: list[Value]) -> torch.Tensor:
    return F.gelu(inputs[0], approximate=node.attr("approximate", "none"))


def _prelu(node: Node, inputs: list[Value]) -> torch.Tensor:
    x, slope = inputs
    return torch.where(x < 0, x * slope, x)


def _clip(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    else:
        low = _scalar(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        high = _scalar(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high)


def _where(node: Node, inputs: list[Value]) -> torch.Tensor:
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


def _logical(fn):
    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        del node
        return fn(*(i.bool() for i in inputs))

    return op


# --------------------------------------------------------------------------- ops: shapes


def _identity(node: Node, inputs: list[Value]):
    if len(node.outputs) > 1 and node.outputs[1]:  # Dropout's mask output
        return inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)
    return inputs[0]


def _reshape(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    shape = _ints(inputs[1]) if node.opset >= 5 else list(node.attr("shape"))
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _transpose(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    perm = node.attr("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


def _flatten(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    axis = _normalize_axis(int(node.attr("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _concat(node: Node, inputs: list[Value]) -> torch.Tensor:
    return torch.cat([i for i in inputs if i is not None], dim=int(node.attr("axis")))


def _split(node: Node, inputs: list[Value]):
    x = inputs[0]
    axis = _normalize_axis(int(node.attr("axis", 0)), x.dim())
    if "split" in node.attrs:
        sizes = list(node.attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    else:
        parts = int(node.attr("num_outputs", len(node.outputs)))
        chunk = -(-x.shape[axis] // parts)  # the last part is smaller when uneven (opset 18)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = list(node.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _normalize_axis(axis, x.dim())
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index = [slice(None)] * axis + [slice(start, max(end, start), step)]
            x = x[tuple(index)]
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            positions = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, positions)
    return x


def _gather(node: Node, inputs: list[Value]) -> torch.Tensor:
    x, indices = inputs
    axis = _normalize_axis(int(node.attr("axis", 0)), x.dim())
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))  # () for a scalar


def _unsqueeze(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    axes = _axes(node, inputs, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(_normalize_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    axes = _axes(node, inputs, 1)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(_normalize_axis(a, x.dim()) for a in axes))


def _shape(node: Node, inputs: list[Value]) -> torch.Tensor:
    dims = list(inputs[0].shape)
    start, end = int(node.attr("start", 0)), node.attr("end")
    dims = dims[start:] if end is None else dims[start : int(end)]
    return torch.tensor(dims, dtype=torch.int64)


def _size(node: Node, inputs: list[Value]) -> torch.Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


def _cast(node: Node, inputs: list[Value]) -> torch.Tensor:
    target = int(node.attr("to"))
    if target not in TORCH_DTYPES:
        raise UnsupportedError(f"Cast {node.label}: cast to {onnx.TensorProto.DataType.Name(target)} is not supported")
    return inputs[0].to(TORCH_DTYPES[target])


def _constant_of_shape(node: Node, inputs: list[Value]) -> torch.Tensor:
    value = node.attr("value")
    shape = _ints(inputs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    fill = _tensor_from_proto(value)
    return torch.full(shape, fill.reshape(-1)[0].item(), dtype=fill.dtype)


def _expand(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return x.expand(shape)


def _tile(node: Node, inputs: list[Value]) -> torch.Tensor:
    return inputs[0].repeat(_ints(inputs[1]))


def _range(node: Node, inputs: list[Value]) -> torch.Tensor:
    start, limit, delta = inputs
    count = max(math.ceil((_scalar(limit) - _scalar(start)) / _scalar(delta)), 0)
    return (start.reshape(()) + torch.arange(count, dtype=start.dtype) * delta.reshape(())).to(start.dtype)


def _pad(node: Node, inputs: list[Value]) -> torch.Tensor:
    x = inputs[0]
    if node.opset < 11:
        pads, constant, axes = list(node.attr("pads")), float(node.attr("value", 0.0)), None
    else:
        pads = _ints(inputs[1])
        constant = _scalar(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else 0
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    axes = [_normalize_axis(a, x.dim()) for a in (axes if axes is not None else range(x.dim()))]
    count = len(axes)
    begins = dict(zip(axes, pads[:count]))
    ends = dict(zip(axes, pads[count:]))
    mode = node.attr("mode", "constant")
    if mode == "constant":
        last = max((a for a in axes if begins[a] or ends[a]), default=-1)
        torch_pads: list[int] = []
        for axis in range(x.dim() - 1, -1, -1):
            if axis < last and axis not in axes:
                torch_pads += [0, 0]
            elif axis <= last:
                torch_pads += [begins.get(axis, 0), ends.get(axis, 0)]
        return F.pad(x, torch_pads, value=constant) if torch_pads else x
    if mode not in _PAD_INDEX:
        raise UnsupportedError(f"Pad {node.label}: mode {mode!r} is not supported")
    for axis in axes:
        if begins[axis] or ends[axis]:
            size = x.shape[axis]
            positions = torch.arange(-begins[axis], size + ends[axis], device=x.device)
            x = x.index_select(axis, _PAD_INDEX[mode](positions, size))
    return x


def _reflect(positions: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded >= size, period - folded, folded)


_PAD_INDEX = {
    "reflect": _reflect,
    "edge": lambda positions, size: positions.clamp(0, size - 1),
    "wrap": lambda positions, size: positions.remainder(size),
}


def _reduce(fn, *, axes_input_from: int):
    """A Reduce* op; its ``axes`` moved from an attribute to input 1 at ``axes_input_from``."""

    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        x = inputs[0]
        axes = _axes(node, inputs, 1) if node.opset >= axes_input_from else list(node.attr("axes", []))
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(_normalize_axis(a, x.dim()) for a in axes), keep)

    return op


def _argmax_like(fn):
    def op(node: Node, inputs: list[Value]) -> torch.Tensor:
        x = inputs[0]
        axis = _normalize_axis(int(node.attr("axis", 0)), x.dim())
        keep = bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    return op


OPS: dict[str, OpFunction] = {
    # linear algebra
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Einsum": _einsum,
    "Conv": _conv,
    # pooling
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    # normalization and activations
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Relu": _unary(torch.relu),
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "PRelu": _prelu,
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Softplus": _unary(F.softplus),
    "Tanh": _unary(torch.tanh),
    "Gelu": _gelu,
    "Erf": _unary(torch.erf),
    # elementwise
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _pow,
    "Mod": _mod,
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "IsNaN": _unary(torch.isnan),  # torch exports of HF attention masks (MiniLM) use it
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Mean": _mean,
    "Clip": _clip,
    "Where": _where,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Not": _logical(torch.logical_not),
    "And": _logical(torch.logical_and),
    "Or": _logical(torch.logical_or),
    "Xor": _logical(torch.logical_xor),
    # reductions (axes became an input: ReduceSum at opset 13, the others at 18)
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k), axes_input_from=18),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k), axes_input_from=13),
    "ReduceMax": _reduce(lambda x, d, k: torch.amax(x, dim=d, keepdim=k), axes_input_from=18),
    "ReduceMin": _reduce(lambda x, d, k: torch.amin(x, dim=d, keepdim=k), axes_input_from=18),
    "ReduceSumSquare": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k), axes_input_from=18),
    "ReduceL2": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt(), axes_input_from=18),
    "ArgMax": _argmax_like(torch.argmax),
    "ArgMin": _argmax_like(torch.argmin),
    # shapes and data movement
    "Identity": _identity,
    "Dropout": _identity,  # inference: the input unchanged (and an all-true mask)
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": _shape,
    "Size": _size,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
    "Pad": _pad,
}
# Constant nodes are folded into parameters/buffers when the module is built.
HANDLED_AT_BUILD = {"Constant"}
SUBGRAPH_OPS = {"If", "Loop", "Scan"}


# --------------------------------------------------------------------------- support check


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Sorted op types of the main graph the interpreter cannot run ("domain:Op" off ai.onnx)."""
    missing = set()
    for node in model.graph.node:
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        if domain:
            missing.add(f"{domain}:{node.op_type}")
        elif node.op_type not in OPS and node.op_type not in HANDLED_AT_BUILD:
            missing.add(node.op_type)
        elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            missing.add(node.op_type)
    return sorted(missing)


def check_supported(model: onnx.ModelProto) -> None:
    """Raise one :class:`UnsupportedError` naming every op type the interpreter cannot run."""
    missing = unsupported_ops(model)
    if not missing:
        return
    subgraphs = sorted(set(missing) & SUBGRAPH_OPS)
    hint = f" (ops with subgraphs such as {', '.join(subgraphs)} are not supported)" if subgraphs else ""
    raise UnsupportedError(
        f"the torch interpreter cannot run {len(missing)} op type(s) of this model: {', '.join(missing)}{hint}; "
        "fine-tuning and ACIP need every op to run in torch"
    )


# --------------------------------------------------------------------------- the module


def _tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        bits = numpy_helper.to_array(proto).view(np.uint16) if proto.raw_data else None
        if bits is None:
            bits = np.array(proto.int32_data, dtype=np.uint16).reshape(tuple(proto.dims))
        return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).clone()
    if proto.data_type not in TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(proto.data_type)
        raise UnsupportedError(f"tensor {proto.name!r}: element type {name} is not supported by the torch interpreter")
    array = numpy_helper.to_array(proto)
    return torch.from_numpy(np.array(array, copy=True))


def _constant_value(node: onnx.NodeProto) -> torch.Tensor:
    for attr in node.attribute:
        if attr.name == "value":
            return _tensor_from_proto(attr.t)
    try:
        return torch.from_numpy(np.array(g.constant_node_value(node), copy=True))
    except ValueError:
        kinds = ", ".join(a.name for a in node.attribute)
        raise UnsupportedError(
            f"Constant {node.name or node.output[0]}: {kinds} constants are not supported by the torch interpreter"
        ) from None


def _decode_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        attrs[attr.name] = value
    return attrs


@dataclasses.dataclass(frozen=True)
class _Step:
    node: Node
    function: OpFunction
    release: tuple[str, ...]  # values no later node reads: dropped after this step


class OnnxModule(nn.Module):
    """An ONNX model's main graph as a torch module.

    Args:
        model: the ONNX model (weights loaded).
        trainable: which initializers / float Constant tensors become trainable parameters
            (by tensor name); the others are frozen parameters (``requires_grad=False``) for
            floats, buffers otherwise. Default: the low-rank factors (``*.lowrank.*``).
        substitutes: tensor name -> module whose ``forward()`` returns that tensor, used
            instead of the stored value (the node producing it, if any, is skipped).

    ``forward(*inputs, **named_inputs)`` takes the graph's real inputs (positional in graph
    order, or by name; numpy arrays are accepted) and returns the single output, or a tuple in
    graph output order when there are several. :meth:`run` returns every output by name.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        trainable: Callable[[str], bool] = is_factor,
        *,
        substitutes: Mapping[str, nn.Module] | None = None,
    ):
        super().__init__()
        check_supported(model)  # before any work: one message listing every missing op
        graph = model.graph
        self.opset = g.opset_version(model)
        initializer_names = {init.name for init in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in initializer_names]
        self.output_names = [v.name for v in graph.output]
        substitutes = dict(substitutes or {})
        self._substitutes = nn.ModuleList(substitutes.values())
        self._substitute_index = {name: i for i, name in enumerate(substitutes)}
        self._slots: dict[str, tuple[str, str]] = {}  # tensor name -> ("param"|"buffer", attribute)
        if graph.sparse_initializer:
            raise UnsupportedError("sparse initializers are not supported by the torch interpreter")
        for init in graph.initializer:
            if init.name not in substitutes:
                self._add_tensor(init.name, _tensor_from_proto(init), trainable)
        steps: list[tuple[Node, OpFunction]] = []
        for index, proto in enumerate(graph.node):
            if proto.output and all(out in substitutes for out in proto.output if out):
                continue  # its value is computed by a substitute
            if proto.op_type == "Constant":
                self._add_tensor(proto.output[0], _constant_value(proto), trainable)
                continue
            node = Node(
                op_type=proto.op_type,
                name=proto.name or g.node_label(proto, index),
                inputs=tuple(proto.input),
                outputs=tuple(proto.output),
                attrs=_decode_attrs(proto),
                opset=self.opset,
            )
            steps.append((node, OPS[proto.op_type]))
        self._steps = self._schedule(steps)
        log.debug(
            "torch interpreter: %d nodes, %d parameters (%d trainable), %d substitutes",
            len(self._steps), sum(1 for _ in self.parameters()),
            sum(1 for p in self.parameters() if p.requires_grad), len(substitutes),
        )

    # ---- building

    def _add_tensor(self, name: str, value: torch.Tensor, trainable: Callable[[str], bool]) -> None:
        attribute = f"t{len(self._slots)}"
        if value.dtype in FLOAT_DTYPES:
            self.register_parameter(attribute, nn.Parameter(value, requires_grad=bool(trainable(name))))
            self._slots[name] = ("param", attribute)
        else:
            self.register_buffer(attribute, value)
            self._slots[name] = ("buffer", attribute)

    def _schedule(self, steps: list[tuple[Node, OpFunction]]) -> list[_Step]:
        available = set(self.input_names) | set(self._slots) | set(self._substitute_index) | {""}
        for node, _ in steps:
            missing = [name for name in node.inputs if name not in available]
            if missing:
                raise InputError(
                    f"node {node.label} reads {', '.join(missing)}, which no earlier node, input or "
                    "initializer provides (is the graph topologically sorted?)"
                )
            available.update(node.outputs)
        for name in self.output_names:
            if name not in available:
                raise InputError(f"graph output {name!r} is not produced by any node")
        last_use: dict[str, int] = {}
        for index, (node, _) in enumerate(steps):
            for name in node.inputs:
                last_use[name] = index
        keep = set(self.output_names) | set(self._slots) | set(self._substitute_index)
        release: dict[int, list[str]] = {}
        for name, index in last_use.items():
            if name and name not in keep:
                release.setdefault(index, []).append(name)
        return [_Step(node, fn, tuple(release.get(i, ()))) for i, (node, fn) in enumerate(steps)]

    # ---- access by ONNX name

    def tensor_names(self) -> list[str]:
        """Names of every stored initializer / Constant tensor (substitutes excluded)."""
        return list(self._slots)

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding the ONNX tensor ``name``."""
        kind, attribute = self._slots[name]
        return getattr(self, attribute)

    def named_onnx_parameters(self, *, trainable_only: bool = True) -> dict[str, nn.Parameter]:
        """ONNX tensor name -> parameter (only the trainable ones unless told otherwise)."""
        out = {}
        for name, (kind, attribute) in self._slots.items():
            param = getattr(self, attribute)
            if kind == "param" and (param.requires_grad or not trainable_only):
                out[name] = param
        return out

    def replace_tensor(self, name: str, value: torch.Tensor) -> nn.Parameter:
        """Swap the parameter behind ``name`` for a new one holding ``value`` (any shape).

        Keeps the old parameter's ``requires_grad``; optimizers holding the old one must be
        rebuilt.
        """
        kind, attribute = self._slots[name]
        if kind != "param":
            raise KeyError(f"{name} is a buffer, not a parameter")
        old = getattr(self, attribute)
        new = nn.Parameter(value.detach().to(old.dtype).clone(), requires_grad=old.requires_grad)
        setattr(self, attribute, new)
        return new

    # ---- running

    def run(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Evaluate the graph; ``feeds`` maps every real input name to a tensor (or array)."""
        missing = [name for name in self.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self.input_names]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown input(s) {', '.join(unknown)}")
            raise InputError(f"{'; '.join(parts)} (the model takes {', '.join(self.input_names)})")
        env: dict[str, torch.Tensor | None] = {"": None}
        for name, (_, attribute) in self._slots.items():
            env[name] = getattr(self, attribute)
        for name, index in self._substitute_index.items():
            env[name] = self._substitutes[index]()
        for name, value in feeds.items():
            env[name] = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        for step in self._steps:
            node = step.node
            inputs = [env[name] for name in node.inputs]
            try:
                result = step.function(node, inputs)
            except (UnsupportedError, InputError):
                raise
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"torch interpreter: node {node.label} ({node.op_type}) failed: {first}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
            for name in step.release:
                env.pop(name, None)
        return {name: env[name] for name in self.output_names}

    def forward(self, *args: Any, **kwargs: Any):
        if len(args) > len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} input(s), got {len(args)} positional")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name in feeds:
                raise InputError(f"input {name!r} given both by position and by name")
            feeds[name] = value
        outputs = self.run(feeds)
        values = tuple(outputs[name] for name in self.output_names)
        return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- check against ORT


@dataclasses.dataclass(frozen=True)
class Verification:
    """How far the interpreter's outputs are from onnxruntime's, per output.

    ``errors`` maps output name -> max |torch - ort| / max |ort| (dimensionless; 0 for
    identical outputs, exact equality required for integer/bool outputs, where a mismatch is
    inf). ``rtol`` is the tolerance that was applied.
    """

    errors: dict[str, float]
    rtol: float

    @property
    def ok(self) -> bool:
        return all(error <= self.rtol for error in self.errors.values())

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)


def verify_against_onnxruntime(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    rtol: float = 1e-4,
    *,
    module: OnnxModule | None = None,
) -> Verification:
    """Run ``model`` on ``feeds`` in the interpreter and on onnxruntime (CPU) and compare.

    ``rtol`` bounds max |torch - ort| / max |ort| per output. Raises
    :class:`UnsupportedError` naming the worst output and the tolerance that would have
    passed when the interpreter disagrees; returns the :class:`Verification` otherwise.
    ``module`` checks an already built interpreter (e.g. with substitutes) instead.
    """
    from onnx_lowrank.validate.reference import run_reference

    expected = run_reference(model, feeds)
    module = module if module is not None else OnnxModule(model, train_nothing)
    with torch.no_grad():
        actual = module.run({name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in feeds.items()})
    errors = {name: _relative_max_error(actual[name], expected[name]) for name in module.output_names}
    verification = Verification(errors, rtol)
    if not verification.ok:
        name = max(errors, key=errors.get)
        raise UnsupportedError(
            f"the torch interpreter disagrees with onnxruntime on output {name!r} "
            f"(max |diff| / max |ort| = {errors[name]:.3g} > rtol {rtol:g}; rtol {errors[name]:.3g} would pass); "
            "not training on a model the interpreter does not reproduce"
        )
    log.info("torch interpreter matches onnxruntime (worst max-relative error %.3g)", verification.worst)
    return verification


def _relative_max_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    got = actual.detach().cpu()
    if got.dtype == torch.bfloat16:
        got = got.float()
    got = got.numpy()
    if tuple(got.shape) != tuple(expected.shape):
        return math.inf
    if expected.dtype.kind not in "fc":
        return 0.0 if np.array_equal(got, expected) else math.inf
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    if not np.all(np.isfinite(diff)):
        same = np.array_equal(np.isnan(got), np.isnan(expected)) and np.array_equal(
            got[~np.isfinite(got)], expected[~np.isfinite(expected)]
        )
        diff = np.where(np.isfinite(diff), diff, 0.0 if same else np.inf)
    scale = float(np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0))
    worst = float(diff.max(initial=0.0))
    return worst / scale if scale > 0 else worst
