"""`onnx-lowrank report`: one self-contained HTML page, with and without matplotlib."""

from __future__ import annotations

import base64
import json
import sys

import pytest
from click.testing import CliRunner

from onnx_lowrank.cli import main
from onnx_lowrank.report_html import PLOTS_HINT, build_html, merge_reports

COMPRESS = {
    "tool": {"name": "onnx-lowrank", "version": "0.1.0"},
    "input": {"path": "model.onnx", "bytes": 4000},
    "output": {"path": "small.onnx", "bytes": 2100},
    "totals": {"model_params_before": 1000, "model_params_after": 520, "layers_factorized": 1,
               "layers_supported": 2, "layers_total": 3, "layer_flops_before": 2000, "layer_flops_after": 1040},
    "layers": [
        {"name": "fc1", "op": "Gemm", "weight_shape": [32, 16], "params_before": 512, "params_after": 192,
         "flops_before": 1024, "flops_after": 384, "rank": 4, "weight_rel_error": 0.12, "action": "factorize",
         "spectrum": [4.0, 2.0, 1.0, 0.5, 0.1]},
        {"name": "<script>alert(1)</script>", "op": "Gemm", "weight_shape": [4, 32], "params_before": 128,
         "params_after": 128, "flops_before": 256, "flops_after": 256, "action": "keep", "reason": "below_min_params"},
    ],
    "plan": {"format": "onnx-lowrank-plan"},
    "sweep": [{"kept_params": 0.3, "metric": 0.81}, {"kept_params": 0.5, "metric": 0.93}, {"kept_params": 1.0, "metric": 0.97}],
}
VALIDATION = {"validation": {"samples": 48, "outputs": [
    {"name": "logits", "shape": [4], "max_abs_error": 0.5, "rel_l2_error": 0.1, "cosine": 0.99, "cosine_min": 0.9,
     "top1_agreement": 0.97}], "accuracy": {"output": "logits", "original": 0.9, "compressed": 0.88, "drop_points": 2.0,
     "samples": 48}, "failures": [{"metric": "cosine", "flag": "--min-cosine", "output": "logits", "value": 0.99,
     "limit": 0.995, "passing": 0.99}], "thresholds": {"min_cosine": 0.995}}}
LATENCY = {"latency": {"models": ["a.onnx", "b.onnx"], "runtime": {"provider_used": "CPUExecutionProvider", "threads": 2,
           "onnxruntime": "1.31.1"}, "results": [
    {"batch": b, "speedup": 1.4, "speedup_iqr": [1.3, 1.5],
     "a": {"label": "a.onnx", "p50_ms": 2.0 * b, "p90_ms": 2.1 * b, "p99_ms": 2.5 * b, "throughput_per_s": 500.0},
     "b": {"label": "b.onnx", "p50_ms": 1.4 * b, "p90_ms": 1.5 * b, "p99_ms": 1.9 * b, "throughput_per_s": 700.0}}
    for b in (1, 8)]}}


def _report(*sections):
    merged, _ = merge_reports([COMPRESS, *sections])
    return merged


def test_html_with_plots_embeds_every_chart():
    pytest.importorskip("matplotlib")
    page = build_html(_report(VALIDATION, LATENCY))
    assert set(page.images) == {"rank_allocation", "spectra", "accuracy_vs_size", "latency"}
    for png in page.images.values():
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in page.html
    for heading in ("Compression", "Per-layer rank allocation", "Singular value spectra", "Accuracy versus size",
                    "Accuracy against the original", "Latency", "Thresholds not met"):
        assert heading in page.html
    assert "<script>" not in page.html and "&lt;script&gt;" in page.html
    assert "http://" not in page.html.replace("http://www.w3.org", "")  # self-contained: nothing fetched
    assert PLOTS_HINT not in page.html


def test_html_without_matplotlib_has_tables_and_the_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" raise ImportError
    page = build_html(_report(VALIDATION, LATENCY))
    assert page.images == {}
    assert "data:image/png" not in page.html
    assert "pip install onnx-lowrank[plots]" in page.html
    assert "<td>fc1</td>" in page.html and "1.400x" in page.html
    assert PLOTS_HINT in page.notes


def test_malformed_section_is_skipped_with_a_note():
    page = build_html({"validation": {"outputs": [{"shape": [1]}]}, **LATENCY}, plots=False)
    assert any("section 'validation' skipped" in note for note in page.notes)
    assert "Latency" in page.html


def test_report_cli_merges_files_and_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    paths = []
    for name, data in (("compress", COMPRESS), ("val", VALIDATION), ("bench", LATENCY)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", *map(str, paths), "-o", str(out), "--png", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "accuracy_vs_size.png", "latency.png", "rank_allocation.png", "spectra.png"]
    again = CliRunner().invoke(main, ["report", str(paths[0]), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_report_cli_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    source = tmp_path / "compress.json"
    source.write_text(json.dumps(COMPRESS))
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "tables only: plots need matplotlib: pip install onnx-lowrank[plots]" in result.output
    assert "<table>" in out.read_text()


def test_report_cli_bad_inputs(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "expected a JSON object" in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "no such report file" in result.output
    assert not (tmp_path / "x.html").exists()
