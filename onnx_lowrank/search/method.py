"""The one small interface every rank-search method implements, and what it is given.

A method is a :class:`SearchMethod`: a name, declared options, and one function
``search(context, budget) -> {layer name: LayerDecision}`` deciding every candidate layer. The
:class:`SearchContext` carries what is computed once and shared by every method and every
budget of a sweep: the candidate layers with their singular values, the ranks the guard allows,
cost tables, the calibration session and a memo for per-method analyses.

Third-party methods are the same dataclass, exposed through the ``onnx_lowrank.searches``
entry-point group (see :mod:`onnx_lowrank.search.registry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from onnx_lowrank.decompose.svd import Spectrum
from onnx_lowrank.errors import OptionError
from onnx_lowrank.layers import Layer
from onnx_lowrank.search.budget import Budget, layer_cost
from onnx_lowrank.search.cache import Cache
from onnx_lowrank.search.plan import LayerDecision

# progress(description, total) -> context manager yielding advance(); the CLI passes its bars.
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


@contextlib.contextmanager
def null_progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress factory that shows nothing."""
    del description, total
    yield lambda *_: None


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One method option: its type (int, float, bool or str), default and a help line."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A layer a search may factorize, with what the searches share about it.

    ``ranks`` are the ranks the guard allows, ascending: below break-even, multiples of the
    rank multiple, and (with a provider) measured faster than the dense layer. Empty when no
    rank qualifies; ``blocked`` then says why.
    """

    layer: Layer
    weight_sha256: str
    spectrum: Spectrum
    ranks: np.ndarray
    blocked: str | None = None

    @property
    def name(self) -> str:
        return self.layer.name


@dataclasses.dataclass(frozen=True)
class SearchContext:
    """Everything a method may read; built once per model and shared across budgets.

    ``memo`` holds per-method analyses (a global ranking, measured sensitivities) so that a
    sweep over budgets pays for them once; methods key it by their own name.
    """

    model: onnx.ModelProto
    layers: tuple[Layer, ...]
    candidates: tuple[Candidate, ...]
    cache: Cache
    seed: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_sha256: str | None = None
    latency: Any = None  # guard.LatencyTable when a provider was given
    calibration: Any = None  # calibrated.Calibration when calibration data was given
    progress: ProgressFactory = null_progress
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # provenance for plans
    memo: dict = dataclasses.field(default_factory=dict)

    def with_options(self, options: Mapping[str, Any]) -> SearchContext:
        """The same context (same memo) with another method's resolved options."""
        return dataclasses.replace(self, options=dict(options))

    def dense_cost(self, candidate: Candidate, kind: str) -> float:
        """Cost of the candidate kept dense, in ``kind`` units (params, FLOPs, ms)."""
        return self.cost(candidate, None, kind)

    def cost(self, candidate: Candidate, rank: int | None, kind: str) -> float:
        """Cost of the candidate at ``rank`` (None = dense)."""
        if kind == "latency-ms":
            if self.latency is None:
                raise OptionError("a latency budget needs measured latency tables: give --provider")
            return self.latency.ms(candidate.layer, rank)
        return layer_cost(candidate.layer, rank, kind)

    def fixed_cost(self, kind: str) -> float:
        """Dense cost of the supported layers that are not candidates (below --min-params)."""
        if kind == "latency-ms":
            return 0.0
        names = {c.name for c in self.candidates}
        return sum(layer_cost(layer, None, kind) for layer in self.layers if layer.supported and layer.name not in names)

    def cost_table(self, candidate: Candidate, kind: str) -> tuple[float, np.ndarray]:
        """(dense cost, cost at each allowed rank), memoized per candidate and kind."""
        key = ("cost_table", candidate.name, kind)
        if key not in self.memo:
            dense = self.dense_cost(candidate, kind)
            costs = np.array([self.cost(candidate, int(r), kind) for r in candidate.ranks], dtype=np.float64)
            self.memo[key] = (dense, costs)
        return self.memo[key]


SearchFunction = Callable[[SearchContext, Budget], dict[str, LayerDecision]]


@dataclasses.dataclass(frozen=True)
class SearchMethod:
    """A rank-search method: ``search(context, budget)`` decides every candidate layer.

    ``needs_calibration``: the method refuses to run without calibration data.
    ``requires``: importable modules it needs (a missing one makes it "unavailable").
    """

    name: str
    search: SearchFunction
    description: str
    options: Mapping[str, OptionSpec] = dataclasses.field(default_factory=dict)
    needs_calibration: bool = False
    requires: tuple[str, ...] = ()

    def resolve_options(self, given: Mapping[str, Any] | None, *, flag: str = "--option") -> dict[str, Any]:
        """Defaults overlaid with ``given`` (already typed, or strings to parse); errors name ``flag``."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise OptionError(f"{flag}: method {self.name!r} has no option {unknown[0]!r} (options: {known})")
        resolved = {}
        for name, spec in self.options.items():
            value = given.get(name, spec.default)
            resolved[name] = _coerce(value, spec, f"{flag} {name}")
        return resolved


def _coerce(value: Any, spec: OptionSpec, label: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and spec.type is not str:
        text = value.strip()
        try:
            if spec.type is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1", "yes")
            else:
                value = spec.type(text)
        except ValueError:
            raise OptionError(f"{label}: expected {spec.type.__name__}, got {value!r}") from None
    elif spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.type is not bool and isinstance(value, bool) or not isinstance(value, spec.type):
        raise OptionError(f"{label}: expected {spec.type.__name__}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"{label}: expected one of {', '.join(map(str, spec.choices))}, got {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise OptionError(f"{label}: must be >= {spec.minimum}, got {value!r}")
    return value
