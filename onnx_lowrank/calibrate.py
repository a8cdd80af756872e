"""Feed calibration inputs through onnxruntime and capture what calibrated searches need.

- :func:`load_calibration` / :func:`random_calibration`: the inputs, as arrays named after the
  model's inputs (batch first), with a hash that plans record.
- :func:`capture_covariances`: each candidate layer's input covariance ``C = X^T X / n``
  (``X`` = one row per token, per output position of a Conv as its im2col patch), accumulated
  batch by batch in float64 so memory stays bounded by one batch's activations.
- :class:`OutputProbe`: runs the model with chosen weights overridden (one session, the
  weights fed as inputs) and measures how far the outputs move: the measured sensitivity.
- :func:`time_model_ms`: median latency of a (one-node) model on an execution provider, for the
  latency guard and latency budgets until ``onnx_lowrank.validate.latency`` can serve them.

onnxruntime is imported here and in ``onnx_lowrank.validate`` only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnx_lowrank import graph as g
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.layers import Layer, weight_source
from onnx_lowrank.shapes import input_shapes as concrete_input_shapes

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_ROWS_PER_CHUNK = 1 << 16  # rows of X multiplied at once when accumulating X^T X


# ---------------------------------------------------------------------------------------------
# calibration data


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """Model inputs for calibration: ``inputs[name]`` is batch first; all share ``samples``.

    ``sha256`` identifies exactly what is fed (input names, dtypes, shapes, bytes); plans
    record it so that ``compress --plan`` can check it is given the same data.
    """

    inputs: dict[str, np.ndarray]
    samples: int
    sha256: str
    source: str

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of at most ``batch_size`` samples."""
        for start in range(0, self.samples, batch_size):
            yield {name: array[start : start + batch_size] for name, array in self.inputs.items()}

    def head(self, samples: int) -> CalibrationData:
        """The first ``samples`` samples (all when there are fewer)."""
        if samples >= self.samples:
            return self
        return make_calibration({k: v[:samples] for k, v in self.inputs.items()}, source=f"{self.source}[:{samples}]")

    def to_json(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "samples": self.samples}


def make_calibration(inputs: dict[str, np.ndarray], *, source: str) -> CalibrationData:
    """Wrap arrays already keyed by input name (checked for a common batch size)."""
    sizes = {name: int(array.shape[0]) for name, array in inputs.items() if np.ndim(array) > 0}
    if not sizes or len(set(sizes.values())) != 1:
        raise InputError(f"{source}: calibration arrays must share their first (batch) dimension, got {sizes}")
    digest = hashlib.sha256()
    for name in sorted(inputs):
        array = np.ascontiguousarray(inputs[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return CalibrationData(dict(inputs), next(iter(sizes.values())), digest.hexdigest(), source)


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are real inputs (not legacy initializer entries)."""
    initializers = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def load_calibration(
    path: str | os.PathLike,
    model: onnx.ModelProto,
    *,
    input_map: dict[str, str] | None = None,
    flag: str = "--calib",
) -> CalibrationData:
    """Read a ``.npz`` of calibration inputs and match its arrays to the model's inputs.

    An input takes the array ``input_map[name]``, else the array of the same name, else (for a
    model with one input) the only array whose trailing dimensions fit. Arrays are cast to the
    input's element type; a float array for an integer input is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag} {path}: not a readable .npz file ({exc})") from None
    inputs = model_inputs(model)
    input_map = dict(input_map or {})
    known = {v.name for v in inputs}
    for name, key in input_map.items():
        if name not in known:
            raise OptionError(f"--input-map {name}={key}: the model has no input {name!r} (inputs: {', '.join(sorted(known))})")
        if key not in arrays:
            raise OptionError(f"--input-map {name}={key}: {path} has no array {key!r} (arrays: {', '.join(sorted(arrays))})")
    chosen: dict[str, np.ndarray] = {}
    for value in inputs:
        key = input_map.get(value.name)
        if key is None and value.name in arrays:
            key = value.name
        if key is None and len(inputs) == 1:
            fitting = [k for k, a in arrays.items() if _fits(a, value)]
            if len(fitting) == 1:
                key = fitting[0]
                log.info("calibration: input %s takes array %s of %s", value.name, key, path)
        if key is None:
            raise InputError(
                f"{flag} {path}: no array for model input {value.name!r} (arrays: {', '.join(sorted(arrays))}); "
                f"map one with --input-map {value.name}=KEY"
            )
        chosen[value.name] = _cast(arrays[key], value, f"{flag} {path}: array {key!r} for input {value.name!r}")
    return make_calibration(chosen, source=str(path))


def random_calibration(
    model: onnx.ModelProto,
    samples: int,
    *,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> CalibrationData:
    """``samples`` random inputs: standard normal floats, ones for integer and bool inputs.

    A weak proxy for real data (the activations' covariance is what calibration measures);
    integer inputs such as token ids get ones because their valid range is unknown.
    """
    if samples < 1:
        raise OptionError(f"--calib-random must be a positive number of samples, got {samples}")
    rng = np.random.default_rng(seed)
    shapes = concrete_input_shapes(model, input_shapes)
    arrays = {}
    for value in model_inputs(model):
        shape = (samples, *shapes[value.name][1:])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            arrays[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[value.name] = np.ones(shape, dtype=dtype)
    return make_calibration(arrays, source=f"random:{samples}:seed{seed}")


def _fits(array: np.ndarray, value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    if array.ndim != len(dims) or array.ndim == 0:
        return False
    return all(d.dim_value <= 0 or d.dim_value == size for d, size in zip(dims[1:], array.shape[1:]))


def _cast(array: np.ndarray, value: onnx.ValueInfoProto, label: str) -> np.ndarray:
    if not _fits(array, value):
        dims = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]
        raise InputError(f"{label}: shape {list(array.shape)} does not fit the input's {dims} (batch first)")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    if np.issubdtype(array.dtype, np.floating) and not np.issubdtype(dtype, np.floating):
        raise InputError(f"{label}: float data for a {np.dtype(dtype).name} input")
    return np.ascontiguousarray(array.astype(dtype, copy=False))


# ---------------------------------------------------------------------------------------------
# sessions


def resolve_provider(name: str, *, flag: str = "--provider") -> str:
    """``cpu`` / ``cuda`` / a full provider name -> an available onnxruntime provider name."""
    import onnxruntime as ort

    full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
    available = ort.get_available_providers()
    if full not in available:
        raise OptionError(f"{flag} {name}: not available in this onnxruntime (available: {', '.join(available)})")
    return full


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


@functools.cache
def device_label(provider: str) -> str:
    """What the latency was measured on (part of the latency cache key)."""
    if provider == "CPUExecutionProvider":
        model_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"{model_name} x{os.cpu_count()}"
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        names = out.stdout.strip().splitlines()
        if names:
            return names[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return provider


def _session(
    model: onnx.ModelProto, provider: str = "CPUExecutionProvider", *, threads: int | None = None, spinning: bool = False
):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle onnxruntime threads spin by default, starving numpy's BLAS (the SVDs run between
    # session calls); the latency timer keeps spinning, as deployments do.
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InputError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# covariance capture


def activation_name(node: onnx.NodeProto, layer: Layer) -> str:
    """The tensor a layer's weight multiplies: x in x @ W, Gemm(x, W), Conv(x, W); W @ x's x."""
    return node.input[1] if layer.form == "left" else node.input[0]


def layer_nodes(model: onnx.ModelProto, layer: Layer) -> list[onnx.NodeProto]:
    """The nodes of a main-graph layer (empty for layers inside subgraphs)."""
    if layer.scope:
        return []
    labels = {g.node_label(node, i): node for i, node in enumerate(model.graph.node)}
    return [labels[name] for name in layer.nodes if name in labels]


def capture_covariances(
    model: onnx.ModelProto,
    layers: list[Layer],
    data: CalibrationData,
    *,
    batch_size: int = 32,
    on_batch: Callable[..., None] | None = None,
) -> dict[str, np.ndarray]:
    """Input covariance ``X^T X / n`` (float64, (in, in)) of each layer, keyed by layer name.

    ``X`` stacks every vector the canonical matrix multiplies: tokens of a MatMul/Gemm input
    (all leading dimensions flattened), columns of ``W @ x``, im2col patches of a Conv in the
    kernel's (Cin, *k) order. Layers inside subgraphs are not captured (absent from the result).
    """
    wanted: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
    for layer in layers:
        nodes = layer_nodes(model, layer)
        if nodes:
            wanted[layer.name] = [(node, activation_name(node, layer)) for node in nodes]
        else:
            log.info("calibration: %s is inside a subgraph; its covariance is not captured", layer.name)
    by_name = {layer.name: layer for layer in layers}
    tensors = sorted({name for pairs in wanted.values() for _, name in pairs})
    session, feed_names = _capture_session(model, tensors)
    sums = {name: np.zeros((by_name[name].in_features,) * 2) for name in wanted}
    counts = dict.fromkeys(wanted, 0)
    for batch in data.batches(batch_size):
        fetched = _run_capture(session, feed_names, tensors, batch)
        for name, pairs in wanted.items():
            for node, tensor in pairs:
                rows = activation_rows(fetched[tensor], node, by_name[name])
                _accumulate(sums[name], rows)
                counts[name] += rows.shape[0]
        if on_batch is not None:
            on_batch()
    return {name: sums[name] / max(counts[name], 1) for name in wanted}


def _capture_session(model: onnx.ModelProto, tensors: list[str]):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph_inputs = {v.name for v in model_inputs(model)}
    outputs = {o.name for o in copy.graph.output}
    types = _tensor_types(model)
    for name in tensors:
        if name not in outputs and name not in graph_inputs:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return _session(copy), graph_inputs


def _run_capture(session, graph_inputs: set[str], tensors: list[str], batch: dict[str, np.ndarray]):
    fetch = [t for t in tensors if t not in graph_inputs]
    values = dict(zip(fetch, session.run(fetch, batch))) if fetch else {}
    values.update({t: batch[t] for t in tensors if t in graph_inputs})
    return values


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # onnx raises several unrelated types here
        inferred = model
    graph = inferred.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in list(graph.input) + list(graph.value_info) + list(graph.output)
        if v.type.HasField("tensor_type")
    }


def activation_rows(x: np.ndarray, node: onnx.NodeProto, layer: Layer) -> np.ndarray:
    """The vectors (one per row) that the layer's canonical matrix multiplies."""
    x = np.asarray(x)
    n = layer.in_features
    if layer.op_type == "Conv":
        return conv_patches(x, node, layer.weight_shape)
    if layer.form == "left":  # W @ x: x is (..., n, T); every column is one vector
        return np.swapaxes(x.reshape(-1, n, x.shape[-1]), 1, 2).reshape(-1, n)
    return x.reshape(-1, n)


def conv_patches(x: np.ndarray, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> np.ndarray:
    """im2col: one row per output position, ``Cin * prod(kernel)`` values in the kernel's order."""
    kernel = tuple(weight_shape[2:])
    spatial = x.shape[2:]
    dims = len(kernel)
    strides = tuple(g.attribute(node, "strides", None) or (1,) * dims)
    dilations = tuple(g.attribute(node, "dilations", None) or (1,) * dims)
    begins, ends = _conv_pads(node, spatial, kernel, strides, dilations)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begins, ends)])
    out = [
        (padded.shape[2 + d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1 for d in range(dims)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(offset[d] * dilations[d], offset[d] * dilations[d] + strides[d] * (out[d] - 1) + 1, strides[d])
            for d in range(dims)
        )
        slices.append(padded[(slice(None), slice(None), *index)])
    stacked = np.stack(slices, axis=2)  # (B, Cin, K, *out)
    order = (0, *range(3, 3 + dims), 1, 2)  # (B, *out, Cin, K)
    return np.transpose(stacked, order).reshape(-1, x.shape[1] * len(slices))


def _conv_pads(node, spatial, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    dims = len(kernel)
    auto_pad = g.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for d in range(dims):
            out = -(-spatial[d] // strides[d])
            total = max((out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - spatial[d], 0)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins, ends
    if auto_pad == "VALID":
        return [0] * dims, [0] * dims
    pads = list(g.attribute(node, "pads", None) or [0] * (2 * dims))
    return pads[:dims], pads[dims:]


def _accumulate(total: np.ndarray, rows: np.ndarray) -> None:
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = rows[start : start + _ROWS_PER_CHUNK].astype(np.float64)
        total += chunk.T @ chunk


# ---------------------------------------------------------------------------------------------
# measured sensitivity


class OutputProbe:
    """The model's outputs on calibration data, and how far they move when weights change.

    One onnxruntime session serves every measurement: the candidate layers' weights are made
    overridable graph inputs, so substituting a layer's weight is a feed, not a new model.
    Layers whose weight is not a main-graph initializer cannot be substituted
    (:meth:`can_substitute` is False).
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], data: CalibrationData, *, batch_size: int = 64):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        inputs = {v.name for v in copy.graph.input}
        initializers = {i.name: i for i in copy.graph.initializer}
        self._weights: dict[str, tuple[str, str, tuple[int, ...], np.dtype]] = {}
        for layer in layers:
            source = weight_source(model, layer)
            if source.kind != "initializer" or source.scope.path != "":
                continue
            init = initializers[source.stored_name]
            if source.stored_name not in inputs:
                copy.graph.input.append(
                    onnx.helper.make_tensor_value_info(source.stored_name, init.data_type, list(init.dims))
                )
                inputs.add(source.stored_name)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            self._weights[layer.name] = (source.stored_name, layer.form, tuple(init.dims), dtype)
        self._session = _session(copy)
        self._outputs = [o.name for o in copy.graph.output]
        self._batches = list(data.batches(batch_size))
        self._reference = [self._session.run(self._outputs, batch) for batch in self._batches]
        self._norm = sum(_sq_norm(y) for outs in self._reference for y in outs) or 1.0
        self.runs = 0

    def can_substitute(self, layer_name: str) -> bool:
        return layer_name in self._weights

    def relative_error(self, substitutions: dict[str, np.ndarray]) -> float:
        """``sum ||y - y0||^2 / sum ||y0||^2`` over every output and sample, with the layers'
        canonical (out, in) matrices replaced by ``substitutions``."""
        feeds = {}
        for name, matrix in substitutions.items():
            stored, form, shape, dtype = self._weights[name]
            array = matrix.T if form == "in_out" else matrix
            feeds[stored] = np.ascontiguousarray(array.reshape(shape).astype(dtype))
        total = 0.0
        for batch, reference in zip(self._batches, self._reference):
            outputs = self._session.run(self._outputs, {**batch, **feeds})
            total += sum(_sq_norm(y - y0) for y, y0 in zip(outputs, reference))
        self.runs += 1
        return float(total / self._norm)


def _sq_norm(array: np.ndarray) -> float:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return 0.0
    return float(np.sum(np.square(array.astype(np.float64))))


# ---------------------------------------------------------------------------------------------
# latency of small models (used by the latency guard until onnx_lowrank.validate.latency serves it)


def time_model_ms(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    provider: str,
    *,
    warmup: int = 5,
    samples: int = 15,
    min_sample_seconds: float = 0.002,
) -> float:
    """Median wall time of one run of ``model`` on ``provider``, in milliseconds.

    Each sample averages enough back-to-back runs to last ``min_sample_seconds`` (timer
    overhead would dominate microsecond kernels otherwise). On a GPU provider inputs and
    outputs are bound to device memory, so host transfers are not timed.
    """
    session = _session(model, provider, spinning=True)
    run = _runner(session, feeds, provider)
    for _ in range(warmup):
        run()
    started = time.perf_counter()
    run()
    single = max(time.perf_counter() - started, 1e-7)
    inner = max(1, int(min_sample_seconds / single))
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        for _ in range(inner):
            run()
        times.append((time.perf_counter() - started) / inner)
    return float(np.median(times) * 1e3)


def _runner(session, feeds: dict[str, np.ndarray], provider: str) -> Callable[[], None]:
    outputs = [o.name for o in session.get_outputs()]
    if provider == "CPUExecutionProvider":
        return lambda: session.run(outputs, feeds)
    import onnxruntime as ort

    device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for name in outputs:
        binding.bind_output(name, device)

    def run() -> None:
        session.run_with_iobinding(binding)

    return run
