"""How far a compressed model's outputs are from the original's, and against labels.

Per output (streamed over batches, computed in float64):

- ``max_abs_error``: max |a - b| over every element;
- ``rel_l2_error``: ||a - b|| / ||a|| over the whole output (a = original);
- ``cosine``: mean over samples of the cosine between a sample's flattened outputs (and its
  minimum, ``cosine_min``); two all-zero samples count as 1;
- ``top1_agreement``: for classifier-like outputs (2-D float [batch, classes]), the fraction of
  samples whose argmax is the same.

With labels, the accuracy (fraction correct) of both models on the first classifier-like output
and the drop in percentage points. :class:`Thresholds` turn these into a pass/fail with, for
each failure, the threshold value that would have passed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np

from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.validate.data import Dataset
from onnx_lowrank.validate.runtime import ModelLike, RuntimeOptions, Session, create_session, runtime_info

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OutputMetrics:
    """Errors of one output of the compressed model against the original (dimensionless)."""

    name: str
    shape: tuple[int, ...]  # per-sample shape (batch axis dropped)
    max_abs_error: float
    rel_l2_error: float
    cosine: float
    cosine_min: float
    top1_agreement: float | None  # None unless the output is [batch, classes]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs_error": _num(self.max_abs_error),
            "rel_l2_error": _num(self.rel_l2_error),
            "cosine": _num(self.cosine),
            "cosine_min": _num(self.cosine_min),
            "top1_agreement": _num(self.top1_agreement),
        }


@dataclasses.dataclass(frozen=True)
class LabelAccuracy:
    """Accuracy of both models against labels on one output (fractions in [0, 1])."""

    output: str
    original: float
    compressed: float
    samples: int

    @property
    def drop_points(self) -> float:
        """Original minus compressed accuracy, in percentage points (positive = worse)."""
        return (self.original - self.compressed) * 100

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "original": _num(self.original),
            "compressed": _num(self.compressed),
            "drop_points": _num(self.drop_points),
            "samples": self.samples,
        }


@dataclasses.dataclass(frozen=True)
class ComparisonResult:
    """Everything :func:`compare_models` measured."""

    outputs: tuple[OutputMetrics, ...]
    accuracy: LabelAccuracy | None
    samples: int
    runtime: dict
    notes: tuple[str, ...] = ()

    def output(self, name: str) -> OutputMetrics:
        for metrics in self.outputs:
            if metrics.name == name:
                return metrics
        raise KeyError(name)

    def worst(self) -> dict[str, float]:
        """The worst value of each metric over all outputs (what a gate compares)."""
        out = {
            "rel_l2_error": max(m.rel_l2_error for m in self.outputs),
            "max_abs_error": max(m.max_abs_error for m in self.outputs),
            "cosine": min(m.cosine for m in self.outputs),
        }
        agreements = [m.top1_agreement for m in self.outputs if m.top1_agreement is not None]
        if agreements:
            out["top1_agreement"] = min(agreements)
        if self.accuracy is not None:
            out["accuracy_original"] = self.accuracy.original * 100
            out["accuracy"] = self.accuracy.compressed * 100
            out["accuracy_drop"] = self.accuracy.drop_points
        return out

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "outputs": [m.to_json() for m in self.outputs],
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "runtime": self.runtime,
            "notes": list(self.notes),
        }


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits; None means not checked. ``max_accuracy_drop`` is in points."""

    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self):
        for field, (flag, low, high) in _LIMITS.items():
            value = getattr(self, field)
            if value is not None and not low <= value <= high:  # NaN fails this too
                raise OptionError(f"{flag} must be in [{low:g}, {high:g}], got {value}")

    def active(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


# field -> (flag, lowest, highest value accepted)
_LIMITS = {
    "max_rel_error": ("--max-rel-error", 0.0, math.inf),
    "min_cosine": ("--min-cosine", -1.0, 1.0),
    "min_top1_agreement": ("--min-top1-agreement", 0.0, 1.0),
    "max_accuracy_drop": ("--max-accuracy-drop", -100.0, 100.0),
}


@dataclasses.dataclass(frozen=True)
class ThresholdFailure:
    """One unmet threshold: the measured value, the limit, and the limit that would pass."""

    metric: str
    flag: str
    output: str | None
    value: float
    limit: float
    passing: float | None  # None when the value is not finite

    @property
    def message(self) -> str:
        where = f" of {self.output}" if self.output else ""
        op = ">" if self.flag.startswith("--max") else "<"
        would = f"{self.flag} {self.passing:g} would pass" if self.passing is not None else "not a finite number"
        return f"{self.metric}{where} is {self.value:.6g} {op} {self.limit:g} ({would})"

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "flag": self.flag, "output": self.output,
            "value": _num(self.value), "limit": self.limit, "passing": self.passing,
        }


# Thresholds checked per output: (Thresholds field, OutputMetrics field, "max"|"min").
_OUTPUT_CHECKS = (
    ("max_rel_error", "rel_l2_error", "max"),
    ("min_cosine", "cosine", "min"),
    ("min_top1_agreement", "top1_agreement", "min"),
)


def check_thresholds(result: ComparisonResult, thresholds: Thresholds) -> list[ThresholdFailure]:
    """Every threshold ``result`` does not meet (an empty list means it passed)."""
    failures = []
    for field, metric, kind in _OUTPUT_CHECKS:
        limit = getattr(thresholds, field)
        if limit is None:
            continue
        flag = _LIMITS[field][0]
        checked = [m for m in result.outputs if getattr(m, metric) is not None]
        if not checked:
            raise OptionError(f"{flag}: no output is classifier-like ([batch, classes] float)")
        for metrics in checked:
            failure = limit_failure(metric, flag, metrics.name, getattr(metrics, metric), limit, kind)
            if failure is not None:
                failures.append(failure)
    if thresholds.max_accuracy_drop is not None:
        if result.accuracy is None:
            raise OptionError("--max-accuracy-drop needs labels (--labels, --labels-key or an npz key 'labels')")
        failure = limit_failure(
            "accuracy drop (points)", "--max-accuracy-drop", result.accuracy.output,
            result.accuracy.drop_points, thresholds.max_accuracy_drop, "max",
        )
        if failure is not None:
            failures.append(failure)
    return failures


def limit_failure(metric: str, flag: str, output: str | None, value: float, limit: float, kind: str):
    """A :class:`ThresholdFailure` if ``value`` misses ``limit`` ("max" or "min"), else None."""
    ok = value <= limit if kind == "max" else value >= limit  # NaN fails both ways
    if ok:
        return None
    passing = _loosen(value, kind) if math.isfinite(value) else None
    return ThresholdFailure(metric, flag, output, float(value), limit, passing)


def compare_models(
    original: ModelLike | Session,
    compressed: ModelLike | Session,
    inputs: Dataset | dict[str, np.ndarray],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    batch_size: int = 64,
    labels: np.ndarray | None = None,
    on_batch: Callable[..., None] | None = None,
) -> ComparisonResult:
    """Run both models on ``inputs`` in batches and measure how far their outputs differ.

    ``original`` / ``compressed``: a path, a ``ModelProto`` or a :class:`Session`.
    ``inputs``: a :class:`Dataset` or a dict of batch-first arrays (with ``labels``).
    ``options`` overrides ``provider``. ``on_batch`` is called after every batch.
    """
    options = options or RuntimeOptions(provider=provider)
    dataset = inputs if isinstance(inputs, Dataset) else Dataset(dict(inputs), labels)
    if labels is not None and isinstance(inputs, Dataset):
        dataset = dataclasses.replace(dataset, labels=labels)
    session_a = original if isinstance(original, Session) else create_session(original, options, label="original")
    session_b = compressed if isinstance(compressed, Session) else create_session(compressed, options, label="compressed")
    notes = list(dataset.notes)
    pairs = _pair_outputs(session_a, session_b, notes)
    _check_inputs(session_a, session_b, dataset)
    accumulators = {name_a: _Accumulator(name_a) for name_a, _ in pairs}
    label_output: str | None = None
    correct_a = correct_b = seen = 0
    for feeds, batch_labels in dataset.batches(batch_size):
        out_a = session_a.run(feeds)
        out_b = session_b.run(feeds)
        for name_a, name_b in pairs:
            accumulators[name_a].add(out_a[name_a], out_b[name_b])
        if batch_labels is not None:
            if label_output is None:
                label_output = _label_output(pairs, out_a, notes)
            name_b = dict(pairs)[label_output]
            pred_a, pred_b = out_a[label_output].argmax(axis=1), out_b[name_b].argmax(axis=1)
            if pred_a.shape[0] != batch_labels.shape[0]:
                raise InputError(f"output {label_output!r} has {pred_a.shape[0]} rows for {batch_labels.shape[0]} labels")
            correct_a += int((pred_a == batch_labels).sum())
            correct_b += int((pred_b == batch_labels).sum())
            seen += int(batch_labels.shape[0])
        if on_batch is not None:
            on_batch()
    accuracy = None
    if label_output is not None and seen:
        accuracy = LabelAccuracy(label_output, correct_a / seen, correct_b / seen, seen)
    runtime = runtime_info(options)
    runtime["provider_used"] = session_a.provider
    return ComparisonResult(
        tuple(acc.result() for acc in accumulators.values()), accuracy, dataset.n, runtime, tuple(notes)
    )


def compare_outputs(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> list[OutputMetrics]:
    """Metrics of ``test`` against ``reference`` for one batch of outputs (same keys)."""
    results = []
    for name, ref in reference.items():
        acc = _Accumulator(name)
        acc.add(ref, test[name])
        results.append(acc.result())
    return results


class _Accumulator:
    """Running sums for one output's metrics, so batches never need concatenating."""

    def __init__(self, name: str):
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.sum_sq_diff = 0.0
        self.sum_sq_ref = 0.0
        self.max_abs = 0.0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.samples = 0
        self.classifier = True
        self.agree = 0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref, test = np.asarray(ref), np.asarray(test)
        if ref.shape != test.shape:
            raise InputError(
                f"output {self.name!r}: original shape {list(ref.shape)} != compressed shape {list(test.shape)}"
            )
        a = ref.astype(np.float64).reshape(ref.shape[0] if ref.ndim else 1, -1)
        b = test.astype(np.float64).reshape(a.shape)
        self.shape = tuple(ref.shape[1:])
        diff = a - b
        self.sum_sq_diff += float(np.sum(diff * diff))
        self.sum_sq_ref += float(np.sum(a * a))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        cosines = _row_cosines(a, b)
        self.cos_sum += float(cosines.sum())
        if cosines.size:
            self.cos_min = min(self.cos_min, float(cosines.min()))
        self.samples += a.shape[0]
        self.classifier = self.classifier and _classifier_like(ref)
        if self.classifier:
            self.agree += int((ref.argmax(axis=1) == test.argmax(axis=1)).sum())

    def result(self) -> OutputMetrics:
        if self.sum_sq_ref > 0:
            rel = math.sqrt(self.sum_sq_diff / self.sum_sq_ref)
        else:
            rel = 0.0 if self.sum_sq_diff == 0 else math.inf
        n = max(self.samples, 1)
        return OutputMetrics(
            name=self.name,
            shape=self.shape or (),
            max_abs_error=self.max_abs if not math.isnan(self.sum_sq_diff) else math.nan,
            rel_l2_error=rel,
            cosine=self.cos_sum / n,
            cosine_min=self.cos_min if self.samples else math.nan,
            top1_agreement=self.agree / n if self.classifier and self.samples else None,
        )


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    both_zero = (norm_a == 0) & (norm_b == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (norm_a * norm_b)
    cos = np.where(both_zero, 1.0, np.where((norm_a == 0) ^ (norm_b == 0), 0.0, cos))
    return np.clip(cos, -1.0, 1.0)


def _classifier_like(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.dtype.kind == "f" and array.shape[1] >= 2


def _pair_outputs(a: Session, b: Session, notes: list[str]) -> list[tuple[str, str]]:
    names_a, names_b = a.output_names, b.output_names
    if set(names_a) == set(names_b):
        return [(n, n) for n in names_a]
    if len(names_a) == len(names_b):
        notes.append(f"output names differ ({names_a} vs {names_b}); compared by position")
        return list(zip(names_a, names_b))
    raise InputError(f"the models have different outputs: {names_a} vs {names_b}")


def _check_inputs(a: Session, b: Session, dataset: Dataset) -> None:
    inputs_a = {s.name for s in a.inputs}
    inputs_b = {s.name for s in b.inputs}
    if inputs_a != inputs_b:
        raise InputError(f"the models have different inputs: {sorted(inputs_a)} vs {sorted(inputs_b)}")
    missing = inputs_a - set(dataset.feeds)
    if missing:
        raise InputError(f"no data for input(s) {', '.join(sorted(missing))}")


def _label_output(pairs: list[tuple[str, str]], outputs: dict[str, np.ndarray], notes: list[str]) -> str:
    candidates = [name for name, _ in pairs if _classifier_like(outputs[name])]
    if not candidates:
        raise InputError("labels were given but no output is classifier-like ([batch, classes] float)")
    if len(candidates) > 1:
        notes.append(f"accuracy measured on output {candidates[0]!r} (first of {', '.join(candidates)})")
    return candidates[0]


def _loosen(value: float, kind: str, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits, away from failing (up for a max)."""
    if value == 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    rounded = (math.ceil if kind == "max" else math.floor)(value * scale) / scale
    return float(f"{rounded:.{digits + 2}g}")


def _num(value: float | None) -> float | None:
    """JSON-safe number: non-finite values become None (JSON has no NaN/Infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 9)
