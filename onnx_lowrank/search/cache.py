"""On-disk cache of what rank searches measure once and reuse: spectra and small tables.

Singular values are keyed by the model's sha256, the layer name and a hash of the weight's
bytes (plus, for whitened spectra, the calibration data hash and the damping), so a second
search of the same model -- another budget, another method -- skips the SVDs. Only singular
values and small JSON tables (measured sensitivities, latencies) are stored, never factors or
covariances.

Location: ``--cache-dir``, else ``$ONNX_LOWRANK_CACHE``, else ``~/.cache/onnx-lowrank``.
Entries are written atomically (temporary file + rename); an unreadable entry is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onnx_lowrank.errors import OptionError

log = logging.getLogger(__name__)

CACHE_ENV = "ONNX_LOWRANK_CACHE"
CACHE_LAYOUT_VERSION = 1  # bump when an entry's meaning changes; old entries are then ignored


def default_cache_dir() -> Path:
    """``$ONNX_LOWRANK_CACHE`` or ``~/.cache/onnx-lowrank``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "onnx-lowrank"


def array_sha256(array: np.ndarray) -> str:
    """Hash of an array's dtype, shape and bytes (the identity of a weight)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def key_sha256(parts: dict[str, Any]) -> str:
    """A stable hash of a JSON-able key (sorted keys)."""
    text = json.dumps({"v": CACHE_LAYOUT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class CacheStats:
    """What a cache did this run (hits, misses, writes); tests and the CLI read it."""

    hits: int = 0
    misses: int = 0
    writes: int = 0


class Cache:
    """A directory of cached arrays (``.npy``) and JSON tables; ``None`` directory = no cache.

    Namespaces (``spectra``, ``sensitivity``, ``latency``) are sub-directories; entries of one
    model live under its hash prefix so they can be deleted together.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.stats = CacheStats()
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OptionError(f"--cache-dir {self.directory}: cannot create it ({exc.strerror})") from None

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def array(self, namespace: str, group: str, key: dict[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key``, or ``compute()`` stored under it."""
        return self._cached(
            self._path(namespace, group, key, ".npy"),
            compute,
            read=lambda path: np.load(path, allow_pickle=False),
            write=lambda handle, value: np.save(handle, np.asarray(value), allow_pickle=False),
        )

    def table(self, namespace: str, group: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """The cached JSON value for ``key``, or ``compute()`` stored under it."""
        return self._cached(
            self._path(namespace, group, key, ".json"),
            compute,
            read=lambda path: json.loads(path.read_text()),
            write=lambda handle, value: handle.write(json.dumps(value, sort_keys=True).encode()),
        )

    def _cached(self, path: Path | None, compute: Callable[[], Any], *, read: Callable, write: Callable) -> Any:
        """``read(path)`` on a hit; else ``compute()``, written with ``write(handle, value)``."""
        if path is not None and path.is_file():
            try:
                value = read(path)
                self.stats.hits += 1
                return value
            except (OSError, ValueError) as exc:
                log.warning("cache entry %s unreadable (%s); recomputing", path, exc)
        self.stats.misses += 1
        value = compute()
        if path is not None:
            self._write(path, lambda handle: write(handle, value))
        return value

    def _path(self, namespace: str, group: str, key: dict[str, Any], suffix: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / namespace / group[:16] / f"{key_sha256(key)[:40]}{suffix}"

    def _write(self, path: Path, writer: Callable) -> None:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
            os.replace(tmp, path)
            self.stats.writes += 1
        except OSError as exc:  # a read-only or full cache must not fail the search
            log.warning("could not write cache entry %s (%s)", path, exc)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def open_cache(directory: str | os.PathLike | None = None, *, enabled: bool = True) -> Cache:
    """The cache at ``directory`` (default location when None), or a disabled one."""
    if not enabled:
        return Cache(None)
    return Cache(directory if directory is not None else default_cache_dir())
