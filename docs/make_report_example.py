"""Build the example HTML report shown in docs/report.png from the digits CNN sample model.

    python docs/make_report_example.py [--out /tmp/report-example]

Compresses the model at 50% of its factorizable parameters (the compress report), adds the
singular value spectra, an accuracy-versus-size sweep (compress + validate at 10 budgets),
the validation of the 50% model and an interleaved CPU latency comparison, then renders
report.html. Screenshot (as in the docs):

    chromium --headless --no-sandbox --disable-gpu --screenshot=docs/report.png \
        --window-size=1200,1600 file://$OUT/report.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnx_lowrank.cli.compress_cmd import build_report
from onnx_lowrank.compress import apply_plan
from onnx_lowrank.decompose.svd import spectrum
from onnx_lowrank.layers import find_layers, weight_matrix
from onnx_lowrank.model import load_model, save_model
from onnx_lowrank.report_html import build_html
from onnx_lowrank.search import BudgetRequest, plan_for
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.validate.accuracy import compare_models
from onnx_lowrank.validate.data import load_dataset
from onnx_lowrank.validate.latency import bench
from onnx_lowrank.validate.runtime import RuntimeOptions, input_specs

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "sample_models" / "digits_cnn.onnx"
DATA = ROOT / "sample_models" / "digits_test.npz"


def compress_to(model, layers, fraction: float, path: Path):
    plan = plan_for(model, layers, BudgetRequest(fraction_budget("params", fraction, flag="--keep-params")), min_params=1024)
    result = apply_plan(model, layers, plan)
    save_model(result.model, path, overwrite=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/report-example")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(MODEL)
    layers = find_layers(model)
    dataset = load_dataset(DATA, input_specs(MODEL))
    options = RuntimeOptions(provider="cpu")

    compressed = out / "cnn50.onnx"
    report = build_report(str(MODEL), str(compressed), compress_to(model, layers, 0.5, compressed))
    report["input"]["path"] = str(MODEL.relative_to(ROOT))  # machine-independent paths on the page
    report["output"]["path"] = compressed.name
    report["spectra"] = {
        layer.name: [round(float(v), 6) for v in spectrum(weight_matrix(model, layer)).values]
        for layer in layers if layer.supported and layer.params >= 1024
    }
    sweep = []
    for fraction in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        path = out / f"cnn_{int(fraction * 100)}.onnx"
        compress_to(model, layers, fraction, path)
        result = compare_models(MODEL, path, dataset, options=options)
        sweep.append({"kept_params": fraction, "metric": round(result.accuracy.compressed * 100, 3)})
    report["sweep"] = sweep
    report["sweep_metric"] = "test accuracy (%)"
    report["validation"] = {
        "original": MODEL.name, "compressed": compressed.name,
        **compare_models(MODEL, compressed, dataset, options=options).to_json(),
    }
    timing = bench(MODEL, compressed, (1, 8, 64), dataset.take, options=options, warmup=20, iters=200,
                   labels=("original", "50% params"))
    report["latency"] = timing.to_json()
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    page = build_html(report, title="onnx-lowrank report: digits_cnn at 50% of its factorizable parameters")
    (out / "report.html").write_text(page.html)
    print(f"wrote {out / 'report.html'} ({len(page.images)} plots)")


if __name__ == "__main__":
    main()
