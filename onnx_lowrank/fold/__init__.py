"""Model folding: data-free merging of similar neurons and channels, with variance repair.

Cluster each foldable layer's output neurons (k-means on their weight rows, with bias and a
following BatchNorm folded in), replace each cluster by its centroid, sum the matching input
columns of the layers that read them, and repair the variance the merge collapses. Exact where
neurons are duplicates. Modules, one job each:

- :mod:`~onnx_lowrank.fold.groups`: find producer -> per-channel ops -> consumer chains, and why
  the others are left alone;
- :mod:`~onnx_lowrank.fold.cluster`: k-means / top-L1 selection and error curves (numpy);
- :mod:`~onnx_lowrank.fold.merge` and :mod:`~onnx_lowrank.fold.repair`: the arithmetic (numpy);
- :mod:`~onnx_lowrank.fold.allocate`: widths per group from a uniform or a model-wide budget;
- :mod:`~onnx_lowrank.fold.apply`: the graph rewrite;
- :mod:`~onnx_lowrank.fold.pipeline`: :func:`fold_model`, the library entry point.
"""

from onnx_lowrank.fold.cluster import MissingDependencyError
from onnx_lowrank.fold.groups import FoldGroup, find_groups, inspect_groups
from onnx_lowrank.fold.pipeline import METHODS, FoldReport, GroupFold, fold_model

__all__ = [
    "METHODS",
    "FoldGroup",
    "FoldReport",
    "GroupFold",
    "MissingDependencyError",
    "find_groups",
    "fold_model",
    "inspect_groups",
]
