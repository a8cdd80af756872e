"""`onnx-lowrank validate` and `onnx-lowrank bench` through click's CliRunner."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from onnx_lowrank.cli import main
from onnx_lowrank.validate.runtime import cuda_session_works


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_validate_identical_models_json(models):
    result = run("validate", models["original"], models["copy"], "--data", models["data"], "--json", "--batch-size", "10")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)["validation"]
    (logits,) = payload["outputs"]
    assert logits["rel_l2_error"] == 0 and logits["max_abs_error"] == 0
    assert logits["cosine"] == pytest.approx(1.0) and logits["top1_agreement"] == 1.0
    assert payload["accuracy"]["original"] == 1.0 and payload["accuracy"]["drop_points"] == 0
    assert payload["passed"] is True
    assert any("'features'" in note for note in payload["notes"])  # the auto-picked npz key is named


def test_validate_table_says_which_key_was_picked(models):
    result = run("validate", models["original"], models["copy"], "--data", models["data"])
    assert result.exit_code == 0
    assert "input 'input' <- npz key 'features'" in result.output
    assert "accuracy on logits (48 labels): original 100.00% -> compressed 100.00%" in result.output


def test_validate_thresholds_set_the_exit_code_and_suggest_passing_values(models):
    failing = run("validate", models["original"], models["negated"], "--data", models["data"],
                  "--min-cosine", "0.9", "--max-accuracy-drop", "1", "--max-rel-error", "3")
    assert failing.exit_code == 1
    message = failing.output.strip().splitlines()[-1]
    assert message.startswith("error: 2 threshold(s) not met")
    assert "--min-cosine -1 would pass" in message
    passing_drop = re.search(r"--max-accuracy-drop ([0-9.]+) would pass", message).group(1)
    retry = run("validate", models["original"], models["negated"], "--data", models["data"],
                "--min-cosine", "-1", "--max-accuracy-drop", passing_drop, "--max-rel-error", "3")
    assert retry.exit_code == 0, retry.output
    assert "thresholds: all met" in retry.output


def test_validate_random_inputs_and_report_file(models, tmp_path):
    report = tmp_path / "val.json"
    result = run("validate", models["original"], models["copy"], "--random", "12", "--seed", "3", "--report", str(report))
    assert result.exit_code == 0
    data = json.loads(report.read_text())["validation"]
    assert data["samples"] == 12 and data["accuracy"] is None
    assert data["data"]["source"] == "random(n=12, seed=3)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --data FILE.npz or --random N"),
        (["--random", "4", "--labels-key", "labels"], "need --data"),
        (["--random", "4", "--max-accuracy-drop", "1"], "--max-accuracy-drop needs labels"),
        (["--random", "4", "--min-cosine", "3"], "--min-cosine must be in"),
        (["--random", "4", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_validate_usage_errors_exit_2_with_one_line(models, args, message):
    result = run("validate", models["original"], models["copy"], *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_validate_missing_model_is_one_line(models, tmp_path):
    result = run("validate", models["original"], str(tmp_path / "nope.onnx"), "--random", "2")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nope.onnx'}: no such file"


@pytest.mark.skipif(cuda_session_works(), reason="CUDA works here, so --provider cuda does not fail")
@pytest.mark.parametrize("command", ["validate", "bench"])
def test_cuda_provider_without_cuda_is_one_clean_line(models, command):
    extra = [models["copy"], "--random", "2"] if command == "validate" else []
    result = run(command, models["original"], *extra, "--provider", "cuda")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: --provider cuda: CUDAExecutionProvider is not available")


def test_bench_single_model_percentiles(models):
    result = run("bench", models["original"], "--batch", "1,4", "--iters", "20", "--warmup", "2", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    latency = json.loads(result.stdout)["latency"]
    assert latency["runtime"]["provider_used"] == "CPUExecutionProvider"
    assert latency["runtime"]["threads"] == 1
    assert [r["batch"] for r in latency["results"]] == [1, 4]
    for row in latency["results"]:
        t = row["a"]
        assert 0 < t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
        assert t["iters"] == 20 and t["throughput_per_s"] > 0


def test_bench_pair_reports_speedup_of_the_faster_model(models):
    result = run("bench", models["slow"], models["original"], "--iters", "20", "--warmup", "2")
    assert result.exit_code == 0, result.output
    assert "speedup (IQR)" in result.output
    speedup = float(re.search(r"([0-9.]+)x \(", result.output).group(1))
    assert speedup > 1.5  # planted ~10x
    assert "provider CPUExecutionProvider" in result.output


def test_bench_with_data_and_samples(models):
    result = run("bench", models["original"], "--data", models["data"], "--batch", "3", "--iters", "5",
                 "--samples", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["latency"]["results"][0]
    assert len(row["a"]["times_ms"]) == 5 and row["a"]["batch"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "1,x"], "--batch '1,x'"),
        (["--cuda-graph"], "--cuda-graph needs --provider cuda"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--input-map", "input=x"], "--input-map needs --data"),
        (["--input-shape", "nope=1x2"], "--input-shape names unknown input"),
    ],
)
def test_bench_usage_errors(models, args, message):
    result = run("bench", models["original"], *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
