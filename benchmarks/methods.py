"""svd vs tucker vs tt vs auto on the CNN sample models: accuracy and CPU latency at equal budget.

    python benchmarks/methods.py [--fractions 0.7,0.5,0.3] [--iters 300]

For each CNN sample model and kept-parameter fraction, compresses with each method (the same
budget, `compress --method M --keep-params F`), and prints digits test accuracy, parameters
and FLOPs kept, and the onnxruntime CPU latency ratio original / compressed measured
interleaved in one process (> 1 means faster). Factorizations that are smaller but slower show
up as a ratio below 1.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import onnxruntime as ort
from digits import SAMPLES

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import load_model
from onnx_lowrank.search import BudgetRequest
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.search.error_bound import plan_with_methods
from onnx_lowrank.validate.latency import measure_pair

MODELS = ("digits_cnn", "digits_resnet")
METHODS = {"svd": ("svd",), "tucker": ("tucker",), "tt": ("tt",), "auto": ("svd", "tucker", "tt")}


def accuracy(model, inputs, labels) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": inputs})[0].argmax(1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.7,0.5,0.3")
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    data = np.load(SAMPLES / "digits_test.npz")
    inputs, labels = data["input_image"], data["labels"]
    batch = {"input": inputs[:64]}
    print(f"machine: {platform.machine()}, onnxruntime {ort.__version__}, latency batch 64, {args.iters} interleaved pairs\n")
    print("| model | keep-params | method | accuracy | params kept | FLOPs kept | CPU speedup (median, IQR) |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        model = load_model(SAMPLES / f"{name}.onnx")
        layers = find_layers(model, {"input": (64, 1, 8, 8)})
        print(f"| {name} | 1.0 | original | {accuracy(model, inputs, labels):.4f} | 100% | 100% | 1.00 |")
        for fraction in (float(f) for f in args.fractions.split(",")):
            request = BudgetRequest(fraction_budget("params", fraction, flag="--fractions"))
            for label, methods in METHODS.items():
                plan = plan_with_methods(model, layers, request, methods, min_params=4096)
                result = apply_plan(model, layers, plan)
                totals = result.totals
                timing = measure_pair(model, result.model, batch, provider="cpu", warmup=20, iters=args.iters)
                chosen = sorted({d.method for d in plan.factorized().values()})
                print(
                    f"| {name} | {fraction:.1f} | {label}{' (' + '+'.join(chosen) + ')' if label == 'auto' else ''} "
                    f"| {accuracy(result.model, inputs, labels):.4f} "
                    f"| {totals['model_params_after'] / totals['model_params_before']:.1%} "
                    f"| {totals['layer_flops_after'] / totals['layer_flops_before']:.1%} "
                    f"| {timing.speedup:.2f} ({timing.iqr[0]:.2f}-{timing.iqr[1]:.2f}) |"
                )


if __name__ == "__main__":
    main()
