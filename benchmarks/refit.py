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

``--minilm`` (``--skip-digits`` to leave the digits table out) runs the same on
all-MiniLM-L6-v2 (``benchmarks/minilm.py``): calibration = the harness's 128 tokenized
sentences, score = (mean embedding cosine to the original, nearest-neighbour agreement) on its
100 evaluation sentences; plus the ``--minilm-alphas`` sweep at ``--minilm-alpha-fraction``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2 shared cores: see benchmarks/search.py

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

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


def whitened_model(model, layers, fraction: float, calibration: Dataset):
    """The calibrated search's plan at ``params=fraction`` with its whitened factors applied."""
    plan = search_plan(model, layers, "calibrated", parse_budget(f"params={fraction}"), calibration=calibration)
    covariances = covariances_for_plan(model, layers, plan, calibration)
    decomposers = {WHITENED: whitened_decomposer(covariances, plan_damping(plan))}
    return plan, apply_plan(model, layers, plan, decomposers=decomposers)


def minilm_section(fractions: list[float], alpha: float, anchor: str, alphas: list[float], alpha_fraction: float) -> None:
    from minilm import MiniLMBench

    with tempfile.TemporaryDirectory() as tmp:
        bench = MiniLMBench.build(Path(tmp))
    model, layers, calibration = bench.model, bench.layers, bench.calibration()
    print(f"\n## all-MiniLM-L6-v2: refit alpha={alpha} anchor={anchor}; calibration 128 sentences, "
          "score on 100 held-out sentences\n")
    print("Cells: mean embedding cosine to the original / nearest-neighbour agreement.\n")
    print("| kept params (layers) | whitened | whitened + refit | cosine gain | search + whiten (s) | refit time |")
    print("|---|---|---|---|---|---|")
    kept = {}
    for fraction in sorted(set(fractions) | {alpha_fraction}, reverse=True):
        started = time.perf_counter()
        plan, whitened = whitened_model(model, layers, fraction, calibration)
        searched = time.perf_counter() - started
        kept[fraction] = (plan, whitened.model)
        if fraction not in fractions:
            continue
        started = time.perf_counter()
        refit, report = refit_model(model, whitened.model, layers, plan, calibration, alpha=alpha, anchor=anchor)
        seconds = time.perf_counter() - started
        w, r = bench.metric(whitened.model), bench.metric(refit)
        share = whitened.totals["layer_params_after"] / whitened.totals["layer_params_before"]
        print(f"| {fraction} ({share:.1%}) | {w[0]:.4f} / {w[1]:.2f} | {r[0]:.4f} / {r[1]:.2f} | {r[0] - w[0]:+.4f} "
              f"| {searched:.1f} | {seconds:.1f} s ({len(report.layers)} layers) |", flush=True)
    plan, whitened = kept[alpha_fraction]
    w = bench.metric(whitened)
    print(f"\nalpha sweep at params={alpha_fraction} (whitened: {w[0]:.4f} / {w[1]:.2f})\n")
    print("| alpha | anchor | whitened + refit | cosine gain | refit time (s) |")
    print("|---|---|---|---|---|")
    for value in alphas:
        started = time.perf_counter()
        refit, _ = refit_model(model, whitened, layers, plan, calibration, alpha=value, anchor=anchor)
        seconds = time.perf_counter() - started
        r = bench.metric(refit)
        print(f"| {value} | {anchor} | {r[0]:.4f} / {r[1]:.2f} | {r[0] - w[0]:+.4f} | {seconds:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.5,0.3,0.2")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--anchor", default=DEFAULT_ANCHOR)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--minilm", action="store_true", help="also run all-MiniLM-L6-v2")
    parser.add_argument("--skip-digits", action="store_true", help="leave the digits table out")
    parser.add_argument("--minilm-alphas", default="0.01,0.1,1.0", help="alpha sweep on MiniLM")
    parser.add_argument("--minilm-alpha-fraction", type=float, default=0.3)
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.skip_digits:
        if args.minilm:
            minilm_section(fractions, args.alpha, args.anchor, [float(a) for a in args.minilm_alphas.split(",")],
                           args.minilm_alpha_fraction)
        return
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
    if args.minilm:
        minilm_section(fractions, args.alpha, args.anchor, [float(a) for a in args.minilm_alphas.split(",")],
                       args.minilm_alpha_fraction)


if __name__ == "__main__":
    main()
