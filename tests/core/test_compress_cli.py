"""The compress and inspect commands as a user runs them, bad input included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rel_error, run, tensor, value
from click.testing import CliRunner
from onnx import helper

from onnx_lowrank.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def _mlp(tmp_path: Path, name="mlp.onnx", hidden=96, rank=None, seed=0) -> Path:
    """Gemm-Relu-Gemm; with ``rank`` the first weight is exactly of that rank."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((hidden, 80)).astype(np.float32)
    if rank is not None:
        w1 = (rng.standard_normal((hidden, rank)) @ rng.standard_normal((rank, 80))).astype(np.float32)
    w2 = rng.standard_normal((10, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [tensor("W1", w1), tensor("b1", np.zeros(hidden, np.float32)), tensor("W2", w2), tensor("b2", np.zeros(10, np.float32))]
    model = make_model(nodes, [value("x", ["batch", 80])], [value("y", ["batch", 10])], inits)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compress_sample_model_end_to_end(tmp_path):
    out = tmp_path / "mlp50.onnx"
    report = tmp_path / "report.json"
    plan = tmp_path / "plan.json"
    result = invoke("compress", SAMPLES / "digits_mlp.onnx", "-o", out, "--keep-params", 0.5,
                    "--report", report, "--save-plan", plan)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    totals = data["totals"]
    assert totals["layer_params_after"] <= 0.5 * totals["layer_params_before"]
    assert totals["model_params_after"] < totals["model_params_before"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    # The plan re-applies to the same model and gives the same bytes.
    again = tmp_path / "again.onnx"
    assert invoke("compress", SAMPLES / "digits_mlp.onnx", "-o", again, "--plan", plan).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_output_is_deterministic(tmp_path):
    src = _mlp(tmp_path)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert invoke("compress", src, "-o", a, "--energy", 0.8).exit_code == 0
    assert invoke("compress", src, "-o", b, "--energy", 0.8).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_exactly_low_rank_layer_is_cut_to_its_rank_without_error(tmp_path):
    src = _mlp(tmp_path, rank=6, hidden=128)
    out = tmp_path / "out.onnx"
    result = invoke("compress", src, "-o", out, "--energy", 0.999999, "--min-params", 100, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["layers"]}
    assert rows["fc1"]["rank"] == 6
    x = np.random.default_rng(1).standard_normal((4, 80)).astype(np.float32)
    original, compressed = onnx.load(str(src)), onnx.load(str(out))
    assert rel_error(run(compressed, {"x": x})[0], run(original, {"x": x})[0]) < 1e-4


def test_keep_flops_and_uniform_rank(tmp_path):
    src = _mlp(tmp_path)
    out = tmp_path / "out.onnx"
    result = invoke("compress", src, "-o", out, "--keep-flops", 0.4, "--min-params", 100, "--json")
    assert result.exit_code == 0, result.output
    totals = json.loads(result.output)["totals"]
    assert totals["layer_flops_after"] <= 0.4 * totals["layer_flops_before"]
    result = invoke("compress", src, "-o", out, "--rank", 10, "--overwrite", "--min-params", 100, "--json")
    ranks = {r["name"]: r.get("rank") for r in json.loads(result.output)["layers"]}
    assert ranks == {"fc1": 10, "fc2": None}  # fc2 (10 x 96) breaks even at 9.06: rank 10 would grow it


def test_external_data_in_external_data_out(tmp_path):
    src = _mlp(tmp_path)
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    model = onnx.load(str(src))
    onnx.save(model, str(ext_dir / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    out = tmp_path / "c.onnx"
    assert invoke("compress", ext_dir / "m.onnx", "-o", out, "--rank", 8, "--min-params", 100).exit_code == 0
    assert (tmp_path / "c.onnx.data").exists()
    x = np.random.default_rng(2).standard_normal((3, 80)).astype(np.float32)
    loaded = onnx.load(str(out))
    assert run(loaded, {"x": x})[0].shape == (3, 10)


def test_inspect_lists_layers_with_break_even_and_energy(tmp_path):
    src = _mlp(tmp_path, rank=5)
    result = invoke("inspect", src, "--json", "--input-shape", "x=4x80")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["layers"]}
    assert rows["fc1"]["break_even_rank"] == 43  # largest paying rank: 43 * 176 < 96 * 80 < 44 * 176
    assert rows["fc1"]["rank_energy_99"] <= 5
    assert rows["fc1"]["flops"] == 2 * 4 * 96 * 80
    human = invoke("inspect", src)
    assert "fc1" in human.output and human.exit_code == 0


# --- bad input: one line, non-zero exit, no traceback, nothing written -----------------


@pytest.fixture
def model_path(tmp_path):
    return _mlp(tmp_path)


def _bad(tmp_path, *args, code=2):
    out = tmp_path / "never.onnx"
    result = CliRunner().invoke(main, ["compress", *[str(a) for a in args], "-o", str(out)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".onnx-lowrank-*"))  # no temporary left behind
    return result.output


def test_missing_path(tmp_path):
    assert "no such file" in _bad(tmp_path, tmp_path / "nope.onnx", "--rank", 4)


def test_not_onnx(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n" * 10)
    assert "not a valid ONNX model" in _bad(tmp_path, junk, "--rank", 4)


def test_truncated_file(tmp_path, model_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model_path.read_bytes()[:300])
    assert "error:" in _bad(tmp_path, cut, "--rank", 4)


def test_missing_external_data(tmp_path, model_path):
    ext = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(model_path)), str(ext), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    assert "external data" in _bad(tmp_path, ext, "--rank", 4)


def test_budget_that_cannot_be_met(tmp_path, model_path):
    assert "cannot be met" in _bad(tmp_path, model_path, "--keep-params", 0.001, "--min-params", 10)


def test_two_budgets_or_none(tmp_path, model_path):
    assert "exactly one" in _bad(tmp_path, model_path, "--rank", 4, "--energy", 0.9)
    assert "exactly one" in _bad(tmp_path, model_path)


def test_bad_option_values(tmp_path, model_path):
    assert "--rank" in _bad(tmp_path, model_path, "--rank", "lots")
    assert "--keep-params" in _bad(tmp_path, model_path, "--keep-params", 1.5)


def test_output_equal_to_input_is_refused(tmp_path, model_path):
    before = model_path.read_bytes()
    result = CliRunner().invoke(main, ["compress", str(model_path), "-o", str(model_path), "--rank", "4", "--overwrite"])
    assert result.exit_code == 2 and "overwrite the input" in result.output
    assert model_path.read_bytes() == before


def test_existing_output_needs_overwrite(tmp_path, model_path):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["compress", str(model_path), "-o", str(out), "--rank", "4"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"


def test_no_supported_layer_is_nothing_to_do(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    path = tmp_path / "relu.onnx"
    onnx.save(make_model(nodes, [value("x", [2, 3])], [value("y", [2, 3])]), str(path))
    output = _bad(tmp_path, path, "--rank", 4, code=0)
    assert "nothing to compress" in output


def test_bad_plan_file(tmp_path, model_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"layers": {"fc1": {"action": "factorize", "rank": -3}}}')
    assert "rank must be a positive integer" in _bad(tmp_path, model_path, "--plan", plan)
    plan.write_text("{not json")
    assert "not valid JSON" in _bad(tmp_path, model_path, "--plan", plan)
    plan.write_text('{"layers": {"fc1": {"rank": 500}}}')
    assert "exceeds its full rank" in _bad(tmp_path, model_path, "--plan", plan)


def test_input_file_never_modified(tmp_path, model_path):
    copy = tmp_path / "copy.onnx"
    shutil.copy(model_path, copy)
    assert invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--rank", 4).exit_code == 0
    assert model_path.read_bytes() == copy.read_bytes()


def test_compress_validate_reports_accuracy_and_latency(tmp_path):
    out, report = tmp_path / "v.onnx", tmp_path / "v.json"
    result = invoke(
        "compress", SAMPLES / "digits_mlp.onnx", "-o", out, "--keep-params", 0.5, "--validate",
        "--data", SAMPLES / "digits_test.npz", "--report", report, "--bench-batch", 4,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    accuracy = data["validation"]["accuracy"]
    assert accuracy["samples"] == 360 and 0.9 < accuracy["original"] <= 1.0
    assert data["validation"]["outputs"][0]["top1_agreement"] > 0.9
    assert data["latency"]["speedup"] > 0 and data["latency"]["a"]["provider"] == "CPUExecutionProvider"


def test_compress_validate_on_missing_provider_fails_before_writing(tmp_path, model_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    assert "CUDAExecutionProvider" in _bad(tmp_path, model_path, "--rank", 4, "--validate", "--provider", "cuda")


def test_fold_then_factorize_budget_counts_from_the_original_and_plan_replays(tmp_path):
    out, plan = tmp_path / "f.onnx", tmp_path / "f.json"
    result = invoke(
        "compress", SAMPLES / "digits_cnn.onnx", "-o", out, "--fold", 0.8, "--keep-params", 0.3,
        "--save-plan", plan, "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    totals = report["totals"]
    assert totals["layer_params_after"] <= 0.3 * totals["layer_params_before"] + 1
    assert totals["layer_params_before"] == 93728  # the original's supported layers, not the folded ones
    groups = json.loads(plan.read_text())["options"]["fold"]["groups"]
    assert groups["/conv2/Conv"] == {"keep": 56, "of": 64}  # ceil(0.8 * 64) = 52, rounded up to a block of 8
    again = tmp_path / "again.onnx"
    assert invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", again, "--plan", plan).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_regress_fold_then_factorize_replays_only_with_its_calibration_data(tmp_path):
    calib = ["--calib", SAMPLES / "digits_calib.npz", "--input-map", "input=input_image"]
    out, plan = tmp_path / "r.onnx", tmp_path / "r.json"
    result = invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", out, "--fold", 0.5, "--fold-method", "regress",
                    *calib, "--keep-params", 0.3, "--save-plan", plan, "--json")
    assert result.exit_code == 0, result.output
    assert {g["action"] for g in json.loads(result.output)["fold"]["groups"]} == {"regress"}
    recorded = json.loads(plan.read_text())["options"]["fold"]
    assert recorded["method"] == "regress" and recorded["groups"]["/conv2/Conv"] == {"keep": 32, "of": 64}
    again = tmp_path / "again.onnx"
    assert invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", again, "--plan", plan, *calib).exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    missing = invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", tmp_path / "x.onnx", "--plan", plan)
    assert missing.exit_code == 2 and "the plan folds with regress" in missing.output
    bare = invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", tmp_path / "y.onnx", "--fold", 0.5,
                  "--fold-method", "regress", "--keep-params", 0.3)
    assert bare.exit_code == 2 and "--fold-method regress needs --calib" in bare.output
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_inspect_lists_foldable_groups(tmp_path):
    result = invoke("inspect", SAMPLES / "digits_resnet.onnx", "--json", "--no-spectrum")
    groups = {g["name"]: g for g in json.loads(result.output)["fold"]["groups"]}
    assert groups["/block1/conv1/Conv"]["foldable"]
    assert groups["/stem/stem.0/Conv"]["reason"] == "residual_add"


def test_compress_search_global_meets_budget(tmp_path):
    out = tmp_path / "g.onnx"
    result = invoke("compress", SAMPLES / "digits_mlp.onnx", "-o", out, "--search", "global", "--budget", "params=0.3",
                    "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["plan"]["method"] == "global"
    assert report["totals"]["layer_params_after"] <= 0.3 * report["totals"]["layer_params_before"]


def test_calibrated_plan_reapplies_only_with_its_calibration_data(tmp_path):
    calib = SAMPLES / "digits_calib.npz"
    direct, replay, plan = tmp_path / "d.onnx", tmp_path / "r.onnx", tmp_path / "p.json"
    common = ["--input-map", "input=input_flat", "--calib", calib]
    result = invoke("compress", SAMPLES / "digits_mlp.onnx", "-o", direct, "--search", "calibrated",
                    "--keep-params", 0.2, "--save-plan", plan, *common)
    assert result.exit_code == 0, result.output
    methods = {d.get("method") for d in json.loads(plan.read_text())["layers"].values()}
    assert "svd-whitened" in methods
    assert invoke("compress", SAMPLES / "digits_mlp.onnx", "-o", replay, "--plan", plan, *common).exit_code == 0
    assert replay.read_bytes() == direct.read_bytes()
    assert "give the --calib data" in _bad(tmp_path, SAMPLES / "digits_mlp.onnx", "--plan", plan)


def test_search_flags_are_checked(tmp_path, model_path):
    assert "--budget goes with --search" in _bad(tmp_path, model_path, "--budget", "params=0.5")
    assert "needs calibration data" in _bad(tmp_path, model_path, "--search", "calibrated", "--keep-params", 0.5)
    assert "unknown" in _bad(tmp_path, model_path, "--search", "nonsense", "--keep-params", 0.5).lower()


def test_outputs_over_the_protobuf_limit_use_external_data(tmp_path, monkeypatch):
    import onnx_lowrank.model as model_module

    src = _mlp(tmp_path)
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT_BYTES", 2_000)  # stand-in for 2 GB
    out = tmp_path / "big.onnx"
    assert invoke("compress", src, "-o", out, "--rank", 8, "--min-params", 100).exit_code == 0
    assert (tmp_path / "big.onnx.data").exists()
    x = np.random.default_rng(3).standard_normal((2, 80)).astype(np.float32)
    assert run(onnx.load(str(out)), {"x": x})[0].shape == (2, 10)


def test_refit_lowers_the_output_error_of_a_calibrated_compression(tmp_path):
    calib = ["--calib", SAMPLES / "digits_calib.npz", "--input-map", "input=input_image"]
    plain, refit = tmp_path / "plain.onnx", tmp_path / "refit.onnx"
    base = ["compress", SAMPLES / "digits_resnet.onnx", "--search", "calibrated", "--keep-params", 0.3, *calib]
    assert invoke(*base, "-o", plain).exit_code == 0
    result = invoke(*base, "-o", refit, "--refit", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["refit"]["layers"]
    test = np.load(SAMPLES / "digits_test.npz")
    feeds = {"input": test["input_image"]}
    reference = run(onnx.load(str(SAMPLES / "digits_resnet.onnx")), feeds)[0]
    error_plain = rel_error(run(onnx.load(str(plain)), feeds)[0], reference)
    error_refit = rel_error(run(onnx.load(str(refit)), feeds)[0], reference)
    assert error_refit < 0.9 * error_plain  # measured on data the refit never saw


def test_refit_needs_calibration(tmp_path, model_path):
    assert "--refit needs calibration data" in _bad(tmp_path, model_path, "--rank", 8, "--refit")


def test_fold_with_latency_guard_records_the_fold_and_replays(tmp_path):
    out, plan = tmp_path / "g.onnx", tmp_path / "g.json"
    # Folded to 24/48/96 channels and factorized, the CNN runs ~1.6x faster: the whole-model check passes.
    result = invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", out, "--fold", 0.7, "--keep-params", 0.5,
                    "--latency-guard", "--bench-batch", 64, "--save-plan", plan, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["latency_guard"]["speedup"] >= 1.0
    assert json.loads(plan.read_text())["options"]["fold"]["groups"]["/conv2/Conv"] == {"keep": 48, "of": 64}
    again = tmp_path / "again.onnx"
    assert invoke("compress", SAMPLES / "digits_cnn.onnx", "-o", again, "--plan", plan).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_rank_multiple_rounds_every_rank_and_meets_the_budget(tmp_path):
    out, plan = tmp_path / "r.onnx", tmp_path / "r.json"
    result = invoke("compress", SAMPLES / "digits_resnet.onnx", "-o", out, "--keep-params", 0.5, "--rank-multiple", 8,
                    "--save-plan", plan, "--json")
    assert result.exit_code == 0, result.output
    totals = json.loads(result.output)["totals"]
    assert totals["layer_params_after"] <= 0.5 * totals["layer_params_before"]
    ranks = [d["rank"] for d in json.loads(plan.read_text())["layers"].values() if d["action"] == "factorize"]
    assert ranks and all(r % 8 == 0 for r in ranks)
    for flags, message in ((["--energy", 0.9], "--rank-multiple picks ranks under a budget"),
                           (["--floor", "cosine=0.9", "--data", SAMPLES / "digits_calib.npz"], "not --floor")):
        bad = invoke("compress", SAMPLES / "digits_resnet.onnx", "-o", tmp_path / "x.onnx", "--rank-multiple", 8, *flags)
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "x.onnx").exists()
