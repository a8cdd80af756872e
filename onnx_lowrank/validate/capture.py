"""Run a model on a :class:`~onnx_lowrank.validate.data.Dataset` and capture intermediate tensors.

The wanted tensors are added as extra graph outputs of a copy of the model (the caller's model
is not touched). Chosen initializers can be made overridable graph inputs, so that a caller
who changes a few weights between passes (the sequential refit of
:mod:`onnx_lowrank.refit`) feeds the new values instead of building a new session.

Memory stays bounded: :meth:`CaptureSession.batches` yields one batch of captured tensors at a
time, for the caller to reduce (e.g. into ``X^T X``) before the next one is computed.
onnxruntime is imported only in this package (and ``calibrate``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx

from onnx_lowrank.validate.data import Dataset
from onnx_lowrank.validate.runtime import RuntimeOptions, create_session, input_specs

log = logging.getLogger(__name__)

# CPU, ORT's default threads, no spinning (numpy runs between the session calls).
CAPTURE_OPTIONS = RuntimeOptions()


class CaptureSession:
    """One onnxruntime session that also outputs ``tensors`` and accepts ``overridable`` weights.

    ``tensors`` may name graph inputs (returned from the feeds), graph outputs or any
    intermediate tensor of the main graph. ``overridable`` names main-graph initializers whose
    values :meth:`run` / :meth:`batches` may replace through ``overrides`` (by name).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        tensors: Iterable[str],
        *,
        overridable: Iterable[str] = (),
        label: str = "capture",
        options: RuntimeOptions = CAPTURE_OPTIONS,
    ):
        self.tensors = tuple(dict.fromkeys(tensors))
        self._graph_inputs = {spec.name for spec in input_specs(model)}
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        outputs = {o.name for o in copy.graph.output}
        types = tensor_types(model)
        for name in self.tensors:
            if name not in outputs and name not in self._graph_inputs:
                elem = types.get(name, onnx.TensorProto.FLOAT)
                copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        inputs = {v.name for v in copy.graph.input}
        initializers = {init.name: init for init in copy.graph.initializer}
        self.overridable: dict[str, np.dtype] = {}
        for name in overridable:
            init = initializers.get(name)
            if init is None:
                raise KeyError(f"{name!r} is not a main-graph initializer")
            if name not in inputs:
                copy.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
                inputs.add(name)
            self.overridable[name] = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        self._fetch = [t for t in self.tensors if t not in self._graph_inputs]
        self._session = create_session(copy, options, label=label)

    def run(
        self, feeds: Mapping[str, np.ndarray], overrides: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The captured tensors for one batch of ``feeds``, with ``overrides`` substituted."""
        full = dict(feeds)
        for name, value in (overrides or {}).items():
            if name not in self.overridable:
                raise KeyError(f"{name!r} was not declared overridable")
            full[name] = np.ascontiguousarray(value, dtype=self.overridable[name])
        fetched = self._session.run(full, outputs=self._fetch) if self._fetch else {}
        fetched.update({t: np.asarray(feeds[t]) for t in self.tensors if t in self._graph_inputs})
        return fetched

    def batches(
        self,
        data: Dataset,
        batch_size: int,
        overrides: Mapping[str, np.ndarray] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """The captured tensors batch by batch, in the data's order (one batch in memory)."""
        for feeds, _ in data.batches(batch_size):
            yield self.run(feeds, overrides)


def capture(
    model: onnx.ModelProto, tensors: Iterable[str], data: Dataset, *, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Every sample's value of ``tensors``, concatenated along the batch axis.

    Convenience for small data: the whole result is held in memory. Use
    :class:`CaptureSession` and reduce batch by batch otherwise.
    """
    session = CaptureSession(model, tensors)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in session.tensors}
    for fetched in session.batches(data, batch_size):
        for name in session.tensors:
            parts[name].append(fetched[name])
    return {name: np.concatenate(values, axis=0) for name, values in parts.items() if values}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor that shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # onnx raises several unrelated types here; untyped tensors default to float
        inferred = model
    graph = inferred.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in list(graph.input) + list(graph.value_info) + list(graph.output)
        if v.type.HasField("tensor_type")
    }
