"""Data-free variance repair: undo the variance that averaging neurons collapses.

Pure numpy. Merging N neurons replaces their outputs y_1..y_N by (roughly) their average,
whose variance is ``(1/N^2) sum_ij std_i std_j corr_ij`` -- smaller than the members' own
variance unless they are perfectly correlated. REPAIR (Jordan et al. 2023) rescales the merged
unit so its statistics match the members'; model folding (Wang et al. 2025, "Fold-AR") does it
without data by estimating ``corr_ij`` by the cosine similarity of the neurons' weight rows,
which is exact when the layer's input has isotropic covariance.

Where the neurons have a BatchNormalization, ``std_i`` comes from its statistics
(``|gamma_i| * sqrt(var_i / (var_i + eps))``, the std of the BN output); without one, from the
weights alone (``std_i = ||w_i||``, the output std for a unit-variance isotropic input). In
the second case the merged std is exactly the norm of the centroid row, so the repair makes the
centroid row's norm equal to the mean norm of its cluster's rows.
"""

from __future__ import annotations

import numpy as np

# Below this fraction of the target std the merged unit is treated as dead: no rescale (a
# huge factor would only amplify noise).
_MIN_MERGED_FRACTION = 1e-6


def merged_std(directions: np.ndarray, stds: np.ndarray) -> float:
    """Estimated std of the mean of units with ``stds`` whose correlation is their rows' cosine.

    ``directions`` (N, d): each unit's weight row (any scale); ``stds`` (N,): each unit's own
    output std. Rows of zero norm count as uncorrelated with everything.
    """
    directions = np.asarray(directions, dtype=np.float64)
    stds = np.asarray(stds, dtype=np.float64)
    norms = np.linalg.norm(directions, axis=1)
    unit = np.divide(directions, norms[:, None], out=np.zeros_like(directions), where=norms[:, None] > 0)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, 1.0)
    variance = float(stds @ cosine @ stds) / stds.size**2
    return float(np.sqrt(max(variance, 0.0)))


def target_std(stds: np.ndarray) -> float:
    """The std a merged unit should have: the mean of its members' stds."""
    return float(np.mean(np.asarray(stds, dtype=np.float64)))


def repair_factor(directions: np.ndarray, stds: np.ndarray) -> float:
    """Factor that brings the merged unit's std from :func:`merged_std` to :func:`target_std`.

    1.0 for a single unit, for exact duplicates, and for dead (zero-variance) clusters.
    """
    target = target_std(stds)
    merged = merged_std(directions, stds)
    if target <= 0.0 or merged <= _MIN_MERGED_FRACTION * target:
        return 1.0
    return target / merged
