"""The search methods: built-ins registered explicitly, third-party ones from entry points.

A third-party distribution exposes a :class:`~onnx_lowrank.search.method.SearchMethod` (or a
zero-argument callable returning one) in the ``onnx_lowrank.searches`` entry-point group::

    [project.entry-points."onnx_lowrank.searches"]
    my-search = "my_package.search:METHOD"

A method that fails to load -- a missing dependency, an exception on import, a wrong object --
is listed as unavailable with its error; it never breaks the other methods or the CLI.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging

from onnx_lowrank.errors import OptionError
from onnx_lowrank.search.method import SearchMethod

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_lowrank.searches"

# name -> "module:attribute". The single registry of built-in methods.
BUILTINS: dict[str, str] = {
    "energy": "onnx_lowrank.search.energy_method:METHOD",
    "global": "onnx_lowrank.search.global_rank:METHOD",
    "continuous": "onnx_lowrank.search.continuous:METHOD",
    "calibrated": "onnx_lowrank.search.calibrated:METHOD",
    "acip": "onnx_lowrank.search.acip_method:METHOD",
}

# What to install for a missing optional module.
_EXTRAS = {"torch": "pip install 'onnx-lowrank[torch]'"}


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """A known method: loaded, or unavailable with the reason."""

    name: str
    origin: str  # "built-in" or "plugin (distribution)"
    method: SearchMethod | None = None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.method is not None

    def to_json(self) -> dict:
        out = {"name": self.name, "origin": self.origin, "available": self.available}
        if self.method is not None:
            out["description"] = self.method.description
            out["options"] = {
                name: {"type": spec.type.__name__, "default": spec.default, "help": spec.help}
                for name, spec in self.method.options.items()
            }
        if self.error:
            out["error"] = self.error
        return out


def discover() -> dict[str, MethodEntry]:
    """Every method, built-ins first (in registry order), then plugins by name."""
    entries = {name: _load_builtin(name, target) for name, target in BUILTINS.items()}
    for entry_point in sorted(_entry_points(), key=lambda ep: ep.name):
        origin = f"plugin ({_distribution(entry_point)})"
        if entry_point.name in entries:
            key = f"{entry_point.name}@{_distribution(entry_point)}"
            entries[key] = MethodEntry(key, origin, error=f"the name {entry_point.name!r} is already taken")
            continue
        entries[entry_point.name] = _load_plugin(entry_point, origin)
    return entries


def get_method(name: str, *, flag: str = "--method") -> SearchMethod:
    """The loaded method called ``name``; OptionError when unknown or unavailable."""
    # Built-ins are found without scanning the installed distributions' entry points (that
    # scan costs ~10 ms, more than planning one budget of a small model).
    entries = {name: _load_builtin(name, BUILTINS[name])} if name in BUILTINS else discover()
    entry = entries.get(name)
    if entry is None:
        raise OptionError(f"{flag} {name}: unknown search method (known: {', '.join(entries)})")
    if entry.method is None:
        raise OptionError(f"{flag} {name}: unavailable ({entry.error})")
    return entry.method


def _load_builtin(name: str, target: str) -> MethodEntry:
    module_name, attribute = target.split(":")
    try:
        method = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # a broken built-in must not break the others
        return MethodEntry(name, "built-in", error=f"{type(exc).__name__}: {exc}")
    missing = [module for module in method.requires if importlib.util.find_spec(module) is None]
    if missing:
        hint = _EXTRAS.get(missing[0], f"pip install {missing[0]}")
        return MethodEntry(name, "built-in", error=f"needs {', '.join(missing)} ({hint})")
    return MethodEntry(name, "built-in", method=method)


def _load_plugin(entry_point, origin: str) -> MethodEntry:
    try:
        loaded = entry_point.load()
        method = loaded if isinstance(loaded, SearchMethod) else loaded() if callable(loaded) else loaded
        if not isinstance(method, SearchMethod):
            raise TypeError(f"{entry_point.value} gave a {type(method).__name__}, not a SearchMethod")
        missing = [module for module in method.requires if importlib.util.find_spec(module) is None]
        if missing:
            raise ImportError(f"needs {', '.join(missing)}")
    except Exception as exc:  # a third-party plugin's failure is data, not a crash
        log.debug("search plugin %s failed to load", entry_point.name, exc_info=True)
        return MethodEntry(entry_point.name, origin, error=f"{type(exc).__name__}: {exc}")
    if method.name != entry_point.name:
        method = dataclasses.replace(method, name=entry_point.name)
    return MethodEntry(entry_point.name, origin, method=method)


def _entry_points():
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # broken metadata of some installed distribution
        log.warning("could not read %s entry points: %s", ENTRY_POINT_GROUP, exc)
        return []


def _distribution(entry_point) -> str:
    dist = getattr(entry_point, "dist", None)
    return getattr(dist, "name", None) or entry_point.value.split(":")[0]
