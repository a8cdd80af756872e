"""Learning on the exported graph: distillation fine-tuning, ACIP ranking, smooth training.

    python benchmarks/learn.py [--sections a,b,c] [--threads 1]

Prints three markdown tables (digits test accuracy, 360 samples: one sample = 0.28 points):

(a) ``finetune`` with 1,000 unlabeled inputs (the digits training split of build.py, inputs
    only) after data-free energy compression: accuracy original / compressed / fine-tuned, the
    share of the lost accuracy recovered, and the time (interpreter check + teacher run +
    training + write-back), with the CLI's defaults (10 epochs, lr 1e-3, batch 64, MSE).
(b) ACIP's learned ranking against the energy allocation at 0.7 / 0.5 / 0.3 / 0.2 of the
    Gemm/MatMul/Conv parameters kept: ONE learning run per model serves the four sizes.
(c) the smooth-trained MLP/CNN (``build.py --smooth``) against the plain ones after data-free
    energy compression, no fine-tuning.

``--minilm`` (``--skip-digits`` leaves (a)-(c) out) fine-tunes all-MiniLM-L6-v2
(``benchmarks/minilm.py``) after data-free energy compression at ``--minilm-fraction`` on the
unlabeled sentences beyond the 100 evaluation ones (the 128 calibration ones and up to 400
more: 357 in all with Python 3.11's pydoc text), with ``--loss mean-cosine --mask-input
attention_mask``, batch 32 and no holdout (the evaluation sentences are held out already):
(mean embedding cosine to the original, nearest-neighbour agreement) before and after, the
share of the lost cosine recovered, and the time. With ``--minilm-acip-steps N`` also ACIP
(N steps) against energy at 0.7 / 0.5 / 0.3 / 0.2.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from digits import MODELS, SAMPLES
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import load_model
from onnx_lowrank.search import BudgetRequest, plan_for
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.torch.acip import AcipOptions, acip_ranking
from onnx_lowrank.torch.finetune import FinetuneOptions, finetune

N_UNLABELED = 1000
MIN_PARAMS = 4096  # compress's default


def unlabeled_inputs(key: str, seed: int = 0) -> np.ndarray:
    """1,000 training inputs (no labels): load_digits, pixels / 16, build.py's split."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, _, _, _ = train_test_split(x, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    chosen = np.sort(np.random.default_rng(seed).choice(len(x_train), N_UNLABELED, replace=False))
    x = x_train[chosen]
    return np.ascontiguousarray(x.reshape(-1, 1, 8, 8) if key == "input_image" else x)


def predictions(model, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0].argmax(1)


def accuracy(model, inputs: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions(model, inputs) == labels).mean())


def energy_model(model, layers, fraction: float):
    plan = plan_for(model, layers, BudgetRequest(fraction_budget("params", fraction, flag="-")), min_params=MIN_PARAMS)
    return apply_plan(model, layers, plan)


def kept(result) -> float:
    totals = result.totals
    return totals["layer_params_after"] / totals["layer_params_before"]


def section_finetune(test, threads: int) -> None:
    print("## (a) finetune: 1,000 unlabeled inputs, data-free energy compression, CLI defaults\n")
    print("| model | keep-params | params kept | accuracy original | compressed | fine-tuned | recovered | "
          "fine-tuned --anneal | finetune time (s) | --anneal time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [("digits_cnn", 0.3), ("digits_cnn", 0.1), ("digits_mlp", 0.3), ("digits_mlp", 0.1),
            ("digits_resnet", 0.3), ("digits_transformer", 0.3)]
    for name, fraction in runs:
        key = MODELS[name]
        model = load_model(SAMPLES / f"{name}.onnx")
        layers = find_layers(model)
        compressed = energy_model(model, layers, fraction)
        feeds = {"input": unlabeled_inputs(key)}
        figures = {}
        for anneal in (False, True):
            started = time.perf_counter()
            result = finetune(model, compressed.model, feeds, options=FinetuneOptions(anneal=anneal, threads=threads))
            figures[anneal] = (accuracy(result.model, test[key], test["labels"]), time.perf_counter() - started)
        base = accuracy(model, test[key], test["labels"])
        before = accuracy(compressed.model, test[key], test["labels"])
        after = figures[False][0]
        lost = base - before
        recovered = f"{(after - before) / lost:.0%}" if lost > 1e-9 else "(nothing lost)"
        print(f"| {name} | {fraction} | {kept(compressed):.1%} | {base:.4f} | {before:.4f} | {after:.4f} | "
              f"{recovered} | {figures[True][0]:.4f} | {figures[False][1]:.1f} | {figures[True][1]:.1f} |")
    print()


def section_acip(test, threads: int) -> None:
    fractions = (0.7, 0.5, 0.3, 0.2)
    print("## (b) ACIP learned ranking vs energy allocation (one ACIP run per model serves every size)\n")
    header = " | ".join(f"{f} energy | {f} ACIP" for f in fractions)
    print(f"| model | accuracy | {header} | ACIP learning time (s) |")
    print("|---|---|" + "---|" * (2 * len(fractions)) + "---|")
    for name, key in MODELS.items():
        model = load_model(SAMPLES / f"{name}.onnx")
        layers = find_layers(model)
        started = time.perf_counter()
        ranking = acip_ranking(model, {"input": unlabeled_inputs(key)}, layers=layers,
                               options=AcipOptions(threads=threads, min_params=MIN_PARAMS))
        seconds = time.perf_counter() - started
        cells = []
        reference = predictions(model, test[key])
        for fraction in fractions:
            for result in (energy_model(model, layers, fraction), apply_plan(model, layers, ranking.plan(layers, fraction))):
                predicted = predictions(result.model, test[key])
                cells.append(f"{np.mean(predicted == test['labels']):.4f} / {np.mean(predicted == reference):.3f} "
                             f"({kept(result):.0%})")
        base = accuracy(model, test[key], test["labels"])
        print(f"| {name} | {base:.4f} | {' | '.join(cells)} | {seconds:.1f} |")
    print("\nCells: test accuracy / top-1 agreement with the uncompressed model (share of the Gemm/MatMul/Conv "
          "weights kept, layers below --min-params 4096 counted dense).\n")


def section_smooth(test) -> None:
    fractions = (0.3, 0.2, 0.1)
    print("## (c) smooth-trained vs plain, data-free energy SVD, no fine-tuning\n")
    header = " | ".join(f"keep {f}" for f in fractions)
    print(f"| model | training | accuracy | {header} |")
    print("|---|---|---|" + "---|" * len(fractions))
    for name in ("digits_mlp", "digits_cnn"):
        key = MODELS[name]
        for variant, file in (("plain", f"{name}.onnx"), ("smooth_penalty", f"{name}_smooth.onnx")):
            path = SAMPLES / file
            if not path.exists():
                print(f"| {name} | {variant} | (missing: run python sample_models/build.py --smooth) |")
                continue
            model = load_model(path)
            layers = find_layers(model)
            base = accuracy(model, test[key], test["labels"])
            cells = []
            for fraction in fractions:
                after = accuracy(energy_model(model, layers, fraction).model, test[key], test["labels"])
                cells.append(f"{after:.4f} ({(after - base) * 100:+.1f})")
            print(f"| {name} | {variant} | {base:.4f} | {' | '.join(cells)} |")
    print("\nCells: test accuracy (change in points against the same model uncompressed).\n")


def section_minilm(fraction: float, threads: int, epochs: int, acip_steps: int) -> None:
    from minilm import MiniLMBench, sentences

    with tempfile.TemporaryDirectory() as tmp:
        bench = MiniLMBench.build(Path(tmp))
    model, layers = bench.model, bench.layers
    texts = bench.calibration_text + sentences(400, skip=228)  # the evaluation ones are 0-99
    feeds = bench.encode(texts)
    compressed = energy_model(model, layers, fraction)
    print(f"## MiniLM finetune: {len(texts)} unlabeled sentences (padded to {feeds['input_ids'].shape[1]} tokens), "
          f"data-free energy compression, {epochs} epochs, batch 32, no holdout, loss 1 - cosine of the "
          f"attention-masked mean-pooled last_hidden_state, {threads} torch thread(s)\n")
    print("Cells: mean embedding cosine to the original on the 100 evaluation sentences / nearest-neighbour "
          "agreement.\n")
    print("| keep-params | layer params kept | compressed | fine-tuned | cosine loss recovered | finetune time (s) |")
    print("|---|---|---|---|---|---|")
    started = time.perf_counter()
    options = FinetuneOptions(threads=threads, epochs=epochs, loss="mean-cosine", mask_input="attention_mask",
                              batch_size=32, holdout=0.0)  # the evaluation sentences are held out already
    result = finetune(model, compressed.model, feeds, options=options)
    seconds = time.perf_counter() - started
    before, after = bench.metric(compressed.model), bench.metric(result.model)
    recovered = (after[0] - before[0]) / (1.0 - before[0])
    print(f"| {fraction} | {kept(compressed):.1%} | {before[0]:.4f} / {before[1]:.2f} | {after[0]:.4f} / {after[1]:.2f} "
          f"| {recovered:.0%} | {seconds:.1f} |\n", flush=True)
    if acip_steps <= 0:
        return
    fractions = (0.7, 0.5, 0.3, 0.2)
    started = time.perf_counter()
    ranking = acip_ranking(model, feeds, layers=layers,
                           options=AcipOptions(threads=threads, min_params=MIN_PARAMS, steps=acip_steps))
    seconds = time.perf_counter() - started
    print(f"## MiniLM ACIP ({acip_steps} steps, {seconds:.1f} s) vs energy, no fine-tuning\n")
    print("| keep-params | energy | ACIP |")
    print("|---|---|---|")
    for value in fractions:
        cells = []
        for found in (energy_model(model, layers, value), apply_plan(model, layers, ranking.plan(layers, value))):
            cosine, agree = bench.metric(found.model)
            cells.append(f"{cosine:.4f} / {agree:.2f} ({kept(found):.0%})")
        print(f"| {value} | {' | '.join(cells)} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="a,b,c")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--minilm", action="store_true", help="also fine-tune all-MiniLM-L6-v2")
    parser.add_argument("--skip-digits", action="store_true", help="leave the digits sections out")
    parser.add_argument("--minilm-fraction", type=float, default=0.3)
    parser.add_argument("--minilm-epochs", type=int, default=10)
    parser.add_argument("--minilm-acip-steps", type=int, default=0, help="ACIP steps on MiniLM (0: skip)")
    args = parser.parse_args()
    if args.skip_digits:
        if args.minilm:
            section_minilm(args.minilm_fraction, args.threads, args.minilm_epochs, args.minilm_acip_steps)
        return
    test = dict(np.load(SAMPLES / "digits_test.npz"))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads available "
          f"(training uses {args.threads}), torch {torch.__version__}, onnxruntime {ort.__version__}\n")
    sections = {"a": lambda: section_finetune(test, args.threads), "b": lambda: section_acip(test, args.threads),
                "c": lambda: section_smooth(test)}
    for key in args.sections.split(","):
        sections[key.strip()]()
    if args.minilm:
        section_minilm(args.minilm_fraction, args.threads, args.minilm_epochs, args.minilm_acip_steps)


if __name__ == "__main__":
    main()
