"""A plain CPU reference run of an in-memory model on ONNX Runtime, for the torch side.

The torch interpreter (:mod:`onnx_lowrank.torch.interpreter`) checks itself against this run
before anything is trained, and the distillation targets are the original model's outputs from
here. Graph optimizations are off and one thread is used, so the reference is the graph's own
semantics, reproducible run to run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_lowrank.validate.data import Dataset
from onnx_lowrank.validate.runtime import RuntimeOptions, create_session

log = logging.getLogger(__name__)

# The graph's own semantics (no ORT fusions), one thread: reproducible run to run.
REFERENCE_OPTIONS = RuntimeOptions(threads=1, optimize=False)


class ReferenceSession:
    """A one-thread CPU session on a ``ModelProto``; ``run`` maps output name -> array."""

    def __init__(self, model: onnx.ModelProto):
        self._session = create_session(model, REFERENCE_OPTIONS, label="reference")
        self.output_names = self._session.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._session.run(dict(feeds))

    def run_batched(self, feeds: Mapping[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Run ``feeds`` (batch first) in slices of ``batch_size`` samples and concatenate."""
        data = Dataset(dict(feeds))
        if data.n == 0:  # no batch axis to slice
            return self.run(feeds)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for batch, _ in data.batches(batch_size):
            out = self.run(batch)
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
