"""ONNX Runtime sessions on a named execution provider, and nothing silently on another.

ORT quietly falls back to the CPU when a requested provider is missing or fails to load; a
latency figure taken that way would be a lie. :func:`create_session` checks both that the
provider is in ``get_available_providers()`` and that the created session really runs on it
(``session.get_providers()[0]``), and raises :class:`ProviderUnavailable` otherwise.

Models are accepted as a path or an in-memory ``ModelProto``; a proto too large for protobuf's
2 GB limit is written to a temporary directory with external data first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.model import PROTOBUF_LIMIT_BYTES, load_model, save_model

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike

# CLI name -> ORT provider name. The single table of providers this tool knows.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Where I/O-bound tensors live for each provider (OrtValue device type).
DEVICES = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# What ORT raises for a model it cannot run on the given feeds (wrong shape, dtype, name).
_ORT_RUN_ERRORS = (_ort_state.Fail, _ort_state.InvalidArgument, _ort_state.RuntimeException, _ort_state.NotImplemented)
# What ORT raises for a model or provider it cannot load (names vary a little across versions).
_ORT_LOAD_ERRORS = (RuntimeError, ValueError, OSError) + tuple(
    getattr(_ort_state, name)
    for name in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
                 "NotImplemented", "RuntimeException", "EPFail", "EngineError", "ModelRequiresCompilation")
    if hasattr(_ort_state, name)
)


class ProviderUnavailable(OptionError):
    """The requested execution provider is not in this onnxruntime build or failed to load."""


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model.

    Attributes:
        provider: "cpu", "cuda" or "tensorrt".
        threads: intra-op threads; None leaves ORT's default (one per physical core).
        tf32: CUDA EP ``use_tf32`` (TF32 tensor-core math for float32 MatMul/Conv); ORT's
            default is on. Ignored on the CPU.
        cuda_graph: CUDA EP ``enable_cuda_graph`` (static shapes and I/O binding required).
        device_id: GPU ordinal.
        spin: let idle intra-op threads busy-wait (ORT's default). Off here by default: two
            sessions timed interleaved, or one on a shared CI machine, otherwise lose whole
            milliseconds to idle threads spinning on the cores the running session needs
            (measured: a 2.7 ms model read 14.7 ms on a loaded 2-core machine with spinning on).
            Off also keeps idle ORT threads from starving numpy's BLAS between session calls.
        optimize: ORT graph optimizations (its default). Off for reference runs, which must
            show the graph's own semantics, not ORT's fused rewrite of it.
    """

    provider: str = "cpu"
    threads: int | None = None
    tf32: bool = True
    cuda_graph: bool = False
    device_id: int = 0
    spin: bool = False
    optimize: bool = True

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise OptionError(f"--provider {self.provider}: expected one of {', '.join(PROVIDERS)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be a positive integer, got {self.threads}")
        if self.cuda_graph and self.provider != "cuda":
            raise OptionError("--cuda-graph needs --provider cuda")

    @property
    def device(self) -> str:
        """OrtValue device type for bound inputs and outputs ("cpu" or "cuda")."""
        return DEVICES[self.provider]

    def to_json(self) -> dict:
        out = {"provider": self.provider, "threads": self.threads if self.threads else "ort-default", "spin": self.spin}
        if self.provider != "cpu":
            out.update(tf32=self.tf32, cuda_graph=self.cuda_graph, device_id=self.device_id)
        if not self.optimize:
            out["optimize"] = False
        return out


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, shape (ints, or a string/None for dynamic dims) and numpy dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)

    def static_dims(self) -> dict[int, int]:
        """Axis -> size for every dimension fixed in the model (the batch axis 0 excluded)."""
        return {axis: d for axis, d in enumerate(self.shape) if axis > 0 and isinstance(d, int) and d > 0}


@dataclasses.dataclass
class Session:
    """An ORT session plus what it really runs on (``provider`` is ORT's first provider)."""

    ort_session: ort.InferenceSession
    options: RuntimeOptions
    provider: str
    label: str

    @property
    def inputs(self) -> list[InputSpec]:
        return [
            InputSpec(i.name, tuple(i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32)))
            for i in self.ort_session.get_inputs()
        ]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.ort_session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Plain run with numpy in and out (used for accuracy; timing uses I/O binding).

        ``outputs``: the output names to fetch (default: all of them).
        """
        names = list(outputs) if outputs is not None else self.output_names
        try:
            return dict(zip(names, self.ort_session.run(names, feeds)))
        except _ORT_RUN_ERRORS as exc:
            raise InputError(
                f"{self.label}: onnxruntime could not run the model on these inputs ({first_line(exc)})"
            ) from None


def available_providers() -> list[str]:
    """ORT provider names this onnxruntime build offers."""
    return list(ort.get_available_providers())


def runtime_info(options: RuntimeOptions | None = None) -> dict:
    """onnxruntime version and providers, for reports and baselines."""
    info = {"onnxruntime": ort.__version__, "available_providers": available_providers()}
    if options is not None:
        info.update(options.to_json())
    return info


def provider_key(name: str) -> str:
    """``cpu`` / ``cuda`` / ``tensorrt`` (any case), or ORT's name for one
    (``CUDAExecutionProvider``), as the key :class:`RuntimeOptions` takes.

    Other names come back as given, for :class:`RuntimeOptions` to refuse naming the flag.
    """
    text = name.strip()
    by_ort_name = {ort_name: key for key, ort_name in PROVIDERS.items()}
    return by_ort_name.get(text, text.lower())


def check_provider(options: RuntimeOptions) -> None:
    """Raise :class:`ProviderUnavailable` unless ORT offers the requested provider."""
    wanted = PROVIDERS[options.provider]
    available = available_providers()
    if wanted not in available:
        hint = "; install onnxruntime-gpu with a matching CUDA/cuDNN" if options.provider != "cpu" else ""
        raise ProviderUnavailable(
            f"--provider {options.provider}: {wanted} is not available in this onnxruntime "
            f"{ort.__version__} (available: {', '.join(p for p in available if p != 'AzureExecutionProvider')}){hint}"
        )


def create_session(model: ModelLike, options: RuntimeOptions, *, label: str | None = None) -> Session:
    """An inference session for ``model`` that really runs on ``options.provider``.

    Raises :class:`ProviderUnavailable` when the provider is missing or ORT fell back to
    another one, and :class:`InputError` when ORT cannot load the model.
    """
    check_provider(options)
    wanted = PROVIDERS[options.provider]
    session_options = ort.SessionOptions()
    # ORT's own warnings (e.g. nodes placed on the CPU next to the CUDA EP) go to stderr
    # unformatted; keep them out of the one-line CLI output unless debugging.
    session_options.log_severity_level = 1 if log.isEnabledFor(logging.DEBUG) else 3
    if not options.optimize:
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if options.threads:
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
    spin = "1" if options.spin else "0"
    session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    providers = _provider_list(options)
    label = label or (str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model"))
    quiet = options.provider != "cpu" and not log.isEnabledFor(logging.DEBUG)
    try:
        if quiet:  # a provider library that fails to load is reported below in one line, not by ORT's logger
            ort.set_default_logger_severity(4)
        with _model_source(model) as source:
            ort_session = ort.InferenceSession(source, sess_options=session_options, providers=providers)
    except _ORT_LOAD_ERRORS as exc:
        text = first_line(exc)
        if options.provider != "cpu" and any(word in text for word in ("CUDA", "cuda", "TensorRT", "cudnn", "libcu")):
            raise ProviderUnavailable(f"--provider {options.provider}: {wanted} is not available: {text}") from None
        raise InputError(f"{label}: onnxruntime cannot load the model ({text})") from None
    finally:
        if quiet:
            ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)
    used = ort_session.get_providers()[0]
    if used != wanted:
        raise ProviderUnavailable(
            f"--provider {options.provider}: {wanted} is not available: its library could not be loaded "
            f"(onnxruntime fell back to {used}); check the CUDA/cuDNN libraries onnxruntime-gpu needs"
        )
    log.debug("session %s on %s (providers %s)", label, used, ort_session.get_providers())
    return Session(ort_session, options, used, label)


def _provider_list(options: RuntimeOptions) -> list:
    """ORT's providers argument; the CPU EP stays last for the nodes the GPU EP cannot take."""
    cuda = {
        "device_id": options.device_id,
        "use_tf32": int(options.tf32),
        "enable_cuda_graph": int(options.cuda_graph),
    }
    table = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"],
        "tensorrt": [
            ("TensorrtExecutionProvider", {"device_id": options.device_id}),
            ("CUDAExecutionProvider", cuda),
            "CPUExecutionProvider",
        ],
    }
    return table[options.provider]


@contextlib.contextmanager
def _model_source(model: ModelLike) -> Iterator[str | bytes]:
    """What ``InferenceSession`` takes: a path (external data resolved beside it) or bytes."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        yield str(path)
        return
    if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        yield model.SerializeToString()
        return
    # ORT has read every weight by the end of session creation, so the directory can go.
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True)
        yield str(path)


def input_specs(model: ModelLike) -> list[InputSpec]:
    """The model's real (non-initializer) inputs, read from the graph without loading weights."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_weights=False)
    initializers = {i.name for i in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        )
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"input {value.name!r} has an unsupported element type {tensor.elem_type}") from None
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi`` (None without one)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else None


def device_label(options: RuntimeOptions) -> str:
    """What a latency was measured on: ``"<CPU model> x<cores>"``, or the GPU's name."""
    if options.device == "cpu":
        return f"{cpu_model()} x{os.cpu_count()}"
    return gpu_name() or PROVIDERS[options.provider]


def probe_provider(options: RuntimeOptions) -> None:
    """Create a one-node session on ``options.provider``: raises :class:`ProviderUnavailable`
    when the provider is listed but cannot really load (onnxruntime-gpu without CUDA libraries)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    create_session(model, options, label="provider probe")


def cuda_session_works() -> bool:
    """True when a CUDA EP session can really be created here (for skipping GPU tests)."""
    if PROVIDERS["cuda"] not in available_providers():
        return False
    try:
        probe_provider(RuntimeOptions(provider="cuda"))
    except OptionError:
        return False
    return True
