"""Load and save ONNX models: external data, atomic writes, checker, hashes.

Loading never modifies the input file. Saving writes to a temporary file beside the target and
renames it, so a failure never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnx_lowrank.errors import InputError, OutputError

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more: larger models must use external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = 1024  # tensors at least this big go to the external data file


def load_model(path: str | os.PathLike, *, load_weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX model from ``path``, external data included.

    Raises :class:`InputError` with a one-line reason for a missing path, a directory, a file
    that is not ONNX, a truncated file or missing external data.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not a valid ONNX model (no graph or no nodes)")
    if not model.opset_import:
        raise InputError(f"{path}: not a valid ONNX model (no opset_import)")
    if load_weights and uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (FileNotFoundError, OSError, onnx.checker.ValidationError) as exc:
            raise InputError(f"{path}: external data could not be read ({_first_line(exc)})") from None
    return model


def file_uses_external_data(path: str | os.PathLike) -> bool:
    """True if the model file keeps (some of) its weights in external data files."""
    try:
        return uses_external_data(onnx.load(str(path), load_external_data=False))
    except Exception:  # unreadable files are reported by load_model
        return False


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model (subgraphs included) is stored outside the .onnx file."""
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data``: True stores weights in ``<name>.data`` beside the model, False inlines
    them, None (default) uses external data only when the model would exceed protobuf's 2 GB
    limit. Refuses to overwrite ``input_path`` (the model being compressed) and, unless
    ``overwrite``, any existing file.
    """
    path = Path(path)
    check_output_path(path, overwrite=overwrite, input_path=input_path)
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT_BYTES
    directory = path.parent if str(path.parent) else Path(".")
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=directory, prefix=".onnx-lowrank-") as tmp:
        tmp_model = Path(tmp) / path.name
        if external_data:
            model = _copy(model)
            onnx.external_data_helper.convert_model_to_external_data(
                model,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_DATA_THRESHOLD_BYTES,
            )
        onnx.save_model(model, str(tmp_model))
        if external_data:
            os.replace(Path(tmp) / data_name, directory / data_name)
        os.replace(tmp_model, path)
    log.info("wrote %s", path)
    return path


def check_output_path(
    path: Path, *, overwrite: bool, input_path: str | os.PathLike | None = None
) -> None:
    """Raise :class:`OutputError` if ``path`` cannot or must not be written."""
    if input_path is not None and _same_file(path, Path(input_path)):
        raise OutputError(f"{path}: output would overwrite the input model; choose another path")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: directory {parent} does not exist")


def check_model(model: onnx.ModelProto) -> None:
    """Run onnx's full checker (with strict shape inference); raise ValueError on failure."""
    if model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
        # The in-memory checker cannot take >2 GB protos; check the graph without weights.
        model = strip_weights(model)
    onnx.checker.check_model(model, full_check=True)


def strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose tensor payloads are emptied (for structural checks only)."""
    stripped = _copy(model)
    for tensor in onnx.external_data_helper._get_all_tensors(stripped):
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    return stripped


def model_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the model file's bytes (the identity a plan or cache is keyed by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
