"""Which ranks a search may pick: break-even, hardware multiples and the latency guard.

Every method chooses each layer's rank from :func:`rank_lattice` -- the multiples of the rank
multiple below the layer's break-even rank -- and, with an execution provider, only among
those at which the factorized layer measured faster than the dense one (the latency guard).

Latency is a staircase in the rank: kernels work in tiles, so ranks 49..64 cost about what 64
costs. Ranks are therefore multiples of ``rank_multiple`` (default 16 on the CPU provider,
whose conv kernels lose their NCHWc path off a multiple of 8/16; 8 on CUDA; 1 without a
provider), i.e. the largest rank of each latency step, whose extra accuracy is free.

Each candidate layer is timed as one-node models -- dense, and factorized by the real lowering
of :mod:`onnx_lowrank.passes.factorize` at up to ``max_timed`` ranks, interpolated between --
on the provider, and cached per (provider, device, onnxruntime version, op, shapes, attributes,
dtype, rank). When :mod:`onnx_lowrank.validate.latency` is installed, the guard's faster/slower
verdict comes from its ``factorized_layer_speedup`` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.errors import LowRankError, OptionError
from onnx_lowrank.layers import Layer, find_layers
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
    speedups: tuple[float, ...] | None = None  # validate.latency's verdicts, when it is installed

    def at(self, rank: int) -> float:
        """Factorized latency at ``rank``, linear between timed ranks (clamped at the ends)."""
        return float(np.interp(rank, self.ranks, self.ms))

    def faster(self, rank: int) -> bool:
        """Whether the factorized layer at ``rank`` beats the dense one."""
        if self.speedups is not None:
            return float(np.interp(rank, self.ranks, self.speedups)) > 1.0
        return self.at(rank) < self.dense_ms

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

    ``timer(model, feeds, provider) -> ms`` replaces every measurement when given (tests,
    custom harnesses); otherwise :func:`onnx_lowrank.calibrate.time_model_ms` times, and
    ``validate.latency`` (when installed) gives the guard's faster/slower verdicts.
    """
    from onnx_lowrank import calibrate  # onnxruntime lives there

    speedup = _validate_speedup() if timer is None else None
    environment = {"provider": provider, "ort": calibrate.ort_version()}
    if timer is None:
        timer = calibrate.time_model_ms
        environment["device"] = calibrate.device_label(provider)
    else:
        environment["timer"] = f"{getattr(timer, '__module__', '')}.{getattr(timer, '__qualname__', repr(timer))}"
    device = environment.get("device", "custom timer")
    shapes = infer_shapes(model, input_shapes)
    layers: dict[str, LayerLatency] = {}
    with progress("latency", len(candidates)) as advance:
        for candidate in candidates:
            layer = candidate.layer
            built = one_node_model(model, layer, shapes)
            if built is None or len(candidate.ranks) == 0:
                advance()
                continue
            dense, feeds, signature = built
            timed = _timed_ranks(candidate.ranks, max_timed)

            def measure(rank: int | None, dense=dense, feeds=feeds, layer=layer) -> float:
                one = dense if rank is None else factorized_one_node(dense, rank)
                return timer(one, feeds, provider)

            key = {**environment, **signature}
            dense_ms = cache.table("latency", provider, {**key, "rank": None}, lambda m=measure: m(None))
            ms = tuple(
                cache.table("latency", provider, {**key, "rank": int(r)}, lambda r=r, m=measure: m(int(r)))
                for r in timed
            )
            speedups = _validated_speedups(speedup, layer, timed, feeds, provider) if speedup is not None else None
            layers[layer.name] = LayerLatency(float(dense_ms), tuple(int(r) for r in timed), ms, speedups)
            log.debug("latency %s: dense %.4f ms, factorized %s", layer.name, dense_ms, dict(zip(timed, ms)))
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


def _validated_speedups(speedup, layer: Layer, ranks: list[int], feeds, provider: str) -> tuple[float, ...] | None:
    """validate.latency's dense/factorized speedups at ``ranks`` (None where it cannot time the layer)."""
    from onnx_lowrank.calibrate import PROVIDER_ALIASES

    short = {full: name for name, full in PROVIDER_ALIASES.items()}.get(provider, provider)
    if layer.op_type == "Conv":
        weight, extent = layer.weight_shape, tuple(feeds["x"].shape)
    else:
        weight, extent = (layer.out_features, layer.in_features), layer.tokens
    try:
        return tuple(float(speedup(layer.op_type, weight, int(r), extent, provider=short)) for r in ranks)
    except LowRankError as exc:  # shapes its microbenchmark does not build (1-D/3-D convs, ...)
        log.debug("validate.latency cannot time %s (%s); using this module's timings", layer.name, exc)
        return None


def _validate_speedup():
    try:
        from onnx_lowrank.validate.latency import factorized_layer_speedup
    except ImportError:
        return None
    return factorized_layer_speedup


# ---------------------------------------------------------------------------------------------
# one-node models


def one_node_model(
    model: onnx.ModelProto, layer: Layer, shapes: dict
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict] | None:
    """The layer alone as a model with random weights: (model, feeds, cache signature).

    Gemm/MatMul take ``tokens`` rows (the pinned input shapes); a Conv takes its real input
    shape. None when that shape is unknown.
    """
    node = _layer_node(model, layer)
    if node is None:
        return None
    rng = np.random.default_rng(0)
    elem = getattr(onnx.TensorProto, layer.dtype)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    m, n = layer.out_features, layer.in_features
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if layer.op_type == "Conv":
        x_shape = shapes.get(node.input[0]) if not layer.scope else None
        if x_shape is None or any(d is None for d in x_shape):
            return None
    elif layer.tokens is None:
        return None
    elif layer.form == "left":
        x_shape = (n, layer.tokens)
    else:
        x_shape = (layer.tokens, n)
    inputs = ["x", "W"]
    initializers = [onnx.numpy_helper.from_array(rng.standard_normal(layer.weight_shape).astype(dtype) * 0.05, "W")]
    if layer.form == "left":
        inputs = ["W", "x"]
    if layer.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
        inputs.append("b")
        initializers.append(onnx.numpy_helper.from_array(np.zeros((m,), dtype=dtype), "b"))
    one = onnx.helper.make_node(layer.op_type, inputs, ["y"], name="layer", **attrs)
    graph = onnx.helper.make_graph(
        [one],
        "one_node",
        [onnx.helper.make_tensor_value_info("x", elem, list(x_shape))],
        [onnx.helper.make_tensor_value_info("y", elem, None)],
        initializers,
    )
    opset = g.opset_version(model) or 17
    built = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=min(model.ir_version, 9))
    feeds = {"x": rng.standard_normal(x_shape).astype(dtype)}
    signature = {
        "op": layer.op_type,
        "form": layer.form,
        "weight_shape": list(layer.weight_shape),
        "input_shape": list(x_shape),
        "attrs": {k: _jsonable(v) for k, v in sorted(attrs.items())},
        "bias": "b" in inputs,
        "dtype": layer.dtype,
        "opset": opset,
    }
    return built, feeds, signature


def factorized_one_node(dense: onnx.ModelProto, rank: int) -> onnx.ModelProto:
    """The one-node model rewritten at ``rank`` by the real lowering, with random factors."""
    from onnx_lowrank.decompose.svd import SVDFactors
    from onnx_lowrank.passes import cleanup
    from onnx_lowrank.passes.factorize import LOWERINGS, LoweringContext
    from onnx_lowrank.passes.rewrite import NameAllocator, replace_nodes

    layer = find_layers(dense)[0]
    result = onnx.ModelProto()
    result.CopyFrom(dense)
    rng = np.random.default_rng(rank)
    factors = SVDFactors(
        left=rng.standard_normal((layer.out_features, rank)).astype(np.float32) * 0.05,
        right=rng.standard_normal((rank, layer.in_features)).astype(np.float32) * 0.05,
    )
    ctx = LoweringContext(
        model=result, graph=result.graph, layer=layer, names=NameAllocator(result),
        elem_type=getattr(onnx.TensorProto, layer.dtype),
    )
    nodes = LOWERINGS[(layer.op_type, "svd")](ctx, result.graph.node[0], factors)
    replace_nodes(result.graph, {0: nodes})
    cleanup.remove_unused(result, {layer.weight})
    return result


def _layer_node(model: onnx.ModelProto, layer: Layer) -> onnx.NodeProto | None:
    for scope in g.iter_scopes(model):
        if scope.path != layer.scope:
            continue
        label = layer.nodes[0][len(layer.scope) + 1 :] if layer.scope else layer.nodes[0]
        for index, node in enumerate(scope.graph.node):
            if g.node_label(node, index) == label:
                return node
    return None


def _jsonable(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str)):
        return value
    return str(value)
