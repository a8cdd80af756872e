"""A smoothness regularizer for models you train yourself: low-rank-friendly weights.

Add ``smooth_penalty(model)`` to the training loss. For every weight with two or more
dimensions, viewed as a matrix W of shape (out, in) (a conv kernel (Cout, Cin, *k) is reshaped
to (Cout, Cin * prod(k)), the layout onnx-lowrank factorizes):

- ``nuclear`` x ||W||_* : the sum of W's singular values (in the weight's own units). It pulls
  the spectrum down, so a truncated SVD keeps more of the weight.
- ``first`` x (sum of squared differences of neighbouring entries along the output axis, plus
  the same along the input axis) (weight units squared). Smooth rows and columns have their
  energy in few singular values (a smooth matrix is close to low rank).
- ``second`` x (sum of squared second differences W[i+1] - 2 W[i] + W[i-1] along both axes)
  (weight units squared): penalizes curvature but leaves linear ramps free.

The three terms are summed over layers (not averaged: a bigger layer pays more). 1-D
parameters (biases, norm scales) and scalars are skipped. The defaults (1e-4, 1e-3, 1e-3) are
a mild setting for models of ~1e5 weights trained with a cross-entropy loss of order 1; scale
them with the loss and the model size. Set a weight to 0 to drop its term.
"""

from __future__ import annotations

import torch
from torch import nn


def smooth_penalty(
    module: nn.Module, nuclear: float = 1e-4, first: float = 1e-3, second: float = 1e-3
) -> torch.Tensor:
    """The regularizer's value for every >= 2-D parameter of ``module`` (a 0-D tensor).

    Differentiable: ``loss + smooth_penalty(model)`` trains toward compressible weights.
    Parameters with ``requires_grad=False`` are still counted (their terms carry no gradient).
    """
    total: torch.Tensor | None = None
    for param in module.parameters():
        if param.dim() < 2:
            continue
        term = matrix_penalty(param.reshape(param.shape[0], -1), nuclear=nuclear, first=first, second=second)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def matrix_penalty(matrix: torch.Tensor, *, nuclear: float, first: float, second: float) -> torch.Tensor:
    """The three terms for one (out, in) matrix (see the module docstring)."""
    value = matrix.new_zeros(())
    if nuclear:
        value = value + nuclear * torch.linalg.matrix_norm(matrix, ord="nuc")
    for axis in (0, 1):
        if first and matrix.shape[axis] > 1:
            value = value + first * torch.diff(matrix, n=1, dim=axis).pow(2).sum()
        if second and matrix.shape[axis] > 2:
            value = value + second * torch.diff(matrix, n=2, dim=axis).pow(2).sum()
    return value
