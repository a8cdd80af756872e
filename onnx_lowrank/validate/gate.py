"""A CI regression gate: accuracy and latency of a compressed model against a stored baseline.

The gate measures the figures ``validate`` and ``bench`` measure (accuracy metrics against
the original model; the speedup compressed vs original, timed interleaved in one run, which is
far steadier across machines and load than absolute times), and compares them with a baseline
JSON file. Tolerances are typed values parsed at the CLI boundary (``speedup:10%`` relative,
``cosine:0.001`` absolute). A metric regresses when it is worse than the baseline by more than
its tolerance AND, where per-run samples exist (the speedup), a one-sided Mann-Whitney U test
says the difference is significant, so scheduler noise does not fail a build. The baseline
records the machine, provider, onnxruntime version and git commit it was measured with.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnx_lowrank import __version__
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.jsonfile import read_json, write_json
from onnx_lowrank.model import model_sha256
from onnx_lowrank.validate.accuracy import (
    ComparisonResult,
    ThresholdFailure,
    Thresholds,
    check_thresholds,
    compare_models,
    limit_failure,
)
from onnx_lowrank.validate.data import Dataset
from onnx_lowrank.validate.latency import PairTiming, measure_pair
from onnx_lowrank.validate.runtime import (
    ModelLike,
    RuntimeOptions,
    cpu_model,
    create_session,
    gpu_name,
    runtime_info,
)

log = logging.getLogger(__name__)

BASELINE_FORMAT = "onnx-lowrank-baseline"
BASELINE_VERSION = 1
DEFAULT_ALPHA = 0.05
_MIN_SAMPLES_FOR_TEST = 5


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How much worse than the baseline a metric may get: ``value`` absolute or, with
    ``relative``, a fraction of the baseline value (``speedup:10%`` -> 0.10 relative)."""

    metric: str
    value: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        """The allowed worsening in the metric's own units."""
        return abs(baseline) * self.value if self.relative else self.value

    def text(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclasses.dataclass(frozen=True)
class Metric:
    """A gated metric: which way is better, its default tolerance and how to print it."""

    name: str
    higher_is_better: bool
    default: Tolerance
    label: str
    fmt: str = "{:.4f}"


# The single table of gated metrics (names are what --tolerance takes).
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("speedup", True, Tolerance("speedup", 0.10, True), "speedup (x)", "{:.3f}"),
        Metric("cosine", True, Tolerance("cosine", 0.001, False), "cosine (worst output)", "{:.5f}"),
        Metric("rel_error", False, Tolerance("rel_error", 0.01, False), "rel. L2 error (worst)", "{:.5f}"),
        Metric("max_abs_error", False, Tolerance("max_abs_error", 0.5, True), "max abs error", "{:.4g}"),
        Metric("top1_agreement", True, Tolerance("top1_agreement", 0.01, False), "top-1 agreement", "{:.4f}"),
        Metric("accuracy", True, Tolerance("accuracy", 0.5, False), "accuracy (%)", "{:.2f}"),
        Metric("accuracy_drop", False, Tolerance("accuracy_drop", 0.5, False), "accuracy drop (points)", "{:.2f}"),
    )
}

_TOLERANCE_RE = re.compile(r"^(?P<metric>[a-z0-9_]+):(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<pct>%?)$")


def parse_tolerance(text: str, *, flag: str = "--tolerance") -> Tolerance:
    """``speedup:10%`` (relative) or ``cosine:0.001`` (absolute) -> :class:`Tolerance`."""
    match = _TOLERANCE_RE.match(text.strip())
    if not match:
        raise OptionError(f"{flag} {text!r}: expected METRIC:VALUE or METRIC:PERCENT%, e.g. speedup:10% or cosine:0.001")
    metric = match.group("metric")
    if metric not in METRICS:
        raise OptionError(f"{flag} {text!r}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    value = float(match.group("num"))
    relative = bool(match.group("pct"))
    if relative:
        value /= 100
    return Tolerance(metric, value, relative)


def parse_tolerances(texts: Sequence[str], *, flag: str = "--tolerance") -> dict[str, Tolerance]:
    """Several ``--tolerance`` values, last one per metric wins."""
    return {t.metric: t for t in (parse_tolerance(text, flag=flag) for text in texts)}


def mann_whitney_u(x: Sequence[float], y: Sequence[float], alternative: str = "two-sided") -> tuple[float, float]:
    """Mann-Whitney U test, normal approximation with tie and continuity corrections.

    Returns (U of ``x``, p-value). ``alternative``: "less" tests whether ``x`` tends to be
    smaller than ``y``, "greater" larger, "two-sided" either.
    """
    if alternative not in ("two-sided", "less", "greater"):
        raise ValueError(f"alternative must be two-sided, less or greater, got {alternative!r}")
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    ranks = _average_ranks(np.concatenate([a, b]))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    _, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    tie_term = float(np.sum(counts**3 - counts)) / (n * (n - 1)) if n > 1 else 0.0
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term))
    mean = n1 * n2 / 2
    if sigma == 0:
        return u, 1.0
    if alternative == "two-sided":
        z = (abs(u - mean) - 0.5) / sigma
        return u, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
    # "less": small U means x ranks low. P(Z <= z) with continuity correction towards the mean.
    z = (u - mean + 0.5) / sigma if alternative == "less" else (u - mean - 0.5) / sigma
    p_low = 0.5 * math.erfc(-z / math.sqrt(2))
    return u, p_low if alternative == "less" else 1.0 - p_low


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    start = 0
    while start < values.size:
        stop = start
        while stop + 1 < values.size and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


@dataclasses.dataclass(frozen=True)
class GateMeasurement:
    """The current figures: metric values, per-run samples (speedup ratios) and context."""

    metrics: dict[str, float]
    samples: dict[str, tuple[float, ...]]
    context: dict
    comparison: ComparisonResult | None = None
    timing: PairTiming | None = None

    def to_baseline(self) -> dict:
        return {
            "format": BASELINE_FORMAT,
            "version": BASELINE_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metrics": {k: round(v, 9) for k, v in self.metrics.items() if math.isfinite(v)},
            "samples": {k: [round(s, 6) for s in v] for k, v in self.samples.items()},
            "context": self.context,
        }


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A stored measurement (see :meth:`GateMeasurement.to_baseline`)."""

    metrics: dict[str, float]
    samples: dict[str, tuple[float, ...]]
    context: dict
    created: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike) -> Baseline:
        path = Path(path)
        data = read_json(path, what="baseline", missing_hint=" (run with --update-baseline to create it)")
        if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
            raise InputError(f"{path}: not an onnx-lowrank baseline (no \"format\": \"{BASELINE_FORMAT}\")")
        if data.get("version") != BASELINE_VERSION:
            raise InputError(f"{path}: baseline version {data.get('version')} is not supported")
        metrics = data.get("metrics")
        samples = data.get("samples", {})
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise InputError(f"{path}: \"metrics\" must map names to numbers")
        if not isinstance(samples, dict) or not all(isinstance(v, list) for v in samples.values()):
            raise InputError(f"{path}: \"samples\" must map names to lists of numbers")
        return cls(
            {k: float(v) for k, v in metrics.items()},
            {k: tuple(float(s) for s in v) for k, v in samples.items()},
            dict(data.get("context") or {}),
            str(data.get("created", "")),
        )


def save_baseline(path: str | os.PathLike, measurement: GateMeasurement) -> Path:
    """Write ``measurement`` as the baseline at ``path``, atomically."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"--baseline {path}: directory {parent} does not exist")
    return write_json(path, measurement.to_baseline())


@dataclasses.dataclass(frozen=True)
class GateRow:
    """One metric of the comparison. ``status``: ok, improved, regressed, noise (beyond the
    tolerance but not significant), new (no baseline value) or missing (not measured now)."""

    metric: str
    baseline: float | None
    current: float | None
    tolerance: Tolerance
    p_value: float | None
    status: str

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline

    @property
    def change_text(self) -> str:
        if self.change is None:
            return ""
        if self.baseline:
            return f"{self.change:+.4g} ({self.change / abs(self.baseline):+.1%})"
        return f"{self.change:+.4g}"

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "current": self.current,
            "change": self.change,
            "tolerance": self.tolerance.text(),
            "p_value": self.p_value,
            "status": self.status,
        }


@dataclasses.dataclass(frozen=True)
class GateReport:
    """Baseline comparison rows, absolute-limit failures and notes."""

    rows: tuple[GateRow, ...]
    failures: tuple[ThresholdFailure, ...]
    notes: tuple[str, ...] = ()

    @property
    def regressions(self) -> tuple[GateRow, ...]:
        return tuple(r for r in self.rows if r.status == "regressed")

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.failures

    def summary(self) -> str:
        """One line naming every regression and failed limit (the CheckFailed message)."""
        parts = []
        for r in self.regressions:
            significance = f", p={r.p_value:.2g}" if r.p_value is not None else ""
            parts.append(
                f"{r.metric} {_fmt(r.metric, r.baseline)} -> {_fmt(r.metric, r.current)} "
                f"(worse by more than {r.tolerance.text()}{significance})"
            )
        parts += [f.message for f in self.failures]
        return "; ".join(parts)

    def table(self) -> list[list[str]]:
        """Rows of strings: metric, baseline, current, change, tolerance, p, status."""
        out = []
        for r in self.rows:
            out.append([
                r.metric, _fmt(r.metric, r.baseline), _fmt(r.metric, r.current), r.change_text,
                r.tolerance.text(), "" if r.p_value is None else f"{r.p_value:.3g}", r.status,
            ])
        return out

    def text(self) -> str:
        """The comparison as a plain-text table (for logs and the pytest plugin)."""
        header = ["metric", "baseline", "current", "change", "tolerance", "p", "status"]
        rows = [header, *self.table()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines + [f"FAILED {f.message}" for f in self.failures])

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "rows": [r.to_json() for r in self.rows],
            "failures": [f.to_json() for f in self.failures],
            "notes": list(self.notes),
        }


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return METRICS[metric].fmt.format(value)


def measure_gate(
    original: ModelLike,
    compressed: ModelLike,
    dataset: Dataset,
    *,
    options: RuntimeOptions | None = None,
    batch: int = 1,
    batch_size: int = 64,
    warmup: int = 10,
    iters: int = 100,
    latency: bool = True,
) -> GateMeasurement:
    """Measure everything the gate compares: accuracy metrics on ``dataset`` (in batches of
    ``batch_size``) and the interleaved speedup original/compressed at batch ``batch``."""
    options = options or RuntimeOptions()
    session_a = create_session(original, options, label="original")
    session_b = create_session(compressed, options, label="compressed")
    comparison = compare_models(session_a, session_b, dataset, options=options, batch_size=batch_size)
    worst = comparison.worst()
    metrics = {
        "cosine": worst["cosine"],
        "rel_error": worst["rel_l2_error"],
        "max_abs_error": worst["max_abs_error"],
    }
    for key in ("top1_agreement", "accuracy", "accuracy_drop"):
        if key in worst:
            metrics[key] = worst[key]
    samples: dict[str, tuple[float, ...]] = {}
    timing = None
    if latency:
        timing = measure_pair(
            session_a, session_b, dataset.take(batch), options=options, warmup=warmup, iters=iters,
            labels=("original", "compressed"),
        )
        metrics["speedup"] = timing.speedup
        samples["speedup"] = timing.ratios
    metrics = {k: round(float(v), 9) for k, v in metrics.items()}  # as stored in the baseline
    context = {
        "tool": {"name": "onnx-lowrank", "version": __version__},
        "machine": machine_info(options),
        "runtime": {**runtime_info(options), "provider_used": session_a.provider},
        "commit": git_commit(),
        "models": {"original": _describe(original), "compressed": _describe(compressed)},
        "data": dataset.to_json(),
        "settings": {"batch": batch, "warmup": warmup, "iters": iters},
    }
    return GateMeasurement(metrics, samples, context, comparison, timing)


def compare_to_baseline(
    current: GateMeasurement,
    baseline: Baseline | None,
    *,
    tolerances: dict[str, Tolerance] | None = None,
    alpha: float = DEFAULT_ALPHA,
    thresholds: Thresholds | None = None,
    min_speedup: float | None = None,
) -> GateReport:
    """Compare ``current`` with ``baseline`` (if any) and absolute limits.

    ``tolerances`` override the per-metric defaults in :data:`METRICS`. A metric with
    per-run samples on both sides regresses only if also significantly worse (one-sided
    Mann-Whitney U, p < ``alpha``).
    """
    if not 0 < alpha < 1:
        raise OptionError(f"--alpha must be in (0, 1), got {alpha}")
    tolerances = tolerances or {}
    rows: list[GateRow] = []
    notes: list[str] = []
    if baseline is not None:
        notes += _context_notes(baseline.context, current.context)
        for name, metric in METRICS.items():
            old, new = baseline.metrics.get(name), current.metrics.get(name)
            if old is None and new is None:
                continue
            tolerance = tolerances.get(name, metric.default)
            rows.append(_row(metric, old, new, tolerance, baseline.samples.get(name), current.samples.get(name), alpha))
        unknown = set(tolerances) - {r.metric for r in rows}
        if unknown:
            notes.append(f"--tolerance for unmeasured metric(s): {', '.join(sorted(unknown))}")
    failures: list[ThresholdFailure] = []
    if thresholds is not None and thresholds.active() and current.comparison is not None:
        failures += check_thresholds(current.comparison, thresholds)
    if min_speedup is not None:
        if "speedup" not in current.metrics:
            raise OptionError("--min-speedup needs the latency measurement")
        failure = limit_failure("speedup", "--min-speedup", None, current.metrics["speedup"], min_speedup, "min")
        if failure is not None:
            failures.append(failure)
    return GateReport(tuple(rows), tuple(failures), tuple(notes))


def _row(metric: Metric, old, new, tolerance: Tolerance, old_samples, new_samples, alpha: float) -> GateRow:
    if old is None:
        return GateRow(metric.name, None, new, tolerance, None, "new")
    if new is None:
        return GateRow(metric.name, old, None, tolerance, None, "missing")
    worse_by = (old - new) if metric.higher_is_better else (new - old)
    allowed = tolerance.allowed(old)
    p_value = None
    if old_samples and new_samples and min(len(old_samples), len(new_samples)) >= _MIN_SAMPLES_FOR_TEST:
        alternative = "less" if metric.higher_is_better else "greater"
        p_value = mann_whitney_u(new_samples, old_samples, alternative)[1]
    significant = p_value is None or p_value < alpha
    if worse_by > allowed or math.isnan(new):
        status = "regressed" if significant or math.isnan(new) else "noise"
    elif -worse_by > allowed and significant:
        status = "improved"
    else:
        status = "ok"
    return GateRow(metric.name, old, new, tolerance, p_value, status)


def _context_notes(old: dict, new: dict) -> list[str]:
    notes = []
    for key, label in (("machine", "machine"), ("runtime", "runtime")):
        for field in ("cpu", "gpu", "provider", "onnxruntime", "threads"):
            a, b = (old.get(key) or {}).get(field), (new.get(key) or {}).get(field)
            if a is not None and b is not None and a != b:
                notes.append(f"baseline {label} {field} was {a!r}, now {b!r}: latency figures may not be comparable")
    return notes


def _describe(model: ModelLike) -> dict:
    if isinstance(model, (str, os.PathLike)):
        return {"path": str(model), "sha256": model_sha256(model)}
    return {"path": None, "sha256": hashlib.sha256(model.SerializeToString()).hexdigest()}


def machine_info(options: RuntimeOptions | None = None) -> dict:
    """Platform, CPU model and cores (and the GPU name on a GPU provider) for baselines."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    if options is not None and options.provider != "cpu":
        info["gpu"] = gpu_name()
    return info


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """HEAD's commit hash when ``cwd`` is inside a git work tree, else None."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
