"""Per-layer sensitivity on the model's real outputs, measured with the floor's metrics.

For each candidate layer and each probed rank, only that layer is replaced by its rank-r
approximation (whitened SVD from the calibration covariances, :mod:`onnx_lowrank.search.calibrated`,
or plain SVD for the greedy baseline) and the model is run on the calibration part through one
onnxruntime session (:class:`onnx_lowrank.calibrate.OutputProbe`, weights fed as inputs). Every
floor metric of the chosen output is recorded (agreement, cosine, relative error, accuracy
drop), so a second floor -- even on another metric -- or another objective reuses them.

Measurements are cached on disk (``search/cache.py``, namespace ``sensitivity``) keyed by the
model hash, the layer and weight hash, the calibration data hash (and labels), the output, the
method, damping and rank: a rerun measures nothing, and an interrupted run (``max_evals`` /
``time_budget``) resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping

import numpy as np

from onnx_lowrank.floor import spec
from onnx_lowrank.search.calibrated import DEFAULT_DAMPING, WHITENED
from onnx_lowrank.search.method import Candidate, SearchContext
from onnx_lowrank.validate.data import Dataset

log = logging.getLogger(__name__)

PLAIN = "svd"


class Workspace:
    """The calibration part, one probe over it, and factors of any (layer, rank, method).

    Only the calibration :class:`Dataset` is ever given to it: this is the search's whole view
    of the data.
    """

    def __init__(self, ctx: SearchContext, data: Dataset, output: str | None, *, damping: float = DEFAULT_DAMPING):
        self.ctx = ctx
        self.data = data
        self.damping = damping
        self.requested_output = output
        self.by_name = {c.name: c for c in ctx.candidates}
        self._probe = None
        self._output: str | None = None

    @property
    def probe(self):
        if self._probe is None:
            from onnx_lowrank.calibrate import OutputProbe

            self._probe = OutputProbe(self.ctx.model, [c.layer for c in self.ctx.candidates], self.data)
            names = self._probe.output_names
            if self.requested_output is not None and self.requested_output not in names:
                from onnx_lowrank.errors import OptionError

                raise OptionError(f"--output-name {self.requested_output!r}: the model's outputs are {', '.join(names)}")
            self._output = self.requested_output or names[0]
            self._reference = self._probe.reference()[self._output]
        return self._probe

    @property
    def output(self) -> str:
        if self.requested_output is not None:
            return self.requested_output
        if self._output is None:
            self._output = self.ctx.model.graph.output[0].name
        return self._output

    @property
    def reference(self) -> np.ndarray:
        self.probe  # noqa: B018 -- builds the probe and its reference outputs
        return self._reference

    @property
    def labels(self) -> np.ndarray | None:
        return self.data.labels

    def can_substitute(self, name: str) -> bool:
        return self.probe.can_substitute(name)

    def matrix(self, name: str, rank: int, method: str) -> np.ndarray:
        """The rank-``rank`` approximation (canonical (out, in)) of a candidate's weight."""
        return self.ctx.calibration.decomposition(self.by_name[name], self.damping, method).factors(rank).reconstruct()

    def evaluate(self, states: Mapping[str, tuple[int, str]]) -> dict[str, float | None]:
        """Every floor metric with the layers in ``states`` ({name: (rank, method)}) replaced."""
        subs = {name: self.matrix(name, rank, method) for name, (rank, method) in states.items()}
        outputs = self.probe.outputs(subs)[self.output]
        return spec.measure(self.reference, outputs, self.labels)

    def key(self, candidate: Candidate, rank: int, method: str) -> dict:
        labels = None
        if self.data.labels is not None:
            labels = hashlib.sha256(np.ascontiguousarray(self.data.labels).tobytes()).hexdigest()
        return {
            "kind": "floor_eval", "model": self.ctx.model_sha256, "layer": candidate.name,
            "weight": candidate.weight_sha256, "data": self.data.sha256, "labels": labels, "output": self.output,
            "method": method, "damping": self.damping if method == WHITENED else 0.0, "rank": int(rank),
        }


@dataclasses.dataclass(frozen=True)
class Table:
    """What the analysis measured: {layer: {rank: metrics}} and how it went."""

    method: str
    values: dict[str, dict[int, dict[str, float | None]]]
    planned: int  # layer x rank evaluations asked for
    evaluated: int  # run now (probe runs)
    cached: int  # read from the cache
    unmeasured: int  # skipped by max_evals / time_budget, or not substitutable
    seconds: float

    def to_json(self) -> dict:
        return {
            "method": self.method, "evaluations": self.planned, "evaluated": self.evaluated, "cached": self.cached,
            "unmeasured": self.unmeasured, "seconds": round(self.seconds, 3),
        }


def probe_ranks(ranks: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` of a layer's allowed ranks: half geometric (errors move fastest at low
    rank), half evenly spaced (floors usually bind at mild compression), always the largest."""
    n = len(ranks)
    if n == 0 or count < 1:
        return []
    half = max(count // 2, 1)
    picks = set(np.round(np.geomspace(1, n, min(half, n))).astype(int) - 1)
    picks |= set(np.round(np.linspace(0, n - 1, min(count - len(picks) + 1, n))).astype(int)[1:])
    picks.add(n - 1)
    return [int(ranks[i]) for i in sorted(picks)]


def greedy_ranks(ranks: np.ndarray, count: int = 10) -> list[int]:
    """AIMET-style candidates: ranks at ``count`` evenly spaced fractions of the largest allowed."""
    if len(ranks) == 0:
        return []
    top = int(ranks[-1])
    wanted = {max(int(round(top * k / count)), 1) for k in range(1, count + 1)}
    snapped = {int(ranks[min(np.searchsorted(ranks, w), len(ranks) - 1)]) for w in wanted}
    return sorted(snapped)


def analyse(
    work: Workspace,
    rank_sets: Mapping[str, list[int]],
    method: str,
    *,
    progress,
    max_evals: int | None = None,
    time_budget: float | None = None,
) -> Table:
    """Measure every (layer, rank) of ``rank_sets`` alone (cached); stop new evaluations after
    ``max_evals`` of them or ``time_budget`` seconds (what was measured is still used)."""
    started = time.perf_counter()
    planned = sum(len(r) for r in rank_sets.values())
    values: dict[str, dict[int, dict]] = {}
    evaluated = cached = unmeasured = 0
    with progress(f"floor analysis: {planned} layer x rank evaluations", planned) as advance:
        for name, ranks in rank_sets.items():
            candidate = work.by_name[name]
            values[name] = {}
            for rank in ranks:
                key = work.key(candidate, rank, method)
                stopped = (max_evals is not None and evaluated >= max_evals) or (
                    time_budget is not None and time.perf_counter() - started > time_budget
                )
                result, ran = _measure(work, candidate, rank, method, key, allow_compute=not stopped)
                advance()
                if result is None:
                    unmeasured += 1
                    continue
                evaluated += ran
                cached += not ran
                values[name][int(rank)] = result
    if unmeasured:
        log.info("floor analysis: %d of %d evaluations not measured (budget or not substitutable)", unmeasured, planned)
    return Table(method, values, planned, evaluated, cached, unmeasured, time.perf_counter() - started)


class _NotComputed(Exception):
    pass


def _measure(work: Workspace, candidate: Candidate, rank: int, method: str, key: dict, *, allow_compute: bool):
    """(metrics or None, whether the probe ran)."""
    ran = False

    def compute():
        nonlocal ran
        if not allow_compute:
            raise _NotComputed
        if not work.can_substitute(candidate.name):
            return {"unsubstitutable": True}
        ran = True
        return work.evaluate({candidate.name: (rank, method)})

    group = work.ctx.model_sha256 or candidate.weight_sha256
    try:
        value = work.ctx.cache.table("sensitivity", group, key, compute)
    except _NotComputed:
        return None, False
    if not isinstance(value, dict) or value.get("unsubstitutable"):
        return None, ran
    return value, ran


def refine_ranks(allowed: np.ndarray, measured: list[int], around: int | None, count: int = 6) -> list[int]:
    """Allowed ranks not yet measured between ``around`` and the next lower measured rank.

    The second, finer pass of the analysis: the first pass's grid is coarse where the floor
    binds, so the ranks just below a layer's chosen rank are measured too.
    """
    if around is None or len(allowed) == 0:
        return []
    lower = max((r for r in measured if r < around), default=int(allowed[0]) - 1)
    between = [int(r) for r in allowed if lower < r < around and int(r) not in measured]
    if len(between) <= count:
        return between
    picks = np.unique(np.round(np.linspace(0, len(between) - 1, count)).astype(int))
    return [between[i] for i in picks]


def merge(first: Table, second: Table) -> Table:
    """Both passes' measurements as one table (counts added)."""
    values = {name: {**first.values.get(name, {}), **second.values.get(name, {})} for name in first.values}
    return Table(
        first.method, values, first.planned + second.planned, first.evaluated + second.evaluated,
        first.cached + second.cached, first.unmeasured + second.unmeasured, first.seconds + second.seconds,
    )
