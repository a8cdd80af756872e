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
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.errors import OptionError
from onnx_lowrank.layers import Layer
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
    _check_counts(warmup, iters)
    options = options or RuntimeOptions(provider=provider)
    bound = BoundModel(_session(model, options, label), feeds)
    for _ in range(warmup):
        bound.run()
    with _no_gc():
        times = tuple(bound.run() for _ in range(iters))
    return Timing(label, bound.batch, times, bound.session.provider, warmup)


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
) -> PairTiming:
    """Time A and B interleaved on the same ``feeds``; speedup = time(A) / time(B)."""
    _check_counts(warmup, iters)
    options = options or RuntimeOptions(provider=provider)
    bound_a = BoundModel(_session(model_a, options, labels[0]), feeds)
    bound_b = BoundModel(_session(model_b, options, labels[1]), feeds)
    for _ in range(warmup):
        bound_a.run()
        bound_b.run()
    times_a, times_b = [], []
    with _no_gc():
        for i in range(iters):
            if i % 2 == 0:
                times_a.append(bound_a.run())
                times_b.append(bound_b.run())
            else:
                times_b.append(bound_b.run())
                times_a.append(bound_a.run())
    ratios = tuple(a / b if b > 0 else math.inf for a, b in zip(times_a, times_b))
    provider_used = bound_a.session.provider
    return PairTiming(
        Timing(labels[0], bound_a.batch, tuple(times_a), provider_used, warmup),
        Timing(labels[1], bound_b.batch, tuple(times_b), provider_used, warmup),
        ratios,
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
# Per-layer microbenchmark for latency-aware rank selection.


def layer_models(
    op_type: str,
    weight_shape: tuple[int, ...],
    rank: int,
    input_shape: int | tuple[int, ...],
    *,
    seed: int = 0,
    opset: int = 17,
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-layer dense model, its rank-``rank`` factorized form (as the factorize pass emits
    it) and a seeded random input, all float32.

    ``weight_shape``: for "Gemm" and "MatMul" the canonical ``(out_features, in_features)``;
    for "Conv" the kernel ``(Cout, Cin, kh, kw)``. ``input_shape``: a full input shape, or an
    int number of tokens: ``(tokens, in_features)`` for Gemm/MatMul, and for Conv a
    ``(1, Cin, s, s)`` image with ``s * s >= tokens`` output positions ("same" padding).
    Dense forms: ``Gemm(x, W[out, in], b, transB=1)`` (the PyTorch export),
    ``MatMul(x, W[in, out])``, ``Conv(x, W, b)``.
    """
    if op_type not in _LAYER_BUILDERS:
        raise OptionError(f"layer microbenchmark: op type {op_type!r} not in {', '.join(_LAYER_BUILDERS)}")
    if rank < 1:
        raise OptionError(f"layer microbenchmark: rank must be >= 1, got {rank}")
    rng = np.random.default_rng(seed)
    dense, factored, x_shape, y_shape = _LAYER_BUILDERS[op_type](rng, tuple(weight_shape), rank, input_shape)
    x = rng.standard_normal(x_shape).astype(np.float32)
    return _one_layer_model(dense, x_shape, y_shape, opset), _one_layer_model(factored, x_shape, y_shape, opset), {"x": x}


def layer_pair_timing(
    op_type: str,
    weight_shape: tuple[int, ...],
    rank: int,
    input_shape: int | tuple[int, ...],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = 5,
    iters: int = 30,
    seed: int = 0,
) -> PairTiming:
    """Dense vs factorized one-layer models timed interleaved (see :func:`layer_models`)."""
    dense, factored, feeds = layer_models(op_type, weight_shape, rank, input_shape, seed=seed)
    return measure_pair(
        dense, factored, feeds, provider=provider, options=options, warmup=warmup, iters=iters,
        labels=("dense", f"rank {rank}"),
    )


def factorized_layer_speedup(
    op_type: str,
    weight_shape: tuple[int, ...],
    rank: int,
    input_shape: int | tuple[int, ...],
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = 5,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Median time(dense) / time(factorized at ``rank``) for one layer; > 1 means factorizing
    makes it faster. Arguments as in :func:`layer_models`."""
    return layer_pair_timing(
        op_type, weight_shape, rank, input_shape, provider=provider, options=options,
        warmup=warmup, iters=iters, seed=seed,
    ).speedup


def _matrix_layer(op_type: str) -> Callable:
    def build(rng, weight_shape, rank, input_shape):
        if len(weight_shape) != 2:
            raise OptionError(f"layer microbenchmark: {op_type} weight shape must be (out, in), got {weight_shape}")
        out_f, in_f = weight_shape
        x_shape = (input_shape, in_f) if isinstance(input_shape, int) else tuple(input_shape)
        if x_shape[-1] != in_f:
            raise OptionError(f"layer microbenchmark: input shape {x_shape} does not end in {in_f}")
        scale = 1 / math.sqrt(in_f)
        w = (rng.standard_normal((out_f, in_f)) * scale).astype(np.float32)
        bias = (rng.standard_normal(out_f) * 0.1).astype(np.float32)
        first = (rng.standard_normal((in_f, rank)) * scale).astype(np.float32)
        second = (rng.standard_normal((rank, out_f)) / math.sqrt(rank)).astype(np.float32)
        use_gemm = op_type == "Gemm" and len(x_shape) == 2
        if use_gemm:
            dense = _graph(["Gemm", ("x", "W", "bias"), {"transB": 1}], {"W": w, "bias": bias})
            factored = _graph(
                ["MatMul", ("x", "A"), {}, "h"], ["Gemm", ("h", "B", "bias"), {}],
                {"A": first, "B": second, "bias": bias},
            )
        else:
            dense = _graph(["MatMul", ("x", "W"), {}], {"W": np.ascontiguousarray(w.T)})
            factored = _graph(["MatMul", ("x", "A"), {}, "h"], ["MatMul", ("h", "B"), {}], {"A": first, "B": second})
        return dense, factored, x_shape, (*x_shape[:-1], out_f)

    return build


def _conv_layer(rng, weight_shape, rank, input_shape):
    if len(weight_shape) != 4:
        raise OptionError(f"layer microbenchmark: Conv kernel must be (Cout, Cin, kh, kw), got {weight_shape}")
    cout, cin, kh, kw = weight_shape
    if isinstance(input_shape, int):
        side = max(1, math.ceil(math.sqrt(input_shape)))
        x_shape = (1, cin, side, side)
    else:
        x_shape = tuple(input_shape)
    if len(x_shape) != 4 or x_shape[1] != cin:
        raise OptionError(f"layer microbenchmark: Conv input must be (N, {cin}, H, W), got {x_shape}")
    pads = [kh // 2, kw // 2, (kh - 1) // 2, (kw - 1) // 2]
    scale = 1 / math.sqrt(cin * kh * kw)
    w = (rng.standard_normal(weight_shape) * scale).astype(np.float32)
    bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    first = (rng.standard_normal((rank, cin, kh, kw)) * scale).astype(np.float32)
    second = (rng.standard_normal((cout, rank, 1, 1)) / math.sqrt(rank)).astype(np.float32)
    attrs = {"kernel_shape": [kh, kw], "pads": pads}
    dense = _graph(["Conv", ("x", "W", "bias"), attrs], {"W": w, "bias": bias})
    factored = _graph(
        ["Conv", ("x", "A"), attrs, "h"], ["Conv", ("h", "B", "bias"), {"kernel_shape": [1, 1]}],
        {"A": first, "B": second, "bias": bias},
    )
    return dense, factored, x_shape, (x_shape[0], cout, *x_shape[2:])


def _graph(*parts) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes ``[op, inputs, attrs, (output)]`` chained to output ``y``, then initializers."""
    *steps, weights = parts
    nodes = []
    for index, (op, inputs, attrs, *out) in enumerate(steps):
        output = out[0] if out else "y"
        nodes.append(helper.make_node(op, list(inputs), [output], name=f"{op}_{index}", **attrs))
    inits = [numpy_helper.from_array(array, name) for name, array in weights.items()]
    return nodes, inits


def _one_layer_model(parts, x_shape: tuple[int, ...], y_shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    nodes, inits = parts
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))
    graph = helper.make_graph(nodes, "layer", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def layer_speedup(
    layer: Layer,
    rank: int,
    *,
    provider: str = "cpu",
    options: RuntimeOptions | None = None,
    warmup: int = 5,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """:func:`factorized_layer_speedup` for a :class:`~onnx_lowrank.layers.Layer` of a real model.

    Gemm/MatMul layers are timed over ``layer.tokens`` input rows (1 when unknown); a 2-D Conv
    over a square image with ``layer.tokens`` output positions. Raises :class:`OptionError`
    for other layers (1-D/3-D convs, unsupported ops).
    """
    tokens = layer.tokens or 1
    if layer.op_type == "Conv":
        if len(layer.weight_shape) != 4:
            raise OptionError(f"layer microbenchmark: only 2-D convs are timed, {layer.name} has kernel {layer.weight_shape}")
        weight_shape = tuple(layer.weight_shape)
    else:
        weight_shape = (layer.out_features, layer.in_features)
    return factorized_layer_speedup(
        layer.op_type, weight_shape, rank, tokens, provider=provider, options=options, warmup=warmup, iters=iters,
        seed=seed,
    )


_LAYER_BUILDERS: dict[str, Callable] = {
    "Gemm": _matrix_layer("Gemm"),
    "MatMul": _matrix_layer("MatMul"),
    "Conv": _conv_layer,
}


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
