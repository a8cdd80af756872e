"""Tests for onnx_lowrank.decompose.tucker (Tucker-2 via HOSVD / HOOI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conv_chains import conv_chain, random_conv_case
from onnx_testing import rel_error as rel_err

from onnx_lowrank.decompose.tucker import (
    TuckerEnergy,
    TuckerRank,
    tucker2,
    tucker_ranks_for_energy,
)
from onnx_lowrank.errors import OptionError


def planted_tucker(rng, cout, cin, spatial, r_out, r_in):
    core = rng.standard_normal((r_out, r_in, *spatial))
    a, b = rng.standard_normal((cout, r_out)), rng.standard_normal((cin, r_in))
    return np.einsum("ab...,oa,ib->oi...", core, a, b)


def mode_energy(kernel: np.ndarray, mode: int, rank: int) -> float:
    unfolding = np.moveaxis(kernel, mode, 0).reshape(kernel.shape[mode], -1)
    s2 = np.linalg.svd(unfolding, compute_uv=False) ** 2
    return float(s2[:rank].sum() / s2.sum())


def test_rank_types_validate():
    assert TuckerRank(np.int64(3), 2) == TuckerRank(3, 2)
    for bad in [(0, 2), (2, 1.5), (True, 2), (-1, 1)]:
        with pytest.raises(OptionError):
            TuckerRank(*bad)
    assert TuckerEnergy(1).energy == 1.0
    for bad in [0.0, 1.01, -0.5, float("nan"), True, "0.9"]:
        with pytest.raises(OptionError):
            TuckerEnergy(bad)
    kernel = np.ones((4, 3, 3, 3))
    with pytest.raises(OptionError):
        tucker2(kernel, 3)
    for bad in (-1, 2.0, True):
        with pytest.raises(OptionError):
            tucker2(kernel, TuckerRank(2, 2), n_iter_max=bad)
    with pytest.raises(ValueError):
        tucker2(np.ones(5), TuckerRank(1, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_ranks_recovered_exactly(seed):
    rng = np.random.default_rng(seed)
    cout, cin = int(rng.integers(8, 17)), int(rng.integers(6, 13))
    r_out, r_in = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    kernel = planted_tucker(rng, cout, cin, (3, 3), r_out, r_in)
    factors = tucker2(kernel, TuckerRank(r_out, r_in))
    assert factors.ranks == TuckerRank(r_out, r_in)
    assert rel_err(factors.reconstruct(), kernel) < 1e-10
    assert tucker_ranks_for_energy(kernel, 1 - 1e-12) == TuckerRank(r_out, r_in)
    assert rel_err(tucker2(kernel, TuckerEnergy(1 - 1e-12)).reconstruct(), kernel) < 1e-10


SHAPES = [(8, 8, 3, 3), (16, 5, 3, 3), (3, 16, 5, 5), (7, 9, 3), (12, 4, 5), (6, 10, 1, 1), (5, 9, 2, 3, 2), (11, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_full_rank_reproduces(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    kernel = rng.standard_normal(shape).astype(dtype)
    tol = 1e-6 if dtype == np.float64 else 1e-5
    for n_iter in (0, 2):
        factors = tucker2(kernel, TuckerRank(10**6, 10**6), n_iter_max=n_iter)
        assert factors.dtype == dtype
        assert factors.shape == shape
        cout, cin, *spatial = shape
        r = factors.ranks
        ones = (1,) * len(spatial)
        assert factors.first.shape == (r.r_in, cin, *ones)
        assert factors.core.shape == (r.r_out, r.r_in, *spatial)
        assert factors.last.shape == (cout, r.r_out, *ones)
        assert rel_err(factors.reconstruct(), kernel) < tol
    assert rel_err(tucker2(kernel, TuckerEnergy(1.0)).reconstruct(), kernel) < tol


def test_matrix_is_treated_as_1x1_kernel():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((12, 9))
    factors = tucker2(weight, TuckerRank(4, 4))
    assert (factors.first.shape, factors.core.shape, factors.last.shape) == ((4, 9), (4, 4), (12, 4))
    np.testing.assert_allclose(factors.reconstruct(), factors.last @ factors.core @ factors.first, atol=1e-12)
    as_conv = tucker2(weight[:, :, None, None], TuckerRank(4, 4))
    np.testing.assert_allclose(as_conv.reconstruct()[:, :, 0, 0], factors.reconstruct(), atol=1e-12)
    assert factors.flops(1, batch=5) == 2 * 5 * (9 * 4 + 4 * 4 + 12 * 4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spatial_ndim", [1, 2])
def test_conv_chain_equals_conv_at_full_rank(seed, spatial_ndim):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(100 + seed)
    kernel, stride, padding, dilation, x = random_conv_case(torch, rng, spatial_ndim)
    cout, cin = kernel.shape[:2]

    factors = tucker2(kernel, TuckerRank(cout, cin), n_iter_max=int(seed % 2))
    kernels = factors.conv_kernels()
    assert all(k.dtype == np.float32 and k.flags.c_contiguous for k in kernels)
    conv = torch.nn.functional.conv1d if spatial_ndim == 1 else torch.nn.functional.conv2d
    ref = conv(x, torch.from_numpy(kernel), stride=stride, padding=padding, dilation=dilation)
    assert rel_err(conv_chain(torch, x, kernels, stride, padding, dilation).numpy(), ref.numpy()) < 1e-5


def test_truncated_chain_params_flops():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((16, 12, 3, 3))
    factors = tucker2(kernel, TuckerRank(6, 5), n_iter_max=3)
    assert factors.ranks == TuckerRank(6, 5)
    assert factors.params == sum(k.size for k in factors.conv_kernels()) == 5 * 12 + 6 * 5 * 9 + 16 * 6
    x = torch.from_numpy(rng.standard_normal((1, 12, 10, 10)))
    ref = torch.nn.functional.conv2d(x, torch.from_numpy(factors.reconstruct()), stride=2, padding=1)
    assert rel_err(conv_chain(torch, x, factors.conv_kernels(), 2, 1, 1).numpy(), ref.numpy()) < 1e-12
    expected = 2 * (100 * 12 * 5 + 25 * (6 * 5 * 9 + 16 * 6))
    assert factors.flops(25, in_spatial_size=100) == expected
    assert factors.flops(25, batch=2, in_spatial_size=100) == 2 * expected
    # Factors are orthonormal.
    u_in = factors.first.reshape(5, 12).T
    u_out = factors.last.reshape(16, 6)
    np.testing.assert_allclose(u_in.T @ u_in, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(u_out.T @ u_out, np.eye(6), atol=1e-12)


def test_rank_clipping():
    rng = np.random.default_rng(5)
    factors = tucker2(rng.standard_normal((64, 3, 3, 3)), TuckerRank(1000, 1000))
    assert factors.ranks == TuckerRank(27, 3)  # r_out <= Cin * S = 27
    factors = tucker2(rng.standard_normal((20, 8)), TuckerRank(6, 2))
    assert factors.ranks == TuckerRank(2, 2)  # a matrix: core (r_out, r_in) gains nothing from r_out > r_in


def test_energy_ranks():
    rng = np.random.default_rng(6)
    kernel = planted_tucker(rng, 24, 16, (3, 3), 8, 6) + 0.05 * rng.standard_normal((24, 16, 3, 3))
    for energy in (0.5, 0.8, 0.95, 0.999):
        rank = tucker_ranks_for_energy(kernel, energy)
        assert rank == tucker_ranks_for_energy(kernel, TuckerEnergy(energy))
        assert mode_energy(kernel, 0, rank.r_out) >= energy
        assert mode_energy(kernel, 1, rank.r_in) >= energy
        assert rank.r_out == 1 or mode_energy(kernel, 0, rank.r_out - 1) < energy
        assert rank.r_in == 1 or mode_energy(kernel, 1, rank.r_in - 1) < energy
        assert tucker2(kernel, TuckerEnergy(energy)).ranks == rank


def test_hooi_never_worse_than_hosvd():
    rng = np.random.default_rng(7)
    kernel = rng.standard_normal((20, 14, 3, 3))
    hosvd = rel_err(tucker2(kernel, TuckerRank(6, 5)).reconstruct(), kernel)
    errors = [rel_err(tucker2(kernel, TuckerRank(6, 5), n_iter_max=n).reconstruct(), kernel) for n in (1, 3, 10)]
    assert errors[0] <= hosvd + 1e-12
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < hosvd


def test_determinism_byte_identical():
    rng = np.random.default_rng(8)
    kernel = rng.standard_normal((16, 12, 3, 3)).astype(np.float32)
    for n_iter in (0, 4):
        a = tucker2(kernel, TuckerRank(6, 5), n_iter_max=n_iter).conv_kernels()
        b = tucker2(kernel.copy(), TuckerRank(6, 5), n_iter_max=n_iter).conv_kernels()
        assert all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    # Sign convention: the largest-|value| entry of every singular vector is positive.
    factors = tucker2(kernel, TuckerRank(6, 5))
    for u in (factors.last.reshape(16, 6), factors.first.reshape(5, 12).T):
        assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] > 0)


@pytest.mark.parametrize("n_iter", [0, 1, 5])
def test_cross_check_tensorly_partial_tucker(n_iter):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    rng = np.random.default_rng(9 + n_iter)
    for shape, (r_out, r_in) in [((24, 16, 3, 3), (6, 5)), ((12, 20, 5), (4, 7)), ((32, 32, 1, 1), (9, 9))]:
        kernel = planted_tucker(rng, *shape[:2], shape[2:], r_out + 2, r_in + 2) + 0.3 * rng.standard_normal(shape)
        ours = rel_err(tucker2(kernel, TuckerRank(r_out, r_in), n_iter_max=n_iter).reconstruct(), kernel)
        (core, factors), _ = partial_tucker(
            kernel, [r_out, r_in], modes=[0, 1], n_iter_max=n_iter, init="svd", tol=0
        )
        theirs = rel_err(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]), kernel)
        assert ours <= theirs * (1 + 1e-6) + 1e-12
    # HOOI to convergence against TensorLy's own stopping rule.
    kernel = rng.standard_normal((16, 16, 3, 3))
    ours = rel_err(tucker2(kernel, TuckerRank(5, 5), n_iter_max=200).reconstruct(), kernel)
    (core, factors), _ = partial_tucker(kernel, [5, 5], modes=[0, 1], n_iter_max=100, init="svd", tol=1e-10)
    theirs = rel_err(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]), kernel)
    assert ours <= theirs * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("shape", [(24, 16, 3, 3), (64, 3, 3, 3), (5, 40, 1, 1), (12, 9)])
def test_float32_gram_path_matches_float64_svd_path(shape):
    """float32 weights go through Gram eigendecompositions in float64, float64 ones through
    LAPACK SVD; both must pick the same subspaces."""
    rng = np.random.default_rng(sum(shape))
    kernel = rng.standard_normal(shape).astype(np.float32)
    rank = TuckerRank(max(1, shape[0] // 3), max(1, shape[1] // 3))
    for n_iter in (0, 3):
        gram = tucker2(kernel, rank, n_iter_max=n_iter)
        exact = tucker2(kernel.astype(np.float64), rank, n_iter_max=n_iter)
        assert gram.ranks == exact.ranks
        assert rel_err(gram.reconstruct(), kernel) == pytest.approx(rel_err(exact.reconstruct(), kernel), rel=1e-5)
        for a, b in zip(gram.conv_kernels(), exact.conv_kernels(), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
    for energy in (0.5, 0.9):
        assert tucker_ranks_for_energy(kernel, energy) == tucker_ranks_for_energy(kernel.astype(np.float64), energy)
        assert tucker2(kernel, TuckerEnergy(energy)).ranks == tucker_ranks_for_energy(kernel, energy)


def test_float32_input_returns_float32_and_params_match():
    rng = np.random.default_rng(10)
    kernel = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    factors = tucker2(kernel, TuckerRank(8, 4))
    assert factors.dtype == np.float32
    assert factors.params == factors.first.size + factors.core.size + factors.last.size
    assert factors.params == 4 * 16 + 8 * 4 * 9 + 32 * 8
    assert factors.params < math.prod(kernel.shape)
