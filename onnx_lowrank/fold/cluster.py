"""Which output neurons merge: k-means on neuron feature rows, or the top-L1 rows (pruning baseline).

Pure numpy, no ONNX. A neuron is one row of a feature matrix ``F`` (C, d): its weight row, bias
and folded BatchNorm (see :mod:`onnx_lowrank.fold.merge`). A :class:`Clustering` maps each of
the C neurons to one of k output channels (or drops it, for pruning).

k-means uses scikit-learn (k-means++ init, seeded, a fixed ``n_init``) on the *distinct* rows
weighted by their multiplicity, so exact duplicates are one point and always share a cluster.
The error curve used to allocate widths across groups comes from Ward's agglomerative
clustering (scipy), which yields the clustering error at every k in one pass.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnx_lowrank.errors import LowRankError

log = logging.getLogger(__name__)

KMEANS_N_INIT = 4  # restarts of k-means; fixed so that a seed fully determines the result
# Large layers: k-means and Ward run on the top principal components of the neurons (distances
# between C points live in at most C - 1 dimensions, so below ~256 neurons nothing is lost), and
# k-means restarts once instead of KMEANS_N_INIT times. Both depend only on the problem's size,
# so the result is still fixed by the seed.
MAX_DIMS = 256
LARGE_PROBLEM = 2e8  # points x clusters x dims above which k-means runs a single restart


class MissingDependencyError(LowRankError):
    """An optional dependency needed for the requested method is not installed."""


@dataclasses.dataclass(frozen=True)
class Clustering:
    """Assignment of C input neurons to k output channels.

    ``labels[i]`` is the output channel of neuron i, or -1 when it is dropped (pruning).
    Output channels are numbered in the order of their first member, so the folded layer keeps
    the original channel order.
    """

    labels: np.ndarray
    k: int
    method: str

    @property
    def width(self) -> int:
        """C, the number of neurons before folding."""
        return int(self.labels.shape[0])

    def members(self) -> list[np.ndarray]:
        """For each output channel, the indices of the neurons it replaces (ascending)."""
        order = np.argsort(self.labels, kind="stable")
        sorted_labels = self.labels[order]
        starts = np.searchsorted(sorted_labels, np.arange(self.k))
        ends = np.searchsorted(sorted_labels, np.arange(self.k), side="right")
        return [order[s:e] for s, e in zip(starts, ends)]


def identity(width: int) -> Clustering:
    """Every neuron is its own channel (nothing changes)."""
    return Clustering(np.arange(width, dtype=np.int64), width, "identity")


def kmeans(features: np.ndarray, k: int, *, seed: int, n_init: int = KMEANS_N_INIT) -> Clustering:
    """Cluster the rows of ``features`` (C, d) into at most ``k`` clusters with k-means.

    Exact duplicate rows are collapsed first and weighted by their count, so they always land
    in one cluster; when there are at most ``k`` distinct rows, each distinct row is a cluster
    (fewer than ``k`` channels are kept, losing nothing). Deterministic for a given ``seed``:
    k-means runs single-threaded so that results do not depend on the machine's core count.
    """
    features = np.asarray(features, dtype=np.float64)
    width = features.shape[0]
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}], got {k}")
    distinct, inverse, counts = _distinct_rows(features)
    if distinct.shape[0] <= k:
        return _compact(inverse, "kmeans")
    KMeans, threadpool_limits = _sklearn()
    with threadpool_limits(limits=1):  # BLAS and OpenMP: same sums whatever the core count
        points = principal_components(distinct, counts)
        if points.shape[0] * k * points.shape[1] > LARGE_PROBLEM:
            n_init = 1
        model = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed)
        model.fit(points, sample_weight=counts.astype(np.float64))
    labels = np.asarray(model.labels_, dtype=np.int64)[inverse]
    return _compact(labels, "kmeans")


def magnitude(rows: np.ndarray, k: int) -> Clustering:
    """Keep the ``k`` rows with the largest L1 norm (ties: the lower index), drop the rest.

    The data-free structured pruning baseline (Li et al. 2017): no merging, kept channels stay
    in their original order.
    """
    rows = np.asarray(rows, dtype=np.float64)
    width = rows.shape[0]
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}], got {k}")
    kept = np.sort(_by_l1_descending(rows)[:k])
    labels = np.full(width, -1, dtype=np.int64)
    labels[kept] = np.arange(k)
    return Clustering(labels, k, "magnitude")


def relative_error(features: np.ndarray, clustering: Clustering) -> float:
    """Squared distance of each neuron to its channel's representative, over the total energy.

    A merged neuron is represented by its cluster's mean, a dropped one by zero. 0 means the
    folded layer reproduces every neuron exactly; the ratio is unitless.
    """
    features = np.asarray(features, dtype=np.float64)
    total = float(np.sum(features**2))
    if total == 0.0:
        return 0.0
    error = float(np.sum(features[clustering.labels < 0] ** 2))
    for members in clustering.members():
        block = features[members]
        error += float(np.sum((block - block.mean(axis=0)) ** 2))
    return error / total


def merge_error_curve(features: np.ndarray) -> np.ndarray:
    """Relative clustering error at every width: ``curve[k]`` for k = 1..C (``curve[0]`` = 1).

    From Ward's agglomerative clustering: each merge adds ``height**2 / 2`` to the
    within-cluster sum of squares, so one pass gives the error of every k. Non-increasing in k,
    ``curve[C] = 0``. A proxy for what k-means reaches at each k (k-means is then run at the
    chosen k).
    """
    features = np.asarray(features, dtype=np.float64)
    width = features.shape[0]
    curve = np.zeros(width + 1)
    curve[0] = 1.0
    total = float(np.sum(features**2))
    if width < 2 or total == 0.0:
        return curve
    linkage = _scipy_linkage()
    _, threadpool_limits = _sklearn()
    with threadpool_limits(limits=1):
        heights = linkage(principal_components(features), method="ward")[:, 2]
    added = np.cumsum(heights**2 / 2.0)  # SSE after m merges, m = 1..C-1
    # after m merges there are C - m clusters
    curve[width - np.arange(1, width)] = added / total
    return np.minimum(curve, 1.0)


def magnitude_error_curve(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Relative error of keeping the top-L1 ``k`` rows: energy of the dropped neurons' features.

    ``curve[k]`` for k = 1..C (``curve[0]`` = 1); the ranking uses ``rows`` (the stored weight
    rows), the error ``features`` (the effective neurons).
    """
    features = np.asarray(features, dtype=np.float64)
    width = features.shape[0]
    curve = np.zeros(width + 1)
    curve[0] = 1.0
    total = float(np.sum(features**2))
    if total == 0.0:
        return curve
    energy = np.sum(features**2, axis=1)[_by_l1_descending(np.asarray(rows, dtype=np.float64))]
    # keeping k drops ranks k..C-1
    dropped = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    curve[1:] = dropped[1:] / total
    return curve


def principal_components(points: np.ndarray, weights: np.ndarray | None = None, dims: int = MAX_DIMS) -> np.ndarray:
    """``points`` (n, d) projected on their top ``dims`` principal axes.

    Returned unchanged when d <= dims or n <= dims + 1 (then nothing would be lost). Distances
    between points are preserved up to the variance outside those axes. ``weights`` are point
    multiplicities for the mean. Uses the eigendecomposition of the smaller of the Gram and
    covariance matrices (much faster than an SVD of the points).
    """
    n, d = points.shape
    if d <= dims or n <= dims + 1:
        return points
    centered = points - np.average(points, axis=0, weights=weights)
    if n <= d:
        values, vectors = np.linalg.eigh(centered @ centered.T)
        top = np.argsort(values)[::-1][:dims]
        return vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))
    values, vectors = np.linalg.eigh(centered.T @ centered)
    top = np.argsort(values)[::-1][:dims]
    return centered @ vectors[:, top]


def _by_l1_descending(rows: np.ndarray) -> np.ndarray:
    l1 = np.abs(rows).sum(axis=1)
    return np.lexsort((np.arange(rows.shape[0]), -l1))


def _distinct_rows(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    distinct, inverse, counts = np.unique(features, axis=0, return_inverse=True, return_counts=True)
    return distinct, np.asarray(inverse).reshape(-1), counts


def _compact(labels: np.ndarray, method: str) -> Clustering:
    """Renumber non-negative labels 0..k-1 in the order of each cluster's first member."""
    _, first = np.unique(labels, return_index=True)
    in_order = labels[np.sort(first)]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lookup[in_order] = np.arange(in_order.size)
    return Clustering(lookup[labels], int(in_order.size), method)


def _sklearn():
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        raise MissingDependencyError(
            f"folding with k-means needs scikit-learn ({exc}); install it with: pip install 'onnx-lowrank[fold]' "
            "(or use --magnitude-prune, which needs nothing extra)"
        ) from None
    return KMeans, threadpool_limits


def _scipy_linkage():
    try:
        from scipy.cluster.hierarchy import linkage
    except ImportError as exc:
        raise MissingDependencyError(
            f"allocating fold widths needs scipy ({exc}); install it with: pip install 'onnx-lowrank[fold]'"
        ) from None
    return linkage
