"""Which ranks a search may pick: break-even, hardware multiples and the latency guard.

Every method chooses each layer's rank from :func:`rank_lattice` -- the multiples of the rank
multiple below the layer's break-even rank -- and, with an execution provider, only among
those at which the factorized layer measured faster than the dense one (the latency guard).

Latency is a staircase in the rank: kernels work in tiles, so ranks 49..64 cost about what 64
costs. Ranks are therefore multiples of ``rank_multiple`` (default 16 on the CPU provider,
whose conv kernels lose their NCHWc path off a multiple of 8/16; 8 on CUDA; 1 without a
provider), i.e. the largest rank of each latency step, whose extra accuracy is free.

Each candidate layer is timed alone (:func:`onnx_lowrank.validate.latency.layer_model`) at up
to ``max_timed`` ranks, interpolated between: per rank, the dense layer and its factorized form
(written by the factorize pass's own lowering) are timed interleaved on the provider with I/O
binding (:func:`onnx_lowrank.validate.latency.time_layer`, the code path of ``bench``). The
median times make the latency table; the median of the per-pair ratios is the guard's
faster/slower verdict. Results are cached per (provider, device, onnxruntime version, op,
shapes, attributes, dtype, rank).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank.errors import OptionError
from onnx_lowrank.layers import Layer
from onnx_lowrank.search.cache import Cache
from onnx_lowrank.search.method import Candidate, ProgressFactory, null_progress
from onnx_lowrank.search.plan import LayerDecision
from onnx_lowrank.shapes import infer_shapes

log = logging.getLogger(__name__)

DEFAULT_RANK_MULTIPLE = {"CPUExecutionProvider": 16, "CUDAExecutionProvider": 8, "TensorrtExecutionProvider": 8}
MAX_TIMED_RANKS = 12


def default_rank_multiple(provider: str | None) -> int:
    """16 on CPU, 8 on CUDA/TensorRT and other providers, 1 (any rank) without a provider."""
    if provider is None:
        return 1
    return DEFAULT_RANK_MULTIPLE.get(provider, 8)


def rank_lattice(layer: Layer, multiple: int = 1) -> np.ndarray:
    """The ranks a layer may take: multiples of ``multiple`` strictly below break-even."""
    if multiple < 1:
        raise OptionError(f"--rank-multiple must be a positive integer, got {multiple}")
    top = math.ceil(layer.break_even_rank) - 1  # the largest r with r < m*n/(m+n)
    return np.arange(multiple, top + 1, multiple, dtype=np.int64)


def snap_up(ranks: np.ndarray, rank: int) -> int | None:
    """The smallest allowed rank >= ``rank`` (None when there is none)."""
    index = int(np.searchsorted(ranks, rank, side="left"))
    return int(ranks[index]) if index < len(ranks) else None


def snap_down(ranks: np.ndarray, rank: int) -> int | None:
    """The largest allowed rank <= ``rank`` (None when there is none)."""
    index = int(np.searchsorted(ranks, rank, side="right")) - 1
    return int(ranks[index]) if index >= 0 else None


# ---------------------------------------------------------------------------------------------
# latency tables


@dataclasses.dataclass(frozen=True)
class LayerLatency:
    """One layer's measured latency (ms): dense, and factorized at the timed ranks."""

    dense_ms: float
    ranks: tuple[int, ...]
    ms: tuple[float, ...]
    speedups: tuple[float, ...] | None = None  # median time(dense) / time(factorized) per timed rank

    def at(self, rank: int) -> float:
        """Factorized latency at ``rank``, linear between timed ranks (clamped at the ends)."""
        return float(np.interp(rank, self.ranks, self.ms))

    def speedup_at(self, rank: int) -> float:
        """time(dense) / time(factorized) at ``rank`` (> 1: factorized is faster), interpolated."""
        if self.speedups is not None:
            return float(np.interp(rank, self.ranks, self.speedups))
        factorized = self.at(rank)
        return self.dense_ms / factorized if factorized > 0 else math.inf

    def faster(self, rank: int) -> bool:
        """Whether the factorized layer at ``rank`` beats the dense one."""
        return self.speedup_at(rank) > 1.0

    def to_json(self) -> dict:
        out = {"dense_ms": self.dense_ms, "ranks": list(self.ranks), "ms": list(self.ms)}
        if self.speedups is not None:
            out["speedups"] = list(self.speedups)
        return out


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Measured per-layer latencies on one provider; the cost model of latency budgets."""

    provider: str
    device: str
    layers: dict[str, LayerLatency]

    def ms(self, layer: Layer, rank: int | None) -> float:
        entry = self.layers.get(layer.name)
        if entry is None:
            raise OptionError(f"layer {layer.name} has no latency measurement (its input shape is unknown)")
        return entry.dense_ms if rank is None else entry.at(rank)

    def to_json(self) -> dict:
        return {
            "provider": self.provider,
            "device": self.device,
            "layers": {name: entry.to_json() for name, entry in self.layers.items()},
        }


Timer = Callable[[onnx.ModelProto, dict[str, np.ndarray], str], float]
# The cache entries' layout: one {"dense_ms", "ms", "speedup"} per (layer, rank) from one pair.
_TIMING = "interleaved-pair-p50-min50ms"


def measure_latency(
    model: onnx.ModelProto,
    candidates: list[Candidate],
    provider: str,
    cache: Cache,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    max_timed: int = MAX_TIMED_RANKS,
    timer: Timer | None = None,
    progress: ProgressFactory = null_progress,
) -> LatencyTable:
    """Time each candidate dense and factorized (at up to ``max_timed`` of its allowed ranks).

    ``provider`` is onnxruntime's name (``CPUExecutionProvider``). ``timer(model, feeds,
    provider) -> ms`` replaces every measurement when given (tests, custom harnesses); the
    speedup is then the ratio of its two times.
    """
    from onnx_lowrank.validate import latency, runtime  # onnxruntime lives there

    options = runtime.RuntimeOptions(provider=runtime.provider_key(provider))
    environment = {"provider": provider, "ort": runtime.runtime_info()["onnxruntime"], "timing": _TIMING}
    if timer is None:
        environment["device"] = runtime.device_label(options)
    else:
        environment["timer"] = f"{getattr(timer, '__module__', '')}.{getattr(timer, '__qualname__', repr(timer))}"
    device = environment.get("device", "custom timer")

    def time_dense(built: latency.LayerModel) -> dict:
        if timer is None:
            return {"dense_ms": latency.measure(built.dense, built.feeds, options=options).p50}
        return {"dense_ms": timer(built.dense, built.feeds, provider)}

    def time_pair(built: latency.LayerModel, rank: int) -> dict:
        if timer is None:
            pair = latency.time_layer(built, rank, options=options)
            return {"dense_ms": pair.a.p50, "ms": pair.b.p50, "speedup": pair.speedup}
        dense_ms, ms = timer(built.dense, built.feeds, provider), timer(built.factorized(rank), built.feeds, provider)
        return {"dense_ms": dense_ms, "ms": ms, "speedup": dense_ms / ms if ms > 0 else math.inf}

    shapes = infer_shapes(model, input_shapes)
    layers: dict[str, LayerLatency] = {}
    with progress("latency", len(candidates)) as advance:
        for candidate in candidates:
            built = latency.layer_model(model, candidate.layer, shapes)
            if built is None:
                advance()
                continue
            key = {**environment, **built.signature}
            if len(candidate.ranks) == 0:  # no rank pays here: it stays dense, but its time counts
                dense = cache.table("latency", provider, {**key, "rank": "dense"}, lambda b=built: time_dense(b))
                layers[candidate.name] = LayerLatency(float(dense["dense_ms"]), (), ())
                advance()
                continue
            timed = _timed_ranks(candidate.ranks, max_timed)
            pairs = [
                cache.table("latency", provider, {**key, "rank": r}, lambda r=r, b=built: time_pair(b, r))
                for r in timed
            ]
            dense_ms = float(np.median([p["dense_ms"] for p in pairs]))
            entry = LayerLatency(
                dense_ms, tuple(timed), tuple(float(p["ms"]) for p in pairs), tuple(float(p["speedup"]) for p in pairs)
            )
            layers[candidate.name] = entry
            log.debug("latency %s: dense %.4f ms, factorized %s", candidate.name, dense_ms, dict(zip(timed, entry.ms)))
            advance()
    return LatencyTable(provider, device, layers)


def apply_latency_guard(candidates: list[Candidate], table: LatencyTable) -> list[Candidate]:
    """Drop the ranks at which a layer measured slower factorized than dense."""
    guarded = []
    for candidate in candidates:
        entry = table.layers.get(candidate.name)
        if entry is None:
            if len(candidate.ranks):
                log.warning("%s: latency could not be measured (unknown input shape); left dense", candidate.name)
            guarded.append(dataclasses.replace(candidate, ranks=candidate.ranks[:0], blocked="latency_unmeasured"))
            continue
        keep = np.array([entry.faster(int(r)) for r in candidate.ranks], dtype=bool)
        ranks = candidate.ranks[keep] if len(candidate.ranks) else candidate.ranks
        blocked = candidate.blocked or ("latency_guard" if len(ranks) == 0 else None)
        guarded.append(dataclasses.replace(candidate, ranks=ranks, blocked=blocked))
    return guarded


def enforce(decisions: dict[str, LayerDecision], candidates: list[Candidate]) -> dict[str, LayerDecision]:
    """Bring a method's decisions onto the allowed ranks (for plugins that ignore them).

    A rank off the lattice goes down to the largest allowed rank below it (never costlier);
    with none, the layer is kept dense with the candidate's blocking reason.
    """
    by_name = {c.name: c for c in candidates}
    fixed = dict(decisions)
    for name, decision in decisions.items():
        candidate = by_name.get(name)
        if candidate is None or decision.action != "factorize" or decision.rank is None:
            continue
        if decision.rank in set(candidate.ranks.tolist()):
            continue
        snapped = snap_down(candidate.ranks, decision.rank)
        if snapped is None:
            fixed[name] = LayerDecision("keep", reason=candidate.blocked or "no_allowed_rank")
        else:
            fixed[name] = dataclasses.replace(decision, rank=snapped, predicted={})
        log.info("%s: rank %s is not allowed here; now %s", name, decision.rank, fixed[name].rank or "kept")
    return fixed


def _timed_ranks(ranks: np.ndarray, max_timed: int) -> list[int]:
    if len(ranks) <= max_timed:
        return [int(r) for r in ranks]
    picks = np.unique(np.round(np.linspace(0, len(ranks) - 1, max_timed)).astype(int))
    return [int(ranks[i]) for i in picks]
