"""``onnx-lowrank search`` end to end on tiny models (CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx_testing import SAMPLES

from onnx_lowrank.cli import main
from onnx_lowrank.search.plan import RankPlan


@pytest.fixture
def model_path(tmp_path, mlp_model):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp_model, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_single_budget_writes_a_plan_that_compress_applies(tmp_path, model_path):
    plan_path = tmp_path / "plan.json"
    cache = tmp_path / "cache"
    result = invoke("search", model_path, "--budget", "params=0.4", "--min-params", 0, "-o", plan_path, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    plan = RankPlan.load(plan_path)
    assert plan.method == "global" and plan.factorized()
    assert "candidate layers factorized" in result.output
    out = tmp_path / "small.onnx"
    result = invoke("compress", model_path, "--plan", plan_path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["totals"]["layers_factorized"] == len(plan.factorized())
    # Refuses to overwrite the plan without --overwrite.
    result = invoke("search", model_path, "--budget", "params=0.4", "--min-params", 0, "-o", plan_path, "--cache-dir", cache)
    assert result.exit_code == 2 and "already exists" in result.output


def test_sweep_writes_every_plan_and_model(tmp_path, model_path):
    result = invoke(
        "search", model_path, "--sweep", "0.3,0.5,0.7", "--min-params", 0, "-o", tmp_path / "plans",
        "--emit", tmp_path / "models", "--no-cache", "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [row["label"] for row in report["plans"]] == ["params-0.3", "params-0.5", "params-0.7"]
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    for row in report["plans"]:
        assert row["totals"]["params_kept"] <= row["budget"]["fraction"]
        assert RankPlan.load(row["plan_path"]).to_json() == row["plan"]
        session = ort.InferenceSession(row["model_path"], providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": x})[0].shape == (4, 10)


def test_calibrated_from_npz_and_emit(tmp_path, model_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, features=np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32))
    result = invoke(
        "search", model_path, "--method", "calibrated", "--calib", calib, "--input-map", "x=features",
        "--budget", "params=0.4", "--min-params", 0, "-o", tmp_path / "plan.json", "--emit", tmp_path / "m",
        "--no-cache", "--json", "--option", "probes=3",
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["plans"][0]
    assert row["plan"]["options"]["calibration"]["samples"] == 48
    assert row["plan"]["options"]["probes"] == 3
    assert {d["method"] for d in row["plan"]["layers"].values() if d["action"] == "factorize"} == {"svd-whitened"}
    assert (tmp_path / "m" / "mlp.calibrated.params-0.4.onnx").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "params=2x"], "--budget"),
        (["--budget", "params=0.4", "--sweep", "0.2"], "exactly one of --budget or --sweep"),
        (["--budget", "params=0.4", "--method", "nope"], "unknown search method"),
        (["--budget", "params=0.4", "--method", "calibrated"], "needs calibration data"),
        (["--budget", "params=0.4", "--option", "weighting"], "KEY=VALUE"),
        (["--budget", "params=0.4", "--option", "beta=2"], "no option 'beta'"),
        (["--budget", "latency-ms=2"], "--provider"),
        (["--budget", "params=0.001"], "cannot be met"),
        (["--budget", "params=0.4", "--provider", "nosuch"], "--provider nosuch"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_path, args, message):
    result = invoke("search", model_path, "--min-params", 0, "--no-cache", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_model_and_list_methods(tmp_path):
    result = invoke("search", tmp_path / "missing.onnx", "--budget", "params=0.5")
    assert result.exit_code == 2 and "no such file" in result.output
    result = invoke("search", "--list-methods", "--json")
    assert result.exit_code == 0
    names = {m["name"]: m for m in json.loads(result.output)["methods"]}
    assert {"energy", "global", "continuous", "calibrated"} <= set(names)
    assert names["global"]["available"]


def test_acip_method_materializes_a_sweep_from_one_learning_run(tmp_path):
    pytest.importorskip("torch")
    samples = SAMPLES
    result = CliRunner().invoke(main, [
        "search", str(samples / "digits_mlp.onnx"), "--method", "acip", "--option", "steps=40",
        "--calib", str(samples / "digits_calib.npz"), "--input-map", "input=input_flat",
        "--sweep", "0.5,0.2", "-o", str(tmp_path), "--json", "--no-cache",
    ])
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["plans"]
    kept = [p["totals"]["params_kept"] for p in plans]
    assert kept[0] <= 0.5 + 1e-9 and kept[1] <= 0.2 + 1e-9 and kept[1] < kept[0]
