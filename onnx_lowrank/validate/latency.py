"""Latency on ONNX Runtime with I/O binding, and speedups measured side by side.

Every timed run goes through ``session.run_with_iobinding``: inputs are copied to the
provider's device once (``OrtValue.ortvalue_from_numpy(x, device)``), outputs are preallocated
there, so a timing holds the model's work and ORT's dispatch, not host<->device copies or
output allocation. The CPU EP takes the same path, so it is exercised by the CPU tests.

Two models are compared interleaved in one process on the same inputs (A B, B A, A B, ... the
order alternating so neither always runs second); the speedup is the median of the per-pair
ratios ``time(A) / time(B)``, with their interquartile range and a bootstrap 95% interval of
that median. Absolute times drift with machine load; same-run ratios mostly do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import graph as g
from onnx_lowrank.errors import OptionError
from onnx_lowrank.layers import Layer, find_layers
from onnx_lowrank.validate.runtime import ModelLike, RuntimeOptions, Session, create_session, runtime_info

log = logging.getLogger(__name__)

DEFAULT_WARMUP = 10
DEFAULT_ITERS = 100
_BOOTSTRAP_RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-run wall times (ms) of one model at one batch size."""

    label: str
    batch: int
    times_ms: tuple[float, ...]
    provider: str
    warmup: int

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the run times, in ms."""
        return float(np.percentile(self.times_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.times_ms))

    @property
    def throughput(self) -> float:
        """Samples per second at the median run time."""
        return self.batch * 1000.0 / self.p50 if self.p50 > 0 else math.inf

    def to_json(self, *, samples: bool = False) -> dict:
        out = {
            "label": self.label,
            "batch": self.batch,
            "provider": self.provider,
            "warmup": self.warmup,
            "iters": len(self.times_ms),
            "p50_ms": round(self.p50, 6),
            "p90_ms": round(self.p90, 6),
            "p99_ms": round(self.p99, 6),
            "mean_ms": round(self.mean, 6),
            "min_ms": round(min(self.times_ms), 6),
            "throughput_per_s": round(self.throughput, 3),
        }
        if samples:
            out["times_ms"] = [round(t, 6) for t in self.times_ms]
        return out


@dataclasses.dataclass(frozen=True)
class PairTiming:
    """Two models timed interleaved; ``ratios[i] = a.times_ms[i] / b.times_ms[i]``.

    A speedup above 1 means B is faster than A (B is usually the compressed model).
    """

    a: Timing
    b: Timing
    ratios: tuple[float, ...]

    @property
    def speedup(self) -> float:
        """Median of the per-pair ratios time(A) / time(B)."""
        return float(np.median(self.ratios))

    @property
    def iqr(self) -> tuple[float, float]:
        """25th and 75th percentiles of the per-pair ratios."""
        return float(np.percentile(self.ratios, 25)), float(np.percentile(self.ratios, 75))

    @property
    def ci95(self) -> tuple[float, float]:
        """Bootstrap 95% interval of the median ratio (seeded, so reproducible)."""
        return bootstrap_median_ci(self.ratios)

    def to_json(self, *, samples: bool = False) -> dict:
        out = {
            "speedup": round(self.speedup, 6),
            "speedup_iqr": [round(v, 6) for v in self.iqr],
            "speedup_ci95": [round(v, 6) for v in self.ci95],
            "a": self.a.to_json(samples=samples),
            "b": self.b.to_json(samples=samples),
        }
        if samples:
            out["ratios"] = [round(r, 6) for r in self.ratios]
        return out


def bootstrap_median_ci(values, *, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of ``values``."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    resampled = rng.choice(data, size=(_BOOTSTRAP_RESAMPLES, data.size), replace=True)
    medians = np.median(resampled, axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


class BoundModel:
    """A session with its inputs and preallocated outputs bound on the provider's device."""

    def __init__(self, session: Session, feeds: dict[str, np.ndarray]):
        self.session = session
        options = session.options
        device, device_id = options.device, options.device_id
        # One plain run: checks the feeds and tells the output shapes to preallocate.
        reference = session.run(feeds)
        self.binding = session.ort_session.io_binding()
        # Keep every OrtValue (and, on the CPU, the numpy buffer it shares) alive while bound.
        self._host = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
        self._values = []
        for name, array in self._host.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, device, device_id)
            self.binding.bind_ortvalue_input(name, value)
            self._values.append(value)
        for name, out in reference.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(out.shape), out.dtype, device, device_id)
            self.binding.bind_ortvalue_output(name, value)
            self._values.append(value)
        self._sync = device != "cpu"
        self.batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1

    def run(self) -> float:
        """One bound run; its wall time in ms."""
        start = time.perf_counter()
        self.session.ort_session.run_with_iobinding(self.binding)
        if self._sync:
            self.binding.synchronize_outputs()
        return (time.perf_counter() - start) * 1000.0


def measure(
    model: ModelLike | Session,
    feeds: dict[str, np.ndarray],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    label: str = "model",
) -> Timing:
    """Time ``iters`` bound runs of ``model`` on ``feeds`` after ``warmup`` untimed ones."""
    (timing,) = measure_interleaved(
        [model], feeds, provider=provider, options=options, warmup=warmup, iters=iters, labels=[label]
    )
    return timing


def measure_pair(
    model_a: ModelLike | Session,
    model_b: ModelLike | Session,
    feeds: dict[str, np.ndarray],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    labels: tuple[str, str] = ("a", "b"),
    min_seconds: float = 0.0,
) -> PairTiming:
    """Time A and B interleaved on the same ``feeds``; speedup = time(A) / time(B).
    ``min_seconds``: see :func:`measure_interleaved`."""
    a, b = measure_interleaved(
        [model_a, model_b], feeds, provider=provider, options=options, warmup=warmup, iters=iters, labels=labels,
        min_seconds=min_seconds,
    )
    ratios = tuple(x / y if y > 0 else math.inf for x, y in zip(a.times_ms, b.times_ms))
    return PairTiming(a, b, ratios)


def measure_interleaved(
    models: Sequence[ModelLike | Session],
    feeds: dict[str, np.ndarray],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    labels: Sequence[str] | None = None,
    min_seconds: float = 0.0,
) -> tuple[Timing, ...]:
    """Time several models in turn on the same ``feeds``, one :class:`Timing` each.

    Every round runs each model once, the order rotating round by round (A B, B A for two)
    so that none always runs first; run ``i`` of every model belongs to the same round.
    ``min_seconds``: run more rounds than ``iters`` (up to 10x) until the timed rounds take
    about that long, so that microsecond models are not judged on a few noisy runs.
    """
    _check_counts(warmup, iters)
    options = options or RuntimeOptions(provider=provider)
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(models))]
    bound = [BoundModel(_session(model, options, label), feeds) for model, label in zip(models, labels, strict=True)]
    for _ in range(warmup):
        for model in bound:
            model.run()
    if min_seconds > 0:
        round_s = sum(model.run() for model in bound) / 1000.0  # one more warm round, as an estimate
        iters = min(10 * iters, max(iters, math.ceil(min_seconds / max(round_s, 1e-9))))
    times: list[list[float]] = [[] for _ in bound]
    order = list(range(len(bound)))
    with _no_gc():
        for i in range(iters):
            shift = i % len(order)
            for k in order[shift:] + order[:shift]:
                times[k].append(bound[k].run())
    provider_used = bound[0].session.provider
    return tuple(
        Timing(label, model.batch, tuple(t), provider_used, warmup) for label, model, t in zip(labels, bound, times)
    )


def parse_batch_sizes(text: str, *, flag: str = "--batch") -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``; every size a positive integer, no duplicates."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OptionError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 1,8,64")
    sizes = tuple(int(p) for p in parts)
    if len(set(sizes)) != len(sizes):
        raise OptionError(f"{flag} {text!r}: a batch size is repeated")
    return sizes


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One batch size: the timing of model A, and with a second model the interleaved pair."""

    batch: int
    a: Timing
    pair: PairTiming | None = None

    def to_json(self, *, samples: bool = False) -> dict:
        if self.pair is None:
            return {"batch": self.batch, "a": self.a.to_json(samples=samples)}
        return {"batch": self.batch, **self.pair.to_json(samples=samples)}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Latency per batch size of one model, or of two models side by side."""

    rows: tuple[BenchRow, ...]
    labels: tuple[str, ...]
    runtime: dict
    provider_used: str

    def to_json(self, *, samples: bool = False) -> dict:
        return {
            "models": list(self.labels),
            "runtime": {**self.runtime, "provider_used": self.provider_used},
            "results": [row.to_json(samples=samples) for row in self.rows],
        }


def bench(
    model_a: ModelLike,
    model_b: ModelLike | None,
    batches: tuple[int, ...],
    feeds_for: Callable[[int], dict[str, np.ndarray]],
    *,
    options: RuntimeOptions,
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    labels: tuple[str, str] = ("a", "b"),
    on_batch: Callable[..., None] | None = None,
) -> BenchResult:
    """Time ``model_a`` (and ``model_b`` interleaved) at every batch size in ``batches``.

    ``feeds_for(batch)`` gives the inputs for one batch size. Sessions are created once and
    reused across batch sizes, except with CUDA graphs (one captured graph per shape).
    """
    _check_counts(warmup, iters)
    fresh = options.cuda_graph

    def sessions():
        a = create_session(model_a, options, label=labels[0])
        b = create_session(model_b, options, label=labels[1]) if model_b is not None else None
        return a, b

    session_a, session_b = sessions()
    rows = []
    for index, batch in enumerate(batches):
        if fresh and index:
            session_a, session_b = sessions()
        feeds = feeds_for(batch)
        if session_b is None:
            timing = measure(session_a, feeds, options=options, warmup=warmup, iters=iters, label=labels[0])
            rows.append(BenchRow(batch, timing))
        else:
            pair = measure_pair(
                session_a, session_b, feeds, options=options, warmup=warmup, iters=iters, labels=labels
            )
            rows.append(BenchRow(batch, pair.a, pair))
        if on_batch is not None:
            on_batch()
    return BenchResult(tuple(rows), labels if model_b is not None else labels[:1], runtime_info(options), session_a.provider)


# ---------------------------------------------------------------------------------------------
# One layer alone: dense vs factorized, for the latency guard and the layer microbenchmark.
#
# A single builder (:func:`_one_node`) makes the dense one-node model; its factorized form is
# written by the factorize pass's own lowering (``passes.factorize.LOWERINGS``), so what is
# timed is exactly what ``compress`` emits (op sequence, attributes, factor layout, dtype).

LAYER_WARMUP = 5
LAYER_ITERS = 30
LAYER_MIN_SECONDS = 0.05  # per layer and rank: tiny layers get up to 300 pairs instead of 30
LAYER_OPS = ("Gemm", "MatMul", "Conv")


@dataclasses.dataclass(frozen=True)
class LayerModel:
    """One layer as a one-node model (input ``x``, output ``y``, seeded random weights), its
    seeded random input, and what determines its latency (``signature``, a cache key)."""

    dense: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    signature: dict

    def factorized(self, rank: int) -> onnx.ModelProto:
        """The model rewritten at ``rank`` by the factorize pass's SVD lowering (random factors)."""
        # Imported here: the passes (and the search package they use) load only to time a layer.
        from onnx_lowrank.decompose.svd import SVDFactors
        from onnx_lowrank.passes import cleanup
        from onnx_lowrank.passes.factorize import LOWERINGS, LoweringContext
        from onnx_lowrank.passes.rewrite import NameAllocator, replace_nodes

        if rank < 1:
            raise OptionError(f"layer microbenchmark: rank must be >= 1, got {rank}")
        layer = find_layers(self.dense)[0]
        result = onnx.ModelProto()
        result.CopyFrom(self.dense)
        rng = np.random.default_rng(rank)
        factors = SVDFactors(
            left=rng.standard_normal((layer.out_features, rank)).astype(np.float32) * 0.05,
            right=rng.standard_normal((rank, layer.in_features)).astype(np.float32) * 0.05,
        )
        ctx = LoweringContext(
            model=result, graph=result.graph, layer=layer, names=NameAllocator(result),
            elem_type=getattr(TensorProto, layer.dtype),
        )
        nodes = LOWERINGS[(layer.op_type, "svd")](ctx, result.graph.node[0], factors)
        replace_nodes(result.graph, {0: nodes})
        cleanup.remove_unused(result, {layer.weight})
        return result


def layer_model(model: onnx.ModelProto, layer: Layer, shapes: dict) -> LayerModel | None:
    """``layer`` of ``model`` alone, with its node's attributes, form, dtype and input shape.

    Gemm/MatMul take ``layer.tokens`` rows; a Conv takes its real input shape from ``shapes``
    (:func:`onnx_lowrank.shapes.infer_shapes`). None when that shape is unknown.
    """
    node = _layer_node(model, layer)
    if node is None:
        return None
    if layer.op_type == "Conv":
        x_shape = shapes.get(node.input[0]) if not layer.scope else None
        if x_shape is None or any(d is None for d in x_shape):
            return None
    elif layer.tokens is None:
        return None
    elif layer.form == "left":
        x_shape = (layer.in_features, layer.tokens)
    else:
        x_shape = (layer.tokens, layer.in_features)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = layer.op_type in ("Gemm", "Conv") and len(node.input) > 2 and bool(node.input[2])
    return _one_node(
        layer.op_type, attrs, tuple(layer.weight_shape), tuple(x_shape),
        form=layer.form, out_features=layer.out_features, bias=bias, elem_type=getattr(TensorProto, layer.dtype),
        opset=g.opset_version(model) or 17, ir_version=min(model.ir_version, 9),
    )


def layer_models(
    op_type: str,
    weight_shape: tuple[int, ...],
    rank: int,
    input_shape: int | tuple[int, ...],
    *,
    seed: int = 0,
    opset: int = 17,
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-layer float32 dense model, its rank-``rank`` factorized form (as the factorize pass
    emits it) and a seeded random input.

    ``weight_shape``: for "Gemm" and "MatMul" the canonical ``(out_features, in_features)``;
    for "Conv" the kernel ``(Cout, Cin, kh, kw)``. ``input_shape``: a full input shape, or an
    int number of tokens: ``(tokens, in_features)`` for Gemm/MatMul, and for Conv a
    ``(1, Cin, s, s)`` image with ``s * s >= tokens`` output positions ("same" padding).
    Dense forms: ``Gemm(x, W[out, in], b, transB=1)`` (the PyTorch export; a MatMul for
    inputs of rank > 2), ``MatMul(x, W[in, out])``, ``Conv(x, W, b)``.
    """
    built = _synthetic_layer(op_type, tuple(weight_shape), input_shape, seed=seed, opset=opset)
    return built.dense, built.factorized(rank), built.feeds


def time_layer(
    built: LayerModel,
    rank: int,
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = LAYER_WARMUP,
    iters: int = LAYER_ITERS,
) -> PairTiming:
    """Dense vs rank-``rank`` factorized ``built`` timed interleaved (speedup > 1: factorized
    is faster)."""
    return measure_pair(
        built.dense, built.factorized(rank), built.feeds, provider=provider, options=options,
        warmup=warmup, iters=iters, labels=("dense", f"rank {rank}"), min_seconds=LAYER_MIN_SECONDS,
    )


def layer_pair_timing(
    op_type: str,
    weight_shape: tuple[int, ...],
    rank: int,
    input_shape: int | tuple[int, ...],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = LAYER_WARMUP,
    iters: int = LAYER_ITERS,
    seed: int = 0,
) -> PairTiming:
    """:func:`time_layer` of the one-layer model :func:`layer_models` describes."""
    built = _synthetic_layer(op_type, tuple(weight_shape), input_shape, seed=seed)
    return time_layer(built, rank, provider=provider, options=options, warmup=warmup, iters=iters)


def factorized_layer_speedup(
    op_type: str, weight_shape: tuple[int, ...], rank: int, input_shape: int | tuple[int, ...], **timing
) -> float:
    """Median time(dense) / time(factorized at ``rank``) for one layer; > 1 means factorizing
    makes it faster. Arguments as in :func:`layer_pair_timing`."""
    return layer_pair_timing(op_type, weight_shape, rank, input_shape, **timing).speedup


def layer_speedup(layer: Layer, rank: int, **timing) -> float:
    """:func:`factorized_layer_speedup` for a :class:`~onnx_lowrank.layers.Layer` of a real model.

    Gemm/MatMul layers are timed over ``layer.tokens`` input rows (1 when unknown); a 2-D Conv
    over a square image with ``layer.tokens`` output positions. Raises :class:`OptionError`
    for other layers (1-D/3-D convs, unsupported ops). Keywords as in :func:`layer_pair_timing`.
    """
    tokens = layer.tokens or 1
    if layer.op_type == "Conv":
        if len(layer.weight_shape) != 4:
            raise OptionError(f"layer microbenchmark: only 2-D convs are timed, {layer.name} has kernel {layer.weight_shape}")
        weight_shape = tuple(layer.weight_shape)
    else:
        weight_shape = (layer.out_features, layer.in_features)
    return factorized_layer_speedup(layer.op_type, weight_shape, rank, tokens, **timing)


def _synthetic_layer(
    op_type: str, weight_shape: tuple[int, ...], input_shape: int | tuple[int, ...], *, seed: int = 0, opset: int = 17
) -> LayerModel:
    """The one-node model of :func:`layer_models` (canonical shapes -> stored layout)."""
    if op_type not in LAYER_OPS:
        raise OptionError(f"layer microbenchmark: op type {op_type!r} not in {', '.join(LAYER_OPS)}")
    common = {"bias": True, "elem_type": TensorProto.FLOAT, "opset": opset, "ir_version": 8, "seed": seed}
    if op_type == "Conv":
        if len(weight_shape) != 4:
            raise OptionError(f"layer microbenchmark: Conv kernel must be (Cout, Cin, kh, kw), got {weight_shape}")
        _, cin, kh, kw = weight_shape
        if isinstance(input_shape, int):
            side = max(1, math.ceil(math.sqrt(input_shape)))
            x_shape = (1, cin, side, side)
        else:
            x_shape = tuple(input_shape)
        if len(x_shape) != 4 or x_shape[1] != cin:
            raise OptionError(f"layer microbenchmark: Conv input must be (N, {cin}, H, W), got {x_shape}")
        attrs = {"kernel_shape": [kh, kw], "pads": [kh // 2, kw // 2, (kh - 1) // 2, (kw - 1) // 2]}
        return _one_node("Conv", attrs, weight_shape, x_shape, form="conv", out_features=weight_shape[0], **common)
    if len(weight_shape) != 2:
        raise OptionError(f"layer microbenchmark: {op_type} weight shape must be (out, in), got {weight_shape}")
    out_f, in_f = weight_shape
    x_shape = (input_shape, in_f) if isinstance(input_shape, int) else tuple(input_shape)
    if x_shape[-1] != in_f:
        raise OptionError(f"layer microbenchmark: input shape {x_shape} does not end in {in_f}")
    if op_type == "Gemm" and len(x_shape) == 2:
        return _one_node("Gemm", {"transB": 1}, (out_f, in_f), x_shape, form="out_in", out_features=out_f, **common)
    return _one_node("MatMul", {}, (in_f, out_f), x_shape, form="in_out", out_features=out_f, **{**common, "bias": False})


def _one_node(
    op_type: str,
    attrs: dict,
    weight_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    *,
    form: str,
    out_features: int,
    bias: bool,
    elem_type: int,
    opset: int,
    ir_version: int,
    seed: int = 0,
) -> LayerModel:
    """The one builder: ``y = op(x, W[, b])`` (``op(W, x)`` for the "left" form) with ``W`` in
    its stored ``weight_shape``, a zero bias of ``out_features``, random weights and input of
    ``elem_type``."""
    rng = np.random.default_rng(seed)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    inputs = ["W", "x"] if form == "left" else ["x", "W"]
    weights = {"W": rng.standard_normal(weight_shape).astype(dtype) * 0.05}
    if bias:
        inputs.append("b")
        weights["b"] = np.zeros((out_features,), dtype=dtype)
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["y"], name="layer", **attrs)],
        "layer",
        [helper.make_tensor_value_info("x", elem_type, list(x_shape))],
        [helper.make_tensor_value_info("y", elem_type, [None] * len(x_shape))],  # same rank, any size
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    dense = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    signature = {
        "op": op_type,
        "form": form,
        "weight_shape": list(weight_shape),
        "input_shape": list(x_shape),
        "attrs": {k: _jsonable(v) for k, v in sorted(attrs.items())},
        "bias": bias,
        "dtype": TensorProto.DataType.Name(elem_type),
        "opset": opset,
    }
    return LayerModel(dense, {"x": rng.standard_normal(x_shape).astype(dtype)}, signature)


def _layer_node(model: onnx.ModelProto, layer: Layer) -> onnx.NodeProto | None:
    """The (first) node of ``layer`` in its scope of ``model``."""
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


def _session(model: ModelLike | Session, options: RuntimeOptions, label: str) -> Session:
    return model if isinstance(model, Session) else create_session(model, options, label=label)


def _check_counts(warmup: int, iters: int) -> None:
    if warmup < 0:
        raise OptionError(f"--warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise OptionError(f"--iters must be >= 1, got {iters}")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Keep Python's garbage collector from pausing inside a timing loop."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
