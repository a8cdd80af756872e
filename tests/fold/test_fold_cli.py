"""``onnx-lowrank fold`` as a user runs it, bad input included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from fold_helpers import SAMPLES, mlp, rel_error, run

from onnx_lowrank.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def dup_mlp(tmp_path) -> Path:
    path = tmp_path / "dup.onnx"
    onnx.save(mlp(np.random.default_rng(0), trans_b=True, distinct=4, width=16), str(path))
    return path


def test_fold_writes_a_valid_model_report_and_widths(tmp_path):
    out, report, widths = tmp_path / "cnn.onnx", tmp_path / "report.json", tmp_path / "widths.json"
    result = invoke(
        "fold", SAMPLES / "digits_cnn.onnx", "--keep", 0.7, "-o", out, "--report", report, "--save-widths", widths
    )
    assert result.exit_code == 0, result.output
    assert "folded groups" in result.output and "/conv2/Conv" in result.output and "64 -> 48" in result.output  # ceil(0.7 * 64) = 45, rounded up to a block of 8
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(report.read_text())
    assert data["totals"]["channels_after"] == 24 + 48 + 96
    assert data["widths"] == json.loads(widths.read_text())
    assert data["repair"] is True and data["method"] == "kmeans"
    # re-applying the widths (from the widths file or from the report) reproduces the bytes
    for source in (widths, report):
        again = tmp_path / f"again_{source.stem}.onnx"
        assert invoke("fold", SAMPLES / "digits_cnn.onnx", "--widths", source, "-o", again).exit_code == 0
        assert again.read_bytes() == out.read_bytes()


def test_fold_duplicates_exact_via_cli_json(tmp_path, dup_mlp):
    out = tmp_path / "out.onnx"
    result = invoke("fold", dup_mlp, "--keep", 0.25, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["groups"][0]["kept"] == 4 and data["groups"][0]["rel_error"] == 0.0
    x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    expected = run(onnx.load(str(dup_mlp)), {"x": x})[0]
    assert rel_error(run(onnx.load(str(out)), {"x": x})[0], expected) < 1e-5


def test_fold_list_text_and_json():
    result = invoke("fold", SAMPLES / "digits_resnet.onnx", "--list")
    assert result.exit_code == 0, result.output
    assert "2/7 groups foldable" in result.output
    assert "skip: residual_add" in result.output
    result = invoke("fold", SAMPLES / "digits_transformer.onnx", "--list", "--json")
    data = json.loads(result.output)
    foldable = [row["name"] for row in data["groups"] if row["foldable"]]
    assert foldable == ["/layers.0/ff1/MatMul", "/layers.1/ff1/MatMul"]


def test_magnitude_prune_and_keep_params(tmp_path):
    out = tmp_path / "pruned.onnx"
    result = invoke("fold", SAMPLES / "digits_mlp.onnx", "--keep-params", 0.4, "--magnitude-prune", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {g["action"] for g in data["groups"]} == {"prune"} and data["repair"] is False
    assert data["totals"]["layer_params_after"] <= 0.4 * data["totals"]["layer_params_before"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", 0.5], "-o/--output is required"),
        (["-o", "{out}"], "give exactly one of --keep, --keep-params, --widths"),
        (["--keep", 0.5, "--keep-params", 0.5, "-o", "{out}"], "give exactly one"),
        (["--keep", 0, "-o", "{out}"], "--keep: the fraction kept must be in (0, 1]"),
        (["--keep-params", 2, "-o", "{out}"], "--keep-params: the fraction kept must be in (0, 1]"),
        (["--keep-params", 0.00001, "-o", "{out}"], "--keep-params 1e-05: folding every group"),
        (["--widths", "{missing}", "-o", "{out}"], "no such widths file"),
        (["--widths", "{bad_json}", "-o", "{out}"], "not valid JSON"),
        (["--widths", "{wrong_width}", "-o", "{out}"], "was planned for width 100"),
        (["--keep", 0.5, "-o", "{model}"], "would overwrite the input"),
        (["--keep", 0.5, "-o", "{existing}"], "already exists (use --overwrite"),
        (["--keep", 0.5, "-o", "{tmp}/no/such/dir/out.onnx"], "does not exist"),
    ],
)
def test_bad_input_is_one_clean_line(tmp_path, dup_mlp, args, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(json.dumps({"groups": {"fc1": {"keep": 3, "of": 100}}}))
    (tmp_path / "existing.onnx").write_bytes(b"x")
    fill = {
        "out": tmp_path / "out.onnx",
        "missing": tmp_path / "missing.json",
        "bad_json": tmp_path / "bad.json",
        "wrong_width": tmp_path / "wrong.json",
        "model": dup_mlp,
        "existing": tmp_path / "existing.onnx",
        "tmp": tmp_path,
    }
    args = [str(a).format(**fill) for a in args]
    result = invoke("fold", dup_mlp, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()
    assert (tmp_path / "existing.onnx").read_bytes() == b"x"


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", None])
def test_unreadable_model_is_an_input_error(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    result = invoke("fold", path, "--keep", 0.5, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert "Traceback" not in result.output


def test_nothing_to_fold_exits_zero_without_writing(tmp_path, dup_mlp):
    out = tmp_path / "out.onnx"
    result = invoke("fold", dup_mlp, "--keep", 1.0, "-o", out)
    assert result.exit_code == 0 and "nothing to fold" in result.output
    assert not out.exists()
    # a model whose only layer feeds the graph output has no foldable group
    single = tmp_path / "single.onnx"
    model = onnx.load(str(dup_mlp))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["batch", 16]))
    del model.graph.node[1:]
    onnx.save(model, str(single))
    result = invoke("fold", single, "--keep", 0.5, "-o", out)
    assert result.exit_code == 0 and "no foldable channel group" in result.output and "graph_output" in result.output
    assert not out.exists()
