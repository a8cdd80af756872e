"""Static shapes of a model's tensors, with dynamic dimensions pinned by the user.

Used for FLOP counts and for building inputs. Symbolic dimensions (``batch``, ``seq``) take the
value the user gave with ``--input-shape`` and 1 otherwise.
"""

from __future__ import annotations

import logging
import re

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
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Shape]:
    """Shapes of every tensor of the main graph that shape inference can reach.

    Inputs are pinned to :func:`input_shapes` first, so most shapes come out concrete. A model
    on which onnx shape inference fails yields only the shapes it declares.
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
    return shapes
