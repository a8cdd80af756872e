"""Floor parsing, the metric functions, and the CLI contract (exit codes, no file on failure)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnx_lowrank.cli import main
from onnx_lowrank.errors import OptionError
from onnx_lowrank.floor.spec import Floor, measure, parse_floor, parse_floors


def test_parse_floor_values():
    assert parse_floor("top1-agreement=0.99") == Floor("top1-agreement", 0.99)
    assert parse_floor("top1_agreement=99%").value == pytest.approx(0.99)
    assert parse_floor("rel-error=0.02", output="y") == Floor("rel-error", 0.02, "y")
    assert parse_floor("accuracy-drop=0.5").allowance == 0.5
    assert parse_floor("cosine=0.995").allowance == pytest.approx(0.005)


@pytest.mark.parametrize("text", ["top1-agreement", "bogus=1", "cosine=abc", "top1-agreement=1.5", "rel-error=-1", "cosine=nan"])
def test_bad_floor_names_the_flag(text):
    with pytest.raises(OptionError, match="--floor"):
        parse_floor(text)


def test_repeated_metric_is_refused():
    with pytest.raises(OptionError, match="twice"):
        parse_floors(["cosine=0.9", "cosine=0.95"])


def test_measure_metrics():
    ref = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    test = np.array([[2.0, 1.0], [4.0, 3.0], [1.0, 0.5]])
    values = measure(ref, test, labels=np.array([0, 1, 0]))
    assert values["top1_agreement"] == pytest.approx(2 / 3)
    assert values["accuracy_drop"] == pytest.approx(100 / 3)
    assert values["rel_error"] == pytest.approx(4 / np.linalg.norm(ref))
    assert values["cosine"] < 1


def test_cli_compress_floor_writes_model_and_report(planted, tmp_path):
    model_path, data_path, _, _ = planted
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, [
        "compress", str(model_path), "-o", str(out), "--data", str(data_path), "--floor", "top1-agreement=0.98",
        "--min-params", "1024", "--report", str(report), "-q",
    ])
    assert result.exit_code == 0, result.output
    floor = json.loads(report.read_text())["floor"]
    assert out.exists() and floor["held_back"]["passed"] and floor["method"] == "floor"
    assert floor["layers"]["low"]["action"] == "factorize"


def test_cli_impossible_floor_exit_3_no_file(planted, tmp_path):
    model_path, data_path, _, _ = planted
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [
        "compress", str(model_path), "-o", str(out), "--data", str(data_path), "--floor", "rel-error=1e-12",
        "--min-params", "1024", "-q",
    ])
    assert result.exit_code == 3
    assert not out.exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "the closest:" in lines[0]


def test_cli_bad_floor_is_a_usage_error(planted, tmp_path):
    model_path, data_path, _, _ = planted
    result = CliRunner().invoke(main, [
        "compress", str(model_path), "-o", str(tmp_path / "o.onnx"), "--data", str(data_path), "--floor", "nope=1",
    ])
    assert result.exit_code == 2 and "--floor" in result.output


def test_cli_search_floor_writes_plan(planted, tmp_path):
    model_path, data_path, _, _ = planted
    plan = tmp_path / "plan.json"
    result = CliRunner().invoke(main, [
        "search", str(model_path), "--calib", str(data_path), "--floor", "top1-agreement=0.98", "--method", "greedy",
        "--min-params", "1024", "-o", str(plan), "--no-cache", "-q",
    ])
    assert result.exit_code == 0, result.output
    assert json.loads(plan.read_text())["method"] == "floor-greedy"


def test_floor_plan_replays_from_the_full_data_file(planted, tmp_path):
    """The plan records how its calibration part was cut, so compress --plan --calib DATA
    (the same file the floor search split) rebuilds the same whitened factors."""
    model_path, data_path, _, _ = planted
    direct, replay, plan = tmp_path / "direct.onnx", tmp_path / "replay.onnx", tmp_path / "plan.json"
    common = ["--floor", "top1-agreement=0.98", "--min-params", "1024", "-q"]
    result = CliRunner().invoke(main, [
        "compress", str(model_path), "-o", str(direct), "--data", str(data_path), "--save-plan", str(plan), *common,
    ])
    assert result.exit_code == 0, result.output
    recorded = json.loads(plan.read_text())["options"]["calibration"]
    assert recorded["split"]["holdout"] == 0.3 and recorded["split"]["seed"] == 0
    result = CliRunner().invoke(main, [
        "compress", str(model_path), "-o", str(replay), "--plan", str(plan), "--calib", str(data_path), "-q",
    ])
    assert result.exit_code == 0, result.output
    assert replay.read_bytes() == direct.read_bytes()
