"""Decomposers and graph lowerings for Tucker-2 and tensor-train layers.

Rewrites:

- ``Conv(x, W, b)`` with Tucker-2 (``ranks = [r_out, r_in]``) or channel TT
  (``ranks = [r1, r2]``) -> 1x1 ``Conv`` Cin->r_in, the original kh x kw ``Conv``
  r_in->r_out (strides, pads, dilations, auto_pad kept), 1x1 ``Conv`` r_out->Cout with the bias;
- ``Gemm`` / ``MatMul(x, W)`` with a TT-matrix (``ranks = [1, r1, ..., 1]``, optional
  ``options.out_dims`` / ``options.in_dims``, default :func:`tt_dims`) -> per core
  ``Reshape -> Transpose -> Reshape -> MatMul``, then a ``Reshape`` back to ``(..., out)`` (and
  the Gemm bias as an ``Add``).

Registered into :mod:`onnx_lowrank.passes.factorize`'s tables.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank import graph as g
from onnx_lowrank.decompose.tt import TTRank, factorize_dim, tt_conv, tt_matrix
from onnx_lowrank.decompose.tucker import TuckerRank, tucker2
from onnx_lowrank.errors import InputError
from onnx_lowrank.layers import Layer
from onnx_lowrank.passes.rewrite import copy_attributes
from onnx_lowrank.search.plan import LayerDecision

# HOOI sweeps after HOSVD: a few sweeps reach most of the gain (see benchmarks/decompose.py).
TUCKER_HOOI_SWEEPS = 5


def tt_dims(layer: Layer, decision: LayerDecision | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How a Linear layer's out and in dimensions are split into TT modes.

    The plan may fix them (``options.out_dims`` / ``options.in_dims``); otherwise both sides use
    the same number of balanced factors (<= 16 each where possible).
    """
    options = decision.options if decision is not None else {}
    if "out_dims" in options and "in_dims" in options:
        return tuple(options["out_dims"]), tuple(options["in_dims"])
    parts = max(len(factorize_dim(layer.out_features)), len(factorize_dim(layer.in_features)), 2)
    return factorize_dim(layer.out_features, parts), factorize_dim(layer.in_features, parts)


def _kernel(matrix: np.ndarray, layer: Layer) -> np.ndarray:
    return matrix.reshape(layer.weight_shape)


def decompose_tucker(matrix: np.ndarray, layer: Layer, decision: LayerDecision):
    if layer.op_type != "Conv" or len(decision.ranks or ()) != 2:
        raise InputError(f"plan layer {layer.name}: tucker needs a Conv and \"ranks\": [r_out, r_in]")
    r_out, r_in = decision.ranks
    return tucker2(_kernel(matrix, layer), TuckerRank(r_out, r_in), n_iter_max=TUCKER_HOOI_SWEEPS)


def decompose_tt(matrix: np.ndarray, layer: Layer, decision: LayerDecision):
    ranks = tuple(decision.ranks or ())
    if layer.op_type == "Conv":
        if len(ranks) != 2:
            raise InputError(f"plan layer {layer.name}: tt on a Conv needs \"ranks\": [r1, r2]")
        return tt_conv(_kernel(matrix, layer), TTRank((1, *ranks, 1)))
    out_dims, in_dims = tt_dims(layer, decision)
    if len(ranks) != len(out_dims) + 1:
        raise InputError(
            f"plan layer {layer.name}: tt needs {len(out_dims) + 1} ranks for dims {out_dims} x {in_dims}, got {list(ranks)}"
        )
    return tt_matrix(matrix, out_dims, in_dims, TTRank(ranks))


def lower_conv_chain(ctx, node: onnx.NodeProto, factors) -> list[onnx.NodeProto]:
    """Three convs: 1x1 in, the original geometry in the middle, 1x1 out with the bias."""
    first, core, last = factors.conv_kernels()
    ones = [1] * (len(ctx.layer.weight_shape) - 2)
    names = [ctx.initializer(str(i), kernel) for i, kernel in enumerate((first, core, last))]
    h1, h2 = ctx.hidden(node), ctx.hidden(node)
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    return [
        helper.make_node("Conv", [node.input[0], names[0]], [h1], name=ctx.node_name(node, 0), kernel_shape=ones),
        helper.make_node("Conv", [h1, names[1]], [h2], name=ctx.node_name(node, 1), **copy_attributes(node)),
        helper.make_node("Conv", [h2, names[2], *bias], list(node.output), name=ctx.node_name(node, 2), kernel_shape=ones),
    ]


def lower_tt_linear(ctx, node: onnx.NodeProto, factors) -> list[onnx.NodeProto]:
    """The TT-matrix contraction chain for ``x @ W`` (MatMul) or ``alpha x W + beta C`` (Gemm)."""
    if ctx.layer.form == "left":
        raise InputError(f"plan layer {ctx.layer.name}: tt cannot lower a MatMul whose weight is the left input")
    is_gemm = node.op_type == "Gemm"
    alpha = float(g.attribute(node, "alpha", 1.0)) if is_gemm else 1.0
    nodes: list[onnx.NodeProto] = []
    state = node.input[0]
    part = 0

    def add(op, inputs, **attrs):
        nonlocal state, part
        out = ctx.hidden(node)
        nodes.append(helper.make_node(op, inputs, [out], name=ctx.node_name(node, part), **attrs))
        part += 1
        state = out

    def shape_constant(values, key):
        return ctx.initializer(key, np.asarray(values, dtype=np.int64), elem_type=onnx.TensorProto.INT64)

    steps = factors.matmul_steps()
    for index, step in enumerate(steps):
        weight = step.weight * alpha if index == 0 and alpha != 1.0 else step.weight
        add("Reshape", [state, shape_constant(step.split_shape, f"split{index}")])
        add("Transpose", [state], perm=list(step.perm))
        add("Reshape", [state, shape_constant(step.rows_shape, f"rows{index}")])
        add("MatMul", [state, ctx.initializer(f"core{index}" + (f"_alpha{alpha:g}" if index == 0 and alpha != 1.0 else ""), weight)])
    out_features = factors.out_features
    if is_gemm:
        add("Reshape", [state, shape_constant([-1, out_features], "out")])
        if len(node.input) > 2 and node.input[2]:
            product, bias = state, node.input[2]
            beta = float(g.attribute(node, "beta", 1.0))
            if beta != 1.0:
                add("Mul", [bias, ctx.initializer(f"beta{beta:g}", np.asarray(beta))])
                bias = state
            add("Add", [product, bias])
    else:  # restore the leading dims of x: (..., in) -> (..., out)
        shape = ctx.hidden(node)
        lead = ctx.hidden(node)
        target = ctx.hidden(node)
        nodes += [
            helper.make_node("Shape", [node.input[0]], [shape], name=ctx.node_name(node, part)),
            helper.make_node(
                "Slice",
                [shape, shape_constant([0], "zero"), shape_constant([-1], "minus_one")],
                [lead],
                name=ctx.node_name(node, part + 1),
            ),
            helper.make_node(
                "Concat", [lead, shape_constant([out_features], "out_dim")], [target], axis=0, name=ctx.node_name(node, part + 2)
            ),
        ]
        part += 3
        add("Reshape", [state, target])
    nodes[-1].output[0] = node.output[0]
    return nodes


DECOMPOSERS = {"tucker": decompose_tucker, "tt": decompose_tt}
LOWERINGS = {
    ("Conv", "tucker"): lower_conv_chain,
    ("Conv", "tt"): lower_conv_chain,
    ("Gemm", "tt"): lower_tt_linear,
    ("MatMul", "tt"): lower_tt_linear,
}
