"""Tucker-2 decomposition of conv kernels (and Linear weights); pure numpy, no ONNX.

A kernel ``K (Cout, Cin, *spatial)`` is factored over its two channel modes only:
``K = core x_0 U_out x_1 U_in`` with orthonormal ``U_out (Cout, r_out)`` and
``U_in (Cin, r_in)``, so the conv becomes 1x1 conv ``Cin -> r_in``, the original spatial conv
``r_in -> r_out``, and 1x1 conv ``r_out -> Cout`` (Kim et al. 2016, "Compression of deep
convolutional neural networks for fast and low power mobile applications").

The factors come from HOSVD (leading left singular vectors of the mode-0 and mode-1
unfoldings), optionally refined by HOOI iterations. Ranks are explicit objects:
:class:`TuckerRank` or :class:`TuckerEnergy`. Precision and sign rules are those of
:mod:`onnx_lowrank.decompose.tt`: float32 weights up to 16 Mi elements are decomposed in
float64 through Gram eigendecompositions, bigger ones in float32, float64 inputs in float64
with LAPACK SVD; results are float32 unless the input is float64; the largest-|value| entry
of each singular vector is positive, so results are byte-for-byte reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.decompose.tt import _leading_left, _positive_int, _prepare, _singular_values, _use_gram
from onnx_lowrank.errors import OptionError

__all__ = [
    "Tucker2Factors",
    "TuckerEnergy",
    "TuckerRank",
    "tucker2",
    "tucker_ranks_for_energy",
]


@dataclass(frozen=True)
class TuckerRank:
    """Explicit Tucker-2 ranks: ``r_out`` (kept output-channel components), ``r_in`` (input).

    Ranks larger than the kernel can use (``r_out > min(Cout, r_in * S)``,
    ``r_in > min(Cin, r_out * S)``, ``S`` = spatial size) are clipped when decomposing.
    """

    r_out: int
    r_in: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "r_out", _positive_int(self.r_out, "Tucker r_out"))
        object.__setattr__(self, "r_in", _positive_int(self.r_in, "Tucker r_in"))


@dataclass(frozen=True)
class TuckerEnergy:
    """Keep, in each of the Cout and Cin unfoldings, the fewest components whose squared
    singular values sum to at least ``energy`` (a fraction in (0, 1]) of the total."""

    energy: float

    def __post_init__(self) -> None:
        e = self.energy
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating, np.integer)):
            raise OptionError(f"Tucker energy must be a number, got {e!r}")
        e = float(e)
        if not (0.0 < e <= 1.0):
            raise OptionError(f"Tucker energy must be in (0, 1], got {self.energy!r}")
        object.__setattr__(self, "energy", e)


@dataclass(frozen=True, eq=False)
class Tucker2Factors:
    """``K[co, ci, ...] = sum_ab last[co, b] core[b, a, ...] first[a, ci]`` (conv kernels).

    ``first`` ``(r_in, Cin, 1, ..)`` is the 1x1 conv ``Cin -> r_in`` (rows = ``U_in.T``);
    ``core`` ``(r_out, r_in, *spatial)`` is the conv with the original strides/pads/dilations;
    ``last`` ``(Cout, r_out, 1, ..)`` is the 1x1 conv ``r_out -> Cout`` (``U_out``; the bias
    goes here). For a 2-D weight the trailing 1s are absent: ``W = last @ core @ first``.
    """

    first: np.ndarray
    core: np.ndarray
    last: np.ndarray

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.core.shape[2:])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the original kernel, ``(Cout, Cin, *spatial)``."""
        return (self.last.shape[0], self.first.shape[1], *self.spatial)

    @property
    def ranks(self) -> TuckerRank:
        """The ranks actually used (after clipping)."""
        return TuckerRank(r_out=self.core.shape[0], r_in=self.core.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.core.dtype

    @property
    def params(self) -> int:
        """Number of stored values (sum of the three factor sizes)."""
        return int(self.first.size + self.core.size + self.last.size)

    def conv_kernels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(first, core, last)``: the ONNX ``Conv`` weights in application order."""
        return self.first, self.core, self.last

    def reconstruct(self) -> np.ndarray:
        """The full kernel ``(Cout, Cin, *spatial)`` in the factors' dtype."""
        r_out, r_in = self.core.shape[:2]
        s = math.prod(self.spatial)
        u_out = self.last.reshape(-1, r_out)
        u_in_t = self.first.reshape(r_in, -1)
        # (Cout, r_in*S) then move r_in last to contract it with U_in^T.
        partial = (u_out @ self.core.reshape(r_out, -1)).reshape(-1, r_in, s)
        full = partial.transpose(0, 2, 1) @ u_in_t  # (Cout, S, Cin)
        return np.ascontiguousarray(full.transpose(0, 2, 1)).reshape(self.shape)

    def flops(self, out_spatial_size: int, batch: int = 1, in_spatial_size: int | None = None) -> int:
        """FLOPs (2 x multiply-adds) of the three convs.

        ``out_spatial_size``/``in_spatial_size`` are numbers of output/input positions (e.g.
        ``H_out * W_out``; 1 for a Linear). The first 1x1 conv runs at the input resolution,
        before the original stride; ``in_spatial_size`` defaults to ``out_spatial_size``.
        """
        if in_spatial_size is None:
            in_spatial_size = out_spatial_size
        cout, cin = self.shape[:2]
        r_out, r_in = self.core.shape[:2]
        s = math.prod(self.spatial)
        macs = in_spatial_size * cin * r_in + out_spatial_size * (r_out * r_in * s + cout * r_out)
        return 2 * batch * macs


def _energy_rank(s: np.ndarray, energy: float) -> int:
    """Fewest leading components whose squared singular values reach ``energy`` of the total."""
    cumulative = np.cumsum(s.astype(np.float64) ** 2)
    total = cumulative[-1]
    if total == 0.0:
        return 1
    # Compare against the last cumsum entry (not a separate sum) so energy=1.0 is reachable
    # despite rounding.
    hit = np.nonzero(cumulative >= energy * total)[0]
    return int(hit[0]) + 1 if hit.size else len(s)


def _unfoldings(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mode-0 ``(Cout, Cin*S)`` and mode-1 ``(Cin, Cout*S)`` unfoldings of ``k (Cout, Cin, S)``."""
    cout, cin, s = k.shape
    return k.reshape(cout, cin * s), np.ascontiguousarray(k.transpose(1, 0, 2)).reshape(cin, cout * s)


def _clip(rank: TuckerRank, cout: int, cin: int, s: int) -> tuple[int, int]:
    # An orthonormal factor cannot have more columns than rows, and HOOI's projected
    # unfoldings (Cout, r_in*S) / (Cin, r_out*S) cap each rank by the other: components beyond
    # these carry nothing, so clipping is lossless.
    r_in = min(rank.r_in, cin, cout * s)
    r_out = min(rank.r_out, cout, r_in * s)
    r_in = min(r_in, r_out * s)
    return r_out, r_in


def _energy_ranks(mode0: np.ndarray, mode1: np.ndarray, energy: TuckerEnergy, gram: bool) -> TuckerRank:
    s0, s1 = _singular_values(mode0, gram), _singular_values(mode1, gram)
    return TuckerRank(r_out=_energy_rank(s0, energy.energy), r_in=_energy_rank(s1, energy.energy))


def tucker_ranks_for_energy(kernel: np.ndarray, energy: float | TuckerEnergy) -> TuckerRank:
    """Tucker-2 ranks keeping ``energy`` (fraction in (0, 1]) of the squared singular values
    of the Cout unfolding (-> ``r_out``) and of the Cin unfolding (-> ``r_in``) of ``kernel``.

    These are the ranks :func:`tucker2` uses for ``TuckerEnergy(energy)`` (before clipping).
    """
    if not isinstance(energy, TuckerEnergy):
        energy = TuckerEnergy(energy)
    a, out_dtype = _prepare(kernel, min_ndim=2)
    mode0, mode1 = _unfoldings(a.reshape(a.shape[0], a.shape[1], -1))
    return _energy_ranks(mode0, mode1, energy, _use_gram(a, out_dtype))


def tucker2(kernel: np.ndarray, rank: TuckerRank | TuckerEnergy, n_iter_max: int = 0) -> Tucker2Factors:
    """Tucker-2 of a conv kernel ``(Cout, Cin, *spatial)``, or of a Linear weight ``(out, in)``.

    HOSVD on the Cout (mode 0) and Cin (mode 1) unfoldings, then up to ``n_iter_max`` HOOI
    sweeps (update ``U_out`` given ``U_in``, then ``U_in`` given ``U_out``, as TensorLy's
    ``partial_tucker``). HOOI never increases the error; the sweeps stop early once one
    improves the captured energy ``||core||_F^2`` by less than 1e-12 relative.
    """
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, (int, np.integer)) or n_iter_max < 0:
        raise OptionError(f"n_iter_max must be an integer >= 0, got {n_iter_max!r}")
    n_iter_max = int(n_iter_max)
    if not isinstance(rank, (TuckerRank, TuckerEnergy)):
        raise OptionError(f"Tucker rank must be a TuckerRank or TuckerEnergy, got {type(rank).__name__}")
    a, out_dtype = _prepare(kernel, min_ndim=2)
    gram = _use_gram(a, out_dtype)
    cout, cin, *spatial = a.shape
    s = math.prod(spatial)
    mode0, mode1 = _unfoldings(a.reshape(cout, cin, s))
    if isinstance(rank, TuckerEnergy):
        rank = _energy_ranks(mode0, mode1, rank, gram)
    r_out, r_in = _clip(rank, cout, cin, s)

    def leading(matrix: np.ndarray, r: int) -> np.ndarray:
        return _leading_left(matrix, lambda _values: r, gram)[0]

    u_out = leading(mode0, r_out)
    u_in = leading(mode1, r_in)

    # Every mode product below is one GEMM on an unfolding that is already contiguous.
    def core_from(by_out_mode1: np.ndarray) -> np.ndarray:
        # (Cin, r_out*S) unfolding of K x_0 U_out^T -> core (r_out, r_in, S)
        return (u_in.T @ by_out_mode1).reshape(r_in, r_out, s).transpose(1, 0, 2)

    def out_projected_mode1() -> np.ndarray:
        by_out = (u_out.T @ mode0).reshape(r_out, cin, s)  # K x_0 U_out^T
        return np.ascontiguousarray(by_out.transpose(1, 0, 2)).reshape(cin, r_out * s)

    core = core_from(out_projected_mode1())
    energy = float(np.sum(core.astype(np.float64) ** 2))
    for _ in range(n_iter_max):
        by_in = (u_in.T @ mode1).reshape(r_in, cout, s)  # K x_1 U_in^T
        by_in_mode0 = np.ascontiguousarray(by_in.transpose(1, 0, 2)).reshape(cout, r_in * s)
        u_out = leading(by_in_mode0, r_out)
        by_out_mode1 = out_projected_mode1()
        u_in = leading(by_out_mode1, r_in)
        core = core_from(by_out_mode1)
        new_energy = float(np.sum(core.astype(np.float64) ** 2))
        converged = new_energy - energy <= 1e-12 * new_energy
        energy = new_energy
        if converged:
            break

    ones = (1,) * len(spatial)
    return Tucker2Factors(
        first=np.ascontiguousarray(u_in.T, dtype=out_dtype).reshape(r_in, cin, *ones),
        core=np.ascontiguousarray(core, dtype=out_dtype).reshape(r_out, r_in, *spatial),
        last=np.ascontiguousarray(u_out, dtype=out_dtype).reshape(cout, r_out, *ones),
    )
