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


def uniform_widths(groups: list[FoldGroup], keep: float) -> dict[str, int]:
    """Every group keeps ``ceil(keep * width)`` channels (at least 1).

    The ceiling means a group never keeps less than the requested fraction: 0.7 of 256 is 180
    (179.2 rounded up), 0.5 of 10 is 5.
    """
    # the small tolerance keeps 0.7 * 10 = 7.000000000000001 at 7
    return {group.name: max(1, math.ceil(keep * group.width - 1e-9)) for group in groups}


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

    def saving(self, group: FoldGroup, widths: dict[str, int]) -> int:
        """Weight values saved by removing one more channel from ``group``."""
        saved = self._columns(group.name, widths)
        for consumer in group.consumers:
            saved += self._rows(consumer.layer, widths) * consumer.block
        return saved

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
) -> dict[str, int]:
    """Widths keeping at most ``fraction`` of the touched layers' weights, by least error per value.

    Greedy: repeatedly take one channel from the group whose next merge adds the least
    relative clustering error (``curves[name][k]``, see :mod:`onnx_lowrank.fold.cluster`) per
    weight value it saves; ties go to the earlier group. Raises :class:`BudgetError` when
    even one channel per group is above the budget.
    """
    model = ParamModel.build(groups, layers)
    widths = {group.name: group.width for group in groups}
    total = model.params(widths)
    target = fraction * total
    while total > target:
        best: tuple[float, FoldGroup, int] | None = None
        for group in groups:
            k = widths[group.name]
            if k <= 1:
                continue
            saved = model.saving(group, widths)
            cost = max(float(curves[group.name][k - 1] - curves[group.name][k]), 0.0)
            ratio = cost / saved
            if best is None or ratio < best[0]:
                best = (ratio, group, saved)
        if best is None:
            floor = model.params(dict.fromkeys(widths, 1))
            raise BudgetError(
                f"--keep-params {fraction:g}: folding every group to one channel still keeps "
                f"{floor / total:.1%} of the foldable layers' weights"
            )
        _, group, _ = best
        widths[group.name] -= 1
        total = model.params(widths)
    return widths
