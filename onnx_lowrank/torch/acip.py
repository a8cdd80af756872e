"""ACIP-style learned ranking: one global order of every singular value, from one learning run.

Every candidate layer of the ORIGINAL model is reparametrized by its SVD, W = U diag(m * S) V^T,
with U, S, V fixed and a learnable mask m over the singular values (initialized at 1, kept in
[0, 1] by projection after each step). Adam minimizes, on unlabeled inputs,

    ||y - y_orig||^2 / ||y_orig||^2  +  lambda(t) * sum_layers (m_l + n_l) * sum(mask_l) / P

(the relative output error of the whole model, plus lambda times the fraction P of the
candidate layers' parameters the factorized model would keep if the masks were 0/1), with
lambda growing geometrically over the run. A mask that falls below ``off_threshold`` is
switched off for good (set to 0 and frozen). The order in which singular values are switched
off (ties and survivors: by final mask value, then by relative singular value) is ONE global
ranking, stored as JSON; :meth:`AcipRanking.plan` materializes a plan for any ``keep-params``
fraction from it without learning again: walking the ranking, each removal lowers its layer's
rank by one until the kept parameters fit; a layer whose rank stays at or above break-even
stays dense.

The weights are substituted inside the exported graph (the torch interpreter evaluates every
other op), so this works on any model the interpreter runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from onnx_lowrank.decompose.svd import full_svd
from onnx_lowrank.errors import BudgetError, InputError, NothingToDo, OptionError
from onnx_lowrank.jsonfile import read_json, write_json
from onnx_lowrank.layers import Layer, find_layers, weight_matrix
from onnx_lowrank.search.analysis import candidate_layers
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.search.energy import make_plan
from onnx_lowrank.search.plan import LayerDecision, RankPlan
from onnx_lowrank.torch.interpreter import (
    TORCH_DTYPES,
    OnnxModule,
    check_supported,
    train_nothing,
    verify_against_onnxruntime,
)
from onnx_lowrank.torch.training import deterministic, require, take, to_torch

log = logging.getLogger(__name__)

RANKING_FORMAT = "onnx-lowrank-acip-ranking"
RANKING_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AcipOptions:
    """How the ranking is learned.

    Attributes:
        steps: optimizer steps (one batch each).
        lr: Adam learning rate on the masks (mask units per step, roughly).
        batch_size: samples per step.
        penalty_start, penalty_end: lambda at the first and last step (dimensionless: it
            weighs a kept-parameter fraction against a relative squared output error);
            geometric in between.
        off_threshold: a mask below this is switched off for good.
        min_params: layers with fewer weight values are not ranked (kept dense).
        seed: seeds the batches and torch.
        threads: torch intra-op threads.
        verify_rtol: the interpreter must match onnxruntime within this max-relative error.
        verify_samples: how many samples that check uses.
    """

    steps: int = 400
    lr: float = 0.02
    batch_size: int = 64
    penalty_start: float = 1e-3
    penalty_end: float = 3.0
    off_threshold: float = 1e-3
    min_params: int = 4096
    seed: int = 0
    threads: int = 1
    verify_rtol: float = 1e-4
    verify_samples: int = 64

    def __post_init__(self):
        checks = (
            (self.steps >= 1, f"--acip-steps must be a positive integer, got {self.steps}"),
            (self.lr > 0, f"ACIP lr must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"--batch must be a positive integer, got {self.batch_size}"),
            (0 < self.penalty_start <= self.penalty_end, "ACIP penalties need 0 < penalty_start <= penalty_end"),
            (0 <= self.off_threshold < 1, f"ACIP off_threshold must be in [0, 1), got {self.off_threshold}"),
            (self.min_params >= 0, f"--min-params must be >= 0, got {self.min_params}"),
            (self.threads >= 1, f"--threads must be a positive integer, got {self.threads}"),
        )
        require(checks)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AcipRanking:
    """The global removal order of singular values, and what is needed to turn it into plans.

    ``removal`` lists (layer name, singular value index) in the order they were switched off
    (first = least useful). ``max_ranks`` holds each ranked layer's full rank, to check that a
    plan is made for the same model.
    """

    removal: tuple[tuple[str, int], ...]
    max_ranks: dict[str, int]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_sha256: str | None = None
    history: tuple[dict[str, float], ...] = ()  # a few (step, loss, kept fraction) samples

    def ranks_for(self, layers: list[Layer], keep_params: float) -> dict[str, int]:
        """Each ranked layer's rank when the supported layers keep at most ``keep_params``.

        The budget counts every supported layer (unranked ones at their dense size), like the
        energy search. Raises :class:`BudgetError` when rank 1 everywhere does not fit.
        """
        budget = fraction_budget("params", keep_params, flag="--keep-params")
        by_name = {layer.name: layer for layer in layers}
        for name, max_rank in self.max_ranks.items():
            layer = by_name.get(name)
            if layer is None or not layer.supported or layer.max_rank != max_rank:
                raise InputError(
                    f"the ACIP ranking does not match this model (layer {name!r} "
                    f"{'missing' if layer is None else f'has full rank {layer.max_rank}, ranking says {max_rank}'})"
                )
        ranked = [by_name[name] for name in self.max_ranks]
        fixed = sum(layer.params for layer in layers if layer.supported and layer.name not in self.max_ranks)
        dense = fixed + sum(layer.params for layer in ranked)
        limit = budget.limit(dense)
        ranks = dict(self.max_ranks)
        current = fixed + sum(_cost(layer, ranks[layer.name]) for layer in ranked)
        for name, _ in self.removal:
            if current <= limit * (1 + 1e-12):
                break
            if ranks[name] <= 1:
                continue
            layer = by_name[name]
            current += _cost(layer, ranks[name] - 1) - _cost(layer, ranks[name])
            ranks[name] -= 1
        if current > limit * (1 + 1e-12):
            raise BudgetError(
                f"budget params <= {keep_params:.1%} cannot be met: rank 1 in every ranked layer still keeps "
                f"{current / dense:.1%} of the supported layers' parameters"
            )
        return ranks

    def plan(self, layers: list[Layer], keep_params: float) -> RankPlan:
        """A :class:`RankPlan` keeping at most ``keep_params`` of the supported layers' params."""
        ranks = self.ranks_for(layers, keep_params)
        decisions = {}
        for layer in layers:
            if layer.name not in ranks:
                continue
            rank = ranks[layer.name]
            if rank >= layer.break_even_rank:
                decisions[layer.name] = LayerDecision("keep", reason="above_break_even")
                continue
            predicted: dict[str, float] = {"params": layer.factor_params(rank)}
            if layer.flops is not None:
                predicted["flops"] = layer.factor_flops(rank)
            decisions[layer.name] = LayerDecision("factorize", method="svd", rank=rank, predicted=predicted)
        budget = fraction_budget("params", keep_params, flag="--keep-params")
        options = {"min_params": int(self.options.get("min_params", 0)), "acip": self.options}
        return make_plan(
            layers, decisions, min_params=options["min_params"], method="acip", budget=budget,
            options=options, model_sha256=self.model_sha256,
        )

    # ---- JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RANKING_FORMAT,
            "version": RANKING_VERSION,
            "model_sha256": self.model_sha256,
            "options": self.options,
            "max_ranks": self.max_ranks,
            "removal": [[name, index] for name, index in self.removal],
            "history": list(self.history),
        }

    @classmethod
    def from_json(cls, data: Any) -> AcipRanking:
        if not isinstance(data, dict) or data.get("format") != RANKING_FORMAT:
            raise InputError(f"ACIP ranking: expected a JSON object with \"format\": \"{RANKING_FORMAT}\"")
        if data.get("version") != RANKING_VERSION:
            raise InputError(f"ACIP ranking: version {data.get('version')} is not supported")
        try:
            max_ranks = {str(k): int(v) for k, v in data["max_ranks"].items()}
            removal = tuple((str(name), int(index)) for name, index in data["removal"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"ACIP ranking: malformed ({exc})") from None
        unknown = {name for name, _ in removal} - set(max_ranks)
        if unknown:
            raise InputError(f"ACIP ranking: removal names unknown layers {', '.join(sorted(unknown))}")
        return cls(
            removal=removal,
            max_ranks=max_ranks,
            options=dict(data.get("options") or {}),
            model_sha256=data.get("model_sha256"),
            history=tuple(data.get("history") or ()),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the ranking as JSON (atomically)."""
        write_json(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcipRanking:
        return cls.from_json(read_json(path, what="ACIP ranking"))


def _cost(layer: Layer, rank: int) -> int:
    """Parameters of ``layer`` at ``rank``: factorized below break-even, dense otherwise."""
    return layer.factor_params(rank) if rank < layer.break_even_rank else layer.params


class SvdWeight(nn.Module):
    """A weight recomputed as U diag(mask * S) V^T in the layer's stored layout."""

    def __init__(self, matrix: np.ndarray, layer: Layer, dtype: torch.dtype):
        super().__init__()
        u, s, vt = full_svd(matrix)
        self.register_buffer("u", torch.from_numpy(u).float())
        self.register_buffer("s", torch.from_numpy(s).float())
        self.register_buffer("vt", torch.from_numpy(vt).float())
        self.mask = nn.Parameter(torch.ones(len(s)))
        self._layout = _STORED[layer.form]
        self._shape = tuple(layer.weight_shape)
        self._dtype = dtype

    def forward(self) -> torch.Tensor:
        matrix = (self.u * (self.mask * self.s)) @ self.vt
        return self._layout(matrix, self._shape).to(self._dtype)


_STORED: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {
    "in_out": lambda m, shape: m.T,
    "out_in": lambda m, shape: m,
    "left": lambda m, shape: m,
    "conv": lambda m, shape: m.reshape(shape),
}


def acip_ranking(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    steps: int | None = None,
    seed: int | None = None,
    layers: list[Layer] | None = None,
    options: AcipOptions | None = None,
    model_sha256: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> AcipRanking:
    """Learn the global removal order of ``model``'s singular values on ``feeds``.

    ``steps`` and ``seed`` override those of ``options``. ``layers`` defaults to
    :func:`find_layers`; the ranked ones are the supported main-graph layers with at least
    ``options.min_params`` weights. Deterministic for a given seed.
    """
    from onnx_lowrank.validate.reference import run_reference

    options = options or AcipOptions()
    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    options = dataclasses.replace(options, **overrides)
    check_supported(model)
    layers = layers if layers is not None else find_layers(model)
    candidates = [la for la in candidate_layers(layers, min_params=options.min_params) if not la.scope]
    if not candidates:
        raise NothingToDo(f"no supported layer with at least {options.min_params} weights to rank")
    started = time.perf_counter()
    teacher = run_reference(model, feeds, batch_size=256)
    targets = to_torch({name: a for name, a in teacher.items() if a.dtype.kind == "f"})
    x = to_torch(feeds)
    n = next(iter(x.values())).shape[0]
    with deterministic(options.seed, options.threads):
        substitutes = {
            layer.weight: SvdWeight(weight_matrix(model, layer), layer, TORCH_DTYPES[getattr(onnx.TensorProto, layer.dtype)])
            for layer in candidates
        }
        module = OnnxModule(model, train_nothing, substitutes=substitutes)
        verify_against_onnxruntime(
            model, take(feeds, np.arange(min(n, options.verify_samples))), options.verify_rtol, module=module
        )
        masks = [substitutes[layer.weight].mask for layer in candidates]
        costs = [float(layer.out_features + layer.in_features) for layer in candidates]
        dense = float(sum(layer.params for layer in candidates))
        scales = {name: float(t.pow(2).mean()) or 1.0 for name, t in targets.items()}
        removed_at = [np.full(len(m), -1, dtype=np.int64) for m in masks]
        optimizer = torch.optim.Adam(masks, lr=options.lr)
        generator = torch.Generator().manual_seed(options.seed)
        history = []
        order = torch.randperm(n, generator=generator)
        cursor = 0
        for step in range(options.steps):
            if cursor + options.batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            index = order[cursor : cursor + options.batch_size]
            cursor += options.batch_size
            outputs = module.run({name: value[index] for name, value in x.items()})
            error = sum((outputs[k].float() - t[index]).pow(2).mean() / scales[k] for k, t in targets.items())
            error = error / len(targets)
            kept = sum(c * m.sum() for c, m in zip(costs, masks)) / dense
            weight = options.penalty_start * (options.penalty_end / options.penalty_start) ** (
                step / max(options.steps - 1, 1)
            )
            loss = error + weight * kept
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for mask, when in zip(masks, removed_at):
                    mask.clamp_(0.0, 1.0)
                    newly = (when < 0) & (mask.detach().numpy() <= options.off_threshold)
                    when[newly] = step
                    mask.mul_(torch.from_numpy((when < 0).astype(np.float32)))  # switched off for good
            if step % max(options.steps // 20, 1) == 0 or step == options.steps - 1:
                history.append({"step": step, "error": round(error.item(), 6), "kept": round(kept.item(), 6)})
            if on_step is not None:
                on_step(step)
        final = [m.detach().numpy().astype(np.float64) for m in masks]
    removal = _order(candidates, substitutes, removed_at, final, options.steps)
    log.info("ACIP: %d steps in %.1f s; %d of %d singular values switched off",
             options.steps, time.perf_counter() - started, sum(int((w >= 0).sum()) for w in removed_at),
             sum(len(w) for w in removed_at))
    return AcipRanking(
        removal=removal,
        max_ranks={layer.name: layer.max_rank for layer in candidates},
        options=options.to_json(),
        model_sha256=model_sha256,
        history=tuple(history),
    )


def _order(candidates, substitutes, removed_at, final, steps) -> tuple[tuple[str, int], ...]:
    """Removal order: switch-off step, then final mask value, then relative singular value."""
    keys = []
    for position, layer in enumerate(candidates):
        s = substitutes[layer.weight].s.numpy().astype(np.float64)
        relative = s / s[0] if s[0] > 0 else s
        for index in range(len(s)):
            when = removed_at[position][index]
            keys.append(
                (int(when) if when >= 0 else steps, float(final[position][index]), float(relative[index]),
                 position, -index, layer.name, index)
            )
    keys.sort()
    return tuple((key[5], key[6]) for key in keys)


def acip_search(
    model: onnx.ModelProto,
    layers: list[Layer],
    budget_fraction: float,
    feeds: Mapping[str, np.ndarray],
    options: AcipOptions | None = None,
    *,
    model_sha256: str | None = None,
) -> RankPlan:
    """Learn an ACIP ranking on ``feeds`` and materialize the plan keeping ``budget_fraction``
    of the supported layers' parameters (``search --method acip``)."""
    if not 0 < budget_fraction <= 1:
        raise OptionError(f"--keep-params must be in (0, 1], got {budget_fraction}")
    ranking = acip_ranking(model, feeds, layers=layers, options=options, model_sha256=model_sha256)
    return ranking.plan(layers, budget_fraction)


def ranking_kept_fraction(ranking: AcipRanking, layers: list[Layer], keep_params: float) -> float:
    """The fraction of the supported layers' params a ranking's plan really keeps (<= budget)."""
    ranks = ranking.ranks_for(layers, keep_params)
    supported = [la for la in layers if la.supported]
    dense = sum(la.params for la in supported)
    kept = sum(_cost(la, ranks[la.name]) if la.name in ranks else la.params for la in supported)
    return kept / dense if dense else math.nan
