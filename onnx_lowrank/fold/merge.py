"""The arithmetic of folding one channel group: neurons in, merged neurons out. Pure numpy.

A group's C output neurons are the producer's canonical weight rows ``W`` (C, n) (stored
scale), its bias ``b`` (C,) if any, Gemm's ``alpha``/``beta``, and optionally the
BatchNormalization right after it. The *effective* neuron is what the channel computes before
its activation::

    without BN:  e_i(x) = alpha * W_i . x + beta * b_i
    with BN:     e_i(x) = s_i * (alpha * W_i . x + beta * b_i - mean_i) + bn_bias_i,
                 s_i = gamma_i / sqrt(var_i + eps)

and the clustering feature of neuron i is the row ``[effective weight | effective bias]``.

Folding a cluster K into one channel:

- without BN, the new row is the centroid ``mean_K(W_i)`` (times the repair factor), the new
  bias ``mean_K(b_i)``;
- with BN, the producer computes the effective centroid ``z = mean_K(e_i(x))`` (its row is
  ``mean_K(s_i W_i)``) and the BN channel keeps its role: running mean/var are the merged
  channel's estimated statistics (mean ``mean_K(bn_bias_i)``, variance from
  :func:`onnx_lowrank.fold.repair.merged_std`), ``gamma`` is the std the output should have
  (the members' mean std with repair; the merged std itself without, so BN is then the
  identity on ``z``) and ``beta`` the members' mean ``bn_bias``.

The consumer's input columns of a cluster are summed: exact when the members were identical,
since every op between producer and consumer acts on each channel alone. Pruning keeps one
neuron per output channel and drops the others' columns. Singleton clusters are copied
unchanged, bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnx_lowrank.fold.cluster import Clustering
from onnx_lowrank.fold.repair import merged_std, repair_factor


@dataclasses.dataclass(frozen=True)
class BatchNormParams:
    """Per-channel BatchNormalization parameters (inference mode)."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float

    @property
    def multiplier(self) -> np.ndarray:
        """``s = gamma / sqrt(var + eps)``: what BN multiplies its (centered) input by."""
        return self.scale / np.sqrt(self.var + self.epsilon)

    def output_std(self) -> np.ndarray:
        """Std of each BN output channel on the data its running statistics describe."""
        return np.abs(self.scale) * np.sqrt(np.maximum(self.var, 0.0) / (self.var + self.epsilon))


@dataclasses.dataclass(frozen=True)
class Neurons:
    """A group's output neurons as arrays (float64; canonical rows at the stored scale)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    alpha: float = 1.0
    beta: float = 1.0
    bn: BatchNormParams | None = None

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def effective(self) -> tuple[np.ndarray, np.ndarray]:
        """The effective rows (C, n) and biases (C,) (see the module docstring)."""
        weight = self.alpha * self.weight
        bias = self.beta * self.bias if self.bias is not None else np.zeros(self.width)
        if self.bn is not None:
            s = self.bn.multiplier
            weight = s[:, None] * weight
            bias = s * (bias - self.bn.mean) + self.bn.bias
        return weight, bias

    def features(self) -> np.ndarray:
        """Clustering features (C, n + 1): effective row and bias."""
        weight, bias = self.effective()
        return np.hstack([weight, bias[:, None]])

    def output_stds(self) -> np.ndarray:
        """Each neuron's output std: from BN statistics, else its row norm (unit isotropic input)."""
        if self.bn is not None:
            return self.bn.output_std()
        return np.linalg.norm(self.alpha * self.weight, axis=1)


@dataclasses.dataclass(frozen=True)
class MergedNeurons:
    """The folded group: apply ``rows`` to the producer, ``columns`` to every consumer.

    Attributes:
        rows: (k, C); the producer's new canonical weight is ``rows @ W``.
        bias: (k,) new stored bias, None when the producer has none.
        bn: new BatchNorm parameters (k,), None without BN.
        columns: (C, k); a consumer's new input columns are ``old_columns @ columns`` per block.
        repair: (k,) the variance-repair factor applied to each channel (1.0: none).
    """

    rows: np.ndarray
    bias: np.ndarray | None
    bn: BatchNormParams | None
    columns: np.ndarray
    repair: np.ndarray

    @property
    def k(self) -> int:
        return int(self.rows.shape[0])


def merge_neurons(neurons: Neurons, clustering: Clustering, *, repair: bool) -> MergedNeurons:
    """Fold (or prune) ``neurons`` according to ``clustering``; see the module docstring."""
    width, k = neurons.width, clustering.k
    if clustering.width != width:
        raise ValueError(f"clustering is for {clustering.width} neurons, the group has {width}")
    rows = np.zeros((k, width))
    columns = np.zeros((width, k))
    factors = np.ones(k)
    bias = np.zeros(k) if neurons.bias is not None else None
    bn = neurons.bn
    new_bn = {f: np.zeros(k) for f in ("scale", "bias", "mean", "var")} if bn is not None else None
    eff_weight, eff_bias = neurons.effective()
    stds = neurons.output_stds()
    for j, members in enumerate(clustering.members()):
        if members.size == 1:
            i = int(members[0])
            rows[j, i] = 1.0
            columns[i, j] = 1.0
            if bias is not None:
                bias[j] = neurons.bias[i]
            if bn is not None:
                for field in new_bn:
                    new_bn[field][j] = getattr(bn, field)[i]
            continue
        columns[members, j] = 1.0
        if repair:
            factors[j] = repair_factor(eff_weight[members], stds[members])
        if bn is None:
            rows[j, members] = factors[j] / members.size
            if bias is not None:
                bias[j] = float(np.mean(neurons.bias[members]))
            continue
        rows[j, members] = bn.multiplier[members] / members.size
        centroid_bias = float(np.mean(eff_bias[members]))
        out_mean = float(np.mean(bn.bias[members]))
        if bias is not None and neurons.beta != 0.0:
            bias[j] = centroid_bias / neurons.beta
            new_bn["mean"][j] = out_mean
        else:
            if bias is not None:
                bias[j] = 0.0
            new_bn["mean"][j] = out_mean - centroid_bias
        sigma = merged_std(eff_weight[members], stds[members])
        new_bn["var"][j] = max(sigma**2 - bn.epsilon, 0.0)
        new_bn["scale"][j] = factors[j] * np.sqrt(new_bn["var"][j] + bn.epsilon)
        new_bn["bias"][j] = out_mean
    merged_bn = BatchNormParams(epsilon=bn.epsilon, **new_bn) if bn is not None else None
    return MergedNeurons(rows=rows, bias=bias, bn=merged_bn, columns=columns, repair=factors)


def merge_columns(matrix: np.ndarray, columns: np.ndarray, block: int) -> np.ndarray:
    """Apply a (C, k) column map to a consumer's canonical matrix (out, C * block).

    Channel c owns the ``block`` consecutive columns ``[c * block, (c + 1) * block)`` (a
    flattened spatial map, or a conv kernel's taps).
    """
    out = matrix.shape[0]
    width, k = columns.shape
    if matrix.shape[1] != width * block:
        raise ValueError(f"consumer has {matrix.shape[1]} columns, expected {width} x {block}")
    blocks = matrix.reshape(out, width, block)
    return np.einsum("ocb,ck->okb", blocks, columns).reshape(out, k * block)
