"""``calibrated``: activation-aware (whitened) SVD, ranks allocated by measured output error.

With calibration inputs, each candidate layer's input covariance ``C = X^T X / n`` is captured
through onnxruntime (:mod:`onnx_lowrank.calibrate`). The layer's output error on those inputs
is ``||(W - W_r) X^T||_F^2 = n ||(W - W_r) S||_F^2`` with ``S S^T = C``, so the best rank-r
weight for the OUTPUT is the truncated SVD of ``M = W S`` mapped back:

    C + damping * mean(diag C) * I = S S^T        (Cholesky; damping keeps S invertible)
    W S = U Sigma V^T                              (SVD, deterministic signs)
    L = U_r Sigma_r^(1/2),  R = Sigma_r^(1/2) V_r^T S^(-1),   W ~= L @ R

:func:`whitened_factors` is that decomposition (plan method ``svd-whitened``). With C = I it is
the plain SVD.

Ranks are then allocated by each layer's measured effect on the model's final outputs: for a
few ranks per layer, only that layer is replaced by its whitened approximation and the relative
squared change of the outputs on the calibration batch is measured (one onnxruntime session,
weights fed as inputs). Between measured ranks the error follows the whitened spectrum's tail,
rescaled to the measurements. Those per-layer curves go through the same global allocation as
``global`` (:mod:`onnx_lowrank.search.allocate`). Whitened spectra and measurements are cached
(keyed by model, layer, weight, data hash, damping), so a sweep or a rerun measures nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx

from onnx_lowrank.decompose.svd import Spectrum, SVDFactors, full_svd
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.search import allocate
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.cache import Cache
from onnx_lowrank.search.global_rank import curves as build_curves
from onnx_lowrank.search.method import (
    Candidate,
    OptionSpec,
    ProgressFactory,
    SearchContext,
    SearchMethod,
    null_progress,
)
from onnx_lowrank.search.plan import LayerDecision, RankPlan

log = logging.getLogger(__name__)

WHITENED = "svd-whitened"  # the plan's decomposition method for calibrated factors
DEFAULT_DAMPING = 0.1


# ---------------------------------------------------------------------------------------------
# the maths (pure numpy)


def whitening(covariance: np.ndarray, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """Lower-triangular ``S`` with ``S S^T = C + damping * mean(diag C) * I`` (float64).

    The damping is relative to the mean input energy, so it means the same for any input
    scale; it is raised tenfold (up to 3 times) if round-off leaves C not positive definite.
    """
    c = np.asarray(covariance, dtype=np.float64)
    c = (c + c.T) / 2
    scale = float(np.mean(np.diag(c)))
    if scale <= 0:  # the layer never sees a non-zero input: any S will do
        return np.eye(c.shape[0])
    eye = np.eye(c.shape[0])
    for _ in range(4):
        try:
            return np.linalg.cholesky(c + damping * scale * eye)
        except np.linalg.LinAlgError:
            damping = max(damping * 10, 1e-8)
    raise np.linalg.LinAlgError("covariance is not positive definite even with damping")


@dataclasses.dataclass(frozen=True)
class WhitenedSVD:
    """The SVD of ``W S`` and ``S``, from which factors of any rank are cheap."""

    u: np.ndarray
    sigma: np.ndarray
    vt: np.ndarray
    s: np.ndarray
    dtype: type

    @classmethod
    def of(cls, matrix: np.ndarray, covariance: np.ndarray, damping: float = DEFAULT_DAMPING) -> WhitenedSVD:
        if matrix.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {matrix.shape}")
        s = whitening(covariance, damping)
        u, sigma, vt = full_svd(np.asarray(matrix, dtype=np.float64) @ s)
        return cls(u, sigma, vt, s, np.float64 if matrix.dtype == np.float64 else np.float32)

    @property
    def spectrum(self) -> Spectrum:
        return Spectrum(self.sigma)

    def factors(self, rank: int) -> SVDFactors:
        if not 1 <= rank <= len(self.sigma):
            raise ValueError(f"rank must be in [1, {len(self.sigma)}], got {rank}")
        root = np.sqrt(self.sigma[:rank])
        left = self.u[:, :rank] * root
        # R = (Sigma^(1/2) V^T) S^(-1): solve S^T R^T = (Sigma^(1/2) V^T)^T instead of inverting.
        right = np.linalg.solve(self.s.T, (root[:, None] * self.vt[:rank]).T).T
        return SVDFactors(left=left.astype(self.dtype), right=right.astype(self.dtype))


def whitened_spectrum(matrix: np.ndarray, covariance: np.ndarray, damping: float = DEFAULT_DAMPING) -> Spectrum:
    """Singular values of ``W S`` (the layer's output-error spectrum)."""
    s = whitening(covariance, damping)
    return Spectrum(np.linalg.svd(np.asarray(matrix, dtype=np.float64) @ s, compute_uv=False))


def whitened_factors(
    matrix: np.ndarray, covariance: np.ndarray, rank: int, *, damping: float = DEFAULT_DAMPING
) -> SVDFactors:
    """Rank-``rank`` factors minimizing the output error ``||(W - L R) S||_F`` (see module doc)."""
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be in [1, {min(matrix.shape)}], got {rank}")
    return WhitenedSVD.of(matrix, covariance, damping).factors(rank)


def whitened_decomposer(covariances: Mapping[str, np.ndarray], damping: float = DEFAULT_DAMPING):
    """A ``passes.factorize`` Decomposer for method ``svd-whitened`` over these covariances."""

    def decompose(matrix: np.ndarray, layer: Layer, decision: LayerDecision) -> SVDFactors:
        covariance = covariances.get(layer.name)
        if covariance is None:
            raise InputError(f"plan layer {layer.name}: svd-whitened needs its calibration covariance (give --calib)")
        return whitened_factors(matrix, covariance, decision.rank, damping=damping)

    return decompose


# ---------------------------------------------------------------------------------------------
# calibration session shared by searches (lazy: a full cache hit runs nothing)


class Calibration:
    """Calibration data plus what is derived from it on demand: covariances, output probes."""

    def __init__(
        self,
        model: onnx.ModelProto,
        candidates: list[Candidate],
        data,
        cache: Cache,
        model_sha256: str | None,
        *,
        batch_size: int = 32,
        progress: ProgressFactory = null_progress,
    ):
        self.model = model
        self.candidates = list(candidates)
        self.data = data
        self.cache = cache
        self.model_sha256 = model_sha256
        self.batch_size = batch_size
        self.progress = progress
        self._covariances: dict[str, np.ndarray] | None = None
        self._probes: dict[int, object] = {}
        self._decompositions: dict[tuple, WhitenedSVD] = {}

    @property
    def covariances(self) -> dict[str, np.ndarray]:
        if self._covariances is None:
            from onnx_lowrank.calibrate import capture_covariances

            layers = [c.layer for c in self.candidates]
            batches = self.data.n_batches(self.batch_size)
            with self.progress("activations", batches) as advance:
                self._covariances = capture_covariances(
                    self.model, layers, self.data, batch_size=self.batch_size, on_batch=advance
                )
        return self._covariances

    def decomposition(self, candidate: Candidate, damping: float, method: str):
        """The layer's whitened SVD (or plain SVD, as ``factors(rank)``), computed once."""
        key = (candidate.name, damping, method)
        if key not in self._decompositions:
            matrix = weight_matrix(self.model, candidate.layer)
            covariance = self.covariances.get(candidate.name) if method == WHITENED else None
            if covariance is None:
                covariance = np.eye(matrix.shape[1])
                damping = 0.0
            self._decompositions[key] = WhitenedSVD.of(matrix, covariance, damping)
        return self._decompositions[key]

    def probe(self, samples: int):
        if samples not in self._probes:
            from onnx_lowrank.calibrate import OutputProbe

            subset = self.data.head(samples)
            self._probes[samples] = OutputProbe(self.model, [c.layer for c in self.candidates], subset)
        return self._probes[samples]


# ---------------------------------------------------------------------------------------------
# the search


@dataclasses.dataclass(frozen=True)
class _LayerModel:
    """A candidate's predicted output error at each allowed rank, and how it was obtained."""

    errors: np.ndarray  # relative squared output error, per allowed rank
    proxy: np.ndarray  # whitened tail fraction, per allowed rank
    method: str  # "svd-whitened", or "svd" where no covariance could be captured
    measured: dict[int, float]


def search(ctx: SearchContext, budget: Budget) -> dict[str, LayerDecision]:
    calibration: Calibration = ctx.calibration
    damping = ctx.options["damping"]
    probes = ctx.options["probes"]
    eval_samples = ctx.options["eval_samples"]
    key = ("calibrated", damping, probes, eval_samples)
    if key not in ctx.memo:
        ctx.memo[key] = _layer_models(ctx, calibration, damping, probes, eval_samples)
    models: dict[str, _LayerModel] = ctx.memo[key]
    curves_key = (*key, budget.kind)
    if curves_key not in ctx.memo:
        layer_curves = build_curves(ctx, budget.kind, lambda c: models[c.name].errors)
        ctx.memo[curves_key] = (layer_curves, allocate.global_ranking(layer_curves))
    layer_curves, ranking = ctx.memo[curves_key]
    _, limit = allocate.budget_limit(ctx, list(ctx.candidates), budget)
    states = allocate.allocate(layer_curves, limit, ranking=ranking, what=budget.kind)
    decisions = {}
    for candidate, state in zip(ctx.candidates, states):
        if state == allocate.DENSE:
            decisions[candidate.name] = allocate.decision(ctx, candidate, None)
            continue
        model = models[candidate.name]
        predicted = {
            "output_rel_error": round(float(np.sqrt(model.errors[state])), 6),
            "whitened_rel_error": round(float(np.sqrt(model.proxy[state])), 6),
        }
        decisions[candidate.name] = allocate.decision(
            ctx, candidate, int(candidate.ranks[state]), method=model.method, predicted=predicted,
            weight_error=model.method == "svd",
        )
    return decisions


def _layer_models(ctx: SearchContext, calibration: Calibration, damping: float, probes: int, eval_samples: int):
    data_sha = calibration.data.sha256
    probe_ranks = {c.name: _probe_ranks(c.ranks, probes) for c in ctx.candidates}
    total = sum(len(r) for r in probe_ranks.values())
    spectra: dict[str, tuple[Spectrum, str]] = {}
    measured: dict[str, dict[int, float]] = {}
    eval_sha = calibration.data.head(eval_samples).sha256
    with ctx.progress("sensitivity", total) as advance:
        for candidate in ctx.candidates:
            spectra[candidate.name] = _spectrum(ctx, calibration, candidate, damping, data_sha)
            measured[candidate.name] = {}
            for rank in probe_ranks[candidate.name]:
                value = _measure(ctx, calibration, candidate, rank, damping, eval_samples, eval_sha, spectra)
                if value is not None:
                    measured[candidate.name][rank] = value
                advance()
    ratios = [
        m / _tail(spectra[name][0], r)
        for name, points in measured.items()
        for r, m in points.items()
        if _tail(spectra[name][0], r) > 0
    ]
    fallback = float(np.median(ratios)) if ratios else 1.0  # for layers that could not be measured
    models = {}
    for candidate in ctx.candidates:
        spectrum, method = spectra[candidate.name]
        proxy = np.array([_tail(spectrum, int(r)) for r in candidate.ranks])
        errors = _interpolate(candidate.ranks, proxy, measured[candidate.name], spectrum, fallback)
        models[candidate.name] = _LayerModel(errors, proxy, method, measured[candidate.name])
    return models


def _spectrum(ctx, calibration: Calibration, candidate: Candidate, damping: float, data_sha: str):
    """(whitened spectrum, method) of a candidate; the plain one where no covariance exists."""
    if candidate.layer.scope:  # activations inside subgraphs are not captured
        return candidate.spectrum, "svd"
    key = {
        "kind": "whitened", "model": ctx.model_sha256, "layer": candidate.name, "weight": candidate.weight_sha256,
        "data": data_sha, "damping": damping,
    }

    def compute() -> np.ndarray:
        return calibration.decomposition(candidate, damping, WHITENED).sigma

    values = ctx.cache.array("spectra", ctx.model_sha256 or candidate.weight_sha256, key, compute)
    return Spectrum(values), WHITENED


def _measure(ctx, calibration, candidate, rank, damping, eval_samples, eval_sha, spectra) -> float | None:
    method = spectra[candidate.name][1]
    key = {
        "kind": "output_error", "model": ctx.model_sha256, "layer": candidate.name,
        "weight": candidate.weight_sha256, "data": eval_sha, "damping": damping, "rank": rank, "method": method,
    }

    def compute():
        probe = calibration.probe(eval_samples)
        if not probe.can_substitute(candidate.name):
            return None
        approx = calibration.decomposition(candidate, damping, method).factors(rank).reconstruct()
        return probe.relative_error({candidate.name: approx})

    value = ctx.cache.table("sensitivity", ctx.model_sha256 or candidate.weight_sha256, key, compute)
    return None if value is None else float(value)


def approximation(matrix: np.ndarray, covariance, rank: int, damping: float, method: str) -> np.ndarray:
    """The rank-``rank`` weight a plan decision stands for (whitened or plain), as one matrix."""
    if method == WHITENED and covariance is not None:
        return whitened_factors(matrix, covariance, rank, damping=damping).reconstruct()
    from onnx_lowrank.decompose.svd import truncated_svd

    return truncated_svd(matrix, rank).reconstruct()


def _tail(spectrum: Spectrum, rank: int) -> float:
    squares = spectrum.values.astype(np.float64) ** 2
    total = squares.sum()
    return float(squares[rank:].sum() / total) if total > 0 else 0.0


def _probe_ranks(ranks: np.ndarray, probes: int) -> list[int]:
    """Up to ``probes`` allowed ranks, geometrically spaced (errors change fastest at low rank)."""
    if len(ranks) == 0 or probes < 1:
        return []
    picks = np.unique(np.round(np.geomspace(1, len(ranks), min(probes, len(ranks)))).astype(int) - 1)
    return [int(ranks[i]) for i in picks]


def _interpolate(ranks, proxy, measured: dict[int, float], spectrum, fallback: float) -> np.ndarray:
    """Measured errors at the probed ranks; between them the spectrum's tail, rescaled.

    The log of measured/tail is interpolated linearly in the rank (flat beyond the ends), then
    errors are made non-increasing in the rank.
    """
    points = sorted((r, m / _tail(spectrum, r)) for r, m in measured.items() if _tail(spectrum, r) > 0 and m > 0)
    if points:
        xs = np.array([p[0] for p in points], dtype=np.float64)
        logs = np.log([p[1] for p in points])
        scale = np.exp(np.interp(ranks.astype(np.float64), xs, logs))
    else:
        scale = np.full(len(ranks), fallback)
    errors = proxy * scale
    return np.maximum.accumulate(errors[::-1])[::-1] if len(errors) else errors


METHOD = SearchMethod(
    name="calibrated",
    search=search,
    description="needs --calib; whitened SVD (W C^1/2), ranks by measured effect on the model outputs",
    options={
        "damping": OptionSpec(float, DEFAULT_DAMPING, "Cholesky damping, relative to the mean input energy", minimum=0.0),
        "probes": OptionSpec(int, 6, "ranks per layer whose output error is measured", minimum=1),
        "eval_samples": OptionSpec(int, 256, "calibration samples used for the output-error measurements", minimum=1),
    },
    needs_calibration=True,
)


# ---------------------------------------------------------------------------------------------
# applying calibrated plans (what compress --plan --calib needs)


def plan_damping(plan: RankPlan) -> float:
    return float(plan.options.get("damping", DEFAULT_DAMPING))


def calibration_record(data) -> dict:
    """What a plan records of its calibration data (a ``validate.data.Dataset``): the
    ``sha256`` that :func:`covariances_for_plan` checks, its source and size."""
    return {"source": data.source, "sha256": data.sha256, "samples": data.n}


def covariances_for_plan(
    model: onnx.ModelProto,
    layers: list[Layer],
    plan: RankPlan,
    data,
    *,
    strict: bool = True,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Covariances of the plan's ``svd-whitened`` layers from ``data`` (a ``validate.data.Dataset``).

    With ``strict``, data other than what the plan was calibrated on (its recorded sha256) is
    an error: the factors would differ from those the search predicted.
    """
    from onnx_lowrank.calibrate import capture_covariances

    record = plan.options.get("calibration") or {}
    recorded = record.get("sha256")
    split = record.get("split")
    if recorded and recorded != data.sha256 and split and split.get("data_sha256") == data.sha256:
        # A --floor plan: its calibration part was cut from this very data; cut it again.
        from onnx_lowrank.floor.split import split_dataset

        data = split_dataset(data, float(split["holdout"]), int(split["seed"])).calibration
    if strict and recorded and recorded != data.sha256:
        raise OptionError(
            f"--calib: the plan was calibrated on data with sha256 {recorded[:12]}..., this data has "
            f"{data.sha256[:12]}...; give the same data (and --input-map) to reproduce its factors"
        )
    by_name = {layer.name: layer for layer in layers}
    wanted = [by_name[name] for name, d in plan.factorized().items() if d.method == WHITENED and name in by_name]
    return capture_covariances(model, wanted, data, batch_size=batch_size) if wanted else {}


def plan_decomposers(plan: RankPlan, covariances: Mapping[str, np.ndarray] | None) -> dict | None:
    """The factorize decomposers a plan's data-dependent layers need (None if it has none)."""
    if not any(d.method == WHITENED for d in plan.factorized().values()):
        return None
    return {WHITENED: whitened_decomposer(covariances or {}, plan_damping(plan))}


def apply_calibrated_plan(model: onnx.ModelProto, layers: list[Layer], plan: RankPlan, covariances, *, on_layer=None):
    """``compress.apply_plan`` with the ``svd-whitened`` decomposer over ``covariances``."""
    from onnx_lowrank.compress import apply_plan

    return apply_plan(model, layers, plan, on_layer=on_layer, decomposers=plan_decomposers(plan, covariances))


