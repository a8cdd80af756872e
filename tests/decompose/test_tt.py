"""Tests for onnx_lowrank.decompose.tt (TT-SVD, TT-matrix, channel TT of conv kernels)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conv_chains import conv_chain, random_conv_case
from onnx_testing import rel_error as rel_err

from onnx_lowrank.decompose import tt as tt_module
from onnx_lowrank.decompose.tt import (
    TTErrorBound,
    TTRank,
    factorize_dim,
    tt_conv,
    tt_matrix,
    tt_svd,
)
from onnx_lowrank.errors import OptionError


def tt_full(cores: list[np.ndarray]) -> np.ndarray:
    """Independent reference contraction of TT cores (r, n, r') via einsum."""
    full = cores[0]
    for core in cores[1:]:
        full = np.tensordot(full, core, axes=([-1], [0]))
    return full.reshape(full.shape[1:-1])


def planted_tt(rng: np.random.Generator, dims: tuple[int, ...], ranks: tuple[int, ...]) -> np.ndarray:
    cores = [rng.standard_normal((ranks[k], n, ranks[k + 1])) for k, n in enumerate(dims)]
    return tt_full(cores)


def same_bytes(a, b) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- rank types


def test_rank_types_validate():
    assert TTRank([1, 2, 1]).ranks == (1, 2, 1)
    assert TTRank((1, np.int64(3), 1)).ranks == (1, 3, 1)
    assert TTRank.uniform(5, 4).ranks == (1, 5, 5, 5, 1)
    assert TTRank.full((4, 5, 6, 3)).ranks == (1, 4, 18, 3, 1)
    for bad in [(2, 3, 1), (1, 3, 2), (1, 0, 1), (1, 2.0, 1), (1, True, 1), (1,)]:
        with pytest.raises(OptionError):
            TTRank(bad)
    assert TTErrorBound(0).eps == 0.0
    for bad in [-0.1, float("nan"), float("inf"), True, "0.1"]:
        with pytest.raises(OptionError):
            TTErrorBound(bad)
    rng = np.random.default_rng(0)
    with pytest.raises(OptionError):  # wrong number of ranks for a 3-mode tensor
        tt_svd(rng.standard_normal((2, 3, 4)), TTRank((1, 2, 1)))
    with pytest.raises(OptionError):
        tt_svd(rng.standard_normal((2, 3, 4)), 3)
    with pytest.raises(ValueError):
        tt_svd(np.array([1.0, np.nan]), TTErrorBound(0.1))


# --------------------------------------------------------------------------- tt_svd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_tt_ranks_recovered_exactly(seed):
    rng = np.random.default_rng(seed)
    dims = tuple(int(n) for n in rng.integers(3, 7, size=3))
    tensor = planted_tt(rng, dims, (1, 2, 3, 1))
    factors = tt_svd(tensor, TTRank((1, 2, 3, 1)))
    assert factors.ranks == (1, 2, 3, 1)
    assert factors.dtype == np.float64
    assert rel_err(factors.reconstruct(), tensor) < 1e-10
    # An error bound discovers the planted ranks by itself.
    found = tt_svd(tensor, TTErrorBound(1e-8))
    assert found.ranks == (1, 2, 3, 1)
    assert rel_err(found.reconstruct(), tensor) < 1e-10


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_full_rank_reproduces(seed, dtype):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(1, 5))
    shape = tuple(int(n) for n in rng.integers(1, 8, size=ndim))
    tensor = rng.standard_normal(shape).astype(dtype)
    tol = 1e-6 if dtype == np.float64 else 1e-5
    for rank in (TTRank.full(shape), TTErrorBound(0.0), TTRank.uniform(10**6, ndim)):
        factors = tt_svd(tensor, rank)
        assert factors.dtype == dtype
        assert factors.shape == shape
        assert factors.ranks == TTRank.full(shape).ranks or isinstance(rank, TTErrorBound)
        assert rel_err(factors.reconstruct(), tensor) < tol
        assert rel_err(tt_full(list(factors.cores)), tensor) < tol
        for k, core in enumerate(factors.cores):
            assert core.shape == (factors.ranks[k], shape[k], factors.ranks[k + 1])


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_error_bound_respected(eps, seed, dtype):
    rng = np.random.default_rng(seed)
    # A decaying-spectrum tensor (planted TT plus noise) so the bound actually truncates.
    tensor = planted_tt(rng, (6, 5, 7, 4), (1, 3, 4, 2, 1)) + 0.3 * rng.standard_normal((6, 5, 7, 4))
    tensor = tensor.astype(dtype)
    factors = tt_svd(tensor, TTErrorBound(eps))
    # float32 factors carry ~1e-7 relative rounding on top of the bound (documented).
    assert rel_err(factors.reconstruct(), tensor) <= eps + (0 if dtype == np.float64 else 1e-6)
    if eps >= 0.3:
        assert factors.params < tensor.size


def test_truncation_is_optimal_per_step_and_monotone():
    rng = np.random.default_rng(3)
    tensor = rng.standard_normal((5, 6, 7))
    errors = [rel_err(tt_svd(tensor, TTRank((1, r, r, 1))).reconstruct(), tensor) for r in (1, 2, 3, 4, 5)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    # d = 2: TT-SVD is the truncated SVD, i.e. Eckart-Young optimal.
    matrix = rng.standard_normal((9, 7))
    s = np.linalg.svd(matrix, compute_uv=False)
    err = np.linalg.norm(tt_svd(matrix, TTRank((1, 3, 1))).reconstruct() - matrix)
    assert err == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-10)


def test_params_and_left_orthonormal_cores():
    rng = np.random.default_rng(4)
    factors = tt_svd(rng.standard_normal((4, 6, 5, 3)), TTRank((1, 3, 4, 2, 1)))
    assert factors.ranks == (1, 3, 4, 2, 1)
    assert factors.params == sum(c.size for c in factors.cores) == 4 * 3 + 3 * 6 * 4 + 4 * 5 * 2 + 2 * 3
    for core in factors.cores[:-1]:
        q = core.reshape(-1, core.shape[-1])
        np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)


def test_determinism_byte_identical():
    rng = np.random.default_rng(5)
    tensor = rng.standard_normal((6, 7, 5, 4)).astype(np.float32)
    a = tt_svd(tensor, TTErrorBound(0.2))
    b = tt_svd(tensor.copy(), TTErrorBound(0.2))
    assert same_bytes(a.cores, b.cores)
    weight = rng.standard_normal((24, 20)).astype(np.float32)
    assert same_bytes(tt_matrix(weight, (4, 6), (4, 5), TTRank((1, 5, 1))).cores,
                      tt_matrix(weight.copy(), (4, 6), (4, 5), TTRank((1, 5, 1))).cores)
    kernel = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    assert same_bytes(tt_conv(kernel, TTRank((1, 4, 5, 1))).conv_kernels(),
                      tt_conv(kernel.copy(), TTRank((1, 4, 5, 1))).conv_kernels())
    # Sign convention: the largest-|value| entry of every left-orthonormal core column is positive.
    for core in a.cores[:-1]:
        q = core.reshape(-1, core.shape[-1])
        assert np.all(q[np.argmax(np.abs(q), axis=0), np.arange(q.shape[1])] > 0)


def test_precision_rules(monkeypatch):
    rng = np.random.default_rng(6)
    tensor = rng.standard_normal((5, 6, 7))
    assert tt_svd(tensor, TTErrorBound(0)).dtype == np.float64
    assert tt_svd(tensor.astype(np.float16), TTErrorBound(0)).dtype == np.float32
    assert tt_svd(tensor.astype(np.int32), TTErrorBound(0)).dtype == np.float32
    # Above the float64 threshold a float32 weight is decomposed in float32 (plain SVD); a
    # float64 input is still decomposed in float64.
    monkeypatch.setattr(tt_module, "FLOAT64_MAX_ELEMENTS", 10)
    f32 = tt_svd(tensor.astype(np.float32), TTErrorBound(0))
    f64 = tt_svd(tensor, TTErrorBound(0))
    assert f32.dtype == np.float32 and f64.dtype == np.float64
    assert rel_err(f32.reconstruct(), tensor) < 1e-5
    assert rel_err(f64.reconstruct(), tensor) < 1e-12


@pytest.mark.parametrize("shape", [(6, 5, 7, 4), (40, 3, 2), (3, 2, 50), (12, 9, 16)])
def test_float32_gram_path_matches_float64_svd_path(shape):
    """float32 weights are decomposed in float64 via Gram eigendecompositions (wide and tall
    unfoldings); float64 inputs via LAPACK SVD. Both must give the same truncation."""
    rng = np.random.default_rng(sum(shape))
    tensor = rng.standard_normal(shape).astype(np.float32)
    full = TTRank.full(shape).ranks
    truncated = TTRank(tuple(max(1, r // 2) for r in full))
    for rank in (truncated, TTErrorBound(0.3)):
        gram = tt_svd(tensor, rank)
        exact = tt_svd(tensor.astype(np.float64), rank)
        assert gram.ranks == exact.ranks
        assert rel_err(gram.reconstruct(), tensor) == pytest.approx(rel_err(exact.reconstruct(), tensor), rel=1e-5, abs=1e-6)
        for a, b in zip(gram.cores, exact.cores, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())  # same vectors, same signs
    assert rel_err(tt_svd(tensor, TTRank(full)).reconstruct(), tensor) < 1e-6
    planted = planted_tt(rng, shape, (1, *[min(2, r) for r in full[1:-1]], 1)).astype(np.float32)
    ranks = TTRank((1, *[min(2, r) for r in full[1:-1]], 1))
    assert rel_err(tt_svd(planted, ranks).reconstruct(), planted) < 1e-6
    # Full ranks on a rank-deficient tensor: the surplus directions must stay harmless.
    assert rel_err(tt_svd(planted, TTRank(full)).reconstruct(), planted) < 1e-6
    assert rel_err(tt_svd(planted, TTErrorBound(0)).reconstruct(), planted) < 1e-6


def test_cross_check_tensorly_tensor_train():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train

    rng = np.random.default_rng(7)
    cases = [((6, 5, 7, 4), (1, 3, 4, 2, 1)), ((8, 9, 10), (1, 4, 6, 1)), ((3, 4, 5, 6, 2), (1, 2, 5, 5, 2, 1))]
    for shape, ranks in cases:
        tensor = planted_tt(rng, shape, ranks) + 0.5 * rng.standard_normal(shape)
        for r in (ranks, (1, *[max(1, x - 1) for x in ranks[1:-1]], 1)):
            ours = rel_err(tt_svd(tensor, TTRank(r)).reconstruct(), tensor)
            theirs = rel_err(tl.tt_to_tensor(tensor_train(tensor, list(r))), tensor)
            assert ours <= theirs * (1 + 1e-6) + 1e-12


def test_cross_check_tensorly_tt_matrix():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix

    rng = np.random.default_rng(8)
    weight = rng.standard_normal((24, 30))
    out_dims, in_dims = (4, 6), (5, 6)
    for r in (3, 8, 15):
        ours = tt_matrix(weight, out_dims, in_dims, TTRank((1, r, 1)))
        # TensorLy's TT-matrix takes (in_dims..., out_dims...) for the (in, out) matrix W.T.
        tensorized = weight.T.reshape(*in_dims, *out_dims)
        theirs = tl.tt_matrix_to_tensor(tensor_train_matrix(tensorized, [1, r, 1]))
        theirs = theirs.reshape(weight.shape[1], weight.shape[0]).T
        assert rel_err(ours.reconstruct(), weight) <= rel_err(theirs, weight) * (1 + 1e-6) + 1e-12


# --------------------------------------------------------------------------- factorize_dim


def test_factorize_dim():
    assert factorize_dim(768) == (8, 8, 12)
    assert factorize_dim(3072) == (12, 16, 16)
    assert factorize_dim(4096) == (16, 16, 16)
    assert factorize_dim(64) == (8, 8)
    assert factorize_dim(769) == (769,)  # prime stays whole
    assert factorize_dim(1) == (1,)
    assert factorize_dim(768, parts=2) == (24, 32)
    assert factorize_dim(768, parts=4) == (4, 4, 6, 8)
    assert factorize_dim(7, parts=3) == (1, 1, 7)
    for n in range(1, 600):
        for parts in (None, 1, 2, 3):
            split = factorize_dim(n, parts)
            assert math.prod(split) == n
            assert list(split) == sorted(split)
            if parts is not None:
                assert len(split) == parts
    with pytest.raises(OptionError):
        factorize_dim(12, parts=0)
    with pytest.raises(ValueError):
        factorize_dim(0)


# --------------------------------------------------------------------------- tt_matrix


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tt_matrix_full_rank_and_apply(seed, dtype):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 4))
    out_dims = tuple(int(n) for n in rng.integers(1, 6, size=d))
    in_dims = tuple(int(n) for n in rng.integers(1, 6, size=d))
    weight = rng.standard_normal((math.prod(out_dims), math.prod(in_dims))).astype(dtype)
    tol = 1e-6 if dtype == np.float64 else 1e-5
    dims = tuple(o * i for o, i in zip(out_dims, in_dims, strict=True))
    factors = tt_matrix(weight, out_dims, in_dims, TTRank.full(dims))
    assert factors.dtype == dtype
    assert factors.out_dims == out_dims and factors.in_dims == in_dims
    assert factors.shape == weight.shape
    for k, core in enumerate(factors.cores):
        assert core.shape == (factors.ranks[k], out_dims[k], in_dims[k], factors.ranks[k + 1])
    assert rel_err(factors.reconstruct(), weight) < tol
    x = rng.standard_normal((7, weight.shape[1])).astype(dtype)
    assert rel_err(factors.apply(x), x @ weight.T) < tol
    assert factors.apply(x.reshape(7, 1, -1)).shape == (7, 1, weight.shape[0])


def test_tt_matrix_truncated_apply_flops_params():
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((48, 60))
    out_dims, in_dims = factorize_dim(48, 3), factorize_dim(60, 3)
    factors = tt_matrix(weight, out_dims, in_dims, TTRank((1, 4, 5, 1)))
    assert factors.ranks == (1, 4, 5, 1)
    assert factors.params == sum(c.size for c in factors.cores)
    x = rng.standard_normal((11, 60))
    np.testing.assert_allclose(factors.apply(x), x @ factors.reconstruct().T, rtol=1e-10, atol=1e-10)

    # flops(tokens) = 2 * the multiply-adds of the MatMuls apply() actually runs.
    macs, z = 0, x
    for step in factors.matmul_steps():
        assert step.perm == (0, 3, 2, 4, 1)
        z = z.reshape(step.split_shape).transpose(step.perm).reshape(step.rows_shape)
        macs += z.shape[0] * step.weight.shape[0] * step.weight.shape[1]
        z = z @ step.weight
    np.testing.assert_allclose(z.reshape(11, 48), factors.apply(x), rtol=1e-12)
    assert factors.flops(11) == 2 * macs
    assert factors.flops(3) == 3 * factors.flops(1)


def test_tt_matrix_error_bound_and_validation():
    rng = np.random.default_rng(10)
    weight = rng.standard_normal((32, 24)) @ np.diag(0.7 ** np.arange(24))
    factors = tt_matrix(weight, (4, 8), (4, 6), TTErrorBound(0.1))
    assert rel_err(factors.reconstruct(), weight) <= 0.1
    with pytest.raises(ValueError):
        tt_matrix(weight, (4, 8), (5, 5), TTErrorBound(0.1))
    with pytest.raises(ValueError):
        tt_matrix(weight, (4, 8), (24,), TTErrorBound(0.1))
    with pytest.raises(OptionError):
        tt_matrix(weight, (4, 8), (4, 6), TTRank((1, 2, 2, 1)))


# --------------------------------------------------------------------------- tt_conv


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spatial_ndim", [1, 2])
def test_tt_conv_chain_equals_conv_at_full_rank(seed, spatial_ndim):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    kernel, stride, padding, dilation, x = random_conv_case(torch, rng, spatial_ndim)
    cout, cin, spatial = *kernel.shape[:2], kernel.shape[2:]

    factors = tt_conv(kernel, TTRank.full((cin, math.prod(spatial), cout)))
    kernels = factors.conv_kernels()
    _, r1, r2, _ = factors.ranks
    ones = (1,) * spatial_ndim
    assert [k.shape for k in kernels] == [(r1, cin, *ones), (r2, r1, *spatial), (cout, r2, *ones)]
    assert all(k.dtype == np.float32 and k.flags.c_contiguous for k in kernels)
    assert rel_err(factors.reconstruct(), kernel) < 1e-5

    conv = torch.nn.functional.conv1d if spatial_ndim == 1 else torch.nn.functional.conv2d
    ref = conv(x, torch.from_numpy(kernel), stride=stride, padding=padding, dilation=dilation)
    out = conv_chain(torch, x, kernels, stride, padding, dilation)
    assert rel_err(out.numpy(), ref.numpy()) < 1e-5


def test_tt_conv_truncated_consistent_params_flops():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    kernel = rng.standard_normal((16, 12, 3, 3))
    factors = tt_conv(kernel, TTRank((1, 5, 7, 1)))
    assert factors.ranks == (1, 5, 7, 1)
    assert factors.shape == kernel.shape and factors.spatial == (3, 3)
    kernels = factors.conv_kernels()
    assert factors.params == sum(k.size for k in kernels) == sum(c.size for c in factors.cores)
    x = torch.from_numpy(rng.standard_normal((1, 12, 10, 10)))
    ref = torch.nn.functional.conv2d(x, torch.from_numpy(factors.reconstruct()), stride=2, padding=1)
    out = conv_chain(torch, x, kernels, 2, 1, 1)
    assert rel_err(out.numpy(), ref.numpy()) < 1e-12
    # 10x10 input, stride 2, pad 1 -> 5x5 output; the first 1x1 conv runs on the 100 input positions.
    expected = 2 * (100 * 12 * 5 + 25 * 7 * 5 * 9 + 25 * 16 * 7)
    assert factors.flops(25, in_spatial_size=100) == expected
    assert factors.flops(25, batch=3, in_spatial_size=100) == 3 * expected
    assert factors.flops(25) == 2 * 25 * (12 * 5 + 7 * 5 * 9 + 16 * 7)


def test_tt_conv_is_sequential_tt_svd_of_reordered_kernel():
    rng = np.random.default_rng(12)
    kernel = rng.standard_normal((10, 8, 3, 3))
    reordered = kernel.reshape(10, 8, 9).transpose(1, 2, 0)
    conv = tt_conv(kernel, TTRank((1, 4, 6, 1)))
    plain = tt_svd(reordered, TTRank((1, 4, 6, 1)))
    assert same_bytes(conv.cores, plain.cores)
    bound = tt_conv(kernel, TTErrorBound(0.3))
    assert rel_err(bound.reconstruct(), kernel) <= 0.3
    with pytest.raises(ValueError):
        tt_conv(kernel[:, :, 0, 0], TTErrorBound(0.3))  # a matrix is not a conv kernel
