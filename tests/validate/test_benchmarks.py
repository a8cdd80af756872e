"""benchmarks/gpu_suite.py in quick CPU mode, and its refusal to time a CPU fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_lowrank.validate.runtime import cuda_session_works

ROOT = Path(__file__).resolve().parents[2]


def suite(*args, out: Path) -> subprocess.CompletedProcess:
    """Run the suite as the GPU machine does: from the checkout, the package NOT installed
    (``-S`` skips the site hooks of an editable install; the dependencies come from PYTHONPATH)."""
    dependencies = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))
    return subprocess.run(
        [sys.executable, "-S", str(ROOT / "benchmarks" / "gpu_suite.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": dependencies},
    )


def test_quick_cpu_suite_writes_json_and_markdown(tmp_path):
    done = suite("--provider", "cpu", "--quick", "--only", "digits_mlp", "big_matmul_quick",
                 "--iters", "4", "--warmup", "1", out=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["errors"] == [] and result["complete"]
    rows = [r for r in result["rows"] if r["method"] == "svd"]
    # 2 models x 2 kept fractions x 2 batch sizes x 2 repeats (no TF32 axis on the CPU)
    assert len(rows) == 16
    guarded = [r for r in result["rows"] if r["guard"] is not None]
    # Every guarded configuration is either measured twice or says why the guard refused it.
    configurations = {(r["model"], r["kept_params"], r["batch"]) for r in rows}
    measured = [(r["model"], r["kept_params"], r["batch"]) for r in guarded]
    refused = [(f["model"], f["kept_params"], f["batch"]) for f in result["guard_failures"]]
    assert sorted(set(measured) | set(refused)) == sorted(configurations)
    assert all(measured.count(c) == 2 for c in set(measured)) and not set(measured) & set(refused)
    assert all(r["guard"]["speedup"] >= 1.0 for r in guarded), "the guard accepted a model it measured slower"
    assert all(f["error"] for f in result["guard_failures"])
    assert {r["model"] for r in rows} == {"digits_mlp", "big_matmul_quick"}
    assert {r["provider_used"] for r in rows} == {"CPUExecutionProvider"}
    for row in rows:
        assert row["speedup"] > 0 and row["p50_original_ms"] > 0
        assert row["ideal_flop_speedup"] > 1  # the compressed model does fewer FLOPs
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "| big_matmul_quick | 30% | svd | 29.7% | 64 | - |" in markdown
    assert "guarded digits_mlp at 30%" in markdown  # the refusal is in the table notes
    gate = result["gate"]  # `check` as CI runs it: baseline, unchanged model, planted regression
    assert [gate[s]["exit_code"] for s in ("baseline", "unchanged", "planted")] == [0, 0, 1]
    assert gate["planted"]["regressed"] == ["speedup"] and gate["as_expected"]
    assert gate["planted"]["speedup"] < gate["unchanged"]["speedup"]


@pytest.mark.skipif(cuda_session_works(), reason="CUDA works here")
def test_suite_fails_loudly_without_cuda(tmp_path):
    done = suite("--quick", "--only", "digits_mlp", "--iters", "2", out=tmp_path)
    assert done.returncode == 2
    assert "error: --provider cuda: CUDAExecutionProvider is not available" in done.stderr
    assert not (tmp_path / "gpu_suite.json").exists()


def test_suite_out_of_time_keeps_what_it_measured_and_says_so(tmp_path):
    done = suite("--provider", "cpu", "--quick", "--only", "big_matmul_quick", "--iters", "4", "--warmup", "1",
                 "--time-budget", "0", out=tmp_path)
    assert done.returncode == 1 and "nothing was measured" in done.stderr
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["gate"]["as_expected"] and result["rows"] == []  # the gate runs first
    assert not result["complete"] and "build_big_matmul" in result["stopped_early"]
    assert "INCOMPLETE: not measured: " in (tmp_path / "gpu_suite.md").read_text()
    assert not list(tmp_path.glob(".*.partial"))


def test_suite_benches_the_minilm_export_from_its_skeleton_and_real_plans(tmp_path):
    """sample_models/minilm_skeleton.onnx (the exported graph, large weights dropped) refilled at
    random, compressed with the plans made on the real weights: what the GPU machine measures."""
    done = suite("--provider", "cpu", "--quick", "--only", "minilm_export_quick", "--no-guard", "--no-gate",
                 "--iters", "3", "--warmup", "1", out=tmp_path)
    assert done.returncode == 0, done.stderr
    all_rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    rows = [r for r in all_rows if r["method"] == "svd"]
    assert len(rows) == 8  # 2 plans x 2 batch sizes x 2 repeats
    folded = [r for r in all_rows if r["method"] == "fold"]
    assert len(folded) == 4 and {r["kept_params"] for r in folded} == {0.5}  # FFN at half width, 2 batches x 2
    assert all(1.2 < r["ideal_flop_speedup"] < 2 for r in folded)  # the FFN is about 2/3 of the MatMul FLOPs
    by_kept = {r["kept_params"]: r for r in rows}
    # the plans' ranks, not a search on the random weights: 36 MatMuls factorized, FLOPs halved or better
    assert {r["layers_factorized"] for r in rows} == {36}
    assert by_kept[0.5]["ideal_flop_speedup"] > 1.9 and by_kept[0.3]["ideal_flop_speedup"] > 3.0
    assert 0.7 < by_kept[0.5]["params_kept"] < 0.8  # the embeddings (30522 x 384) are not factorized
