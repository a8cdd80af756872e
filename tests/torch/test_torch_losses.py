"""Distillation losses with a padding mask: masked MSE and mean-pooled cosine, and --mask-input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from torch_helpers import make_model, tensor, value  # noqa: E402

from onnx_lowrank.cli.common import LowRankGroup  # noqa: E402
from onnx_lowrank.cli.finetune_cmd import finetune as finetune_command  # noqa: E402
from onnx_lowrank.compress import apply_plan  # noqa: E402
from onnx_lowrank.errors import InputError, OptionError  # noqa: E402
from onnx_lowrank.layers import find_layers  # noqa: E402
from onnx_lowrank.search.plan import LayerDecision, RankPlan  # noqa: E402
from onnx_lowrank.torch.finetune import FinetuneOptions, finetune  # noqa: E402
from onnx_lowrank.torch.training import LOSSES, distill_loss  # noqa: E402

TOKENS, FEATURES = 6, 8


def _pair(seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    teacher = torch.randn(4, TOKENS, FEATURES, generator=rng)
    student = teacher + 0.3 * torch.randn(4, TOKENS, FEATURES, generator=rng)
    mask = torch.ones(4, TOKENS, dtype=torch.bool)
    mask[:, 4:] = False  # the last two positions are padding
    return student, teacher, mask


@pytest.mark.parametrize("kind", ["mse", "mean-cosine"])
def test_masked_losses_ignore_padding_and_equal_the_plain_loss_without_any(kind):
    student, teacher, mask = _pair()
    loss = LOSSES[kind]
    masked = loss(student, teacher, 1.0, mask)
    scribbled = student.clone()
    scribbled[:, 4:] += 100.0  # what the model does at padded positions does not count
    assert loss(scribbled, teacher, 1.0, mask).item() == pytest.approx(masked.item(), rel=1e-6)
    assert loss(scribbled, teacher, 1.0, None).item() > masked.item()
    everything = torch.ones_like(mask)
    assert loss(student, teacher, 1.0, everything).item() == pytest.approx(loss(student, teacher, 1.0).item(), rel=1e-6)


def test_mean_cosine_compares_pooled_embeddings():
    student, teacher, mask = _pair()
    assert LOSSES["mean-cosine"](teacher, teacher, 1.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    # A per-position change that leaves the mean over the real positions alone costs nothing.
    shuffled = teacher.clone()
    shuffled[:, [0, 1]] = teacher[:, [1, 0]]
    assert LOSSES["mean-cosine"](shuffled, teacher, 1.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert LOSSES["mse"](shuffled, teacher, 1.0, mask).item() > 0.1
    # 2-D outputs are compared row by row: a scaled row has cosine 1.
    rows = teacher[:, 0]
    assert LOSSES["mean-cosine"](3.0 * rows, rows, 1.0, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_applies_the_mask_only_where_its_shape_fits():
    student, teacher, mask = _pair()
    pooled_s, pooled_t = student.mean(1), teacher.mean(1)  # [batch, features]: the mask does not fit
    both = distill_loss({"h": student, "p": pooled_s}, {"h": teacher, "p": pooled_t}, "mse", 1.0, mask)
    expected = (LOSSES["mse"](student, teacher, 1.0, mask) + LOSSES["mse"](pooled_s, pooled_t, 1.0)) / 2
    assert both.item() == pytest.approx(expected.item(), rel=1e-6)


def _token_model(seed: int = 0) -> onnx.ModelProto:
    """x [n, T, F] -> MatMul(F x 16) -> Relu -> MatMul(16 x F) -> times mask [n, T] (as float)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((FEATURES, 16)).astype(np.float32) / 3
    w2 = rng.standard_normal((16, FEATURES)).astype(np.float32) / 4
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["o", "m3"], ["y"]),
    ]
    return make_model(
        nodes,
        [value("x", ["n", TOKENS, FEATURES]), value("mask", ["n", TOKENS], TensorProto.INT64)],
        [value("y", ["n", TOKENS, FEATURES])],
        [tensor("w1", w1), tensor("w2", w2), tensor("axes", np.array([2], np.int64))],
    )


def _feeds(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((n, TOKENS), np.int64)
    for i, length in enumerate(rng.integers(1, TOKENS + 1, n)):
        mask[i, length:] = 0
    return {"x": rng.standard_normal((n, TOKENS, FEATURES)).astype(np.float32), "mask": mask}


def _compressed(original: onnx.ModelProto) -> onnx.ModelProto:
    decisions = {"fc1": LayerDecision("factorize", "svd", rank=2), "fc2": LayerDecision("factorize", "svd", rank=2)}
    return apply_plan(original, find_layers(original), RankPlan(decisions)).model


def test_finetune_with_mean_cosine_and_a_mask_input_learns():
    original = _token_model()
    options = FinetuneOptions(epochs=30, lr=1e-2, batch_size=16, loss="mean-cosine", mask_input="mask", holdout=0.0)
    result = finetune(original, _compressed(original), _feeds(), options=options)
    assert result.history[-1].loss < 0.5 * result.history[0].loss


@pytest.mark.parametrize("name, feeds_change, error, message", [
    ("nope", None, OptionError, "is not an input of the model"),
    ("x", None, OptionError, "must be [batch, positions]"),
    ("mask", "empty_row", InputError, "some samples have no unmasked position"),
])
def test_bad_mask_input_is_a_clear_error(name, feeds_change, error, message):
    original = _token_model()
    feeds = _feeds(16)
    if feeds_change == "empty_row":
        feeds["mask"][3] = 0
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        finetune(original, _compressed(original), feeds,
                 options=FinetuneOptions(epochs=1, loss="mean-cosine", mask_input=name))


def test_cli_mask_input_error_is_one_line(tmp_path):
    original = _token_model()
    paths = {}
    for label, model in (("original", original), ("compressed", _compressed(original))):
        paths[label] = str(tmp_path / f"{label}.onnx")
        onnx.save_model(model, paths[label])
    np.savez(tmp_path / "data.npz", **_feeds(16))
    out = tmp_path / "tuned.onnx"
    group = LowRankGroup(commands={"finetune": finetune_command})
    result = CliRunner().invoke(group, [
        "finetune", paths["original"], paths["compressed"], "--data", str(tmp_path / "data.npz"), "-o", str(out),
        "--loss", "mean-cosine", "--mask-input", "attention_mask",
    ])
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip().startswith("error: --mask-input 'attention_mask' is not an input of the model")
    assert len(result.output.strip().splitlines()) == 1
