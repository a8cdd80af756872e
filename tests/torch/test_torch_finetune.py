"""Distillation fine-tuning: planted convergence, write-back, determinism, annealing, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from onnx import helper  # noqa: E402
from torch_helpers import make_model, mlp, ort_run, tensor, value  # noqa: E402

from onnx_lowrank.cli.finetune_cmd import finetune as finetune_command  # noqa: E402
from onnx_lowrank.compress import apply_plan  # noqa: E402
from onnx_lowrank.errors import InputError, OptionError, UnsupportedError  # noqa: E402
from onnx_lowrank.layers import find_layers  # noqa: E402
from onnx_lowrank.search.plan import LayerDecision, RankPlan  # noqa: E402
from onnx_lowrank.torch.finetune import FinetuneOptions, anneal_schedule, factor_pairs, finetune, write_back  # noqa: E402


def _compress(model: onnx.ModelProto, ranks: dict[str, int]) -> onnx.ModelProto:
    layers = find_layers(model)
    decisions = {name: LayerDecision("factorize", "svd", rank=rank) for name, rank in ranks.items()}
    return apply_plan(model, layers, RankPlan(decisions)).model


def _factors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if ".lowrank." in i.name}


def _perturbed(model: onnx.ModelProto, scale: float, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    noisy = {name: a + scale * rng.standard_normal(a.shape).astype(np.float32) for name, a in _factors(model).items()}
    return write_back(model, noisy)


def _without_payloads(model: onnx.ModelProto) -> bytes:
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for init in stripped.graph.initializer:
        init.ClearField("raw_data")
        init.ClearField("float_data")
    return stripped.SerializeToString()


def _inputs(n: int, features: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, features)).astype(np.float32)}


def test_planted_reachable_target_converges():
    """fc1's weight has exact rank 4 and is factorized at rank 4, then the factors are perturbed:
    the original is reachable exactly, and distillation gets there."""
    original = mlp(seed=0, rank=4)
    compressed = _perturbed(_compress(original, {"fc1": 4}), scale=0.1, seed=1)
    feeds = _inputs(256)
    start_error = np.abs(ort_run(compressed, feeds)[0] - ort_run(original, feeds)[0]).max()
    assert start_error > 0.05
    options = FinetuneOptions(epochs=150, lr=2e-2, batch_size=32, holdout=0.1)
    result = finetune(original, compressed, feeds, options=options)
    assert result.history[-1].loss < 1e-6 < result.history[0].loss
    test = _inputs(64, seed=5)
    np.testing.assert_allclose(ort_run(result.model, test)[0], ort_run(original, test)[0], atol=1e-3)
    assert result.after.rel_error < 1e-3 < result.before.rel_error
    assert result.after.agreement == 1.0


def test_write_back_changes_only_factor_values():
    original = mlp(seed=2)
    compressed = _compress(original, {"fc1": 3, "fc2": 2})
    result = finetune(original, compressed, _inputs(96), options=FinetuneOptions(epochs=2, lr=1e-2))
    assert _without_payloads(result.model) == _without_payloads(compressed)
    before = {i.name: i.raw_data for i in compressed.graph.initializer}
    after = {i.name: i.raw_data for i in result.model.graph.initializer}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == set(_factors(compressed))
    assert set(result.trained) == changed
    onnx.checker.check_model(result.model, full_check=True)


def test_write_back_keeps_float_data_storage_and_checks_shapes():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = helper.make_tensor("W.lowrank.0", onnx.TensorProto.FLOAT, [2, 3], w.reshape(-1).tolist())
    model = make_model(
        [helper.make_node("MatMul", ["x", "W.lowrank.0"], ["y"])], [value("x", ["n", 2])], [value("y", ["n", 3])], [proto]
    )
    updated = write_back(model, {"W.lowrank.0": -w})
    stored = updated.graph.initializer[0]
    assert not stored.raw_data and list(stored.float_data) == (-w).reshape(-1).tolist()
    with pytest.raises(ValueError, match="shape"):
        write_back(model, {"W.lowrank.0": np.zeros((3, 2), np.float32)})
    with pytest.raises(KeyError):
        write_back(model, {"nope": w})


def test_same_seed_gives_byte_identical_models_and_other_seeds_differ():
    original = mlp(seed=3)
    compressed = _compress(original, {"fc1": 3})
    feeds = _inputs(128, seed=2)
    options = FinetuneOptions(epochs=3, lr=5e-3, batch_size=16, seed=7)
    first = finetune(original, compressed, feeds, options=options)
    second = finetune(original, compressed, feeds, options=options)
    other = finetune(original, compressed, feeds, options=FinetuneOptions(epochs=3, lr=5e-3, batch_size=16, seed=8))
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.model.SerializeToString() != other.model.SerializeToString()
    assert [e.loss for e in first.history] == [e.loss for e in second.history]


def test_labels_add_a_task_loss_and_kl_runs():
    original = mlp(seed=4)
    compressed = _compress(original, {"fc1": 2})
    feeds = _inputs(120, seed=3)
    labels = ort_run(original, feeds)[0].argmax(1)
    result = finetune(
        original, compressed, feeds, labels, FinetuneOptions(epochs=4, lr=1e-2, loss="kl", label_weight=0.3)
    )
    assert all(e.task is not None and e.task > 0 for e in result.history)
    assert result.history[-1].loss < result.history[0].loss
    assert result.after.accuracy is not None and result.original.accuracy == 1.0
    assert result.after.rel_error < result.before.rel_error


def test_anneal_ends_at_the_compressed_structure():
    original = mlp(seed=5, hidden=24)
    compressed = _compress(original, {"fc1": 3, "fc2": 2})
    pairs = factor_pairs(original, find_layers(original), compressed)
    assert {(p.layer, p.rank) for p in pairs} == {("fc1", 3), ("fc2", 2)}
    schedule = anneal_schedule(pairs, 2.0, 3, total_steps=40)
    assert list(schedule) == [6, 13, 20]
    assert schedule[20] == {"fc1": 3, "fc2": 2} and schedule[6] == {"fc1": 5, "fc2": 3}
    result = finetune(
        original, compressed, _inputs(160, seed=4), options=FinetuneOptions(epochs=4, lr=1e-2, anneal=True, anneal_stages=3)
    )
    assert _without_payloads(result.model) == _without_payloads(compressed)
    assert result.anneal_ranks == {"fc1": (6, 3), "fc2": (4, 2)}
    assert result.history[0].ranks != result.history[-1].ranks == {"fc1": 3, "fc2": 2}
    assert result.after.rel_error < result.before.rel_error


def test_models_that_do_not_belong_together_and_nothing_to_train():
    original = mlp(seed=6)
    with pytest.raises(InputError, match="no trainable factors"):
        finetune(original, original, _inputs(32), options=FinetuneOptions(epochs=1))
    other = mlp(seed=6, n_out=4)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(other)
    renamed.graph.output[0].name = "z"
    renamed.graph.node[-1].output[0] = "z"
    with pytest.raises(InputError, match="do not belong together"):
        finetune(original, renamed, _inputs(32), options=FinetuneOptions(epochs=1))
    with pytest.raises(OptionError, match="--epochs"):
        FinetuneOptions(epochs=0)


def test_unsupported_op_fails_before_training():
    original = mlp(seed=7)
    compressed = _compress(original, {"fc1": 2})
    graph = compressed.graph
    graph.node.append(helper.make_node("TopK", ["y", "k"], ["top", "top_i"], name="topk"))
    graph.initializer.append(tensor("k", np.array([1], np.int64)))
    with pytest.raises(UnsupportedError, match="TopK"):
        finetune(original, compressed, _inputs(32), options=FinetuneOptions(epochs=1))


def _write(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_cli_finetunes_and_reports(tmp_path):
    original = mlp(seed=8)
    original_path = _write(original, tmp_path / "original.onnx")
    compressed_path = _write(_compress(original, {"fc1": 2}), tmp_path / "compressed.onnx")
    np.savez(tmp_path / "data.npz", features=_inputs(100)["x"])
    out = tmp_path / "tuned.onnx"
    args = [original_path, compressed_path, "--data", str(tmp_path / "data.npz"), "-o", str(out), "--epochs", "3"]
    result = CliRunner().invoke(finetune_command, args + ["--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output and "epoch" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["evaluated_on"] == "holdout" and report["after"]["samples"] == 10
    assert report["after"]["rel_error"] < report["before"]["rel_error"]
    assert onnx.load(str(out)).graph.node[0].name == onnx.load(compressed_path).graph.node[0].name

    again = CliRunner().invoke(finetune_command, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)
    as_json = CliRunner().invoke(finetune_command, args + ["--overwrite", "--json", "--epochs", "1"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["options"]["epochs"] == 1


def test_cli_bad_input_is_one_line(tmp_path):
    from onnx_lowrank.cli.common import LowRankGroup

    group = LowRankGroup(commands={"finetune": finetune_command})
    original = mlp(seed=9)
    original_path = _write(original, tmp_path / "original.onnx")
    compressed_path = _write(_compress(original, {"fc1": 2}), tmp_path / "compressed.onnx")
    base = ["finetune", original_path, compressed_path, "-o", str(tmp_path / "out.onnx")]
    missing = CliRunner().invoke(group, base + ["--data", str(tmp_path / "none.npz")])
    assert missing.exit_code == 2 and missing.output.strip().startswith("error:") and "none.npz" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    np.savez(tmp_path / "data.npz", x=_inputs(20)["x"])
    bad = CliRunner().invoke(group, base + ["--data", str(tmp_path / "data.npz"), "--lr", "-1"])
    assert bad.exit_code == 2 and "--lr" in bad.output
    assert not (tmp_path / "out.onnx").exists()


def test_train_all_also_updates_biases():
    original = mlp(seed=10)
    compressed = _compress(original, {"fc1": 2})
    result = finetune(original, compressed, _inputs(64), options=FinetuneOptions(epochs=2, lr=1e-2, train="all"))
    before = {i.name: i.raw_data for i in compressed.graph.initializer}
    changed = {i.name for i in result.model.graph.initializer if i.raw_data != before[i.name]}
    assert {"b1", "b2", "W2"} <= changed and any(".lowrank." in name for name in changed)
    assert _without_payloads(result.model) == _without_payloads(compressed)
