"""The CI gate: Mann-Whitney U, tolerances, baselines, and `onnx-lowrank check`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from onnx_lowrank.cli import main
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.validate.gate import (
    METRICS,
    Baseline,
    GateMeasurement,
    Tolerance,
    compare_to_baseline,
    mann_whitney_u,
    parse_tolerance,
    save_baseline,
)


def test_mann_whitney_matches_the_textbook_normal_approximation():
    # scipy.stats.mannwhitneyu([1..5], [6..10], method="asymptotic") gives U=0, p=0.012186 (two-sided)
    u, p = mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert u == 0.0
    assert p == pytest.approx(0.0121858, rel=1e-4)
    assert mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], "less")[1] == pytest.approx(0.0060929, rel=1e-4)
    assert mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], "greater")[1] > 0.99
    assert mann_whitney_u([3, 3, 3], [3, 3, 3]) == (4.5, 1.0)  # all ties: no evidence at all


def test_mann_whitney_separates_shifted_samples_and_not_equal_ones():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.05, 100)
    same = rng.normal(1.0, 0.05, 100)
    slower = rng.normal(0.8, 0.05, 100)
    assert mann_whitney_u(slower, base, "less")[1] < 1e-10
    assert mann_whitney_u(same, base, "less")[1] > 0.01
    u_xy, _ = mann_whitney_u(slower, base)
    u_yx, _ = mann_whitney_u(base, slower)
    assert u_xy + u_yx == 100 * 100


def test_parse_tolerance():
    assert parse_tolerance("speedup:10%") == Tolerance("speedup", 0.10, True)
    assert parse_tolerance("cosine:0.001") == Tolerance("cosine", 0.001, False)
    assert parse_tolerance(" accuracy_drop:.5 ").value == 0.5
    for bad in ("speedup", "speedup:", "speedup:-1", "speedup:1e-3", "nope:1%", ":1"):
        with pytest.raises(OptionError, match="--tolerance"):
            parse_tolerance(bad)


def _measure(speedup_samples, **metrics) -> GateMeasurement:
    samples = {"speedup": tuple(speedup_samples)} if speedup_samples is not None else {}
    if speedup_samples is not None:
        metrics["speedup"] = float(np.median(speedup_samples))
    return GateMeasurement(metrics, samples, {"machine": {"cpu": "x"}, "runtime": {"provider": "cpu"}})


def _baseline(measurement: GateMeasurement) -> Baseline:
    return Baseline(measurement.metrics, measurement.samples, measurement.context)


def test_a_regression_needs_both_tolerance_and_significance():
    rng = np.random.default_rng(1)
    old = _baseline(_measure(rng.normal(2.0, 0.02, 60), cosine=0.99))
    slower = _measure(rng.normal(1.0, 0.02, 60), cosine=0.99)
    noisy = _measure([2.0, 0.5, 3.0, 0.4, 2.8, 0.6], cosine=0.99)  # median 1.3, but all over the place
    same = _measure(rng.normal(2.0, 0.02, 60), cosine=0.99)

    rows = {r.metric: r for r in compare_to_baseline(slower, old).rows}
    assert rows["speedup"].status == "regressed" and rows["speedup"].p_value < 1e-6
    assert rows["cosine"].status == "ok"
    noisy_row = compare_to_baseline(noisy, old).rows[0]
    assert noisy_row.metric == "speedup" and noisy_row.status == "noise"
    assert compare_to_baseline(same, old).passed
    assert compare_to_baseline(slower, old, tolerances={"speedup": parse_tolerance("speedup:60%")}).passed


def test_deterministic_metrics_regress_on_tolerance_alone():
    old = _baseline(_measure(None, cosine=0.999, accuracy_drop=0.2))
    worse = _measure(None, cosine=0.990, accuracy_drop=1.0)
    better = _measure(None, cosine=0.9999, accuracy_drop=-1.0)
    report = compare_to_baseline(worse, old)
    assert {r.metric for r in report.regressions} == {"cosine", "accuracy_drop"}
    assert "cosine 0.99900 -> 0.99000 (worse by more than 0.001)" in report.summary()
    statuses = {r.metric: r.status for r in compare_to_baseline(better, old).rows}
    assert statuses == {"cosine": "ok", "accuracy_drop": "improved"}
    assert "regressed" in compare_to_baseline(_measure(None, cosine=math.nan, accuracy_drop=0.2), old).text()


def test_baseline_round_trip_and_malformed_files(tmp_path):
    measurement = _measure([1.1, 1.2, 1.3, 1.25, 1.15], cosine=0.995)
    path = save_baseline(tmp_path / "base.json", measurement)
    loaded = Baseline.load(path)
    assert loaded.metrics == pytest.approx(measurement.metrics)
    assert loaded.samples["speedup"] == pytest.approx(measurement.samples["speedup"])
    assert loaded.context["machine"] == {"cpu": "x"}
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not an onnx-lowrank baseline"):
        Baseline.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        Baseline.load(tmp_path / "broken.json")
    with pytest.raises(InputError, match="--update-baseline"):
        Baseline.load(tmp_path / "missing.json")


def test_every_metric_has_a_default_tolerance():
    for name, metric in METRICS.items():
        assert metric.default.metric == name and metric.default.value > 0


def _check(*args):
    return CliRunner().invoke(main, ["check", *args])


FAST = ["--iters", "30", "--warmup", "3", "--random", "16"]


def test_check_cli_baseline_pass_and_planted_regression(models, tmp_path):
    baseline = str(tmp_path / "baseline.json")
    created = _check(models["copy"], "--original", models["original"], "--baseline", baseline, "--update-baseline", *FAST)
    assert created.exit_code == 0, created.output
    stored = json.loads(open(baseline).read())
    assert stored["format"] == "onnx-lowrank-baseline"
    assert {"platform", "cpu", "cores"} <= set(stored["context"]["machine"])
    assert stored["context"]["runtime"]["provider_used"] == "CPUExecutionProvider"
    assert stored["context"]["runtime"]["onnxruntime"]
    assert "commit" in stored["context"]
    assert len(stored["samples"]["speedup"]) == 30

    unchanged = _check(models["copy"], "--original", models["original"], "--baseline", baseline, *FAST,
                       "--tolerance", "speedup:50%")
    assert unchanged.exit_code == 0, unchanged.output
    assert "check against baseline" in unchanged.output

    # original vs a 10x+ slower twin with identical outputs: only the speedup regresses
    regressed = _check(models["slow"], "--original", models["original"], "--baseline", baseline, *FAST,
                       "--tolerance", "speedup:50%")
    assert regressed.exit_code == 1, regressed.output
    assert "regressed" in regressed.output
    assert "error: regression against" in regressed.output and "speedup" in regressed.output
    assert "cosine" not in regressed.output.split("error:")[1]


def test_check_cli_json_and_absolute_limits(models, tmp_path):
    baseline = str(tmp_path / "b.json")
    result = _check(models["negated"], "--original", models["original"], "--baseline", baseline,
                    "--update-baseline", "--no-latency", "--random", "8", "--min-cosine", "0.5", "--json")
    assert result.exit_code == 1
    assert "cosine of logits is -1 < 0.5" in result.output
    assert not (tmp_path / "b.json").exists()  # a failing run does not become the baseline


def test_check_cli_usage_errors(models, tmp_path):
    base = ["--original", models["original"], "--baseline", str(tmp_path / "none.json")]
    bad = _check(models["copy"], *base, "--tolerance", "speedup=10")
    assert bad.exit_code == 2 and "--tolerance 'speedup=10'" in bad.output
    missing = _check(models["copy"], *base, "--random", "4")
    assert missing.exit_code == 2 and "--update-baseline" in missing.output
    both = _check(models["copy"], *base, "--random", "4", "--data", models["data"], "--update-baseline")
    assert both.exit_code == 2 and "not both" in both.output
