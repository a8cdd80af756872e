"""Split the user's data, once and deterministically, into a calibration and a held-back part.

The calibration part is all the search ever sees (covariances, per-layer sensitivities,
verification, back-off); the held-back part is used once, by the final check with
:func:`onnx_lowrank.validate.accuracy.compare_models`. :func:`onnx_lowrank.floor.run.compress_to_floor`
passes only the calibration :class:`Dataset` to the analysis, and the tests assert that no
dataset the search touches has the held-back part's sha256.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnx_lowrank.errors import OptionError
from onnx_lowrank.validate.data import Dataset


@dataclasses.dataclass(frozen=True)
class Split:
    """The two parts and how they were drawn (``holdout`` fraction, ``seed``)."""

    calibration: Dataset
    held_back: Dataset
    holdout: float
    seed: int

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "holdout": self.holdout,
            "calibration": {"samples": self.calibration.n, "sha256": self.calibration.sha256},
            "held_back": {"samples": self.held_back.n, "sha256": self.held_back.sha256},
        }


def split_dataset(data: Dataset, holdout: float, seed: int) -> Split:
    """A seeded random partition: ``round(holdout * n)`` samples held back (at least 1 each side).

    Samples keep their original order within each part, so the split is the same for the same
    data, fraction and seed.
    """
    if not 0 < holdout < 1:
        raise OptionError(f"--holdout must be in (0, 1), got {holdout}")
    n = data.n
    if n < 2:
        raise OptionError(f"--holdout: need at least 2 samples to split, the data has {n}")
    held = min(max(int(round(holdout * n)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    held_index = np.sort(order[:held])
    calib_index = np.sort(order[held:])
    return Split(_subset(data, calib_index, "calibration"), _subset(data, held_index, "held-back"), holdout, seed)


def _subset(data: Dataset, index: np.ndarray, part: str) -> Dataset:
    feeds = {k: np.ascontiguousarray(v[index]) for k, v in data.feeds.items()}
    labels = data.labels[index] if data.labels is not None else None
    return Dataset(feeds, labels, data.notes, f"{data.source}[{part} {len(index)}]")
