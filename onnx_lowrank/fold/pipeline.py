"""The fold job as a library call: model + budget -> checked, narrower model + report.

    model -> find groups -> neuron features -> widths (uniform / budget / given)
          -> cluster (k-means) or rank (L1) -> merge (+ repair) -> rewrite -> check

    method "regress" (needs calibration data): capture what each group's consumers read ->
          rank by activation x consumer-column norm -> fold the dropped channels into the
          kept ones by ridge regression (see :mod:`onnx_lowrank.fold.regress`)

The widths a run chose are a small JSON dict (``report.widths()``), e.g.
``{"groups": {"/fc1/Gemm": {"keep": 180, "of": 256}}}``, that can be kept in a plan and
re-applied with ``fold_model(model, widths=...)``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnx_lowrank.compress import count_params, verify
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.fold import cluster, regress
from onnx_lowrank.fold.allocate import DEFAULT_WIDTH_MULTIPLE, ParamModel, budget_widths, uniform_widths
from onnx_lowrank.fold.apply import apply_folds, read_neurons
from onnx_lowrank.fold.groups import FoldGroup, find_groups
from onnx_lowrank.fold.merge import MergedNeurons, Neurons, merge_neurons
from onnx_lowrank.layers import find_layers, weight_matrix
from onnx_lowrank.validate.data import Dataset, check_mask_input

log = logging.getLogger(__name__)

METHODS = ("kmeans", "magnitude", "regress")
DATA_METHODS = ("regress",)  # methods that need calibration data


@dataclasses.dataclass(frozen=True)
class GroupFold:
    """What happened to one foldable group.

    ``action`` is "fold" (k-means merge), "prune" (top-L1 channels kept) or "keep" (full
    width). ``rel_error`` is the clustering error relative to the neurons' energy (see
    :func:`onnx_lowrank.fold.cluster.relative_error`); ``repair`` the mean variance-repair factor
    over merged channels (1.0 = none). ``params_*`` count the weight values of the producer
    and its consumers (a layer shared with a neighbouring group is counted in both).
    """

    name: str
    op_type: str
    width: int
    kept: int
    action: str
    rel_error: float
    repair: float
    consumers: tuple[str, ...]
    params_before: int
    params_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op_type,
            "width": self.width,
            "kept": self.kept,
            "action": self.action,
            "rel_error": round(self.rel_error, 6),
            "repair": round(self.repair, 6),
            "consumers": list(self.consumers),
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """Everything a fold run decided and measured (JSON via :meth:`to_json`).

    ``layer_params_*``: weight values of every layer a foldable group scales (what
    ``keep_params`` is a fraction of); ``model_params_*``: every float value of the model.
    """

    method: str
    repair: bool
    seed: int
    budget: dict[str, Any]
    groups: tuple[GroupFold, ...]
    skipped: tuple[dict[str, Any], ...]
    not_applied: dict[str, str]
    layer_params_before: int
    layer_params_after: int
    model_params_before: int
    model_params_after: int
    seconds: float

    @property
    def modified(self) -> bool:
        return any(group.kept < group.width for group in self.groups)

    def widths(self) -> dict[str, Any]:
        """The chosen widths, re-appliable with ``fold_model(model, widths=...)``."""
        return {"groups": {group.name: {"keep": group.kept, "of": group.width} for group in self.groups}}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "repair": self.repair,
            "seed": self.seed,
            "budget": self.budget,
            "totals": {
                "groups_folded": sum(1 for g in self.groups if g.kept < g.width),
                "groups_foldable": len(self.groups),
                "groups_skipped": len(self.skipped),
                "channels_before": sum(g.width for g in self.groups),
                "channels_after": sum(g.kept for g in self.groups),
                "layer_params_before": self.layer_params_before,
                "layer_params_after": self.layer_params_after,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
            },
            "groups": [group.to_json() for group in self.groups],
            "skipped": list(self.skipped),
            "not_applied": self.not_applied,
            "widths": self.widths(),
            "seconds": round(self.seconds, 3),
        }


def fold_model(
    model: onnx.ModelProto,
    *,
    keep: float | None = None,
    keep_params: float | None = None,
    widths: Mapping[str, Any] | None = None,
    method: str = "kmeans",
    repair: bool = True,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    calibration: Dataset | None = None,
    ridge: float = regress.DEFAULT_RIDGE,
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE,
    mask_input: str | None = None,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Merge similar output channels of every foldable group; return the new model and a report.

    Exactly one of:

    - ``keep``: each group keeps ``ceil(keep * width)`` channels (fraction in (0, 1]), rounded
      up to a multiple of ``width_multiple`` (default 8: kernels work in channel blocks, see
      :func:`~onnx_lowrank.fold.allocate.round_width`; 1 turns the rounding off);
    - ``keep_params``: the layers the groups scale keep at most this fraction of their weight
      values, allocated greedily by clustering error per value saved, in steps of
      ``width_multiple`` channels;
    - ``widths``: the widths of a previous run (``report.widths()``, or its inner dict; a
      value may be ``{"keep": k, "of": width}`` or just ``k``); groups it does not name keep
      their width, names the model lacks are listed in ``report.not_applied``.

    ``method`` "kmeans" merges clusters into centroids (needs scikit-learn; exact duplicates
    always merge exactly); "magnitude" keeps the channels with the largest L1 weight norm (the
    structured-pruning baseline); "regress" needs ``calibration`` (model inputs) and keeps the
    channels that contribute most to the consumers' output on it, folding the others into them
    by ridge regression of their activations (``ridge``: relative ridge weight; ``mask_input``:
    a model input holding a [batch, positions] padding mask whose 0 positions are left out; see
    :mod:`onnx_lowrank.fold.regress`). ``repair`` (k-means only) rescales merged channels to undo the variance
    that averaging collapses (data-free; see :mod:`onnx_lowrank.fold.repair`). The input model
    is not modified; the result passes onnx's full checker and has the same graph inputs and
    outputs. Deterministic for a given ``seed``.
    """
    started = time.perf_counter()
    budget = _budget(keep, keep_params, widths, method)
    if isinstance(width_multiple, bool) or not isinstance(width_multiple, int) or width_multiple < 1:
        raise OptionError(f"--width-multiple must be a positive integer, got {width_multiple!r}")
    if method in DATA_METHODS and calibration is None:
        raise OptionError(f"fold method {method!r} needs calibration data (--calib FILE.npz)")
    if mask_input is not None:
        if method not in DATA_METHODS:
            raise OptionError(f"--mask-input goes with --method {' or '.join(DATA_METHODS)} (it masks calibration data)")
        check_mask_input(model, calibration.feeds, mask_input)
    layers = find_layers(model, input_shapes)
    all_groups = find_groups(model, input_shapes, layers=layers)
    groups = [group for group in all_groups if group.foldable]
    by_layer = {layer.name: layer for layer in layers}
    neurons = {group.name: read_neurons(model, group, by_layer[group.name]) for group in groups}
    features = {name: n.features() for name, n in neurons.items()}
    acts: dict[str, np.ndarray] = {}
    column_norms: dict[str, np.ndarray] = {}
    if method in DATA_METHODS:
        acts = regress.consumer_inputs(model, groups, calibration, seed=seed, mask_input=mask_input)
        column_norms = {group.name: _column_norms(model, group, by_layer) for group in groups}
    not_applied: dict[str, str] = {}

    if keep is not None:
        targets = uniform_widths(groups, keep, width_multiple)
    elif keep_params is not None:
        curves = {
            name: regress.regression_error_curve(acts[name], column_norms[name], ridge=ridge) if method in DATA_METHODS
            else _error_curve(method, neurons[name], features[name])
            for name in neurons
        }
        targets = budget_widths(groups, layers, curves, keep_params, width_multiple)
    else:
        targets, not_applied = _given_widths(widths, groups, all_groups)

    merged: dict[str, MergedNeurons] = {}
    results: list[GroupFold] = []
    params = ParamModel.build(groups, layers)
    for group in groups:
        k = targets.get(group.name, group.width)
        if method in DATA_METHODS:
            clustering = (cluster.identity(group.width) if k >= group.width
                          else regress.select(acts[group.name], column_norms[group.name], k))
        else:
            clustering = _cluster(method, neurons[group.name], features[group.name], k, seed)
        if method in DATA_METHODS:  # the regression residual on the calibration data
            error = regress.relative_error(acts[group.name], column_norms[group.name], clustering, ridge=ridge)
        else:  # the weight-space clustering error
            error = cluster.relative_error(features[group.name], clustering)
        factors = np.ones(1)
        if clustering.k < group.width and method in DATA_METHODS:
            merged[group.name] = regress.regress_neurons(neurons[group.name], clustering, acts[group.name], ridge=ridge)
        elif clustering.k < group.width:
            change = merge_neurons(neurons[group.name], clustering, repair=repair and method == "kmeans")
            merged[group.name] = change
            merged_channels = [m.size > 1 for m in clustering.members()]
            if any(merged_channels):
                factors = change.repair[np.array(merged_channels)]
        results.append(_group_result(group, clustering.k, method, error, float(np.mean(factors)), params))

    rewritten = apply_folds(model, groups, layers, merged)
    if rewritten.modified:
        verify(model, rewritten.model)
    final = {result.name: result.kept for result in results}
    report = FoldReport(
        method=method,
        repair=repair and method == "kmeans",
        seed=seed,
        budget=budget,
        groups=tuple(results),
        skipped=tuple(
            {"name": g.name, "op": g.op_type, "width": g.width, "reason": g.skip.code, "detail": g.skip.message}
            for g in all_groups
            if not g.foldable
        ),
        not_applied=not_applied,
        layer_params_before=params.params({g.name: g.width for g in groups}),
        layer_params_after=params.params(final),
        model_params_before=count_params(model),
        model_params_after=count_params(rewritten.model),
        seconds=time.perf_counter() - started,
    )
    return rewritten.model, report


def _budget(keep, keep_params, widths, method) -> dict[str, Any]:
    given = [name for name, value in (("keep", keep), ("keep_params", keep_params), ("widths", widths)) if value is not None]
    if len(given) != 1:
        what = "none was given" if not given else f"got {', '.join(given)}"
        raise OptionError(f"give exactly one of --keep, --keep-params or --widths ({what})")
    if method not in METHODS:
        raise OptionError(f"unknown fold method {method!r} (known: {', '.join(METHODS)})")
    if keep is not None:
        _check_fraction(keep, "--keep")
        return {"keep": keep}
    if keep_params is not None:
        _check_fraction(keep_params, "--keep-params")
        return {"keep_params": keep_params}
    return {"widths": "given"}


def _check_fraction(value: float, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OptionError(f"{flag}: the fraction kept must be in (0, 1], got {value!r}")


def _given_widths(
    widths: Mapping[str, Any], groups: list[FoldGroup], all_groups: list[FoldGroup]
) -> tuple[dict[str, int], dict[str, str]]:
    """Validate a widths dict against the model's groups."""
    if not isinstance(widths, Mapping):
        raise InputError("widths: expected a JSON object mapping group names to widths")
    entries = widths.get("groups", widths) if "groups" in widths else widths
    if not isinstance(entries, Mapping):
        raise InputError('widths: "groups" must be an object mapping group names to widths')
    foldable = {group.name: group for group in groups}
    skipped = {group.name: group for group in all_groups if not group.foldable}
    targets: dict[str, int] = {}
    not_applied: dict[str, str] = {}
    for name, entry in entries.items():
        if isinstance(entry, Mapping):
            k, of = entry.get("keep"), entry.get("of")
        else:
            k, of = entry, None
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"widths: group {name!r}: keep must be a positive integer, got {k!r}")
        if name not in foldable:
            not_applied[name] = skipped[name].skip.code if name in skipped else "group_not_found"
            continue
        group = foldable[name]
        if of is not None and of != group.width:
            raise InputError(f"widths: group {name!r} was planned for width {of}, the model has {group.width}")
        if k > group.width:
            raise InputError(f"widths: group {name!r}: keep {k} exceeds its width {group.width}")
        targets[name] = k
    return targets, not_applied


def _error_curve(method: str, neurons: Neurons, features: np.ndarray) -> np.ndarray:
    if method == "magnitude":
        return cluster.magnitude_error_curve(features, neurons.weight)
    return cluster.merge_error_curve(features)


def _column_norms(model: onnx.ModelProto, group: FoldGroup, by_layer) -> np.ndarray:
    """Norm of each channel's input columns over all the group's consumers (every block)."""
    squares = np.zeros(group.width)
    for consumer in group.consumers:
        matrix = weight_matrix(model, by_layer[consumer.layer]).astype(np.float64)
        blocks = matrix.reshape(matrix.shape[0], group.width, consumer.block)
        squares += np.sum(blocks**2, axis=(0, 2))
    return np.sqrt(squares)


def _cluster(method: str, neurons: Neurons, features: np.ndarray, k: int, seed: int) -> cluster.Clustering:
    if k >= neurons.width:
        return cluster.identity(neurons.width)
    if method == "magnitude":
        return cluster.magnitude(neurons.weight, k)
    return cluster.kmeans(features, k, seed=seed)


def _group_result(group: FoldGroup, kept: int, method: str, error: float, repair: float, params: ParamModel):
    names = [group.name] + [c.layer for c in group.consumers]
    before = sum(params.layer_params(n, {}) for n in names)
    after = sum(params.layer_params(n, {group.name: kept}) for n in names)
    action = "keep" if kept == group.width else {"magnitude": "prune", "regress": "regress"}.get(method, "fold")
    return GroupFold(
        name=group.name,
        op_type=group.op_type,
        width=group.width,
        kept=kept,
        action=action,
        rel_error=error,
        repair=repair,
        consumers=tuple(c.layer for c in group.consumers),
        params_before=before,
        params_after=after,
    )
