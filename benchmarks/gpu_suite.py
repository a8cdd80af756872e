"""Every GPU latency figure in one run: original vs compressed models on the CUDA EP.

Usage:
    python benchmarks/gpu_suite.py                          # H100 + onnxruntime-gpu, < 10 min
    python benchmarks/gpu_suite.py --provider cpu --quick   # the same code path on a CPU
    OUT=/some/dir python benchmarks/gpu_suite.py [--only NAME ...] [--iters N] [--cuda-graph]

For each model of ``MODEL_BUILDERS`` (the four digits sample models; all-MiniLM-L6-v2's exported
graph at 128 tokens, from ``sample_models/minilm_skeleton.onnx`` with the plans made on its real
weights; a MiniLM-shaped torch encoder; a BERT-large-like MLP block stack 1024 -> 4096 -> 1024
over 128 tokens and a 4096 x 4096 MatMul over 128 tokens per sample, so 8192 tokens at batch 64;
random weights, seeded) it compresses the model to 50% and
30% of its factorizable parameters with the library (``plan_for`` + ``apply_plan``), then times
original vs compressed interleaved with I/O binding at batch 1 and 64, with TF32 on and off on
the CUDA EP, each pair twice (to show reproducibility), and reports the measured speedup next to
the ideal one (the FLOP ratio of the factorized layers). Then the same budgets with the
latency guard on, as ``compress --keep-params F --latency-guard`` does it (per-layer timings on
the provider at that batch size, then whole-model timing with slow layers kept dense), each
guarded model measured twice again: the guard's goal is a speedup of at least 1.0 in every
such row; and every foldable group (a transformer's FFN) at half its width, timed twice: the
GPU-friendly alternative DESIGN.md points to. Last, the CI gate as users run it (``onnx-lowrank check``, a subprocess): a baseline
of the big MatMul compressed to 50%, then the same compressed model (must pass) and a planted
regression with identical outputs and about 5x the work (must fail), speedup tolerance 30%. Results go to ``$OUT``
(default ./out) as ``gpu_suite.json`` and ``gpu_suite.md``.

It fails loudly (exit 2) when CUDA was asked for and is not the provider actually used.

``minilm_shaped`` is all-MiniLM-L6-v2's architecture with random weights (its latency, not its
accuracy, is what this suite measures). Adding a model: write ``def build_x(quick: bool) -> ModelCase`` and
append it to ``MODEL_BUILDERS``; a builder that raises ``SkipCase`` (e.g. a file not present)
is reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The GPU machine runs the checkout without installing it: make the package (and the benchmarks'
# shared modules, whatever the caller's sys.path) importable from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_lowrank.compress import apply_plan, count_params
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import BudgetRequest, plan_for
from onnx_lowrank.search.budget import fraction_budget
from onnx_lowrank.search.cache import Cache
from onnx_lowrank.search.engine import prepare_search, run_search
from onnx_lowrank.search.model_guard import guard_whole_model, pair_measure
from onnx_lowrank.search.plan import RankPlan
from onnx_lowrank.validate.data import load_dataset
from onnx_lowrank.validate.latency import LAYER_OPS, measure_pair
from onnx_lowrank.validate.runtime import (
    PROVIDERS,
    ProviderUnavailable,
    RuntimeOptions,
    create_session,
    gpu_name,
    probe_provider,
    runtime_info,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
KEPT = (0.5, 0.3)


class SkipCase(Exception):
    """A builder cannot provide its model here (missing file or dependency)."""


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A model to benchmark: its graph, inputs per batch size, and shapes for FLOP counts."""

    name: str
    model: onnx.ModelProto
    feeds_for: Callable[[int], dict[str, np.ndarray]]
    flop_shapes: dict[str, tuple[int, ...]]  # input shapes at batch 1 (FLOP ratio is per sample)
    batches: tuple[int, ...] = (1, 64)
    min_params: int = 4096
    note: str = ""
    plans: dict[float, Path] | None = None  # kept fraction -> RankPlan made elsewhere (on real weights)


# ---------------------------------------------------------------------------------------------
# Model builders


def _sample(name: str, key: str) -> Callable[[bool], ModelCase]:
    def build(quick: bool) -> ModelCase:
        del quick
        from onnx_lowrank.model import load_model
        from onnx_lowrank.validate.runtime import input_specs

        path = SAMPLES / f"{name}.onnx"
        if not path.exists():
            raise SkipCase(f"{path} not found")
        model = load_model(path)
        dataset = load_dataset(SAMPLES / "digits_test.npz", input_specs(model), input_map={"input": key}, want_labels=False)
        shape = (1, *dataset.feeds["input"].shape[1:])
        return ModelCase(name, model, dataset.take, {"input": shape}, note="digits sample model")

    build.__name__ = f"build_{name}"
    return build


def build_bert_large_mlp(quick: bool) -> ModelCase:
    """BERT-large-like FFN blocks: x + W2 relu(W1 x + b1) + b2, hidden 1024, inner 4096."""
    hidden, inner, tokens, blocks = (128, 512, 16, 2) if quick else (1024, 4096, 128, 4)
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i in range(blocks):
        w1 = _weight(rng, hidden, inner)
        w2 = _weight(rng, inner, hidden)
        inits += [
            numpy_helper.from_array(w1, f"w1_{i}"), numpy_helper.from_array(np.zeros(inner, np.float32), f"b1_{i}"),
            numpy_helper.from_array(w2, f"w2_{i}"), numpy_helper.from_array(np.zeros(hidden, np.float32), f"b2_{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w1_{i}"], [f"h{i}"], name=f"fc1_{i}"),
            helper.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"]),
            helper.make_node("Relu", [f"hb{i}"], [f"a{i}"]),
            helper.make_node("MatMul", [f"a{i}", f"w2_{i}"], [f"o{i}"], name=f"fc2_{i}"),
            helper.make_node("Add", [f"o{i}", f"b2_{i}"], [f"ob{i}"]),
            helper.make_node("Add", [current, f"ob{i}"], [f"r{i}"]),
        ]
        current = f"r{i}"
    nodes[-1].output[0] = "y"
    model = _model(nodes, inits, "x", ["batch", tokens, hidden], "bert_large_mlp")
    return ModelCase(
        "bert_large_mlp" + ("_quick" if quick else ""), model, _random_feeds("x", (tokens, hidden)),
        {"x": (1, tokens, hidden)}, note=f"{blocks} x ({hidden}->{inner}->{hidden}), {tokens} tokens per sample",
    )


def build_big_matmul(quick: bool) -> ModelCase:
    """One 4096 x 4096 MatMul over 128 tokens per sample (8192 tokens at batch 64)."""
    width, tokens = (256, 16) if quick else (4096, 128)
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(_weight(rng, width, width), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="big")]
    model = _model(nodes, inits, "x", ["batch", tokens, width], "big_matmul")
    return ModelCase(
        "big_matmul" + ("_quick" if quick else ""), model, _random_feeds("x", (tokens, width)), {"x": (1, tokens, width)},
        note=f"{width}x{width} MatMul, {tokens} tokens per sample",
    )


def build_minilm_shaped(quick: bool) -> ModelCase:
    """An encoder shaped like all-MiniLM-L6-v2 (hidden 384, 12 heads, FFN 1536, 6 layers, 128
    tokens), exported by torch with random weights: its latency is what the GPU figures need, and
    the real model's 90 MB of weights cannot travel to the GPU machine."""
    try:
        import torch
    except ImportError as exc:
        raise SkipCase(f"torch is needed to export it ({exc})") from None
    hidden, heads, inner, layers, tokens = (64, 4, 256, 2, 16) if quick else (384, 12, 1536, 6, 128)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(hidden, heads, inner, dropout=0.0, activation="gelu", batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    with torch.no_grad():  # the layers are deep copies of one: give each its own weights, as MiniLM has
        for weight in encoder.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn_like(weight) / weight.shape[1] ** 0.5)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder, (torch.randn(1, tokens, hidden),), buffer, input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - any exporter failure (torch versions differ) skips this case only
        raise SkipCase(f"torch {torch.__version__} could not export it ({type(exc).__name__}: {exc})") from None
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = min(model.ir_version, 9)
    return ModelCase(
        "minilm_shaped" + ("_quick" if quick else ""), model, _random_feeds("x", (tokens, hidden)),
        {"x": (1, tokens, hidden)},
        note=f"{layers}-layer encoder, hidden {hidden}, FFN {inner}, {tokens} tokens per sample (random weights)",
    )


def build_minilm_export(quick: bool) -> ModelCase:
    """all-MiniLM-L6-v2 as torch exports it from Hugging Face (``sample_models/minilm_skeleton.onnx``,
    its graph with the large weights refilled at random) at 128 tokens per sample, compressed with
    the keep-params plans made on the real weights (``minilm_plan_keep*.json``): the real graph
    and the real ranks, which is what latency depends on."""
    from minilm import PLAN_PATHS, SKELETON_PATH, fill_skeleton  # benchmarks/ is on sys.path

    if not SKELETON_PATH.exists():
        raise SkipCase(f"{SKELETON_PATH} not found (python benchmarks/minilm.py --write-skeleton)")
    model = fill_skeleton(onnx.load(str(SKELETON_PATH)))
    tokens = 16 if quick else 128

    def feeds(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch)
        return {
            "input_ids": rng.integers(0, 30522, (batch, tokens), dtype=np.int64),
            "attention_mask": np.ones((batch, tokens), np.int64),
            "token_type_ids": np.zeros((batch, tokens), np.int64),
        }

    shapes = {name: (1, tokens) for name in ("input_ids", "attention_mask", "token_type_ids")}
    return ModelCase(
        "minilm_export" + ("_quick" if quick else ""), model, feeds, shapes, plans=dict(PLAN_PATHS),
        note=f"all-MiniLM-L6-v2's exported graph, {tokens} tokens per sample, weights random, ranks from the real ones",
    )


# The hook: every model the suite measures. Append a builder to add one.
MODEL_BUILDERS: list[Callable[[bool], ModelCase]] = [
    _sample("digits_mlp", "input_flat"),
    _sample("digits_cnn", "input_image"),
    _sample("digits_resnet", "input_image"),
    _sample("digits_transformer", "input_image"),
    build_minilm_export,  # before the big synthetic cases: the issue asks for it, they take longest
    build_minilm_shaped,
    build_bert_large_mlp,
    build_big_matmul,
]


def _weight(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """A (fan_in, fan_out) weight with a decaying spectrum, like trained layers (not flat noise)."""
    rank = min(fan_in, fan_out)
    left = np.linalg.qr(rng.standard_normal((fan_in, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((fan_out, rank)))[0]
    sigma = (1.0 + np.arange(rank)) ** -0.7
    return (left * sigma @ right.T).astype(np.float32)


def _model(nodes, inits, input_name: str, shape: list, name: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)  # every case keeps the input's shape
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def plant_slowdown(model: onnx.ModelProto, extra: int) -> onnx.ModelProto:
    """``model`` plus ``extra`` square MatMuls on its input whose result is multiplied by 0 and
    added to ``y``: the same outputs for about (1 + extra) x the work (input and output shapes
    must match, as every suite case has them)."""
    planted = onnx.ModelProto()
    planted.CopyFrom(model)
    graph = planted.graph
    width = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    rng = np.random.default_rng(7)
    source = graph.input[0].name
    for i in range(extra):
        graph.initializer.append(numpy_helper.from_array(_weight(rng, width, width), f"planted_w{i}"))
        graph.node.append(helper.make_node("MatMul", [source, f"planted_w{i}"], [f"planted_{i}"]))
        source = f"planted_{i}"
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "planted_zero"))
    (output,) = [node for node in graph.node if "y" in node.output]
    output.output[list(output.output).index("y")] = "planted_y"
    graph.node.extend([
        helper.make_node("Mul", [source, "planted_zero"], ["planted_nothing"]),
        helper.make_node("Add", ["planted_y", "planted_nothing"], ["y"]),
    ])
    return planted


def run_gate(case: ModelCase, args: argparse.Namespace, workdir: Path) -> dict:
    """``onnx-lowrank check`` on the case: write a baseline, pass unchanged, fail a planted regression."""
    compressed, _, _ = compress_case(case, 0.5)
    paths = {"original": workdir / "original.onnx", "compressed": workdir / "compressed.onnx",
             "planted": workdir / "planted.onnx"}
    onnx.save_model(case.model, paths["original"])
    onnx.save_model(compressed, paths["compressed"])
    onnx.save_model(plant_slowdown(compressed, extra=4), paths["planted"])
    baseline = workdir / "baseline.json"
    common = ["--original", str(paths["original"]), "--baseline", str(baseline), "--provider", args.provider,
              "--batch", "64", "--random", "8", "--iters", str(max(args.iters, 30)), "--warmup", str(args.warmup), "--json",
              "--tolerance", "speedup:30%"]  # the planted twin is ~5x slower; noise on a shared CPU is not
    if args.threads:
        common += ["--threads", str(args.threads)]
    steps = {}
    for label, model, extra in (("baseline", "compressed", ["--update-baseline"]), ("unchanged", "compressed", []),
                                ("planted", "planted", [])):
        done = subprocess.run(
            [sys.executable, "-m", "onnx_lowrank", "check", str(paths[model]), *common, *extra],
            capture_output=True, text=True, check=False, cwd=ROOT, env=_with_package_path(),
        )
        step = {"exit_code": done.returncode}
        try:
            check = json.loads(done.stdout)["check"]
            step["speedup"] = check["metrics"].get("speedup")
            step["provider_used"] = check["context"]["runtime"]["provider_used"]
            step["regressed"] = [row["metric"] for row in check["rows"] if row["status"] == "regressed"]
        except (ValueError, KeyError):
            step["stderr"] = done.stderr.strip().splitlines()[-1:]
        steps[label] = step
        print(f"gate {label}: exit {done.returncode}, speedup {step.get('speedup')}", file=sys.stderr, flush=True)
    steps["as_expected"] = (
        steps["baseline"]["exit_code"] == 0 and steps["unchanged"]["exit_code"] == 0
        and steps["planted"]["exit_code"] == 1
    )
    return {"model": case.name, **steps}


def _with_package_path() -> dict[str, str]:
    """The environment with the checkout on PYTHONPATH (the GPU machine does not install it)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _random_feeds(name: str, sample_shape: tuple[int, ...]) -> Callable[[int], dict[str, np.ndarray]]:
    def feeds(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch)
        return {name: rng.standard_normal((batch, *sample_shape)).astype(np.float32)}

    return feeds


# ---------------------------------------------------------------------------------------------
# The run


def guarded_cases(case: ModelCase, batch: int, options: RuntimeOptions, cache: Cache, *, warmup: int, iters: int):
    """Per kept fraction: (kept, compressed model, ideal speedup, totals, guard record) with the
    latency guard on at ``batch``, as ``compress --keep-params F --latency-guard`` makes it; a
    budget the guard cannot meet yields (kept, None, None, None, {"error": why})."""
    shapes = {name: (batch, *shape[1:]) for name, shape in case.flop_shapes.items()}
    layers = find_layers(case.model, case.flop_shapes)  # FLOPs per sample
    ctx = prepare_search(
        case.model, layers, min_params=case.min_params, provider=options.provider, input_shapes=shapes, cache=cache
    )
    measure = pair_measure(case.model, case.feeds_for(batch), options, warmup=warmup, iters=iters)
    for kept in KEPT:
        budget = fraction_budget("params", kept, flag="kept")
        try:
            plan = run_search(ctx, "energy", budget)
            if not plan.factorized():
                raise LowRankError("no layer may be factorized at a rank that measured faster than dense")
            build = lambda p: apply_plan(case.model, layers, p)  # noqa: E731
            guarded = guard_whole_model(ctx, "energy", budget, None, plan, build, measure)
        except LowRankError as exc:
            yield kept, None, None, None, {"error": str(exc)}
            continue
        totals = guarded.built.totals
        yield kept, guarded.built.model, _ideal(totals), totals, guarded.to_json()


def compress_case(case: ModelCase, kept: float) -> tuple[onnx.ModelProto, float | None, dict]:
    """The case compressed to ``kept`` of its factorizable params; the ideal (FLOP) speedup."""
    layers = find_layers(case.model, case.flop_shapes)
    if case.plans and kept in case.plans:
        plan = RankPlan.load(case.plans[kept])
    else:
        budget = fraction_budget("params", kept, flag="kept")
        plan = plan_for(case.model, layers, BudgetRequest(budget), min_params=case.min_params)
    result = apply_plan(case.model, layers, plan)
    return result.model, _ideal(result.totals), result.totals


FOLD_KEEP = 0.5  # the fold rows: every foldable group at half its width


def fold_case(case: ModelCase, keep: float) -> tuple[onnx.ModelProto, float | None, dict, float] | None:
    """The case with every foldable group (e.g. a transformer's FFN) at ``keep`` of its width, or
    None when nothing folds. Widths are what latency depends on, so the data-free magnitude
    selection stands in for ``--method regress`` (same widths, no calibration data needed)."""
    from onnx_lowrank.fold import fold_model

    started = time.perf_counter()
    folded, report = fold_model(case.model, keep=keep, method="magnitude", input_shapes=case.flop_shapes)
    if not report.groups or all(group.kept == group.width for group in report.groups):
        return None
    seconds = time.perf_counter() - started

    def layer_flops(model: onnx.ModelProto) -> int:
        return sum(layer.flops or 0 for layer in find_layers(model, case.flop_shapes) if layer.op_type in LAYER_OPS)

    before, after = layer_flops(case.model), layer_flops(folded)
    totals = {
        "model_params_before": count_params(case.model), "model_params_after": count_params(folded),
        "layers_factorized": 0,
    }
    return folded, (before / after if after else None), totals, seconds


def _ideal(totals: dict) -> float | None:
    if totals.get("layer_flops_after"):
        return totals["layer_flops_before"] / totals["layer_flops_after"]
    return None


def run(args: argparse.Namespace, checkpoint: Callable[[dict], None] = lambda result: None) -> dict:
    """Measure everything; ``checkpoint(result)`` after each part, so a run cut off by the
    device's time limit still leaves what it measured. Stops starting new parts after
    ``args.time_budget`` seconds (and says so in the result)."""
    names = set(args.only or [])
    tf32_modes = (True, False) if args.provider == "cuda" else (True,)
    rows, skipped, guard_failures = [], [], []
    started = time.perf_counter()
    expected = PROVIDERS[args.provider]
    probe_provider(RuntimeOptions(provider=args.provider))  # before minutes of compressing: loads, or fails
    result = {
        "suite": "gpu_suite",
        "quick": args.quick,
        "provider": args.provider,
        "settings": {"warmup": args.warmup, "iters": args.iters, "threads": args.threads, "cuda_graph": args.cuda_graph},
        "runtime": runtime_info(),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "gpu": gpu_name()},
        "seconds": 0.0,
        "complete": False,
        "stopped_early": [],
        "rows": rows,
        "guard_failures": guard_failures,
        "gate": None,
        "errors": [],
        "skipped": skipped,
    }

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        checkpoint(result)

    def out_of_time(part: str) -> bool:
        if time.perf_counter() - started <= args.time_budget:
            return False
        result["stopped_early"].append(part)
        print(f"time budget of {args.time_budget} s spent: not starting {part}", file=sys.stderr, flush=True)
        return True

    originals: dict[tuple, object] = {}  # one session per original model and options: half the session builds

    def measure_twice(case, compressed, feeds, options, base: dict) -> None:
        key = (case.name, options)
        if key not in originals:
            if any(name != case.name for name, _ in originals):
                originals.clear()  # only the current model's sessions stay alive (GPU memory)
            originals[key] = create_session(case.model, options, label="original")
        compressed_session = create_session(compressed, options, label="compressed")
        for repeat in (1, 2):
            pair = measure_pair(
                originals[key], compressed_session, feeds, options=options, warmup=args.warmup, iters=args.iters,
                labels=("original", "compressed"),
            )
            if pair.a.provider != expected:
                raise SystemExit(f"error: asked for {expected} but the session ran on {pair.a.provider}")
            low, high = pair.iqr
            row = {
                "model": case.name, **base, "tf32": options.tf32 if args.provider != "cpu" else None,
                "repeat": repeat, "provider_used": pair.a.provider,
                "p50_original_ms": round(pair.a.p50, 5), "p50_compressed_ms": round(pair.b.p50, 5),
                "speedup": round(pair.speedup, 4), "speedup_iqr": [round(low, 4), round(high, 4)],
            }
            rows.append(row)
            print(_progress_line(row), file=sys.stderr, flush=True)

    def describe(kept, ideal, totals, seconds, guard=None, method=None) -> dict:
        return {
            "kept_params": kept, "method": method or ("svd+guard" if guard else "svd"), "guard": guard,
            "ideal_flop_speedup": round(ideal, 4) if ideal else None,
            "params_kept": round(totals["model_params_after"] / totals["model_params_before"], 4),
            "layers_factorized": totals["layers_factorized"], "compress_s": round(seconds, 2),
        }

    # The gate first: it is quick and it is what a reviewer checks first.
    if not args.no_gate and (not names or "big_matmul" + ("_quick" if args.quick else "") in names):
        with tempfile.TemporaryDirectory(prefix="gpu_suite_gate_") as workdir:
            result["gate"] = run_gate(build_big_matmul(args.quick), args, Path(workdir))
        save()
    cache = Cache(tempfile.mkdtemp(prefix="gpu_suite_cache_"))  # identical layers are timed once

    def measure_case(case: ModelCase) -> None:
        for kept in KEPT:
            t0 = time.perf_counter()
            compressed, ideal, totals = compress_case(case, kept)
            base = {**describe(kept, ideal, totals, time.perf_counter() - t0)}
            for batch in case.batches:
                for tf32 in tf32_modes:
                    options = RuntimeOptions(
                        provider=args.provider, threads=args.threads, tf32=tf32, cuda_graph=args.cuda_graph
                    )
                    measure_twice(case, compressed, case.feeds_for(batch), options, {**base, "batch": batch})
        save()
        folded = fold_case(case, FOLD_KEEP)
        if folded is not None:
            model, ideal, totals, seconds = folded
            base = describe(FOLD_KEEP, ideal, totals, seconds, method="fold")
            for batch in case.batches:
                options = RuntimeOptions(provider=args.provider, threads=args.threads, cuda_graph=args.cuda_graph)
                measure_twice(case, model, case.feeds_for(batch), options, {**base, "batch": batch})
            save()
        if args.no_guard or out_of_time(f"{case.name} guarded"):
            return
        options = RuntimeOptions(provider=args.provider, threads=args.threads, cuda_graph=args.cuda_graph)
        for batch in case.batches:
            t0 = time.perf_counter()
            for kept, compressed, ideal, totals, guard in guarded_cases(
                case, batch, options, cache, warmup=args.warmup, iters=args.iters
            ):
                if compressed is None:
                    guard_failures.append({"model": case.name, "kept_params": kept, "batch": batch, **guard})
                    print(f"{case.name:<22} kept={kept:.0%} batch={batch:<3} guarded: {guard['error']}", file=sys.stderr)
                    continue
                base = describe(kept, ideal, totals, time.perf_counter() - t0, guard)
                measure_twice(case, compressed, case.feeds_for(batch), options, {**base, "batch": batch})
                t0 = time.perf_counter()

    for builder in MODEL_BUILDERS:
        if out_of_time(builder.__name__):
            continue
        try:
            case = builder(args.quick)
        except SkipCase as exc:
            skipped.append({"builder": builder.__name__, "reason": str(exc)})
            print(f"skip {builder.__name__}: {exc}", file=sys.stderr)
            continue
        except ProviderUnavailable:
            raise  # the provider itself is missing: nothing else can be measured either
        except Exception as exc:  # noqa: BLE001 - as for a failing case below
            result["errors"].append({"model": builder.__name__, "error": f"{type(exc).__name__}: {exc}"})
            print(f"error building {builder.__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        if names and case.name not in names:
            continue
        try:
            measure_case(case)
        except ProviderUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - one device call: a failing case must not cost the others
            detail = f"{type(exc).__name__}: {exc}"
            result["errors"].append({"model": case.name, "error": detail})
            print(f"error in {case.name}: {detail}", file=sys.stderr, flush=True)
        save()
    result["complete"] = not result["stopped_early"]
    save()
    return result


def _progress_line(row: dict) -> str:
    tf32 = "" if row["tf32"] is None else f" tf32={'on' if row['tf32'] else 'off'}"
    guarded = "" if row["method"] == "svd" else f" {row['method']}"
    return (
        f"{row['model']:<22} kept={row['kept_params']:.0%} batch={row['batch']:<3}{tf32}{guarded} #{row['repeat']}: "
        f"{row['p50_original_ms']:.4f} -> {row['p50_compressed_ms']:.4f} ms, speedup {row['speedup']:.3f}x "
        f"(IQR {row['speedup_iqr'][0]:.3f}-{row['speedup_iqr'][1]:.3f}), ideal {row['ideal_flop_speedup'] or float('nan'):.2f}x"
    )


def markdown(result: dict) -> str:
    lines = [
        f"# gpu_suite ({result['provider']}{', quick' if result['quick'] else ''})",
        "",
        f"onnxruntime {result['runtime']['onnxruntime']}, {result['machine']['gpu'] or result['machine']['platform']}, "
        f"{result['settings']['iters']} interleaved pairs after {result['settings']['warmup']} warm-up runs, "
        f"I/O binding{', CUDA graphs' if result['settings']['cuda_graph'] else ''}; {result['seconds']} s.",
        "Speedup = time(original) / time(compressed), median of per-pair ratios (IQR); ideal = FLOP ratio of the "
        "factorized layers (for fold: of all Gemm/MatMul/Conv layers). Each configuration measured twice (run 1 / "
        "run 2). Methods: svd = compress --keep-params; svd + guard = the same with --latency-guard at that batch size "
        "(per-layer, then whole-model; its params can be below the budget); fold = every foldable group (a "
        "transformer's FFN) at half its width, as fold --keep 0.5 (any --method: the widths set the latency).",
        "",
        "| model | budget | method | params kept | batch | TF32 | p50 orig (ms) | p50 comp (ms) | speedup run 1 "
        "| speedup run 2 | ideal |",
        "|---|---:|:---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    grouped: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        key = (row["model"], row["kept_params"], row["method"], row["batch"], row["tf32"])
        grouped.setdefault(key, []).append(row)
    for (model, kept, method, batch, tf32), runs in grouped.items():
        speeds = [f"{r['speedup']:.3f} ({r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f})" for r in runs]
        speeds += [""] * (2 - len(speeds))
        ideal = runs[0]["ideal_flop_speedup"]
        tf = "-" if tf32 is None else ("on" if tf32 else "off")
        guard = {"svd+guard": "svd + guard"}.get(method, method)
        if runs[0]["guard"] and runs[0]["guard"]["blocked"]:
            guard += f" ({len(runs[0]['guard']['blocked'])} kept dense)"
        lines.append(
            f"| {model} | {kept:.0%} | {guard} | {runs[0]['params_kept']:.1%} | {batch} | {tf} "
            f"| {runs[0]['p50_original_ms']:.4f} | {runs[0]['p50_compressed_ms']:.4f} "
            f"| {speeds[0]} | {speeds[1]} | {f'{ideal:.2f}' if ideal else '?'} |"
        )
    for failure in result.get("guard_failures", []):
        lines.append(
            f"\nguarded {failure['model']} at {failure['kept_params']:.0%}, batch {failure['batch']}: {failure['error']}"
        )
    for skip in result["skipped"]:
        lines.append(f"\nskipped {skip['builder']}: {skip['reason']}")
    for error in result.get("errors", []):
        lines.append(f"\nFAILED {error['model']}: {error['error']}")
    if not result.get("complete", True):
        missing = ", ".join(result.get("stopped_early", [])) or "the rest (still running or cut off)"
        lines.append(f"\nINCOMPLETE: not measured: {missing}")
    gate = result.get("gate")
    if gate:
        lines += ["", f"CI gate (`onnx-lowrank check`, {gate['model']} at 50%, batch 64): "
                  + ("as expected" if gate["as_expected"] else "NOT as expected"), ""]
        lines += ["| step | exit code | speedup | regressed |", "|---|---:|---:|---|"]
        for label in ("baseline", "unchanged", "planted"):
            step = gate[label]
            speedup = f"{step['speedup']:.3f}" if step.get("speedup") is not None else "?"
            lines.append(f"| {label} | {step['exit_code']} | {speedup} | {', '.join(step.get('regressed', [])) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Original vs compressed latency on the CUDA EP (or the CPU).")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--quick", action="store_true", help="Small synthetic models and few iterations (for CPU tests).")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="Only these cases (by name).")
    parser.add_argument("--iters", type=int, help="Timed pairs per configuration (default 100, quick 10).")
    parser.add_argument("--warmup", type=int, help="Untimed runs per model (default 20, quick 3).")
    parser.add_argument("--threads", type=int, help="Intra-op threads (default: onnxruntime's).")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA EP enable_cuda_graph.")
    parser.add_argument("--no-guard", action="store_true", help="Skip the latency-guarded rows.")
    parser.add_argument("--no-gate", action="store_true", help="Skip the `check` gate on a planted regression.")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="Output directory (default $OUT or ./out).")
    parser.add_argument("--time-budget", type=float, default=500.0,
                        help="Start no new model after this many seconds (default 500: one device call is 600).")
    args = parser.parse_args(argv)
    args.iters = args.iters or (10 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    out = Path(args.out)

    def write(result: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_suite.json", json.dumps(result, indent=2) + "\n"), ("gpu_suite.md", markdown(result))):
            partial = out / f".{name}.partial"
            partial.write_text(text)
            partial.replace(out / name)  # a reader never sees half a file

    try:
        result = run(args, checkpoint=write)
    except LowRankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(markdown(result))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {result['seconds']} s", file=sys.stderr)
    if not result["rows"]:
        print("error: nothing was measured", file=sys.stderr)
        return 1
    if result["errors"]:
        print(f"error: {len(result['errors'])} case(s) failed; see 'FAILED' in the markdown", file=sys.stderr)
        return 1
    if result["gate"] is not None and not result["gate"]["as_expected"]:
        print("error: the check gate did not pass the unchanged model and fail the planted regression", file=sys.stderr)
        return 1
    return 0 if all(math.isfinite(r["speedup"]) for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
