"""RankPlan: the contract between rank search and the rewrite passes.

A plan says, per layer, whether to factorize it, with which method and rank(s), or to keep it
and why. It is a small versioned JSON file that a user can write by hand, keep in a repository
and re-apply to a re-exported model (layers are matched by node name).

Example::

    {"format": "onnx-lowrank-plan", "version": 1, "method": "energy",
     "budget": {"kind": "params", "fraction": 0.5},
     "layers": {"fc1": {"action": "factorize", "method": "svd", "rank": 16},
                "fc2": {"action": "keep", "reason": "above_break_even"}}}
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from onnx_lowrank.errors import InputError
from onnx_lowrank.jsonfile import read_json, write_json

PLAN_FORMAT = "onnx-lowrank-plan"
PLAN_VERSION = 1
ACTIONS = ("factorize", "keep")


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What to do with one layer.

    ``rank`` is the SVD rank; ``ranks`` carries the rank tuple of multi-rank methods (Tucker:
    [r_out, r_in]; TT on a Conv: [r1, r2]; TT on a Linear: [1, r1, ..., 1]). ``options`` holds
    method settings (e.g. TT's ``out_dims`` / ``in_dims``). ``predicted`` holds the search's
    estimates (params, flops, rel_error).
    """

    action: str
    method: str = "svd"
    rank: int | None = None
    ranks: tuple[int, ...] | None = None
    reason: str | None = None
    predicted: dict[str, float] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.action == "keep":
            out: dict[str, Any] = {"action": "keep"}
            if self.reason:
                out["reason"] = self.reason
        else:
            out = {"action": "factorize", "method": self.method}
            if self.rank is not None:
                out["rank"] = self.rank
            if self.ranks is not None:
                out["ranks"] = list(self.ranks)
            if self.options:
                out["options"] = self.options
        if self.predicted:
            out["predicted"] = self.predicted
        return out

    @classmethod
    def from_json(cls, name: str, data: Any) -> LayerDecision:
        if isinstance(data, int) and not isinstance(data, bool):
            data = {"action": "factorize", "rank": data}  # shorthand: "fc1": 16
        if data == "keep":
            data = {"action": "keep"}
        if not isinstance(data, dict):
            raise InputError(f"plan layer {name!r}: expected an object, a rank or \"keep\"")
        action = data.get("action", "factorize")
        if action not in ACTIONS:
            raise InputError(f"plan layer {name!r}: action must be one of {ACTIONS}, got {action!r}")
        rank = data.get("rank")
        ranks = data.get("ranks")
        if action == "factorize":
            if rank is None and ranks is None:
                raise InputError(f"plan layer {name!r}: a factorized layer needs \"rank\" or \"ranks\"")
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
                raise InputError(f"plan layer {name!r}: rank must be a positive integer, got {rank!r}")
            if ranks is not None and (
                not isinstance(ranks, list) or not all(isinstance(r, int) and r >= 1 for r in ranks)
            ):
                raise InputError(f"plan layer {name!r}: ranks must be a list of positive integers")
        return cls(
            action=action,
            method=str(data.get("method", "svd")),
            rank=rank,
            ranks=tuple(ranks) if ranks is not None else None,
            reason=data.get("reason"),
            predicted=dict(data.get("predicted", {})),
            options=dict(data.get("options", {})),
        )


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """Per-layer decisions plus where they came from (method, budget, options, model hash)."""

    layers: dict[str, LayerDecision]
    method: str = "manual"
    budget: dict[str, Any] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    model_sha256: str | None = None

    def factorized(self) -> dict[str, LayerDecision]:
        """The decisions that change the model."""
        return {k: v for k, v in self.layers.items() if v.action == "factorize"}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "method": self.method,
            "budget": self.budget,
            "options": self.options,
            "seed": self.seed,
            "model_sha256": self.model_sha256,
            "layers": {name: d.to_json() for name, d in self.layers.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> RankPlan:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise InputError("plan: expected a JSON object with a \"layers\" object")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise InputError(f"plan: unknown format {data.get('format')!r}")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise InputError(f"plan: version {version} is not supported (this tool reads version {PLAN_VERSION})")
        layers = {name: LayerDecision.from_json(name, d) for name, d in data["layers"].items()}
        return cls(
            layers=layers,
            method=str(data.get("method", "manual")),
            budget=data.get("budget"),
            options=dict(data.get("options") or {}),
            seed=int(data.get("seed", 0)),
            model_sha256=data.get("model_sha256"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as indented JSON (atomically)."""
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankPlan:
        """Read a plan file; malformed files raise :class:`InputError`."""
        return cls.from_json(read_json(path, what="plan"))
