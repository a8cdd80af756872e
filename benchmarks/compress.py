"""Digits test accuracy of each sample model before and after `compress --keep-params F`.

    python benchmarks/compress.py [--fractions 0.5,0.3,0.2]

Prints a markdown table: accuracy before/after, parameters and Gemm/MatMul/Conv FLOPs kept,
and the compress time (SVD analysis + rewrite + checker), per model and budget.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import onnxruntime as ort
from digits import MODELS, SAMPLES

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import load_model
from onnx_lowrank.search import BudgetRequest, plan_for
from onnx_lowrank.search.budget import fraction_budget


def accuracy(model_bytes: bytes, inputs: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    return float((logits.argmax(1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.5,0.3,0.2")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    data = np.load(SAMPLES / "digits_test.npz")
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}\n")
    print("| model | keep-params | accuracy before | accuracy after | params kept | FLOPs kept | compress time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, key in MODELS.items():
        model = load_model(SAMPLES / f"{name}.onnx")
        before = accuracy(model.SerializeToString(), data[key], data["labels"])
        for fraction in fractions:
            started = time.perf_counter()
            layers = find_layers(model)
            plan = plan_for(model, layers, BudgetRequest(fraction_budget("params", fraction, flag="-")), min_params=4096)
            result = apply_plan(model, layers, plan)
            seconds = time.perf_counter() - started
            after = accuracy(result.model.SerializeToString(), data[key], data["labels"])
            totals = result.totals
            params = totals["model_params_after"] / totals["model_params_before"]
            flops = totals["layer_flops_after"] / totals["layer_flops_before"]
            print(
                f"| {name} | {fraction:.1f} | {before:.4f} | {after:.4f} | {params:.1%} | {flops:.1%} | {seconds:.3f} |"
            )


if __name__ == "__main__":
    main()
