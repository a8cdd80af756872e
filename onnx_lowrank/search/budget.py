"""Budgets: how much of the factorizable layers' parameters or FLOPs a plan may keep.

Parsed once at the CLI boundary into a frozen :class:`Budget`; the searches only ever see the
typed value. ``params=0.4`` keeps 40% (a fraction in (0, 1]); ``params=2.5M`` is an absolute
count (suffix k, M or G, or a plain integer above 1).

``latency-ms=1.8`` is always absolute: the candidate layers together, each timed as a one-node
model on the chosen execution provider, take at most 1.8 ms (the rest of the model is not
counted). ``latency-ms=60%`` keeps 60% of their dense latency. Latency budgets need measured
tables (``search --provider``); :func:`layer_cost` cannot price them.
"""

from __future__ import annotations

import dataclasses
import re

from onnx_lowrank.errors import OptionError
from onnx_lowrank.layers import Layer

KINDS = ("params", "flops", "latency-ms")
ABSOLUTE_ONLY_KINDS = ("latency-ms",)  # a plain number is an amount, never a fraction
_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
_BUDGET_RE = re.compile(r"^(?P<kind>[a-z-]+)=(?P<num>\d+(?:\.\d+)?|\.\d+)(?P<suffix>[kKMG%]?)$")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Keep at most ``fraction`` of the candidate layers' cost, or at most ``absolute`` units."""

    kind: str
    fraction: float | None = None
    absolute: float | None = None

    def limit(self, total: float) -> float:
        """The allowed cost given the candidate layers' dense ``total``."""
        return self.fraction * total if self.fraction is not None else float(self.absolute)

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        else:
            out["absolute"] = self.absolute
        return out


def parse_budget(text: str, *, flag: str = "--budget") -> Budget:
    """Parse ``params=0.4``, ``flops=50%`` or ``params=1.5M`` into a :class:`Budget`."""
    match = _BUDGET_RE.match(text.strip())
    if not match or match.group("kind") not in KINDS:
        raise OptionError(
            f"{flag} {text!r}: expected KIND=VALUE with KIND in {', '.join(KINDS)}, "
            "e.g. params=0.4, flops=50%, params=1.5M or latency-ms=2.5"
        )
    kind, number, suffix = match.group("kind"), float(match.group("num")), match.group("suffix")
    if kind in ABSOLUTE_ONLY_KINDS and suffix not in ("", "%"):
        raise OptionError(f"{flag} {text!r}: {kind} takes milliseconds (e.g. {kind}=2.5) or a percentage")
    if kind in ABSOLUTE_ONLY_KINDS and suffix == "":
        if number <= 0:
            raise OptionError(f"{flag} {text!r}: the latency must be positive")
        return Budget(kind, absolute=number)
    if suffix == "%":
        number /= 100
        suffix = ""
        is_fraction = True
    else:
        is_fraction = suffix == "" and number <= 1
    if is_fraction:
        return fraction_budget(kind, number, flag=flag)
    return Budget(kind, absolute=number * _SUFFIX[suffix])


def fraction_budget(kind: str, fraction: float, *, flag: str) -> Budget:
    """A budget keeping ``fraction`` (0, 1] of the candidate layers' ``kind``."""
    if not 0 < fraction <= 1:
        raise OptionError(f"{flag}: the fraction kept must be in (0, 1], got {fraction}")
    return Budget(kind, fraction=fraction)


def layer_cost(layer: Layer, rank: int | None, kind: str) -> float:
    """Cost of ``layer`` kept dense (``rank`` None) or factorized by SVD at ``rank``."""
    if kind == "params":
        return float(layer.params if rank is None else layer.factor_params(rank))
    if kind == "flops":
        if layer.flops is None:
            raise OptionError(
                f"a FLOP budget needs static shapes, and layer {layer.name} has none; "
                "pin dynamic dimensions with --input-shape NAME=1x3x224x224"
            )
        return float(layer.flops if rank is None else layer.factor_flops(rank))
    if kind == "latency-ms":
        raise OptionError("a latency budget needs measured latency tables: give --provider")
    raise OptionError(f"unknown budget kind {kind!r}")
