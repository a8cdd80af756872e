"""The refit's closed form: planted exact answers, the error formula, and why the anchor exists."""

import numpy as np
import pytest

from onnx_lowrank.decompose.svd import truncated_svd
from onnx_lowrank.refit import Moments, output_error, refit_factors
from onnx_lowrank.search.calibrated import whitened_factors


def _moments(x, x0):
    moments = Moments.zeros(x.shape[1])
    moments.add(x, x0)
    return moments


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("anchor", ["identity", "covariance"])
def test_exactly_low_rank_target_is_recovered(alpha, anchor):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 20))
    x = rng.standard_normal((200, 20))
    factors = refit_factors(w, _moments(x, x), 3, alpha=alpha, anchor=anchor)
    assert factors.left.shape == (12, 3) and factors.right.shape == (3, 20)
    np.testing.assert_allclose(factors.reconstruct(), w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_output_error_matches_the_direct_sum():
    rng = np.random.default_rng(1)
    w, m = rng.standard_normal((6, 9)), rng.standard_normal((6, 9))
    x0 = rng.standard_normal((50, 9))
    x = x0 + 0.3 * rng.standard_normal((50, 9))
    direct = np.sum((x @ m.T - x0 @ w.T) ** 2) / np.sum((x0 @ w.T) ** 2)
    assert output_error(m, w, _moments(x, x0)) == pytest.approx(direct, rel=1e-9)


def test_refit_compensates_shifted_inputs():
    # The inputs arrive distorted by a fixed map (an earlier layer's error): the refit sees it
    # and beats factorizing W alone, on held-out rows of the same distortion.
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 24))
    distortion = np.eye(24) + 0.3 * rng.standard_normal((24, 24))
    cal, held = rng.standard_normal((400, 24)), rng.standard_normal((2000, 24))
    refit = refit_factors(w, _moments(cal @ distortion.T, cal), 12)
    held_moments = _moments(held @ distortion.T, held)
    plain = output_error(truncated_svd(w, 12).reconstruct(), w, held_moments)
    assert output_error(refit.reconstruct(), w, held_moments) < 0.5 * plain


def test_identity_anchor_without_upstream_error_is_the_whitened_svd():
    # With X = X0 the ridge solution is W itself, and the rank-r step in the metric
    # X^T X + alpha mean(diag) I is exactly the whitened SVD with damping alpha.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((10, 14))
    x = rng.standard_normal((60, 14)) * np.geomspace(4, 0.2, 14)
    moments = _moments(x, x)
    refit = refit_factors(w, moments, 5, alpha=0.1)
    whitened = whitened_factors(w, moments.g / 60, 5, damping=0.1)
    np.testing.assert_allclose(refit.reconstruct(), whitened.reconstruct(), atol=1e-5)


def test_ridge_anchor_keeps_tiny_calibration_from_overfitting():
    # n = 16 calibration rows for 64 inputs: without the anchor (alpha = 0) the fit is free
    # outside the calibration span and held-out error is worse than plain SVD; anchored, it
    # is as good as the best data-aware baseline.
    rng = np.random.default_rng(0)
    d_in, d_out, rank = 64, 48, 8
    mix = rng.standard_normal((d_in, d_in)) * np.geomspace(3, 0.1, d_in)[:, None]
    w = rng.standard_normal((d_out, d_in)) * np.geomspace(1, 0.1, d_in)
    cal = rng.standard_normal((16, d_in)) @ mix
    held = rng.standard_normal((4000, d_in)) @ mix
    cal_moments, held_moments = _moments(cal, cal), _moments(held, held)

    def held_out(factors):
        return output_error(factors.reconstruct(), w, held_moments)

    plain = held_out(truncated_svd(w, rank))
    whitened = held_out(whitened_factors(w, cal_moments.k / 16, rank))
    anchored = held_out(refit_factors(w, cal_moments, rank))
    free = held_out(refit_factors(w, cal_moments, rank, alpha=0.0))
    assert anchored <= 1.02 * min(plain, whitened)
    assert free > 1.05 * plain
    assert free > 1.2 * anchored


def test_bad_arguments_are_refused():
    w = np.ones((3, 4))
    moments = _moments(np.ones((5, 4)), np.ones((5, 4)))
    with pytest.raises(ValueError):
        refit_factors(w, moments, 4)
    with pytest.raises(ValueError):
        refit_factors(w, moments, 2, alpha=-1)
    with pytest.raises(ValueError):
        refit_factors(w, moments, 2, anchor="nope")
