"""A plain CPU reference run of an in-memory model on ONNX Runtime, for the torch side.

The torch interpreter (:mod:`onnx_lowrank.torch.interpreter`) checks itself against this run
before anything is trained, and the distillation targets are the original model's outputs from
here. Graph optimizations are off and one thread is used, so the reference is the graph's own
semantics, reproducible run to run.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.errors import InputError
from onnx_lowrank.model import PROTOBUF_LIMIT_BYTES, save_model

log = logging.getLogger(__name__)


class ReferenceSession:
    """A one-thread CPU session on a ``ModelProto``; ``run`` maps output name -> array."""

    def __init__(self, model: onnx.ModelProto):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
                self._session = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            else:  # protobuf cannot serialize it in one piece: go through external data
                with tempfile.TemporaryDirectory(prefix="onnx-lowrank-ref-") as tmp:
                    path = Path(tmp) / "model.onnx"
                    save_model(model, path, external_data=True)
                    self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises Fail / InvalidGraph / NotImplemented ...
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load the model ({text})") from None
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(self.output_names, dict(feeds))
        except Exception as exc:  # wrong input names/shapes/dtypes, or the graph fails on them
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot run the model on these inputs ({text})") from None
        return dict(zip(self.output_names, outputs))

    def run_batched(self, feeds: Mapping[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Run ``feeds`` (batch first) in slices of ``batch_size`` samples and concatenate."""
        n = _samples(feeds)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, n, batch_size):
            out = self.run({k: v[start : start + batch_size] for k, v in feeds.items()})
            for name in self.output_names:
                parts[name].append(out[name])
        return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}


def run_reference(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds`` from onnxruntime's CPU provider (output name -> array).

    With ``batch_size`` the feeds are run in slices along axis 0 and concatenated.
    """
    session = ReferenceSession(model)
    if batch_size is None:
        return session.run(feeds)
    return session.run_batched(feeds, batch_size)


def _samples(feeds: Mapping[str, np.ndarray]) -> int:
    sizes: Iterable[int] = {v.shape[0] for v in feeds.values() if v.ndim}
    sizes = sorted(sizes)
    return sizes[0] if sizes else 1
