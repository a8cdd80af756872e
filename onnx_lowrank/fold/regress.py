"""Data-aware folding: keep the most active neurons, fold the others into them by least squares.

Pure numpy apart from :func:`consumer_inputs` (onnxruntime). For a group with C channels, let
``H`` (N, C) be what its consumers read (the producer's outputs after the per-channel ops,
e.g. GELU) on N calibration rows (tokens, or spatial positions of a feature map). Keep the k
channels with the largest ``rms(H_i) * ||consumer columns of i||`` (the size of their
contribution to the consumer's output), and replace each dropped channel j by its ridge
regression on the kept ones::

    H_drop ~= H_keep @ S,   S = (H_keep^T H_keep + lam I)^-1 H_keep^T H_drop

so the consumer's kept column i becomes ``col_i + sum_j S[i, j] col_j``. This is a fold whose
column map holds regression coefficients instead of ones (a plain fold sums the columns of a
cluster with coefficient 1): the producer rows of kept channels are unchanged (no centroid, so
nothing for the non-linearity to distort), and the consumer's output on calibration data is the
closest the kept channels can give (ridge-anchored). Exact where a dropped channel is a linear
combination of kept ones. ``lam = ridge * trace(G) / k`` (relative, as ``compress --refit``).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_lowrank.fold.cluster import Clustering
from onnx_lowrank.fold.groups import FoldGroup
from onnx_lowrank.fold.merge import BatchNormParams, MergedNeurons, Neurons

DEFAULT_RIDGE = 0.1
MAX_ROWS = 1 << 16  # calibration rows kept per group (seeded subsample above)


def importance(acts: np.ndarray, column_norms: np.ndarray) -> np.ndarray:
    """Each channel's contribution size: rms activation times its consumer columns' norm."""
    return np.sqrt(np.mean(np.asarray(acts, np.float64) ** 2, axis=0)) * column_norms


def _ranking(acts: np.ndarray, column_norms: np.ndarray) -> np.ndarray:
    """Channel indices, most important first (ties: lower index)."""
    score = importance(acts, column_norms)
    return np.lexsort((np.arange(score.shape[0]), -score))


def _ridge_fold(gram_kk: np.ndarray, gram_kd: np.ndarray, ridge: float) -> np.ndarray:
    """S (k, dropped) with H_drop ~= H_keep S, from Gram blocks; lambda = ridge * trace / k."""
    k = gram_kk.shape[0]
    lam = max(ridge * float(np.trace(gram_kk)) / k, 1e-12)
    return np.linalg.solve(gram_kk + lam * np.eye(k), gram_kd)


def select(acts: np.ndarray, column_norms: np.ndarray, k: int) -> Clustering:
    """Keep the ``k`` most important channels (ties: lower index), in their original order."""
    width = acts.shape[1]
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}], got {k}")
    kept = np.sort(_ranking(acts, column_norms)[:k])
    labels = np.full(width, -1, dtype=np.int64)
    labels[kept] = np.arange(k)
    return Clustering(labels, k, "regress")


def regression_error_curve(
    acts: np.ndarray, column_norms: np.ndarray, *, ridge: float = DEFAULT_RIDGE, points: int = 12
) -> np.ndarray:
    """``curve[k]``: relative error of keeping the top k and folding the rest in by regression.

    The error of channel j is its regression residual ``||h_j - H_keep s_j||^2`` times its
    consumer columns' squared norm, summed over the dropped channels and divided by the same
    sum of ``||h_j||^2`` over all channels (what the consumer loses, relative). Evaluated from
    one Gram matrix at ``points`` widths and interpolated between them (monotone in k).
    """
    acts = np.asarray(acts, np.float64)
    width = acts.shape[1]
    gram = acts.T @ acts
    order = _ranking(acts, column_norms)
    grid = np.unique(np.linspace(1, width, min(points, width)).round().astype(int))
    errors = [_residual_error(gram, column_norms, order[:k], order[k:], ridge) for k in grid]
    curve = np.empty(width + 1)
    curve[0] = 1.0
    curve[1:] = np.interp(np.arange(1, width + 1), grid, errors)
    return np.minimum.accumulate(curve)


def relative_error(acts: np.ndarray, column_norms: np.ndarray, clustering: Clustering, *,
                   ridge: float = DEFAULT_RIDGE) -> float:
    """What the consumers lose (relative, on the calibration rows) when ``clustering``'s dropped
    channels are folded in by regression: one point of :func:`regression_error_curve`."""
    acts = np.asarray(acts, np.float64)
    kept, dropped = np.flatnonzero(clustering.labels >= 0), np.flatnonzero(clustering.labels < 0)
    return _residual_error(acts.T @ acts, column_norms, kept, dropped, ridge)


def _residual_error(gram: np.ndarray, column_norms: np.ndarray, keep: np.ndarray, drop: np.ndarray,
                    ridge: float) -> float:
    """Sum over dropped j of ||w_j||^2 ||h_j - H_keep s_j||^2, over the sum of ||w_j||^2 ||h_j||^2."""
    weights = np.asarray(column_norms, np.float64) ** 2
    total = float(np.sum(weights * np.diag(gram)))
    if drop.size == 0 or total == 0.0:
        return 0.0
    g_kk, g_kd = gram[np.ix_(keep, keep)], gram[np.ix_(keep, drop)]
    coef = _ridge_fold(g_kk, g_kd, ridge)
    # ||h_j - H s_j||^2 = g_jj - 2 s_j.g_kj + s_j.G_kk s_j
    residual = np.diag(gram)[drop] - 2 * np.sum(coef * g_kd, axis=0) + np.sum(coef * (g_kk @ coef), axis=0)
    return float(np.sum(weights[drop] * np.maximum(residual, 0.0))) / total


def regress_neurons(
    neurons: Neurons, clustering: Clustering, acts: np.ndarray, *, ridge: float = DEFAULT_RIDGE
) -> MergedNeurons:
    """Prune to ``clustering``'s kept channels and fold the dropped ones in by ridge regression."""
    acts = np.asarray(acts, np.float64)
    width, k = neurons.width, clustering.k
    kept = np.flatnonzero(clustering.labels >= 0)
    kept = kept[np.argsort(clustering.labels[kept])]
    dropped = np.flatnonzero(clustering.labels < 0)
    rows = np.zeros((k, width))
    rows[np.arange(k), kept] = 1.0
    columns = np.zeros((width, k))
    columns[kept, np.arange(k)] = 1.0
    if dropped.size:
        h_keep, h_drop = acts[:, kept], acts[:, dropped]
        columns[dropped] = _ridge_fold(h_keep.T @ h_keep, h_keep.T @ h_drop, ridge).T
    bias = neurons.bias[kept].copy() if neurons.bias is not None else None
    bn = None
    if neurons.bn is not None:
        b = neurons.bn
        bn = BatchNormParams(
            scale=b.scale[kept], bias=b.bias[kept], mean=b.mean[kept], var=b.var[kept], epsilon=b.epsilon
        )
    return MergedNeurons(rows=rows, bias=bias, bn=bn, columns=columns, repair=np.ones(k))


def consumer_inputs(model: onnx.ModelProto, groups: list[FoldGroup], data, *, batch_size: int = 32,
                    max_rows: int = MAX_ROWS, seed: int = 0, mask_input: str | None = None) -> dict[str, np.ndarray]:
    """Per group, what its consumers read on ``data``: (rows, C) float64, one row per token or position.

    The tensor is the last one on the group's path (``group.tensors[-1]``); its channel axis is
    the last one when it has C (or C x block) entries there, else axis 1 (NCHW feature maps).
    ``mask_input`` names a model input holding a [batch, positions] padding mask: rows of
    [batch, positions, C] tensors at masked (0) positions are left out. At most ``max_rows``
    rows per group are kept (a seeded subsample), so memory stays bounded.
    """
    from onnx_lowrank.validate.capture import CaptureSession

    names = {group.name: group.tensors[-1] for group in groups}
    wanted = sorted(set(names.values()) | ({mask_input} if mask_input else set()))
    session = CaptureSession(model, wanted, label="fold calibration")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for fetched in session.batches(data, batch_size):
        mask = np.asarray(fetched[mask_input]) != 0 if mask_input else None
        for group in groups:
            tensor = np.asarray(fetched[names[group.name]])
            if mask is not None and tensor.ndim == 3 and tensor.shape[:2] == mask.shape:
                tensor = tensor[mask]  # (real positions, C): padding never enters the regression
            parts[group.name].append(_channel_rows(tensor, group.width))
    rng = np.random.default_rng(seed)
    result = {}
    for name, chunks in parts.items():
        rows = np.concatenate(chunks, axis=0).astype(np.float64)
        if rows.shape[0] > max_rows:
            rows = rows[np.sort(rng.choice(rows.shape[0], max_rows, replace=False))]
        result[name] = rows
    return result


def _channel_rows(x: np.ndarray, width: int) -> np.ndarray:
    if x.ndim >= 2 and x.shape[-1] == width:
        return x.reshape(-1, width)
    if x.ndim >= 2 and x.shape[-1] % width == 0 and x.ndim == 2:  # flattened (N, C * block)
        block = x.shape[-1] // width
        return np.moveaxis(x.reshape(-1, width, block), 1, 2).reshape(-1, width)
    if x.ndim >= 3 and x.shape[1] == width:  # (N, C, *spatial)
        return np.moveaxis(x, 1, -1).reshape(-1, width)
    raise ValueError(f"cannot find a channel axis of size {width} in a tensor of shape {list(x.shape)}")
