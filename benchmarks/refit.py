"""Whitened (calibrated) factorization vs the same plus the sequential refit, on the digits models.

    python benchmarks/refit.py [--fractions 0.5,0.3,0.2] [--alpha 0.1] [--anchor identity]

For every sample model and kept-parameter fraction: the ``calibrated`` search plans the ranks
(calibration on ``sample_models/digits_calib.npz``, 512 samples), the plan's whitened factors
are applied (``svd-whitened``), then :func:`onnx_lowrank.refit.refit_model` refits them on the
same calibration data. Both models are scored on ``digits_test.npz`` (360 samples, never seen
by the calibration): test accuracy, top-1 agreement with the original and the relative L2
error of the logits. Prints a markdown table.

``alpha`` (the ridge weight, relative to the mean input energy per dimension) was chosen with
this script: 0.01 / 0.1 / 1.0 with the identity and the covariance anchor all gave the same
picture within one or two test samples; 0.1 with the identity anchor makes the refit equal
the whitened SVD (damping 0.1) wherever a layer's inputs carry no upstream error, so that it
only departs from the whitened factors by what the compensation buys.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2 shared cores: see benchmarks/search.py

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from digits import MODELS, SAMPLES  # noqa: E402

from onnx_lowrank.calibrate import load_calibration  # noqa: E402
from onnx_lowrank.compress import apply_plan  # noqa: E402
from onnx_lowrank.layers import find_layers  # noqa: E402
from onnx_lowrank.model import load_model  # noqa: E402
from onnx_lowrank.refit import DEFAULT_ALPHA, DEFAULT_ANCHOR, refit_model  # noqa: E402
from onnx_lowrank.search.budget import parse_budget  # noqa: E402
from onnx_lowrank.search.calibrated import (  # noqa: E402
    WHITENED,
    covariances_for_plan,
    plan_damping,
    whitened_decomposer,
)
from onnx_lowrank.search.engine import search_plan  # noqa: E402
from onnx_lowrank.validate.capture import capture  # noqa: E402
from onnx_lowrank.validate.data import Dataset  # noqa: E402


def logits(model, data: Dataset) -> np.ndarray:
    return capture(model, [model.graph.output[0].name], data, batch_size=128)[model.graph.output[0].name]


def scores(model, data: Dataset, reference: np.ndarray) -> tuple[float, float, float]:
    """(test accuracy, top-1 agreement with the original, relative L2 error of the logits)."""
    out = logits(model, data).astype(np.float64)
    accuracy = float(np.mean(out.argmax(1) == data.labels))
    agreement = float(np.mean(out.argmax(1) == reference.argmax(1)))
    error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    return accuracy, agreement, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.5,0.3,0.2")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--anchor", default=DEFAULT_ANCHOR)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    test = np.load(SAMPLES / "digits_test.npz")
    print(f"refit alpha={args.alpha} anchor={args.anchor}; calibration digits_calib.npz; test digits_test.npz\n")
    print("| model | kept params | whitened acc | refit acc | whitened agree | refit agree "
          "| whitened logit err | refit logit err | refit time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        key = MODELS[name]
        model = load_model(SAMPLES / f"{name}.onnx")
        layers = find_layers(model)
        calibration = load_calibration(SAMPLES / "digits_calib.npz", model, input_map={"input": key})
        data = Dataset({"input": test[key].astype(np.float32)}, test["labels"])
        reference = logits(model, data).astype(np.float64)
        accuracy = float(np.mean(reference.argmax(1) == data.labels))
        print(f"| {name} | 1.0 (original) | {accuracy:.4f} | | | | | | |")
        for fraction in fractions:
            plan = search_plan(model, layers, "calibrated", parse_budget(f"params={fraction}"), calibration=calibration)
            covariances = covariances_for_plan(model, layers, plan, calibration)
            decomposers = {WHITENED: whitened_decomposer(covariances, plan_damping(plan))}
            whitened = apply_plan(model, layers, plan, decomposers=decomposers).model
            started = time.perf_counter()
            refit, report = refit_model(model, whitened, layers, plan, calibration, alpha=args.alpha, anchor=args.anchor)
            seconds = time.perf_counter() - started
            w_acc, w_agree, w_err = scores(whitened, data, reference)
            r_acc, r_agree, r_err = scores(refit, data, reference)
            print(
                f"| {name} | {fraction} | {w_acc:.4f} | {r_acc:.4f} | {w_agree:.4f} | {r_agree:.4f} "
                f"| {w_err:.4f} | {r_err:.4f} | {seconds:.2f} s ({len(report.layers)} layers) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
