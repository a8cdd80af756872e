"""How many channels each foldable group keeps: a uniform fraction, or a model-wide budget.

Widths are counted in channels. The parameters a width costs are the weight values of the
layers it scales: the producer's rows and every consumer's input columns. A layer can be both
the consumer of one group and the producer of the next (a middle Gemm), so the cost is
bilinear in the widths; it is always recomputed from the current widths, never summed from
per-group constants.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnx_lowrank.errors import BudgetError
from onnx_lowrank.fold.groups import FoldGroup
from onnx_lowrank.layers import Layer

DEFAULT_WIDTH_MULTIPLE = 8


def round_width(width: int, k: int, multiple: int) -> int:
    """``k`` channels of a ``width``-channel group rounded up to a multiple of ``multiple``.

    Kernels work in channel blocks: onnxruntime's CPU convs lose their NCHWc path off a multiple
    of 8 (the digits CNN folded to 23/45 channels ran 0.39x of the original, to 24/48 1.34x) and
    GPU tensor cores want multiples of 8, so within a block the extra channels are free. Groups
    no wider than ``multiple`` (and ``multiple`` 1) keep ``k``; the result never exceeds ``width``.
    """
    if multiple <= 1 or width <= multiple:
        return k
    return min(width, math.ceil(k / multiple) * multiple)


def uniform_widths(groups: list[FoldGroup], keep: float, multiple: int = 1) -> dict[str, int]:
    """Every group keeps ``ceil(keep * width)`` channels (at least 1), rounded up to ``multiple``.

    The ceiling means a group never keeps less than the requested fraction: 0.7 of 256 is 180
    (179.2 rounded up; 184 with multiple 8), 0.5 of 10 is 5.
    """
    # the small tolerance keeps 0.7 * 10 = 7.000000000000001 at 7
    return {
        group.name: round_width(group.width, max(1, math.ceil(keep * group.width - 1e-9)), multiple)
        for group in groups
    }


def _narrower(width: int, k: int, multiple: int) -> int:
    """The next allowed width below ``k`` (0 when there is none)."""
    if multiple <= 1 or width <= multiple:
        return k - 1
    return (k - 1) // multiple * multiple


@dataclasses.dataclass(frozen=True)
class ParamModel:
    """The weight values of the layers the foldable groups scale, as a function of their widths."""

    groups: tuple[FoldGroup, ...]
    shapes: dict[str, tuple[int, int]]  # layer -> canonical (out, in)
    produces: dict[str, str]  # layer -> the group whose width is its number of rows
    consumes: dict[str, tuple[str, int]]  # layer -> (group whose channels it reads, columns per channel)

    @classmethod
    def build(cls, groups: list[FoldGroup], layers: list[Layer]) -> ParamModel:
        produces, consumes = {}, {}
        for group in groups:
            produces[group.name] = group.name
            for consumer in group.consumers:
                consumes[consumer.layer] = (group.name, consumer.block)
        shapes = {
            layer.name: (layer.out_features, layer.in_features)
            for layer in layers
            if layer.name in produces or layer.name in consumes
        }
        return cls(tuple(groups), shapes, produces, consumes)

    def params(self, widths: dict[str, int]) -> int:
        """Weight values of every touched layer at ``widths`` (full width where a group is absent)."""
        return sum(self.layer_params(name, widths) for name in self.shapes)

    def layer_params(self, name: str, widths: dict[str, int]) -> int:
        """Weight values of one touched layer at ``widths``."""
        return self._rows(name, widths) * self._columns(name, widths)

    def _rows(self, name: str, widths: dict[str, int]) -> int:
        group = self.produces.get(name)
        return widths.get(group, self.shapes[name][0]) if group else self.shapes[name][0]

    def _columns(self, name: str, widths: dict[str, int]) -> int:
        out, columns = self.shapes[name]
        if name not in self.consumes:
            return columns
        group, block = self.consumes[name]
        width = next(candidate.width for candidate in self.groups if candidate.name == group)
        return columns - (width - widths.get(group, width)) * block


def budget_widths(
    groups: list[FoldGroup],
    layers: list[Layer],
    curves: dict[str, np.ndarray],
    fraction: float,
    multiple: int = 1,
) -> dict[str, int]:
    """Widths keeping at most ``fraction`` of the touched layers' weights, by least error per value.

    Greedy: repeatedly narrow the group whose next step adds the least relative clustering
    error (``curves[name][k]``, see :mod:`onnx_lowrank.fold.cluster`) per weight value it saves;
    ties go to the earlier group. A step goes to the next multiple of ``multiple`` below (see
    :func:`round_width`). Raises :class:`BudgetError` when the narrowest widths are above the
    budget.
    """
    model = ParamModel.build(groups, layers)
    widths = {group.name: group.width for group in groups}
    total = model.params(widths)
    start = total
    target = fraction * total
    while total > target:
        best: tuple[float, FoldGroup, int] | None = None
        for group in groups:
            k = widths[group.name]
            narrower = _narrower(group.width, k, multiple)
            if narrower < 1:
                continue
            saved = total - model.params({**widths, group.name: narrower})
            cost = max(float(curves[group.name][narrower] - curves[group.name][k]), 0.0)
            ratio = cost / saved
            if best is None or ratio < best[0]:
                best = (ratio, group, narrower)
        if best is None:
            raise BudgetError(
                f"--keep-params {fraction:g}: folding every group to its narrowest width (1 channel, or "
                f"{multiple} with the width multiple) still keeps {total / start:.1%} of the foldable layers' weights"
            )
        _, group, narrower = best
        widths[group.name] = narrower
        total = model.params(widths)
    return widths
