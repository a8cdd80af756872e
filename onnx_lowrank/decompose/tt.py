"""Tensor-train (TT-SVD) decompositions of weight arrays; pure numpy, no ONNX.

Three entry points, all built on the same sequential TT-SVD (Oseledets 2011):

* :func:`tt_svd` -- a TT decomposition of any tensor, cores ``(r_{k-1}, n_k, r_k)``.
* :func:`tt_matrix` -- the TT-matrix ("TT layer", Novikov et al. 2015) format of a Linear
  weight ``(out, in)``, cores ``(r_{k-1}, out_k, in_k, r_k)``, with the exact contraction
  sequence the graph lowering emits (:meth:`TTMatrixFactors.matmul_steps`).
* :func:`tt_conv` -- a conv kernel ``(Cout, Cin, *spatial)`` factored over its channel modes
  with the spatial part kept whole, so the layer becomes 1x1 conv -> spatial conv -> 1x1 conv.

Ranks are always explicit objects: :class:`TTRank` (the rank vector ``(1, r_1, ..., 1)``) or
:class:`TTErrorBound` (a relative Frobenius error bound). Requested ranks larger than what the
tensor can use are clipped; ``factors.ranks`` reports the ranks actually used.

Precision: a float32 (or float16/integer) weight with at most ``FLOAT64_MAX_ELEMENTS``
elements is decomposed in float64, through eigendecompositions of the smaller Gram matrix of
each unfolding (5-10x faster than LAPACK's SVD on conv unfoldings, see :func:`_leading_left`);
a bigger one in float32 with LAPACK SVD (a float64 copy costs too much memory and time). A
float64 input is always decomposed in float64 with LAPACK SVD. Factors come back float64 if
the input was float64, else float32. Signs are fixed (the largest-|value| entry of every kept
left singular vector is positive), so the same input gives byte-identical factors.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.errors import OptionError

__all__ = [
    "FLOAT64_MAX_ELEMENTS",
    "TTConvFactors",
    "TTErrorBound",
    "TTFactors",
    "TTMatMulStep",
    "TTMatrixFactors",
    "TTRank",
    "factorize_dim",
    "tt_conv",
    "tt_matrix",
    "tt_svd",
]

#: Tensors with at most this many elements (16 Mi = 2**24) are decomposed in float64.
FLOAT64_MAX_ELEMENTS = 16 * 1024 * 1024


# --------------------------------------------------------------------------- rank types


def _positive_int(value: object, what: str) -> int:
    # operator.index accepts Python and numpy integers but rejects floats, so a rank can
    # never silently mean "fraction of the full rank"; bool is an int subclass, reject it too.
    if isinstance(value, bool):
        raise OptionError(f"{what} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise OptionError(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise OptionError(f"{what} must be a positive integer, got {value!r}")
    return number


@dataclass(frozen=True)
class TTRank:
    """Explicit TT ranks ``(1, r_1, ..., r_{d-1}, 1)`` for a tensor with ``d`` modes.

    ``ranks[k]`` is the size of the bond between core ``k-1`` and core ``k`` (unitless counts).
    A rank larger than the corresponding unfolding allows is clipped when decomposing.
    """

    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        ranks = tuple(_positive_int(r, "TT rank") for r in self.ranks)
        if len(ranks) < 2 or ranks[0] != 1 or ranks[-1] != 1:
            raise OptionError(f"TT ranks must look like (1, r_1, ..., 1), got {self.ranks!r}")
        object.__setattr__(self, "ranks", ranks)

    @classmethod
    def uniform(cls, rank: int, n_modes: int) -> TTRank:
        """``(1, rank, ..., rank, 1)`` for a tensor with ``n_modes`` modes."""
        n_modes = _positive_int(n_modes, "number of TT modes")
        return cls((1, *([rank] * (n_modes - 1)), 1))

    @classmethod
    def full(cls, dims: Sequence[int]) -> TTRank:
        """The maximal (exact) ranks for mode sizes ``dims``: ``min(prod(dims[:k]), prod(dims[k:]))``."""
        dims = tuple(_positive_int(n, "mode size") for n in dims)
        inner = [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))]
        return cls((1, *inner, 1))


@dataclass(frozen=True)
class TTErrorBound:
    """Choose the TT ranks so that ``||A - TT||_F <= eps * ||A||_F`` (relative, unitless).

    As in Oseledets' TT-SVD the budget is split evenly over the ``d - 1`` truncations: each
    keeps the smallest rank whose discarded singular values have norm <= ``eps/sqrt(d-1)*||A||_F``.
    ``eps = 0`` keeps every non-zero singular value (exact up to rounding). The bound holds for
    the factors in the compute precision; rounding float32 factors adds ~1e-7 relative on top,
    and for float32 inputs singular values below ~1e-8 of the largest are not resolved, so an
    ``eps`` below ~1e-7 is not meaningful for them.
    """

    eps: float

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, np.floating, np.integer)):
            raise OptionError(f"TT error bound must be a number, got {self.eps!r}")
        eps = float(self.eps)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise OptionError(f"TT error bound must be finite and >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)


TTRankSpec = TTRank | TTErrorBound


# --------------------------------------------------------------------------- shared numerics
# (tucker.py imports the underscore helpers below so both decompositions follow one rule.)


def _prepare(array: object, *, min_ndim: int) -> tuple[np.ndarray, np.dtype]:
    """Validate ``array`` and return (contiguous copy in the compute dtype, result dtype)."""
    a = np.asarray(array)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"expected a real numeric array, got dtype {a.dtype}")
    if a.ndim < min_ndim:
        raise ValueError(f"expected an array with at least {min_ndim} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"cannot decompose an empty array of shape {a.shape}")
    result = np.dtype(np.float64) if a.dtype == np.float64 else np.dtype(np.float32)
    # A float64 input is decomposed in float64 whatever its size (as decompose.svd does).
    compute = np.float64 if a.size <= FLOAT64_MAX_ELEMENTS or result == np.float64 else np.float32
    a = np.ascontiguousarray(a, dtype=compute)
    # LAPACK either fails or returns garbage on NaN/Inf; say which input is broken instead.
    if not np.isfinite(a).all():
        raise ValueError("cannot decompose an array containing NaN or Inf")
    return a, result


def _use_gram(a: np.ndarray, result: np.dtype) -> bool:
    """Whether :func:`_leading_left` may use the Gram eigendecomposition (see there)."""
    return a.dtype == np.float64 and result == np.float32


def _fix_signs(u: np.ndarray) -> None:
    """Make the largest-|value| entry of each column of ``u`` positive, in place.

    Singular vectors are defined up to sign; fixing it makes the factors a pure function of
    the input (everything downstream is computed from the sign-fixed ``u``).
    """
    if u.shape[1] == 0:
        return
    pivot = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[pivot, np.arange(u.shape[1])])
    signs[signs == 0] = 1  # only an all-zero column, which an orthonormal basis never has
    u *= signs


def _singular_values(matrix: np.ndarray, gram: bool) -> np.ndarray:
    """All ``min(m, n)`` singular values, descending, float64."""
    if gram:
        small = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
        return np.sqrt(np.clip(np.linalg.eigvalsh(small)[::-1], 0.0, None))
    return np.linalg.svd(matrix, compute_uv=False).astype(np.float64)


def _leading_left(
    matrix: np.ndarray, choose_rank: Callable[[np.ndarray], int], gram: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Leading left singular vectors ``U_r (m, r)`` (signs fixed, contiguous) and all singular
    values ``s`` (descending, float64), where ``r = choose_rank(s)``.

    ``gram=False``: LAPACK SVD (``gesdd``), accurate to working precision. ``gram=True`` (float64
    compute of a float32/float16 weight): eigendecomposition of the smaller Gram matrix, ~5-10x
    faster on conv unfoldings such as (512, 4608). Squaring the matrix resolves singular values
    only down to ~1e-8 of the largest -- below the ~6e-8 relative resolution of the float32
    weight itself -- while ``U_r`` stays orthonormal to working precision, so full-rank
    reconstructions remain exact and truncations optimal to far below float32 rounding.
    """
    m, n = matrix.shape
    if not gram:
        u, s, _ = np.linalg.svd(matrix, full_matrices=False)
        s = s.astype(np.float64)
        u = np.ascontiguousarray(u[:, : choose_rank(s)])
    elif m <= n:
        lam, w = np.linalg.eigh(matrix @ matrix.T)
        s = np.sqrt(np.clip(lam[::-1], 0.0, None))
        u = np.ascontiguousarray(w[:, ::-1][:, : choose_rank(s)])
    else:
        lam, v = np.linalg.eigh(matrix.T @ matrix)
        s = np.sqrt(np.clip(lam[::-1], 0.0, None))
        # A @ V_r = U_r S_r; QR re-orthonormalizes it without dividing by tiny singular values.
        u = np.linalg.qr(matrix @ v[:, ::-1][:, : choose_rank(s)])[0]
        u = np.ascontiguousarray(u)
    _fix_signs(u)
    return u, s


def _rank_for_tail(s: np.ndarray, tail_sq_max: float) -> int:
    """Smallest rank ``r >= 1`` whose discarded squared singular values sum to <= ``tail_sq_max``."""
    squares = s.astype(np.float64) ** 2
    # tail[r] = sum_{i >= r} s_i^2, for r = 0..len(s); the reversed cumsum keeps it monotone.
    tail = np.append(np.cumsum(squares[::-1])[::-1], 0.0)
    ok = np.nonzero(tail[1:] <= tail_sq_max)[0]
    return int(ok[0]) + 1 if ok.size else len(s)


def _tt_svd_cores(a: np.ndarray, dims: tuple[int, ...], rank: TTRankSpec, gram: bool) -> list[np.ndarray]:
    """Sequential TT-SVD of ``a`` viewed with mode sizes ``dims``; cores in ``a``'s dtype."""
    d = len(dims)
    if isinstance(rank, TTRank):
        if len(rank.ranks) != d + 1:
            raise OptionError(
                f"TT rank {rank.ranks} has {len(rank.ranks)} entries; a tensor with {d} modes "
                f"needs {d + 1} (1, r_1, ..., r_{d - 1}, 1)"
            )
    elif isinstance(rank, TTErrorBound):
        norm_sq = float(np.sum(a.astype(np.float64, copy=False) ** 2)) if d > 1 else 0.0
        tail_sq_max = rank.eps**2 / max(d - 1, 1) * norm_sq
    else:
        raise OptionError(f"TT rank must be a TTRank or TTErrorBound, got {type(rank).__name__}")

    cores: list[np.ndarray] = []
    remainder = a.reshape(-1)
    r_prev = 1
    for k in range(d - 1):
        unfolding = remainder.reshape(r_prev * dims[k], -1)
        if isinstance(rank, TTRank):
            cap = rank.ranks[k + 1]

            def choose(s: np.ndarray, cap: int = cap) -> int:
                return min(cap, len(s))
        else:

            def choose(s: np.ndarray) -> int:
                return _rank_for_tail(s, tail_sq_max)

        u, _ = _leading_left(unfolding, choose, gram)
        r = u.shape[1]
        cores.append(u.reshape(r_prev, dims[k], r))
        # Carry U_r^T A (= S_r V_r^T) forward: the cores stay left-orthonormal, so the errors
        # of the individual truncations add in squares (Oseledets, Thm 2.2).
        remainder = u.T @ unfolding
        r_prev = r
    cores.append(np.ascontiguousarray(remainder.reshape(r_prev, dims[-1], 1)))
    return cores


def _chain(cores: Sequence[np.ndarray]) -> np.ndarray:
    """Contract TT cores ``(r, n, r')`` left to right into a ``(prod n,)`` vector."""
    result = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        result = (result @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    return result.reshape(-1)


# --------------------------------------------------------------------------- plain TT


@dataclass(frozen=True, eq=False)
class TTFactors:
    """A tensor in TT format: ``A[i_1, ..., i_d] = G_1[:, i_1, :] @ ... @ G_d[:, i_d, :]``.

    ``cores[k]`` has shape ``(r_k, n_{k+1}, r_{k+1})`` with ``r_0 = r_d = 1``; all cores but the
    last are left-orthonormal (reshaped to ``(r_k * n_{k+1}, r_{k+1})`` their columns are
    orthonormal).
    """

    cores: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Mode sizes ``(n_1, ..., n_d)`` of the represented tensor."""
        return tuple(c.shape[1] for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The TT ranks actually used, ``(1, r_1, ..., r_{d-1}, 1)``."""
        return (1, *(c.shape[2] for c in self.cores))

    @property
    def dtype(self) -> np.dtype:
        return self.cores[0].dtype

    @property
    def params(self) -> int:
        """Number of stored values (sum of the core sizes)."""
        return sum(int(c.size) for c in self.cores)

    def reconstruct(self) -> np.ndarray:
        """The full tensor, shape :attr:`shape`, in the cores' dtype."""
        return _chain(self.cores).reshape(self.shape)


def tt_svd(tensor: np.ndarray, rank: TTRank | TTErrorBound) -> TTFactors:
    """TT-SVD (Oseledets 2011) of ``tensor`` (any shape with >= 1 dimension).

    ``rank`` is a :class:`TTRank` with ``tensor.ndim + 1`` entries or a :class:`TTErrorBound`.
    Exact ranks (:meth:`TTRank.full` or ``TTErrorBound(0)``) reproduce the tensor up to
    rounding.
    """
    a, out_dtype = _prepare(tensor, min_ndim=1)
    cores = _tt_svd_cores(a, a.shape, rank, _use_gram(a, out_dtype))
    return TTFactors(tuple(c.astype(out_dtype, copy=False) for c in cores))


# --------------------------------------------------------------------------- factorize_dim


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _best_split(n: int, parts: int) -> tuple[int, ...]:
    """Non-decreasing ``parts`` factors >= 2 of ``n`` with the smallest maximum (then largest minimum)."""
    best: tuple[int, ...] | None = None

    def key(split: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        return (split[-1], -split[0], split)

    def search(rest: int, k: int, lo: int, prefix: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                candidate = (*prefix, rest)
                if best is None or key(candidate) < key(best):
                    best = candidate
            return
        f = lo
        while f**k <= rest:  # the remaining k factors are all >= f
            if rest % f == 0:
                search(rest // f, k - 1, f, (*prefix, f))
            f += 1

    search(n, parts, 2, ())
    assert best is not None  # parts <= number of prime factors, so a split exists
    return best


def factorize_dim(n: int, parts: int | None = None) -> tuple[int, ...]:
    """Split a dimension ``n`` into ``parts`` small, balanced factors (ascending, product ``n``).

    Among the splits into exactly ``parts`` factors the one with the smallest largest factor
    wins (ties: the largest smallest factor): ``768 -> (8, 8, 12)``, ``3072 -> (12, 16, 16)``.
    ``parts=None`` picks the fewest parts whose factors can all be <= 16 (at most one per prime
    factor, so a prime stays whole: ``769 -> (769,)``). An explicit ``parts`` larger than the
    number of prime factors pads with leading 1s (``factorize_dim(7, 2) == (1, 7)``), which keeps
    the out and in dims of :func:`tt_matrix` the same length. Pass your own dims to
    :func:`tt_matrix` to override completely.
    """
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"can only factorize a positive dimension, got {n}")
    primes = _prime_factors(n)
    if parts is None:
        parts = 1
        while 16**parts < n:
            parts += 1
        parts = max(1, min(parts, len(primes)))
    else:
        parts = _positive_int(parts, "number of factors")
    if n == 1:
        return (1,) * parts
    ones = max(0, parts - len(primes))
    return (1,) * ones + _best_split(n, parts - ones)


# --------------------------------------------------------------------------- TT-matrix


@dataclass(frozen=True, eq=False)
class TTMatMulStep:
    """One step of the TT-matrix contraction, as graph ops on the running state ``z``.

    ``z = Reshape(z, split_shape)``; ``z = Transpose(z, perm)``; ``z = Reshape(z, rows_shape)``;
    ``z = MatMul(z, weight)``. The state starts as the input ``x (tokens, in)`` and, after the
    last step, ``Reshape(z, (-1, out))`` is the output. ``-1`` always stands for the one
    token-dependent axis. The same step as one Einsum: ``"bcri,rois->bcos"`` on the
    transposed state and core ``k``, which is what ``weight`` is reshaped from.
    """

    core: int  # index k of the core this step contracts
    split_shape: tuple[int, ...]  # (-1, in_k, prod(in[k+1:]), out_{k-1}, r_k); out_{-1} = 1
    perm: tuple[int, ...]  # always (0, 3, 2, 4, 1): -> (-1, out_{k-1}, prod(in[k+1:]), r_k, in_k)
    rows_shape: tuple[int, int]  # (-1, r_k * in_k)
    weight: np.ndarray  # (r_k * in_k, out_k * r_{k+1}) = core_k.transpose(0, 2, 1, 3)
    macs_per_token: int  # multiply-adds of this MatMul per input vector


@dataclass(frozen=True, eq=False)
class TTMatrixFactors:
    """A matrix ``W (out, in)`` in TT-matrix format (Novikov et al., "Tensorizing NNs").

    ``cores[k]`` has shape ``(r_k, out_k, in_k, r_{k+1})``, ``r_0 = r_d = 1``, and
    ``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] @ ... @ G_d[:, o_d, i_d, :]`` with the
    row and column multi-indices in row-major (numpy ``reshape``) order.
    """

    cores: tuple[np.ndarray, ...]

    @property
    def out_dims(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    @property
    def in_dims(self) -> tuple[int, ...]:
        return tuple(c.shape[2] for c in self.cores)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_dims)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_dims)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1, *(c.shape[3] for c in self.cores))

    @property
    def dtype(self) -> np.dtype:
        return self.cores[0].dtype

    @property
    def params(self) -> int:
        """Number of stored values (sum of the core sizes)."""
        return sum(int(c.size) for c in self.cores)

    def reconstruct(self) -> np.ndarray:
        """The dense ``(out, in)`` matrix in the cores' dtype."""
        d = len(self.cores)
        merged = [c.reshape(c.shape[0], -1, c.shape[3]) for c in self.cores]
        full = _chain(merged).reshape(*(x for c in self.cores for x in c.shape[1:3]))
        # (o_1, i_1, o_2, i_2, ...) -> (o_1, ..., o_d, i_1, ..., i_d)
        full = full.transpose(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
        return np.ascontiguousarray(full).reshape(self.shape)

    def matmul_steps(self) -> tuple[TTMatMulStep, ...]:
        """The contraction sequence of :meth:`apply` (and of the ONNX lowering), core 0 first.

        Step ``k`` contracts the input mode ``in_k`` and the bond ``r_k`` with core ``k``;
        its MatMul has ``tokens * prod(out[:k]) * prod(in[k+1:])`` rows.
        """
        steps = []
        outs, ins, ranks = self.out_dims, self.in_dims, self.ranks
        for k, core in enumerate(self.cores):
            r, o, i, s = core.shape
            rest_in = math.prod(ins[k + 1 :])
            prev_out = outs[k - 1] if k else 1
            weight = np.ascontiguousarray(core.transpose(0, 2, 1, 3)).reshape(r * i, o * s)
            steps.append(
                TTMatMulStep(
                    core=k,
                    split_shape=(-1, i, rest_in, prev_out, ranks[k]),
                    perm=(0, 3, 2, 4, 1),
                    rows_shape=(-1, r * i),
                    weight=weight,
                    macs_per_token=math.prod(outs[:k]) * rest_in * r * i * o * s,
                )
            )
        return tuple(steps)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T`` for ``x (..., in)`` -> ``(..., out)``, via :meth:`matmul_steps`."""
        x = np.asarray(x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"expected input (..., {self.in_features}), got shape {x.shape}")
        lead = x.shape[:-1]
        z = x.reshape(-1, self.in_features)
        for step in self.matmul_steps():
            z = z.reshape(step.split_shape).transpose(step.perm).reshape(step.rows_shape)
            z = z @ step.weight
        return z.reshape(*lead, self.out_features)

    def flops(self, tokens: int = 1) -> int:
        """FLOPs (2 x multiply-adds) of :meth:`apply` on ``tokens`` input vectors."""
        return 2 * tokens * sum(step.macs_per_token for step in self.matmul_steps())


def tt_matrix(
    weight: np.ndarray,
    out_dims: Sequence[int],
    in_dims: Sequence[int],
    rank: TTRank | TTErrorBound,
) -> TTMatrixFactors:
    """TT-matrix decomposition of a Linear weight ``W (out, in)`` (``y = x @ W.T``).

    ``out_dims``/``in_dims`` factor ``out``/``in`` (same length ``d``; see
    :func:`factorize_dim`). ``W`` is viewed as the tensor with modes ``(out_k * in_k)`` and
    decomposed by TT-SVD, so ``rank`` is a :class:`TTRank` with ``d + 1`` entries or a
    :class:`TTErrorBound` (relative Frobenius error of ``W``).
    """
    out_dims = tuple(_positive_int(n, "out dim") for n in out_dims)
    in_dims = tuple(_positive_int(n, "in dim") for n in in_dims)
    w, out_dtype = _prepare(weight, min_ndim=2)
    if w.ndim != 2:
        raise ValueError(f"tt_matrix expects a 2-D (out, in) weight, got shape {w.shape}")
    if len(out_dims) != len(in_dims):
        raise ValueError(f"out_dims {out_dims} and in_dims {in_dims} must have the same length")
    if (math.prod(out_dims), math.prod(in_dims)) != w.shape:
        raise ValueError(f"dims {out_dims} x {in_dims} do not factor a weight of shape {w.shape}")
    d = len(out_dims)
    # (o_1..o_d, i_1..i_d) -> (o_1, i_1, ..., o_d, i_d): pairing each out mode with its in
    # mode is what lets every core act on one (out_k, in_k) slice.
    t = w.reshape(*out_dims, *in_dims)
    t = t.transpose([ax for k in range(d) for ax in (k, d + k)])
    t = np.ascontiguousarray(t)
    dims = tuple(o * i for o, i in zip(out_dims, in_dims, strict=True))
    cores = _tt_svd_cores(t, dims, rank, _use_gram(w, out_dtype))
    cores = [
        c.reshape(c.shape[0], o, i, c.shape[2]).astype(out_dtype, copy=False)
        for c, o, i in zip(cores, out_dims, in_dims, strict=True)
    ]
    return TTMatrixFactors(tuple(cores))


# --------------------------------------------------------------------------- TT conv


@dataclass(frozen=True, eq=False)
class TTConvFactors:
    """A conv kernel ``(Cout, Cin, *spatial)`` as three TT cores over ``(Cin, S, Cout)``.

    ``cores`` = ``(1, Cin, r1)``, ``(r1, S, r2)``, ``(r2, Cout, 1)`` with ``S = prod(spatial)``
    and ``K[co, ci, s] = sum_ab G1[0, ci, a] G2[a, s, b] G3[b, co, 0]``; this is exactly the
    chain 1x1 conv ``Cin -> r1``, spatial conv ``r1 -> r2``, 1x1 conv ``r2 -> Cout``
    (:meth:`conv_kernels`). Only ``group=1`` convs factor this way.
    """

    cores: tuple[np.ndarray, np.ndarray, np.ndarray]
    spatial: tuple[int, ...]  # kernel spatial shape, e.g. (kh, kw)

    @property
    def in_channels(self) -> int:
        return self.cores[0].shape[1]

    @property
    def out_channels(self) -> int:
        return self.cores[2].shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the original kernel, ``(Cout, Cin, *spatial)``."""
        return (self.out_channels, self.in_channels, *self.spatial)

    @property
    def ranks(self) -> tuple[int, int, int, int]:
        """``(1, r1, r2, 1)``: r1 = channels after the first 1x1 conv, r2 after the spatial one."""
        return (1, self.cores[0].shape[2], self.cores[1].shape[2], 1)

    @property
    def dtype(self) -> np.dtype:
        return self.cores[0].dtype

    @property
    def params(self) -> int:
        """Number of stored values (= sum of the three conv kernel sizes)."""
        return sum(int(c.size) for c in self.cores)

    def conv_kernels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ONNX ``Conv`` weights, applied in order (contiguous arrays):

        ``(r1, Cin, 1, ..)`` 1x1 conv with stride 1 and no padding; ``(r2, r1, *spatial)`` with
        the original strides/pads/dilations; ``(Cout, r2, 1, ..)`` 1x1 conv (the bias goes here).
        A pointwise conv without bias maps zero padding to zero, so moving the original padding
        after the first 1x1 conv changes nothing.
        """
        g1, g2, g3 = self.cores
        r1, r2 = g1.shape[2], g2.shape[2]
        ones = (1,) * len(self.spatial)
        first = np.ascontiguousarray(g1[0].T).reshape(r1, self.in_channels, *ones)
        middle = np.ascontiguousarray(g2.transpose(2, 0, 1)).reshape(r2, r1, *self.spatial)
        last = np.ascontiguousarray(g3[:, :, 0].T).reshape(self.out_channels, r2, *ones)
        return first, middle, last

    def reconstruct(self) -> np.ndarray:
        """The full kernel ``(Cout, Cin, *spatial)`` in the cores' dtype."""
        cin_s_cout = _chain(self.cores).reshape(self.in_channels, -1, self.out_channels)
        return np.ascontiguousarray(cin_s_cout.transpose(2, 0, 1)).reshape(self.shape)

    def flops(self, out_spatial_size: int, batch: int = 1, in_spatial_size: int | None = None) -> int:
        """FLOPs (2 x multiply-adds) of the three convs.

        ``out_spatial_size``/``in_spatial_size`` are numbers of output/input positions (e.g.
        ``H_out * W_out``). The first 1x1 conv runs at the input resolution, before the
        original stride; ``in_spatial_size`` defaults to ``out_spatial_size`` (stride 1, same
        padding).
        """
        if in_spatial_size is None:
            in_spatial_size = out_spatial_size
        _, r1, r2, _ = self.ranks
        s = math.prod(self.spatial)
        macs = (
            in_spatial_size * self.in_channels * r1
            + out_spatial_size * r2 * r1 * s
            + out_spatial_size * self.out_channels * r2
        )
        return 2 * batch * macs


def tt_conv(kernel: np.ndarray, rank: TTRank | TTErrorBound) -> TTConvFactors:
    """Channel TT of a conv kernel ``(Cout, Cin, *spatial)`` (1-D, 2-D or 3-D convs).

    The kernel is reordered to ``(Cin, S, Cout)`` (``S = prod(spatial)``, kept as one mode)
    and decomposed by TT-SVD in that order, so ``rank`` is ``TTRank((1, r1, r2, 1))`` or a
    :class:`TTErrorBound`; ``TTRank.full((Cin, S, Cout))`` is exact.

    The result has the same structure as Tucker-2 (:func:`onnx_lowrank.decompose.tucker.tucker2`)
    but a different truncation: r1 comes from the SVD of the ``Cin`` unfolding of the kernel
    (same as Tucker-2's input factor), while r2 comes from the SVD of the *already
    Cin-truncated* tensor unfolded as ``(r1 * S, Cout)`` -- a sequentially truncated HOSVD
    (Cin first, then Cout) with the spatial mode absorbed into the middle core, without HOOI.
    """
    a, out_dtype = _prepare(kernel, min_ndim=3)
    cout, cin, *spatial = a.shape
    s = math.prod(spatial)
    reordered = np.ascontiguousarray(a.reshape(cout, cin, s).transpose(1, 2, 0))
    cores = _tt_svd_cores(reordered, (cin, s, cout), rank, _use_gram(a, out_dtype))
    cores = tuple(c.astype(out_dtype, copy=False) for c in cores)
    return TTConvFactors(cores=cores, spatial=tuple(spatial))
