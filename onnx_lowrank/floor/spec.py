"""Accuracy floors: what the user asks to keep, parsed once into typed values, and the metrics.

A floor is ``METRIC=VALUE`` (``--floor``, repeatable, all must hold):

- ``top1-agreement=0.99``: fraction of samples whose argmax matches the original's (>=);
- ``cosine=0.995``: mean per-sample cosine to the original's outputs (>=);
- ``rel-error=0.02``: ``||y - y0|| / ||y0||`` over the whole output (<=);
- ``accuracy-drop=0.5``: original minus compressed accuracy against labels, in points (<=).

Each metric also has a *loss*, the quantity the search assumes additive across layers:
``1 - agreement``, ``1 - cosine``, ``rel_error^2`` (squared errors of independent layers add),
and the accuracy drop in points (clamped at 0). A floor's *allowance* is the loss its value
permits (``top1-agreement=0.99`` allows 0.01).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from onnx_lowrank.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Metric:
    """One floor metric: its direction, valid range, loss and inverse, report field."""

    name: str
    field: str  # key in :func:`measure` results and in the report
    kind: str  # "min": the value must stay >= the floor; "max": <= the floor
    low: float
    high: float
    loss: Callable[[float], float]
    value: Callable[[float], float]  # inverse of ``loss``
    needs_labels: bool = False
    label: str = ""  # human name for messages


METRICS: dict[str, Metric] = {
    "top1-agreement": Metric(
        "top1-agreement", "top1_agreement", "min", 0.0, 1.0, lambda v: 1.0 - v, lambda x: 1.0 - x,
        label="top-1 agreement",
    ),
    "cosine": Metric("cosine", "cosine", "min", -1.0, 1.0, lambda v: 1.0 - v, lambda x: 1.0 - x, label="cosine"),
    "rel-error": Metric(
        "rel-error", "rel_error", "max", 0.0, math.inf, lambda v: v * v, lambda x: math.sqrt(max(x, 0.0)),
        label="relative error",
    ),
    "accuracy-drop": Metric(
        "accuracy-drop", "accuracy_drop", "max", 0.0, 100.0, lambda v: max(v, 0.0), lambda x: x,
        needs_labels=True, label="accuracy drop (points)",
    ),
}


@dataclasses.dataclass(frozen=True)
class Floor:
    """``metric`` must stay on the right side of ``value`` on ``output`` (None: the first)."""

    metric: str
    value: float
    output: str | None = None

    @property
    def spec(self) -> Metric:
        return METRICS[self.metric]

    @property
    def allowance(self) -> float:
        """The loss this floor permits (>= 0)."""
        return max(self.spec.loss(self.value), 0.0)

    def holds(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value - 1e-12 if self.spec.kind == "min" else value <= self.value + 1e-12

    @property
    def text(self) -> str:
        op = ">=" if self.spec.kind == "min" else "<="
        return f"{self.spec.label} {op} {self.value:g}"

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.value, "output": self.output, "kind": self.spec.kind}


def parse_floor(text: str, *, output: str | None = None, flag: str = "--floor") -> Floor:
    """``"top1-agreement=0.99"`` -> Floor; a malformed one is an OptionError naming ``flag``."""
    name, sep, value_text = str(text).partition("=")
    name = name.strip().lower().replace("_", "-")
    known = ", ".join(METRICS)
    if not sep or not value_text.strip():
        raise OptionError(f"{flag} {text!r}: expected METRIC=VALUE, e.g. top1-agreement=0.99 (metrics: {known})")
    if name not in METRICS:
        raise OptionError(f"{flag} {text!r}: unknown metric {name!r} (metrics: {known})")
    spec = METRICS[name]
    raw = value_text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") and spec.kind == "min" else float(raw)
    except ValueError:
        raise OptionError(f"{flag} {text!r}: {raw!r} is not a number") from None
    if not spec.low <= value <= spec.high:  # NaN fails too
        raise OptionError(f"{flag} {text!r}: {name} must be in [{spec.low:g}, {spec.high:g}]")
    return Floor(name, value, output)


def parse_floors(texts, *, output: str | None = None, flag: str = "--floor") -> tuple[Floor, ...]:
    floors = tuple(parse_floor(t, output=output, flag=flag) for t in texts)
    if not floors:
        raise OptionError(f"give at least one {flag} METRIC=VALUE")
    if len({f.metric for f in floors}) != len(floors):
        raise OptionError(f"{flag}: a metric is given twice")
    return floors


# ---------------------------------------------------------------------------------------------
# metrics on output arrays (numpy only; the probe and the final check produce the arrays)


def measure(reference: np.ndarray, test: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float | None]:
    """Every floor metric of ``test`` against ``reference`` (same shape, batch first).

    ``top1_agreement`` and ``accuracy_drop`` are None unless the output is [batch, classes];
    ``accuracy_drop`` also needs ``labels``.
    """
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(test, dtype=np.float64).reshape(a.shape)
    norm = float(np.sum(a * a))
    diff = float(np.sum((a - b) ** 2))
    rel = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", a, b) / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
    out: dict[str, float | None] = {
        "rel_error": rel, "cosine": float(np.mean(np.clip(cos, -1, 1))), "top1_agreement": None, "accuracy_drop": None,
    }
    reference = np.asarray(reference)
    if reference.ndim == 2 and reference.shape[1] >= 2:
        pa, pb = a.argmax(axis=1), b.argmax(axis=1)
        out["top1_agreement"] = float(np.mean(pa == pb))
        if labels is not None:
            out["accuracy_drop"] = float(np.mean(pa == labels) - np.mean(pb == labels)) * 100
    return out


def check_measurable(floors: tuple[Floor, ...], reference: np.ndarray, labels: np.ndarray | None) -> None:
    """Refuse floors the chosen output or data cannot measure (before any search work)."""
    sample = measure(reference[:2], reference[:2], labels[:2] if labels is not None else None)
    for floor in floors:
        if sample[floor.spec.field] is None:
            if floor.spec.needs_labels and labels is None:
                raise OptionError(
                    f"--floor {floor.metric}: needs labels (--labels, --labels-key or an npz key 'labels')"
                )
            raise OptionError(f"--floor {floor.metric}: the output is not classifier-like ([batch, classes] float)")


def normalized_loss(floors: tuple[Floor, ...], values: dict[str, float | None]) -> float:
    """The largest loss / allowance over the floors (1.0 = exactly at the tightest floor)."""
    worst = 0.0
    for floor in floors:
        value = values.get(floor.spec.field)
        if value is None or not math.isfinite(value):
            return math.inf
        loss = floor.spec.loss(value)
        allowance = floor.allowance
        share = loss / allowance if allowance > 0 else (0.0 if loss <= 1e-12 else 1e9)
        worst = max(worst, share)
    return worst


def holds(floors: tuple[Floor, ...], values: dict[str, float | None]) -> bool:
    return all(f.holds(values.get(f.spec.field)) for f in floors)


def describe(floors: tuple[Floor, ...], values: dict[str, float | None]) -> str:
    """``"top-1 agreement 0.987"`` for each floor's metric."""
    parts = []
    for floor in floors:
        value = values.get(floor.spec.field)
        parts.append(f"{floor.spec.label} {value:.4g}" if value is not None else f"{floor.spec.label} ?")
    return ", ".join(parts)
