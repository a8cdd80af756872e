"""The pytest-onnx-lowrank plugin, loaded with -p from plugins/ without installing it."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
from validate_models import inputs, mlp, run_model, write

# pytester's in-process runs drop the modules a run imported; importing the gate here keeps one
# copy of onnx_lowrank.validate for every run (else a stale package attribute mixes two copies).
import onnx_lowrank.validate.gate  # noqa: F401

pytest_plugins = ["pytester"]

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "pytest-onnx-lowrank"
# Installed (as CI does), pytest loads the plugin through its pytest11 entry point, and a
# second "-p" of the same module is an error; from the source tree it needs the "-p".
INSTALLED = any(e.name == "onnx_lowrank" for e in importlib.metadata.entry_points(group="pytest11"))
LOAD = () if INSTALLED else ("-p", "pytest_onnx_lowrank.plugin")


@pytest.fixture
def project(pytester, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.setenv("PYTHONPATH", str(PLUGIN_DIR))  # for runpytest_subprocess
    x = inputs(32)
    np.savez(pytester.path / "d.npz", input=x, labels=run_model(mlp(), x).argmax(axis=1))
    write(mlp(), pytester.path / "a.onnx")
    write(mlp(), pytester.path / "b.onnx")
    write(mlp(scale=-1.0), pytester.path / "bad.onnx")
    write(mlp(slow=6), pytester.path / "slow.onnx")
    return pytester


def test_gate_fixture_passes_fails_and_writes_results(project):
    project.makepyfile(
        """
        def test_ok(onnx_lowrank_gate):
            result = onnx_lowrank_gate(original="a.onnx", compressed="b.onnx", data="d.npz",
                                       min_speedup=0.3, max_accuracy_drop=0.5, iters=20, warmup=2)
            assert result.passed and result.metrics["accuracy_drop"] == 0

        def test_accuracy_lost(onnx_lowrank_gate):
            onnx_lowrank_gate(original="a.onnx", compressed="bad.onnx", data="d.npz", max_accuracy_drop=0.5)

        def test_too_slow(onnx_lowrank_gate):
            onnx_lowrank_gate(original="a.onnx", compressed="slow.onnx", random=8, min_speedup=0.9,
                              iters=20, warmup=2)
        """
    )
    # a separate process, as a CI job would run it: the plugin found through PYTHONPATH only
    result = project.runpytest_subprocess(*LOAD, "--onnx-lowrank-results", "out/results.json")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*onnx-lowrank gate failed: accuracy drop (points) of logits is * > max_accuracy_drop=0.5; "
        "max_accuracy_drop=* would pass*",
        "*onnx-lowrank gate failed: speedup is * < min_speedup=0.9; min_speedup=* would pass*",
        "*onnx-lowrank gates*",
        "PASSED test_*::test_ok: speedup *x, cosine 1.00000, accuracy drop 0.00 points",
    ])
    assert "Traceback" not in result.stdout.str()
    saved = json.loads((project.path / "out" / "results.json").read_text())
    assert saved["format"] == "onnx-lowrank-pytest-results"
    by_test = {r["test"].split("::")[1]: r for r in saved["results"]}
    assert by_test["test_ok"]["passed"] and by_test["test_ok"]["limits"] == {"min_speedup": 0.3, "max_accuracy_drop": 0.5}
    assert not by_test["test_accuracy_lost"]["passed"] and by_test["test_accuracy_lost"]["metrics"]["accuracy_drop"] > 50
    assert by_test["test_too_slow"]["metrics"]["speedup"] < 0.9
    assert by_test["test_ok"]["context"]["runtime"]["provider_used"] == "CPUExecutionProvider"


def test_gate_fixture_with_a_baseline(project):
    project.makepyfile(
        """
        def test_gate(onnx_lowrank_gate):
            onnx_lowrank_gate(original="a.onnx", compressed="b.onnx", random=8, baseline="base.json",
                              tolerances=["speedup:60%"], iters=20, warmup=2)
        """
    )
    project.runpytest(*LOAD, "--onnx-lowrank-update-baseline").assert_outcomes(passed=1)
    assert (project.path / "base.json").exists()
    project.runpytest(*LOAD).assert_outcomes(passed=1)


def test_gate_errors_fail_the_test_in_one_line(project):
    project.makepyfile(
        """
        def test_missing(onnx_lowrank_gate):
            onnx_lowrank_gate(original="a.onnx", compressed="nope.onnx", random=4)

        def test_bad_tolerance(onnx_lowrank_gate):
            onnx_lowrank_gate(original="a.onnx", compressed="b.onnx", random=4, baseline="x.json",
                              tolerances=["speedup"])
        """
    )
    result = project.runpytest(*LOAD)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*onnx-lowrank gate could not run: nope.onnx: no such file*",
        "*onnx-lowrank gate could not run: tolerances 'speedup': expected METRIC:VALUE*",
    ])


def test_plugin_declares_its_pytest11_entry_point():
    text = (PLUGIN_DIR / "pyproject.toml").read_text()
    assert "[project.entry-points.pytest11]" in text
    assert 'onnx_lowrank = "pytest_onnx_lowrank.plugin"' in text
