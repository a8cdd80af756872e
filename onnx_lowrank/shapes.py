"""Static shapes of a model's tensors, with dynamic dimensions pinned by the user.

Used for FLOP counts and for building inputs. Symbolic dimensions (``batch``, ``seq``) take the
value the user gave with ``--input-shape`` and 1 otherwise.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx

from onnx_lowrank.errors import OptionError

log = logging.getLogger(__name__)

Shape = tuple[int | None, ...]

_SHAPE_RE = re.compile(r"^([^=]+)=(\d+(?:[x,]\d+)*)$")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (or ``NAME=1,3,224,224``) into a name and a shape."""
    match = _SHAPE_RE.match(text.strip())
    if not match:
        raise OptionError(f"--input-shape {text!r}: expected NAME=DIMxDIMx... e.g. input=1x3x224x224")
    dims = tuple(int(d) for d in re.split(r"[x,]", match.group(2)))
    return match.group(1), dims


def input_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every real (non-initializer) graph input.

    ``overrides`` maps input names to full shapes; unknown dimensions default to 1.
    """
    overrides = dict(overrides or {})
    initializers = {i.name for i in model.graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in overrides:
            shapes[value.name] = tuple(overrides.pop(value.name))
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    if overrides:
        names = ", ".join(sorted(overrides))
        raise OptionError(f"--input-shape names unknown input(s): {names}")
    return shapes


def infer_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None, *, measure_missing: bool = True
) -> dict[str, Shape]:
    """Shapes of every tensor of the main graph that shape inference can reach.

    Inputs are pinned to :func:`input_shapes` first, so most shapes come out concrete. Where
    the Gemm/MatMul/Conv shapes still have open dimensions and ``measure_missing`` is set, the
    model is run once on random inputs of those shapes to read them. A model on which onnx
    shape inference fails yields only the shapes it declares (and measured ones).
    """
    concrete = input_shapes(model, overrides)
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for value in pinned.graph.input:
        if value.name in concrete:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, concrete[value.name]):
                dim.Clear()
                dim.dim_value = size
    # Declared intermediate shapes may carry stale symbols; let inference recompute them.
    del pinned.graph.value_info[:]
    try:
        pinned = onnx.shape_inference.infer_shapes(pinned, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        log.debug("shape inference failed: %s", exc)
    shapes: dict[str, Shape] = {}
    graph = pinned.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = tuple(d.dim_value if d.dim_value > 0 else None for d in tensor_type.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = _unknown_layer_shapes(model, shapes)
    if missing and measure_missing:
        shapes.update(_measured_shapes(model, concrete, missing))
    return shapes


# The ops whose shapes FLOP counts and per-layer timing need.
_LAYER_OPS = frozenset({"Gemm", "MatMul", "Conv"})


def _unknown_layer_shapes(model: onnx.ModelProto, shapes: dict[str, Shape]) -> list[str]:
    """Inputs and outputs of main-graph layer nodes whose shape static inference left open."""
    names = []
    for node in model.graph.node:
        if node.op_type in _LAYER_OPS:
            for name in [*node.input[:2], *node.output[:1]]:
                shape = shapes.get(name)
                if name and (shape is None or any(d is None for d in shape)):
                    names.append(name)
    return list(dict.fromkeys(names))


def _measured_shapes(model: onnx.ModelProto, concrete: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, Shape]:
    """Shapes of ``names`` from one onnxruntime run on seeded random inputs of the pinned shapes.

    Real exports compute reshape targets and position ids from ``Shape`` at run time (Hugging
    Face encoders), which static inference cannot follow; running the graph once can. Returns
    {} when the model cannot run that way (the shapes then stay unknown, as before).
    """
    try:
        from onnx_lowrank.validate.capture import CaptureSession
        from onnx_lowrank.validate.data import random_feeds
        from onnx_lowrank.validate.runtime import input_specs

        feeds = random_feeds(input_specs(model), None, shapes=concrete)
        fetched = CaptureSession(model, names, label="shape probe").run(feeds)
    except Exception as exc:  # noqa: BLE001 - any failure only means the shapes stay unknown
        log.debug("could not measure %d tensor shapes by running the model: %s", len(names), exc)
        return {}
    log.debug("measured %d tensor shapes by running the model once", len(fetched))
    return {name: tuple(int(d) for d in np.shape(value)) for name, value in fetched.items()}
