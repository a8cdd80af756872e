"""Inputs for validation and benchmarking: ``.npz`` files matched to model inputs, or random.

Arrays are batch first. An ``.npz`` array is matched to a model input by, in order: an explicit
``--input-map INPUT=KEY``, the same name, the only unused array, or the only unused array whose
rank, fixed dimensions and kind of element type fit the input. Arrays are cast to the input's
element type within a kind (float64 -> float32, int32 -> int64); float data for an integer
input, or integers for a float input, are refused. Every automatic choice is recorded in
:attr:`Dataset.notes` so the CLI can say which key it picked. Errors name the flag that gave
the file (``--data`` for validate/bench, ``--calib`` for calibration).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.validate.runtime import InputSpec, first_line

log = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "label")  # npz keys used as labels when no --labels/--labels-key is given


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Model inputs (batch first, all with ``n`` samples) and optional integer class labels.

    Also what calibrated searches capture activations from: :attr:`sha256` identifies the
    inputs, and calibrated plans record it.
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    notes: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self):
        _common_batch(self.feeds, self.source or "inputs")

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 0

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(feeds, labels) slices of at most ``batch_size`` samples, in order."""
        if batch_size < 1:
            raise OptionError(f"--batch-size must be a positive integer, got {batch_size}")
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            labels = self.labels[start:stop] if self.labels is not None else None
            yield {k: v[start:stop] for k, v in self.feeds.items()}, labels

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n // batch_size)

    def head(self, samples: int) -> Dataset:
        """The first ``samples`` samples (this dataset when it has no more)."""
        if samples >= self.n:
            return self
        labels = self.labels[:samples] if self.labels is not None else None
        feeds = {k: v[:samples] for k, v in self.feeds.items()}
        return Dataset(feeds, labels, self.notes, f"{self.source}[:{samples}]")

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of exactly what is fed: input names, dtypes, shapes and bytes (not the labels).

        Calibrated plans record it (``options.calibration.sha256``) so that re-applying one
        can refuse other data. Computed once; the arrays are not expected to change.
        """
        digest = hashlib.sha256()
        for name in sorted(self.feeds):
            array = np.ascontiguousarray(self.feeds[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def take(self, batch: int) -> dict[str, np.ndarray]:
        """Exactly ``batch`` samples (the first ones, cycled when there are fewer), contiguous."""
        index = np.arange(batch) % max(self.n, 1)
        return {k: np.ascontiguousarray(v[index]) for k, v in self.feeds.items()}

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "samples": self.n,
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.feeds.items()},
            "labels": self.labels is not None,
            "notes": list(self.notes),
        }


def parse_input_map(values: Sequence[str], *, flag: str = "--input-map") -> dict[str, str]:
    """``["input=input_image"]`` -> ``{"input": "input_image"}`` (model input -> npz key)."""
    mapping: dict[str, str] = {}
    for text in values:
        name, sep, key = text.partition("=")
        if not sep or not name.strip() or not key.strip():
            raise OptionError(f"{flag} {text!r}: expected INPUT=NPZ_KEY, e.g. input=input_image")
        if name.strip() in mapping:
            raise OptionError(f"{flag}: input {name.strip()!r} is mapped twice")
        mapping[name.strip()] = key.strip()
    return mapping


def load_npz(path: str | os.PathLike, *, flag: str = "--data") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (or a single ``.npy``) file, by key; no pickles.

    ``flag``: the option that named the file, for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such data file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {path.stem: loaded}
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{flag} {path}: not a readable .npz/.npy file ({first_line(exc)})") from None


def load_dataset(
    path: str | os.PathLike,
    specs: list[InputSpec],
    *,
    input_map: dict[str, str] | None = None,
    labels_path: str | os.PathLike | None = None,
    labels_key: str | None = None,
    want_labels: bool = True,
    flag: str = "--data",
) -> Dataset:
    """Read ``path`` and match its arrays to ``specs`` (see the module docstring).

    Labels come from ``labels_path`` (.npy), from ``labels_key`` in the npz, or from an npz
    key named ``labels`` that is not a model input (noted). One-hot labels are turned into
    class indices. ``want_labels=False`` (timing, calibration) still keeps a ``labels`` key
    from being matched to an input, but drops the labels. ``flag`` names the option that gave
    ``path`` in error messages.
    """
    if labels_path is not None and labels_key is not None:
        raise OptionError("give --labels or --labels-key, not both")
    arrays = load_npz(path, flag=flag)
    label = f"{flag} {path}"
    notes: list[str] = []
    labels = None
    input_names = {s.name for s in specs}
    if labels_key is not None:
        if labels_key not in arrays:
            raise OptionError(f"--labels-key {labels_key!r}: {path} has no such array (keys: {_keys(arrays)})")
        labels = arrays.pop(labels_key)
    elif labels_path is not None:
        labels_arrays = load_npz(labels_path, flag="--labels")
        if len(labels_arrays) != 1:
            raise OptionError(f"--labels {labels_path}: expected one array, found {_keys(labels_arrays)}")
        labels = next(iter(labels_arrays.values()))
    else:
        for key in LABEL_KEYS:
            if key in arrays and key not in input_names and key not in (input_map or {}).values():
                labels = arrays.pop(key)
                if want_labels:
                    notes.append(f"labels: npz key {key!r} (use --labels-key to choose another)")
                break
    if not want_labels:
        labels = None
    feeds = _match(arrays, specs, input_map or {}, notes, label)
    n = _common_batch(feeds, label)
    if n == 0:
        raise InputError(f"{label}: no samples")
    if labels is not None:
        labels = _class_indices(labels)
        if labels.shape[0] != n:
            raise InputError(f"labels have {labels.shape[0]} entries but the inputs have {n} samples")
    return Dataset(feeds, labels, tuple(notes), str(path))


def random_dataset(
    specs: list[InputSpec],
    n: int,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    flag: str = "--random",
) -> Dataset:
    """``n`` seeded random samples shaped by ``specs`` (dynamic dims from ``shapes``, else 1).

    Floats are standard normal; integer inputs are 0/1 (ones for names containing "mask");
    booleans are fair coins. Give real data for token ids or anything range-bound. ``flag``
    names the option that asked for them in error messages.
    """
    if n < 1:
        raise OptionError(f"{flag} must be a positive number of samples, got {n}")
    notes: list[str] = []
    feeds = random_feeds(specs, n, shapes=shapes, seed=seed, notes=notes)
    return Dataset(feeds, None, tuple(notes), f"random(n={n}, seed={seed})")


def random_feeds(
    specs: list[InputSpec],
    batch: int,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    notes: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """One seeded random batch of ``batch`` samples for every input (see :func:`random_dataset`)."""
    unknown = set(shapes or {}) - {s.name for s in specs}
    if unknown:
        raise OptionError(
            f"--input-shape names unknown input(s): {', '.join(sorted(unknown))} (inputs: {', '.join(s.name for s in specs)})"
        )
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = concrete_shape(spec, batch, shapes, notes=notes)
        feeds[spec.name] = _random_array(rng, spec, shape)
    return feeds


def concrete_shape(
    spec: InputSpec,
    batch: int | None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    notes: list[str] | None = None,
) -> tuple[int, ...]:
    """The input's shape with axis 0 set to ``batch`` and other dynamic dims pinned.

    ``shapes`` (from ``--input-shape``) gives full shapes; their axis 0 is replaced by
    ``batch`` when given. A fixed batch dimension that differs from ``batch`` is an error.
    """
    shapes = shapes or {}
    if spec.name in shapes:
        dims = list(shapes[spec.name])
        if len(dims) != spec.rank and spec.rank:
            raise OptionError(f"--input-shape {spec.name}: model input has rank {spec.rank}, got {len(dims)} dims")
    else:
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
                continue
            dims.append(1)
            if axis > 0 and notes is not None:
                notes.append(f"input {spec.name!r}: dynamic dim {d or '?'} (axis {axis}) set to 1; pin it with --input-shape")
    if batch is not None and dims:
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
        if fixed is not None and fixed != batch:
            raise OptionError(f"input {spec.name!r} has a fixed batch dimension {fixed}; use batch size {fixed}")
        dims[0] = batch
    return tuple(int(d) for d in dims)


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        if "mask" in spec.name.lower():
            return np.ones(shape, dtype=spec.dtype)
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    raise InputError(f"input {spec.name!r}: cannot make random {spec.dtype} data; give --data")


def _match(
    arrays: dict[str, np.ndarray], specs: list[InputSpec], input_map: dict[str, str], notes: list[str], label: str
) -> dict[str, np.ndarray]:
    """``label`` ("--data file.npz") starts every error message."""
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}
    chosen: dict[str, str] = {}
    for name, key in input_map.items():
        if name not in by_name:
            raise OptionError(f"--input-map {name}={key}: the model has no input {name!r} (inputs: {', '.join(names)})")
        if key not in arrays:
            raise OptionError(f"--input-map {name}={key}: {label} has no array {key!r} (keys: {_keys(arrays)})")
        chosen[name] = key
    for spec in specs:
        if spec.name not in chosen and spec.name in arrays and spec.name not in chosen.values():
            chosen[spec.name] = spec.name
    for spec in specs:
        if spec.name in chosen:
            continue
        unused = [k for k in arrays if k not in chosen.values()]
        pending = [s for s in specs if s.name not in chosen]
        if len(unused) == 1 and len(pending) == 1:
            chosen[spec.name] = unused[0]
            notes.append(f"input {spec.name!r} <- npz key {unused[0]!r} (the only unused array)")
            continue
        fitting = [k for k in unused if _fits(arrays[k], spec)]
        if len(fitting) == 1:
            chosen[spec.name] = fitting[0]
            notes.append(
                f"input {spec.name!r} <- npz key {fitting[0]!r} (the only array of shape "
                f"{_shape_text(spec.shape)}; use --input-map to choose another)"
            )
            continue
        why = f"several arrays fit ({', '.join(fitting)})" if fitting else f"none of {_keys(arrays)} fits {_shape_text(spec.shape)}"
        raise InputError(f"{label}: no array named {spec.name!r} and {why}; pass --input-map {spec.name}=KEY")
    return {name: _conform(arrays[key], by_name[name], key, notes, label) for name, key in chosen.items()}


def _fits(array: np.ndarray, spec: InputSpec) -> bool:
    if array.ndim != spec.rank or spec.dtype.kind != array.dtype.kind:
        return False
    return all(array.shape[axis] == size for axis, size in spec.static_dims().items())


def _conform(array: np.ndarray, spec: InputSpec, key: str, notes: list[str], label: str) -> np.ndarray:
    """Check rank and fixed dims; cast within a dtype kind (float64 -> float32), noting it."""
    fits = array.ndim == spec.rank and all(array.shape[axis] == size for axis, size in spec.static_dims().items())
    if not fits:
        raise InputError(
            f"{label}: npz key {key!r} of shape {list(array.shape)} does not fit input {spec.name!r}, "
            f"which expects {_shape_text(spec.shape)} (batch first)"
        )
    if array.dtype != spec.dtype:
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise InputError(f"{label}: npz key {key!r} is {array.dtype} but input {spec.name!r} expects {spec.dtype}")
        notes.append(f"input {spec.name!r}: cast {array.dtype} -> {spec.dtype}")
        array = array.astype(spec.dtype)
    return np.ascontiguousarray(array)


def _common_batch(feeds: dict[str, np.ndarray], source: str) -> int:
    """The inputs' common number of samples (0 for none); different numbers are an error."""
    sizes = {name: int(np.shape(a)[0]) for name, a in feeds.items() if np.ndim(a)}
    if len(set(sizes.values())) > 1:
        raise InputError(f"{source}: inputs have different numbers of samples: {sizes}")
    return next(iter(sizes.values()), 0)


def _class_indices(labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2:
        return labels.argmax(axis=1)  # one-hot or scores
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        if labels.ndim == 1 and labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            return labels.astype(np.int64)
        raise InputError(f"labels must be class indices [n] or one-hot [n, classes], got {labels.dtype} {list(labels.shape)}")
    return labels.astype(np.int64)


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (str(d) if d else "?") for d in shape) + "]"


def _keys(arrays: dict) -> str:
    return ", ".join(sorted(arrays)) or "(none)"


def check_mask_input(model, feeds: dict[str, np.ndarray], name: str) -> None:
    """``--mask-input NAME``: a real model input of shape [batch, positions] (nonzero = real
    position) with at least one real position per sample."""
    from onnx_lowrank.validate.runtime import input_specs

    inputs = [spec.name for spec in input_specs(model)]
    if name not in inputs:
        raise OptionError(f"--mask-input {name!r} is not an input of the model (it takes {', '.join(inputs)})")
    mask = np.asarray(feeds[name])
    if mask.ndim != 2:
        raise OptionError(f"--mask-input {name!r} must be [batch, positions], got shape {tuple(mask.shape)}")
    if not np.all(mask.sum(axis=1) > 0):
        raise InputError(f"--mask-input {name!r}: some samples have no unmasked position")
