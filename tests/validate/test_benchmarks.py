"""benchmarks/gpu_suite.py in quick CPU mode, and its refusal to time a CPU fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_lowrank.validate.runtime import cuda_session_works

ROOT = Path(__file__).resolve().parents[2]


def suite(*args, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


def test_quick_cpu_suite_writes_json_and_markdown(tmp_path):
    done = suite("--provider", "cpu", "--quick", "--only", "digits_mlp", "big_matmul_quick",
                 "--iters", "4", "--warmup", "1", out=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = result["rows"]
    # 2 models x 2 kept fractions x 2 batch sizes x 2 repeats (no TF32 axis on the CPU)
    assert len(rows) == 16
    assert {r["model"] for r in rows} == {"digits_mlp", "big_matmul_quick"}
    assert {r["provider_used"] for r in rows} == {"CPUExecutionProvider"}
    for row in rows:
        assert row["speedup"] > 0 and row["p50_original_ms"] > 0
        assert row["ideal_flop_speedup"] > 1  # the compressed model does fewer FLOPs
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "| big_matmul_quick | 30% | 64 |" in markdown


@pytest.mark.skipif(cuda_session_works(), reason="CUDA works here")
def test_suite_fails_loudly_without_cuda(tmp_path):
    done = suite("--quick", "--only", "digits_mlp", "--iters", "2", out=tmp_path)
    assert done.returncode == 2
    assert "error: --provider cuda: CUDAExecutionProvider is not available" in done.stderr
    assert not (tmp_path / "gpu_suite.json").exists()
