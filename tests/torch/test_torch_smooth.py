"""smooth_penalty: zero where it should be, positive otherwise, differentiable; lazy torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from onnx_lowrank.torch import smooth_penalty  # noqa: E402


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return module


def test_constant_weights_have_no_difference_terms():
    model = nn.Sequential(nn.Linear(5, 4), nn.Conv2d(2, 3, 3))
    with torch.no_grad():
        model[0].weight.fill_(0.7)
        model[1].weight.fill_(-0.2)
        model[0].bias.normal_()  # 1-D: never counted
    assert smooth_penalty(model, nuclear=0).item() == 0.0
    # A constant matrix has rank 1: its nuclear norm is |c| * sqrt(m * n).
    expected = 0.7 * (4 * 5) ** 0.5 + 0.2 * (3 * 18) ** 0.5
    assert smooth_penalty(model, nuclear=1.0, first=0, second=0).item() == pytest.approx(expected, rel=1e-5)


def test_linear_ramps_are_free_for_the_second_difference_only():
    layer = nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(5.0)[:, None] + 2 * torch.arange(6.0)[None, :])
    assert smooth_penalty(layer, nuclear=0, first=0, second=1.0).item() == pytest.approx(0.0, abs=1e-9)
    # first differences: 1 along the output axis (4 x 6 pairs), 2 along the input axis (5 x 5 pairs)
    assert smooth_penalty(layer, nuclear=0, first=1.0, second=0).item() == pytest.approx(4 * 6 * 1 + 5 * 5 * 4)


def test_random_weights_are_penalized_and_conv_is_viewed_as_a_matrix():
    conv = _seeded(nn.Conv2d(3, 4, 2))
    matrix = conv.weight.detach().reshape(4, 12)
    expected = (
        1e-4 * torch.linalg.matrix_norm(matrix, ord="nuc")
        + 1e-3 * (torch.diff(matrix, dim=0).pow(2).sum() + torch.diff(matrix, dim=1).pow(2).sum())
        + 1e-3 * (torch.diff(matrix, n=2, dim=0).pow(2).sum() + torch.diff(matrix, n=2, dim=1).pow(2).sum())
    )
    value = smooth_penalty(conv)
    assert value.item() > 0
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert smooth_penalty(nn.LayerNorm(8)).item() == 0.0  # only 1-D parameters


def test_gradient_flows_and_descent_lowers_the_penalty():
    model = _seeded(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), seed=1)
    penalty = smooth_penalty(model, nuclear=1e-2, first=1e-2, second=1e-2)
    penalty.backward()
    assert model[0].weight.grad.abs().sum().item() > 0 and model[2].weight.grad.abs().sum().item() > 0
    assert model[0].bias.grad is None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    start = penalty.item()
    for _ in range(20):
        optimizer.zero_grad()
        smooth_penalty(model, nuclear=1e-2, first=1e-2, second=1e-2).backward()
        optimizer.step()
    assert smooth_penalty(model, nuclear=1e-2, first=1e-2, second=1e-2).item() < 0.5 * start


def test_the_package_and_cli_do_not_import_torch():
    code = (
        "import sys, onnx_lowrank, onnx_lowrank.compress, onnx_lowrank.cli, onnx_lowrank.cli.finetune_cmd, "
        "onnx_lowrank.validate.reference; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
