"""Reading and writing the small JSON files the tool exchanges (plans, reports, baselines).

Writes are atomic (temporary file beside the target, then rename) so a crash never leaves a
half-written file; reads turn a missing or malformed file into one :class:`InputError` line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnx_lowrank.errors import InputError, OptionError


def read_json(path: str | os.PathLike, *, what: str, missing_hint: str = "") -> Any:
    """Parse the JSON file at ``path``; ``what`` names it in errors ("plan", "report", ...)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file{missing_hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename; return the path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"{path}: directory {parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (numpy scalars and tuples allowed), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=json_default) + "\n")


def json_default(value):
    """``json.dumps`` fallback for numpy scalars, tuples and sets."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
