"""Model folding vs magnitude pruning vs SVD (and fold + SVD) on the digits sample models.

    python benchmarks/fold.py [--keeps 0.9,0.7,0.5,0.3] [--models digits_mlp,digits_cnn] [--repeats 300]

Prints markdown tables (paste into benchmarks/RESULTS.md):

1. Per neuron budget ``keep`` (every foldable group keeps ceil(keep x width) channels): digits
   test accuracy of fold without repair, fold with repair, magnitude (L1) pruning at the same
   widths, ``--method regress`` (data-aware: fitted on ``digits_calib.npz``), data-free SVD (``compress --keep-params``) tuned to the same *model* parameter count,
   and fold + SVD at that count (fold to a wider keep, then SVD down to the count; the split is
   picked on the calibration split ``digits_calib.npz``, never on the test set).
2. At 30% of the model's parameters: fold + repair with the model-wide budget allocation
   (``--keep-params``), magnitude pruning with the same allocation, SVD alone, fold + SVD.
3. onnxruntime CPU latency at equal parameters (fold + repair vs SVD at the ``keep`` 0.5 count),
   timed interleaved in one process; ratio > 1 means the folded model is faster.

With ``--minilm`` (``--skip-digits`` to leave the digits tables out), the same comparison on
all-MiniLM-L6-v2 (``benchmarks/minilm.py``): the foldable groups ``inspect_groups`` finds and
why the others are left alone, then per ``keep`` the (mean embedding cosine to the original,
nearest-neighbour agreement) of fold, fold + repair, magnitude pruning, ``--method regress``
(fitted on the 128 calibration sentences, padding masked), SVD alone at the same
model parameter count (within 1%), fold + SVD (fold keep picked on the 128 calibration
sentences), and the interleaved CPU latency of fold + repair vs SVD at that count.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from digits import MODELS, SAMPLES

from onnx_lowrank.compress import apply_plan, count_params
from onnx_lowrank.errors import BudgetError
from onnx_lowrank.fold import fold_model, inspect_groups
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import load_model
from onnx_lowrank.search import BudgetRequest, plan_for
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.validate.data import Dataset
from onnx_lowrank.validate.latency import measure_interleaved, measure_pair
from onnx_lowrank.validate.runtime import RuntimeOptions, create_session

SPLITS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)  # fold keeps tried before SVD in fold + SVD
MIN_PARAMS = 4096  # compress's default --min-params


def accuracy(model: onnx.ModelProto, data) -> float:
    inputs, labels = data
    (logits,) = create_session(model, RuntimeOptions(threads=2)).run({"input": inputs}).values()
    return float((logits.argmax(1) == labels).mean())


def svd(model: onnx.ModelProto, fraction: float) -> onnx.ModelProto | None:
    """``compress --keep-params fraction`` through the library; None when nothing is factorized."""
    layers = find_layers(model)
    plan = plan_for(model, layers, BudgetRequest(fraction_budget("params", fraction, flag="x")), min_params=MIN_PARAMS)
    if not plan.factorized():
        return None
    return apply_plan(model, layers, plan).model


def svd_to_params(model: onnx.ModelProto, target: int) -> onnx.ModelProto | None:
    """The SVD-compressed model with the most parameters not above ``target`` (bisection on the
    budget fraction); None when no budget gets there."""
    if count_params(model) <= target:
        return model
    best, low, high = None, 0.0, 1.0
    for _ in range(11):  # budget resolution 1/2048
        middle = (low + high) / 2
        candidate = svd(model, middle) if middle > 0 else None
        if candidate is not None and count_params(candidate) <= target:
            best, low = candidate, middle
        else:
            high = middle
    return best


def fold_to_params(model: onnx.ModelProto, target: int, **kw) -> onnx.ModelProto | None:
    """Fold with the model-wide budget allocation, bisected to at most ``target`` model parameters."""
    best, low, high = None, 0.0, 1.0
    for _ in range(11):  # budget resolution 1/2048
        middle = (low + high) / 2
        try:
            candidate, _ = fold_model(model, keep_params=middle, **kw) if middle > 0 else (None, None)
        except BudgetError:
            candidate = None
        if candidate is not None and count_params(candidate) <= target:
            best, low = candidate, middle
        else:
            high = middle
    return best


def fold_then_svd(model, target: int, calib, *, above: float) -> tuple[onnx.ModelProto | None, float | None]:
    """Fold to a keep in SPLITS (above ``above``), then SVD down to ``target`` params; the split
    with the best calibration accuracy wins."""
    best, best_split, best_score = None, None, -1.0
    for split in SPLITS:
        if split <= above:
            continue
        folded, _ = fold_model(model, keep=split)
        candidate = svd_to_params(folded, target)
        if candidate is None:
            continue
        score = accuracy(candidate, calib)
        if score > best_score:
            best, best_split, best_score = candidate, split, score
    return best, best_split


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def accuracy_table(names, keeps, tests, calibs) -> dict:
    print("| model | keep neurons | model params kept | fold | fold + repair | magnitude prune | regress (calib) "
          "| SVD (same params) | fold + SVD (fold keep) |")
    print("|---|---|---|---|---|---|---|---|---|")
    at_half = {}
    for name in names:
        model = load_model(SAMPLES / f"{name}.onnx")
        total = count_params(model)
        print(f"| {name} | 1.0 (original) | 100% | {accuracy(model, tests[name]):.4f} | | | | | |")
        calibration = Dataset({"input": calibs[name][0]}, source="digits_calib.npz")
        for keep in keeps:
            plain, _ = fold_model(model, keep=keep, repair=False)
            repaired, _ = fold_model(model, keep=keep, repair=True)
            pruned, _ = fold_model(model, keep=keep, method="magnitude")
            regressed, _ = fold_model(model, keep=keep, method="regress", calibration=calibration)
            target = count_params(repaired)
            factorized = svd_to_params(model, target)
            combined, split = fold_then_svd(model, target, calibs[name], above=keep)
            if keep == 0.5:
                at_half[name] = (model, repaired, factorized, target / total)
            combo = f"{fmt(accuracy(combined, tests[name]))} ({split})" if combined is not None else "n/a"
            svd_text = fmt(accuracy(factorized, tests[name])) if factorized is not None else "n/a"
            print(
                f"| {name} | {keep} | {target / total:.1%} | {accuracy(plain, tests[name]):.4f} "
                f"| {accuracy(repaired, tests[name]):.4f} | {accuracy(pruned, tests[name]):.4f} "
                f"| {accuracy(regressed, tests[name]):.4f} | {svd_text} | {combo} |"
            )
    return at_half


def params_table(names, fraction, tests, calibs) -> None:
    print(f"\n| model | model params kept (target {fraction:.0%}) | fold + repair (budget) | magnitude (budget) "
          "| SVD | fold + SVD (fold keep) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        model = load_model(SAMPLES / f"{name}.onnx")
        target = int(fraction * count_params(model))
        folded = fold_to_params(model, target)
        pruned = fold_to_params(model, target, method="magnitude")
        factorized = svd_to_params(model, target)
        combined, split = fold_then_svd(model, target, calibs[name], above=0.0)
        kept = [count_params(m) / count_params(model) for m in (folded, factorized, combined) if m is not None]
        cells = [fmt(accuracy(m, tests[name])) if m is not None else "n/a (cannot reach)" for m in (folded, pruned, factorized)]
        combo = f"{fmt(accuracy(combined, tests[name]))} ({split})" if combined is not None else "n/a"
        print(f"| {name} | {min(kept):.1%}-{max(kept):.1%} | {' | '.join(cells)} | {combo} |")


def interleaved(models: dict[str, onnx.ModelProto], feed: np.ndarray, repeats: int) -> dict[str, float]:
    """Median latency (us) of each model, run in turn so that machine noise hits all alike."""
    timings = measure_interleaved(
        list(models.values()), {"input": feed}, options=RuntimeOptions(threads=1), warmup=10, iters=repeats,
        labels=list(models),
    )
    return {timing.label: timing.p50 * 1e3 for timing in timings}


def latency_table(at_half: dict, tests, repeats: int) -> None:
    print("\n| model | params kept | batch | original (us) | fold + repair (us) | SVD (us) | SVD / fold |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, folded, factorized, kept) in at_half.items():
        if factorized is None:
            continue
        for batch in (1, 64):
            feed = tests[name][0][:batch]
            result = interleaved({"original": model, "fold": folded, "svd": factorized}, feed, repeats)
            print(
                f"| {name} | {kept:.1%} | {batch} | {result['original']:.1f} | {result['fold']:.1f} "
                f"| {result['svd']:.1f} | {result['svd'] / result['fold']:.2f}x |"
            )


# --- all-MiniLM-L6-v2 ------------------------------------------------------------------------

MINILM_SPLITS = (0.9, 0.7, 0.5)  # fold keeps tried before SVD in fold + SVD (fewer: each fold is ~9 s)


def plan_params(model: onnx.ModelProto, layers, plan) -> int:
    """Model parameters after ``plan`` (each factorized layer: rank x (in + out) weight values)."""
    by_name = {layer.name: layer for layer in layers}
    factorized = plan.factorized()
    return (count_params(model) - sum(by_name[name].params for name in factorized)
            + sum(decision.predicted["params"] for decision in factorized.values()))


def svd_to_params_fast(model: onnx.ModelProto, target: int) -> onnx.ModelProto | None:
    """:func:`svd_to_params`, bisecting on the plan's parameter count (plan_for is ~0.6 s on
    MiniLM, apply_plan ~2 s) and applying only the chosen plan."""
    if count_params(model) <= target:
        return model
    layers = find_layers(model)
    best, low, high = None, 0.0, 1.0
    for _ in range(14):  # budget resolution 1/16384
        middle = (low + high) / 2
        plan = plan_for(model, layers, BudgetRequest(fraction_budget("params", middle, flag="-")), min_params=MIN_PARAMS)
        if plan.factorized() and plan_params(model, layers, plan) <= target:
            best, low = plan, middle
        else:
            high = middle
    return None if best is None else apply_plan(model, layers, best).model


def minilm_groups(bench) -> None:
    listing = inspect_groups(bench.model, layers=bench.layers)
    totals = listing["totals"]
    print(f"MiniLM fold groups: {totals['groups']} groups, {totals['foldable_groups']} foldable "
          f"({totals['foldable_channels']} channels, {totals['foldable_layer_params']:,} layer params "
          f"of {count_params(bench.model):,} model params)\n")
    print("| group (layer 0; same in layers 1-5) | width | foldable | path -> consumer, or reason |")
    print("|---|---|---|---|")
    for row in listing["groups"]:
        if "layer.0/" not in row["name"]:
            continue
        name = row["name"].removeprefix("/inner/encoder/layer.0/")
        if row["foldable"]:
            detail = " -> ".join(row["path"]) + " -> " + ", ".join(c.rsplit("/", 3)[-3] for c in row["consumers"])
        else:
            detail = f"{row['reason']}: {row['detail']}"
        print(f"| {name} | {row['width']} | {row['foldable']} | {detail} |")
    print()


def minilm_section(keeps: list[float], iters: int) -> None:
    from minilm import MiniLMBench

    with tempfile.TemporaryDirectory() as tmp:
        bench = MiniLMBench.build(Path(tmp))
    calib = dataclasses.replace(bench, evaluation_text=bench.calibration_text, _reference=None)
    model, total = bench.model, count_params(bench.model)
    minilm_groups(bench)
    folds: dict[tuple, onnx.ModelProto] = {}

    def fold(keep: float, **kw) -> onnx.ModelProto:
        key = (keep, *sorted(kw.items()))
        if key not in folds:
            folds[key] = fold_model(model, keep=keep, **kw)[0]
        return folds[key]

    def cell(candidate) -> str:
        if candidate is None:
            return "n/a"
        cosine, agree = bench.metric(candidate)
        return f"{cosine:.4f} / {agree:.2f}"

    print("Cells: mean cosine of the 100 evaluation sentences' embeddings to the original's / "
          "nearest-neighbour agreement.\n")
    calibration = bench.calibration()
    print("| keep neurons | model params kept | fold | fold + repair | magnitude prune | regress (calib) "
          "| SVD (same params) | fold + SVD (fold keep) | fold / SVD params | fold build (s) | regress build (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| 1.0 (original) | 100% ({total:,}) | {cell(model)} | | | | | | | | |", flush=True)
    pairs = {}
    for keep in keeps:
        started = time.perf_counter()
        repaired = fold(keep, repair=True)
        seconds = time.perf_counter() - started
        plain = fold(keep, repair=False)
        pruned = fold(keep, method="magnitude", repair=True)
        started = time.perf_counter()
        regressed = fold_model(model, keep=keep, method="regress", calibration=calibration,
                               mask_input="attention_mask")[0]
        regress_seconds = time.perf_counter() - started
        target = count_params(repaired)
        factorized = svd_to_params_fast(model, target)
        best, best_split, best_score = None, None, -1.0
        for split in MINILM_SPLITS:
            if split <= keep:
                continue
            candidate = svd_to_params_fast(fold(split, repair=True), target)
            score = calib.metric(candidate)[0] if candidate is not None else -1.0
            if score > best_score:
                best, best_split, best_score = candidate, split, score
        pairs[keep] = (repaired, factorized, target / total)
        combo = f"{cell(best)} ({best_split})" if best is not None else "n/a"
        ratio = f"{target / count_params(factorized):.4f}" if factorized is not None else "n/a"
        print(f"| {keep} | {target / total:.1%} | {cell(plain)} | {cell(repaired)} | {cell(pruned)} "
              f"| {cell(regressed)} | {cell(factorized)} | {combo} | {ratio} | {seconds:.1f} | {regress_seconds:.1f} |",
              flush=True)

    feeds = bench.encode(bench.evaluation_text[:8])
    print(f"\nonnxruntime CPU, batch 8 x {feeds['input_ids'].shape[1]} tokens, interleaved, warmup 10, {iters} iters "
          "(p50; ratio > 1: the folded model is faster)\n")
    print("| keep neurons | model params kept | original (ms) | fold + repair (ms) | SVD same params (ms) | SVD / fold |")
    print("|---|---|---|---|---|---|")
    for keep, (folded, factorized, kept) in pairs.items():
        if factorized is None:
            continue
        timing = measure_pair(folded, factorized, feeds, provider="cpu", warmup=10, iters=iters,
                              labels=("fold", "svd"))
        base = measure_pair(model, folded, feeds, provider="cpu", warmup=10, iters=iters, labels=("original", "fold"))
        print(f"| {keep} | {kept:.1%} | {base.a.p50:.2f} | {timing.a.p50:.2f} | {timing.b.p50:.2f} "
              f"| {timing.b.p50 / timing.a.p50:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--params", type=float, default=0.3, help="model-params fraction of the second table")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--minilm", action="store_true", help="also run the all-MiniLM-L6-v2 tables")
    parser.add_argument("--skip-digits", action="store_true", help="leave the digits tables out")
    parser.add_argument("--minilm-iters", type=int, default=50, help="timed runs per model (MiniLM latency)")
    args = parser.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    if args.skip_digits:
        print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, seed 0\n")
        if args.minilm:
            minilm_section(keeps, args.minilm_iters)
        return
    names = args.models.split(",")
    test, calib = np.load(SAMPLES / "digits_test.npz"), np.load(SAMPLES / "digits_calib.npz")
    tests = {name: (test[MODELS[name]], test["labels"]) for name in names}
    calibs = {name: (calib[MODELS[name]], calib["labels"]) for name in names}
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, seed 0\n")
    at_half = accuracy_table(names, keeps, tests, calibs)
    params_table(names, args.params, tests, calibs)
    latency_table(at_half, tests, args.repeats)
    if args.minilm:
        print()
        minilm_section(keeps, args.minilm_iters)


if __name__ == "__main__":
    main()
