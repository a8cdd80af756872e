"""``onnx-lowrank compress``: factorize a model under one budget and write it atomically."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from onnx_lowrank import __version__
from onnx_lowrank.cli.common import console, echo_json, human, info, json_option, parse_pairs, progress, write_json
from onnx_lowrank.cli.search_cmd import calibration_data, floor_options
from onnx_lowrank.cli.validate_cmd import data_options, make_dataset, make_runtime, runtime_options
from onnx_lowrank.compress import CompressResult, apply_plan, count_params
from onnx_lowrank.errors import NothingToDo, OptionError
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import check_output_path, file_uses_external_data, load_model, model_sha256, save_model
from onnx_lowrank.search import BudgetRequest, EnergyRequest, FullRankRequest, RankRequest, plan_for, registry
from onnx_lowrank.search.budget import Budget, fraction_budget, layer_cost, parse_budget
from onnx_lowrank.search.cache import open_cache
from onnx_lowrank.search.engine import prepare_search, run_search
from onnx_lowrank.search.error_bound import plan_with_methods
from onnx_lowrank.search.method import SearchContext, SearchMethod
from onnx_lowrank.search.plan import RankPlan
from onnx_lowrank.validate.accuracy import compare_models
from onnx_lowrank.validate.latency import measure_pair
from onnx_lowrank.validate.runtime import PROVIDERS, check_provider

BUDGET_FLAGS = ("--keep-params", "--keep-flops", "--energy", "--rank", "--plan")
METHODS = {"svd": ("svd",), "tucker": ("tucker",), "tt": ("tt",), "auto": ("svd", "tucker", "tt")}


@click.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=str))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=str), help="Where to write the compressed model.")
@click.option("--keep-params", type=float, metavar="F", help="Factorizable layers keep at most this fraction of their parameters.")
@click.option("--keep-flops", type=float, metavar="F", help="Factorizable layers keep at most this fraction of their FLOPs.")
@click.option("--energy", type=float, metavar="E", help="Per layer, the smallest rank keeping E of the squared singular values.")
@click.option("--rank", "rank_text", metavar="N|full", help="Uniform rank cap, or 'full' (exact rewrite of every supported layer).")
@click.option("--plan", "plan_path", type=click.Path(path_type=str), help="Apply this RankPlan JSON (per-layer ranks).")
@click.option("--search", "search_method", metavar="METHOD",
              help="Plan with a search method (global, continuous, calibrated, ...; see `search --list-methods`).")
@click.option("--budget", "budget_text", metavar="KIND=VALUE", help="The --search budget: params=0.4, flops=50%, latency-ms=2.5.")
@click.option("--option", "option_texts", multiple=True, metavar="KEY=VALUE", help="A --search method option (repeatable).")
@click.option("--calib", "calib_path", type=click.Path(path_type=str),
              help="Calibration inputs (.npz) for --search calibrated, or to reproduce a calibrated --plan.")
@click.option("--calib-random", type=int, metavar="N", help="N random calibration inputs instead of --calib (a weak proxy).")
@click.option("--refit", is_flag=True,
              help="After factorizing, refit the SVD factors layer by layer on --calib data to match the original "
                   "layers' outputs (later layers correct earlier ones' error; ridge-anchored to the weights).")
@click.option("--refit-alpha", type=float, default=0.1, show_default=True, help="Ridge weight of --refit (relative).")
@click.option(
    "--latency-guard", is_flag=True,
    help="Never pick a rank that measures slower than dense on --provider, then time the whole model against the "
    "original there at --bench-batch (layers are timed at that batch too) and keep slow layers dense until it is "
    "not slower. With --keep-params/"
    "--keep-flops and no --search, searches with 'energy'.",
)
@click.option(
    "--rank-multiple", type=int, metavar="N",
    help="Ranks are multiples of N (default: 16 with --latency-guard on the CPU, 8 on CUDA, else 1). Convs off a "
    "multiple of 8 lose onnxruntime's fast kernels: the digits ResNet at --keep-params 0.5 runs 0.65x with free "
    "ranks, 1.04x with --rank-multiple 8. With --keep-params/--keep-flops and no --search, searches with 'energy'.",
)
@click.option(
    "--method", "method", default="svd", show_default=True,
    type=click.Choice(["svd", "tucker", "tt", "auto", "floor", "greedy"]),
    help="Decomposition: svd, tucker (Conv), tt (Conv and Linear), or auto (per layer, the fewest values at the error target). "
    "With --floor: floor (default; whitened SVD, measured global allocation) or greedy (AIMET-style baseline).",
)
@floor_options("--data")
@click.option("--fold-method", type=click.Choice(["kmeans", "regress"]), default="kmeans", show_default=True,
              help="How --fold merges: kmeans (data-free) or regress (keeps the channels that matter on --calib "
              "and folds the others into them by least squares).")
@click.option("--fold", "fold_keep", type=float, metavar="F",
              help="Fold first (each foldable group keeps F of its neurons, k-means + repair), then factorize.")
@click.option("--min-params", default=4096, show_default=True, help="Leave layers with fewer weight values alone.")
@click.option("--save-plan", type=click.Path(path_type=str), help="Write the plan that was applied.")
@click.option("--report", "report_path", type=click.Path(path_type=str), help="Write a JSON report.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--inputs-as-constants", is_flag=True, help="Factorize weights that are also graph inputs (IR >= 4).")
@click.option(
    "--external-data/--no-external-data", default=None,
    help="Store weights in OUTPUT.data (default: as the input does, and always above 2 GB).",
)
@click.option("--validate", "run_validation", is_flag=True,
              help="After writing, compare outputs with the original and time both (interleaved) on --provider.")
@data_options
@runtime_options
@click.option("--bench-batch", default=1, show_default=True, help="Batch size for --validate's latency comparison.")
@json_option
def compress(
    model_path, output_path, keep_params, keep_flops, energy, rank_text, plan_path, search_method, budget_text,
    option_texts, calib_path, calib_random, refit, refit_alpha, latency_guard, rank_multiple, method, fold_method, fold_keep, min_params,
    save_plan,
    report_path, overwrite, inputs_as_constants, external_data, run_validation, data_path, random_n, labels_path,
    labels_key, input_map, input_shapes, seed, provider, threads, tf32, spin, bench_batch, as_json,
    floor_texts=(), minimize="params", holdout=0.3, output_name=None, max_evals=None, time_budget=None,
):
    """Replace weight matrices and conv kernels of MODEL.onnx by low-rank factors.

    Exactly one of --keep-params, --keep-flops, --energy, --rank or --plan says how much, or
    --floor with --data: the smallest (--minimize) model keeping the floor on held-back data.
    """
    if floor_texts or method in ("floor", "greedy"):
        if latency_guard:
            raise OptionError("--latency-guard goes with a budget; with --floor, --minimize latency times each layer")
        if rank_multiple is not None:
            raise OptionError("--rank-multiple goes with a budget (--keep-params, --keep-flops, --search), not --floor")
        _compress_to_floor(
            model_path, output_path, overwrite, floor_texts, method, minimize, holdout, output_name, max_evals,
            time_budget, min_params, report_path, save_plan, data_path, labels_path, labels_key, input_map,
            seed, provider, as_json, budget_flags=(keep_params, keep_flops, energy, rank_text, plan_path, search_method,
                                                   budget_text, fold_keep, random_n, calib_path, calib_random),
        )
        return
    if (latency_guard or rank_multiple is not None) and search_method is None:
        flag = "--latency-guard" if latency_guard else "--rank-multiple"
        if energy is not None or rank_text is not None or plan_path is not None:
            raise OptionError(
                f"{flag} picks ranks under a budget: give --keep-params, --keep-flops or --search with "
                "--budget, not --energy, --rank or --plan"
            )
        search_method = "energy"
    if search_method is not None:
        request = _search_budget(budget_text, keep_params, keep_flops, energy, rank_text, plan_path)
    elif budget_text is not None:
        raise OptionError("--budget goes with --search (or use --keep-params / --keep-flops)")
    else:
        request = _request(keep_params, keep_flops, energy, rank_text, plan_path)
    check_output_path(Path(output_path), overwrite=overwrite, input_path=model_path)
    runtime = make_runtime(provider, threads, tf32, spin)
    if run_validation or latency_guard:
        check_provider(runtime)  # fail before any work, never time the CPU instead
    original = model = load_model(model_path)
    fold_report = None
    fold_widths = request.options.get("fold") if isinstance(request, RankPlan) else None
    # Calibration inputs match the original's inputs, which folding keeps.
    calibration = calibration_data(original, calib_path, calib_random, input_map, seed, input_shapes)
    if fold_keep is not None or fold_widths:
        if fold_widths:
            fold_method = fold_widths.get("method", "kmeans")
        model, fold_report = _fold(model, fold_keep, fold_widths, seed, input_shapes, fold_method, calibration)
    layers = find_layers(model, input_shapes, treat_inputs_as_constants=inputs_as_constants)
    original_layers = layers
    if fold_report is not None:
        original_layers = find_layers(original, input_shapes, treat_inputs_as_constants=inputs_as_constants)
        if isinstance(request, BudgetRequest) and request.budget.fraction is not None:
            # The budget is a fraction of the ORIGINAL layers: what folding saved counts.
            request = BudgetRequest(_absolute_budget(request.budget, original_layers))
    if not any(layer.supported for layer in layers):
        raise NothingToDo(f"{model_path}: nothing to compress (no supported Gemm/MatMul/Conv layer); no file written")
    sha = model_sha256(model_path)
    search = None
    if isinstance(request, RankPlan):
        plan = request
    elif search_method is not None:
        search = _search(
            model, layers, search_method, request, option_texts, calibration, min_params=min_params, seed=seed,
            model_sha256=sha, provider=provider if latency_guard else None, rank_multiple=rank_multiple,
            input_shapes=_at_batch(model, input_shapes, bench_batch) if latency_guard else input_shapes,
        )
        plan = search.plan
    else:
        methods = METHODS[method]
        with progress("analyse", sum(1 for la in layers if la.supported)) as advance:
            if methods == ("svd",):
                plan = plan_for(model, layers, request, min_params=min_params, model_sha256=sha, on_layer=advance)
            else:
                plan = plan_with_methods(
                    model, layers, request, methods, min_params=min_params, model_sha256=sha, on_layer=advance
                )
    if not plan.factorized() and not (fold_report and fold_report.modified):
        raise NothingToDo(
            f"{model_path}: nothing to compress at this budget (every layer kept: below --min-params "
            "or at/above its break-even rank); no file written"
        )

    def build(plan: RankPlan) -> CompressResult:
        """Factorize per ``plan``, recording the fold it follows so that --plan replays both
        (the latency guard builds from the search's plans, which know nothing of the fold)."""
        if fold_report is not None:
            fold = fold_report.widths() if fold_method == "kmeans" else {**fold_report.widths(), "method": fold_method}
            plan = dataclasses.replace(plan, options={**plan.options, "fold": fold})
        decomposers = _data_decomposers(model, layers, plan, calibration)
        with progress("factorize", len(plan.factorized())) as advance:
            return apply_plan(model, layers, plan, on_layer=advance, decomposers=decomposers)

    if latency_guard:
        model_guard = _guard_whole_model(original, search, build, runtime, input_shapes, bench_batch, seed)
        result = model_guard.built
    else:
        model_guard, result = None, build(plan)
    plan = result.plan
    refit_report = None
    if refit:
        result, refit_report = _refit(model, result, layers, plan, calibration, refit_alpha)
    if external_data is None and file_uses_external_data(model_path):
        external_data = True  # keep the input's storage layout
    save_model(result.model, output_path, overwrite=overwrite, input_path=model_path, external_data=external_data)
    report = build_report(model_path, output_path, result)
    if refit_report is not None:
        report["refit"] = refit_report.to_json()
    if model_guard is not None:
        report["latency_guard"] = {"provider": PROVIDERS[runtime.provider], "batch": bench_batch, **model_guard.to_json()}
    if fold_report is not None:
        report["fold"] = fold_report.to_json()
        totals = report["totals"]
        totals["model_params_before"] = count_params(original)
        supported = [layer for layer in original_layers if layer.supported]
        totals["layer_params_before"] = sum(layer.params for layer in supported)
        if "layer_flops_before" in totals:
            totals["layer_flops_before"] = sum(layer.flops or 0 for layer in supported)
    if run_validation:
        dataset = make_dataset(
            model_path, data_path, random_n, labels_path, labels_key, input_map, input_shapes, seed, default_random=64
        )
        report.update(validate_and_time(model_path, output_path, dataset, runtime, batch=bench_batch))
    if save_plan:
        plan.save(save_plan)
    if report_path:
        write_json(report_path, report)
    if as_json:
        echo_json(report)
    else:
        print_summary(report)
        if "latency_guard" in report:
            print_model_guard(report["latency_guard"])
        if "refit" in report:
            refit_rows = report["refit"]["layers"]
            before = sum(row["rel_sq_error_before"] for row in refit_rows)
            after = sum(row["rel_sq_error_after"] for row in refit_rows)
            console().print(
                f"refit {len(refit_rows)} layers on {report['refit']['samples']} samples: summed relative squared "
                f"layer-output error {before:.4g} -> {after:.4g}"
            )
        if "validation" in report:
            print_validation(report)
        info(f"wrote {output_path}")


FLOOR_METHODS = {"floor": "floor", "greedy": "greedy", "svd": "floor"}


def _compress_to_floor(
    model_path, output_path, overwrite, floor_texts, method, minimize, holdout, output_name, max_evals, time_budget,
    min_params, report_path, save_plan, data_path, labels_path, labels_key, input_map, seed, provider, as_json,
    *, budget_flags,
):
    """--floor: parse, call :func:`onnx_lowrank.floor.compress_to_floor`, write, print."""
    from onnx_lowrank.floor import compress_to_floor, parse_floors
    from onnx_lowrank.validate.data import load_dataset, parse_input_map
    from onnx_lowrank.validate.runtime import input_specs

    if not floor_texts:
        raise OptionError(f"--method {method} goes with --floor METRIC=VALUE")
    if method not in FLOOR_METHODS:
        raise OptionError(f"--floor uses --method floor (default) or greedy, not {method}")
    if any(v is not None for v in budget_flags):
        raise OptionError(
            "--floor replaces --keep-params/--keep-flops/--energy/--rank/--plan/--search/--budget/--fold "
            "and takes real inputs with --data (not --random or --calib)"
        )
    if data_path is None:
        raise OptionError("--floor needs --data FILE.npz (split into calibration and held-back parts)")
    for flag, value in (("--max-evals", max_evals), ("--time-budget", time_budget)):
        if value is not None and value < 0:
            raise OptionError(f"{flag} must be >= 0, got {value}")
    floors = parse_floors(floor_texts, output=output_name)
    check_output_path(Path(output_path), overwrite=overwrite, input_path=model_path)
    model = load_model(model_path)
    data = load_dataset(
        data_path, input_specs(model), input_map=parse_input_map(input_map), labels_path=labels_path,
        labels_key=labels_key,
    )
    layers = find_layers(model)
    result = compress_to_floor(
        model, layers, data, floors, minimize, method=FLOOR_METHODS[method], provider=provider, seed=seed,
        holdout=holdout, cache=open_cache(), progress=progress, max_evals=max_evals, time_budget=time_budget,
        min_params=min_params, model_sha256=model_sha256(model_path),
    )
    external = True if file_uses_external_data(model_path) else None
    save_model(result.model, output_path, overwrite=overwrite, input_path=model_path, external_data=external)
    report = build_report(model_path, output_path, result.compressed)
    report["floor"] = result.report
    if save_plan:
        result.plan.save(save_plan)
    if report_path:
        write_json(report_path, report)
    if as_json:
        echo_json(report)
        return
    print_summary(report)
    print_floor(result.report)
    info(f"wrote {output_path}")


def print_floor(floor: dict) -> None:
    """The analysis size, the chosen point (predicted vs realized) and the held-back check."""
    out = console()
    analysis = floor["analysis"]
    split = floor["split"]
    out.print(
        f"floor analysis: {analysis['evaluations']} layer x rank evaluations ({analysis['evaluated']} run, "
        f"{analysis['cached']} cached) in {analysis['seconds']:.2f} s; split {split['calibration']['samples']} "
        f"calibration / {split['held_back']['samples']} held back (seed {split['seed']})"
    )
    chosen, held = floor["chosen"], floor["held_back"]
    for key, predicted in chosen["predicted"].items():
        out.print(
            f"{key}: predicted {predicted:.4f}, calibration {chosen['realized_calibration'][key]:.4f}, "
            f"held back {held['realized'][key]:.4f}"
        )
    out.print(f"{floor['objective']} kept: {chosen['cost_kept']:.1%} of the candidate layers' ({floor['method']})")


def _absolute_budget(budget: Budget, layers) -> Budget:
    total = sum(layer_cost(layer, None, budget.kind) for layer in layers if layer.supported)
    return Budget(budget.kind, absolute=budget.fraction * total)


def _fold(model, keep, widths, seed, input_shapes, method, calibration):
    """Fold first: by a neuron fraction, or re-applying a plan's recorded widths (and method)."""
    from onnx_lowrank.fold import fold_model

    if method == "regress" and calibration is None:
        what = "the plan folds with regress: give the --calib data it was made with" if widths else (
            "--fold-method regress needs --calib data.npz")
        raise OptionError(what)
    kw = {"seed": seed, "input_shapes": input_shapes, "method": method, "calibration": calibration}
    if keep is not None:
        if not 0 < keep <= 1:
            raise OptionError(f"--fold must be in (0, 1], got {keep}")
        return fold_model(model, keep=keep, **kw)
    return fold_model(model, widths=widths, **kw)


def _search_budget(budget_text, keep_params, keep_flops, energy, rank_text, plan_path) -> Budget:
    if energy is not None or rank_text is not None or plan_path is not None:
        raise OptionError("--search takes --budget (or --keep-params / --keep-flops), not --energy, --rank or --plan")
    given = [v for v in (budget_text, keep_params, keep_flops) if v is not None]
    if len(given) != 1:
        raise OptionError("--search needs exactly one of --budget, --keep-params or --keep-flops")
    if budget_text is not None:
        return parse_budget(budget_text)
    if keep_params is not None:
        return fraction_budget("params", keep_params, flag="--keep-params")
    return fraction_budget("flops", keep_flops, flag="--keep-flops")


@dataclasses.dataclass(frozen=True)
class _Search:
    """A search's plan with what re-planning needs (the latency guard re-runs it)."""

    context: SearchContext
    method: SearchMethod
    budget: Budget
    options: dict
    plan: RankPlan


def _search(model, layers, method, budget, option_texts, calibration, **prepare) -> _Search:
    """Plan with a registered search method (progress bars for the analysis)."""
    chosen = registry.get_method(method, flag="--search")
    if chosen.needs_calibration and calibration is None:
        raise OptionError(f"--search {method} needs calibration data: give --calib data.npz (or --calib-random N)")
    options = chosen.resolve_options(parse_pairs(option_texts, "--option"))
    context = prepare_search(model, layers, cache=open_cache(), calibration=calibration, progress=progress, **prepare)
    return _Search(context, chosen, budget, options, run_search(context, chosen, budget, options))


def _at_batch(model, input_shapes, batch: int) -> dict[str, tuple[int, ...]]:
    """Every input's concrete shape at ``batch``: the latency guard times layers as the whole model runs."""
    from onnx_lowrank.validate.data import concrete_shape
    from onnx_lowrank.validate.runtime import input_specs

    return {spec.name: concrete_shape(spec, batch, input_shapes) for spec in input_specs(model)}


def _guard_whole_model(original, search: _Search, build, runtime, input_shapes, batch: int, seed: int):
    """Time the compressed model against ``original``; keep slow layers dense until it is not slower."""
    from onnx_lowrank.search.model_guard import guard_whole_model, pair_measure
    from onnx_lowrank.validate.data import random_feeds
    from onnx_lowrank.validate.runtime import input_specs

    feeds = random_feeds(input_specs(original), batch, shapes=input_shapes, seed=seed)
    measure = pair_measure(
        original, feeds, runtime,
        on_result=lambda speedup, used: info(f"latency guard: whole model {speedup:.3f}x as fast as the original on {used}"),
    )
    return guard_whole_model(search.context, search.method, search.budget, search.options, search.plan, build, measure)


def _data_decomposers(model, layers, plan: RankPlan, calibration) -> dict | None:
    """Decomposers for the plan's data-dependent methods (whitened SVD needs covariances)."""
    from onnx_lowrank.search.calibrated import WHITENED, covariances_for_plan, plan_decomposers

    if not any(d.method == WHITENED for d in plan.factorized().values()):
        return None
    if calibration is None:
        raise OptionError("the plan has calibrated (svd-whitened) layers: give the --calib data it was made with")
    return plan_decomposers(plan, covariances_for_plan(model, layers, plan, calibration))


def _refit(model, result: CompressResult, layers, plan: RankPlan, calibration, alpha: float):
    """Refit the SVD factors layer by layer on the calibration data (error-compensating)."""
    from onnx_lowrank.refit import refit_model

    if calibration is None:
        raise OptionError("--refit needs calibration data: give --calib data.npz (or --calib-random N)")
    with progress("refit", len(plan.factorized())) as advance:
        refit, report = refit_model(model, result.model, layers, plan, calibration, alpha=alpha, on_layer=advance)
    return dataclasses.replace(result, model=refit), report

def _request(keep_params, keep_flops, energy, rank_text, plan_path):
    given = [
        flag for flag, value in zip(BUDGET_FLAGS, (keep_params, keep_flops, energy, rank_text, plan_path))
        if value is not None
    ]
    if len(given) != 1:
        what = "none was given" if not given else f"got {', '.join(given)}"
        raise OptionError(f"give exactly one of {', '.join(BUDGET_FLAGS)} ({what})")
    if keep_params is not None:
        return BudgetRequest(fraction_budget("params", keep_params, flag="--keep-params"))
    if keep_flops is not None:
        return BudgetRequest(fraction_budget("flops", keep_flops, flag="--keep-flops"))
    if energy is not None:
        if not 0 < energy <= 1:
            raise OptionError(f"--energy must be in (0, 1], got {energy}")
        return EnergyRequest(energy)
    if rank_text is not None:
        if rank_text.strip().lower() == "full":
            return FullRankRequest()
        if not rank_text.strip().isdigit() or int(rank_text) < 1:
            raise OptionError(f"--rank must be a positive integer or 'full', got {rank_text!r}")
        return RankRequest(int(rank_text))
    return RankPlan.load(plan_path)


def validate_and_time(model_path: str, output_path: str, dataset, runtime, *, batch: int) -> dict:
    """Accuracy against the original and an interleaved latency comparison, as report sections."""
    comparison = compare_models(model_path, output_path, dataset, options=runtime)
    timing = measure_pair(model_path, output_path, dataset.take(batch), options=runtime, labels=("original", "compressed"))
    return {
        "validation": {"data": dataset.to_json(), **comparison.to_json()},
        "latency": {"batch": batch, **timing.to_json()},
    }


def print_validation(report: dict) -> None:
    """One line per output, then the measured speedup."""
    out = console()
    for row in report["validation"]["outputs"]:
        agreement = row.get("top1_agreement")
        out.print(
            f"validation {row['name']}: rel. L2 error {row['rel_l2_error']:.4g}, cosine {row['cosine']:.5f}"
            + (f", top-1 agreement {agreement:.2%}" if agreement is not None else "")
        )
    accuracy = report["validation"].get("accuracy")
    if accuracy:
        out.print(
            f"accuracy: original {accuracy['original']:.2%} -> compressed {accuracy['compressed']:.2%} "
            f"(drop {accuracy['drop_points']:.2f} points)"
        )
    latency = report["latency"]
    low, high = latency["speedup_iqr"]
    out.print(
        f"latency at batch {latency['batch']} on {latency['a']['provider']}: {latency['speedup']:.2f}x "
        f"(IQR {low:.2f}-{high:.2f}; > 1 means the compressed model is faster)"
    )


def build_report(model_path: str, output_path: str, result: CompressResult) -> dict:
    """The JSON report of one compress run."""
    return {
        "tool": {"name": "onnx-lowrank", "version": __version__},
        "input": {"path": model_path, "bytes": os.path.getsize(model_path)},
        "output": {"path": output_path, "bytes": _size_with_data(output_path)},
        "seconds": round(result.seconds, 3),
        "totals": result.totals,
        "layers": result.layers,
        "not_applied": result.factorize_report.not_applied,
        "plan": result.plan.to_json(),
    }


def print_model_guard(guard: dict) -> None:
    """One line: the accepted model's measured speedup and the layers the guard kept dense."""
    low, high = guard["steps"][-1]["speedup_iqr"]
    line = (
        f"latency guard: whole model {guard['speedup']:.2f}x as fast as the original (IQR {low:.2f}-{high:.2f}) "
        f"at batch {guard['batch']} on {guard['provider']}"
    )
    if guard["blocked"]:
        line += f"; kept dense after timing the whole model: {', '.join(guard['blocked'])}"
    console().print(line)


def print_summary(report: dict) -> None:
    """Before/after table of the factorized layers, then totals."""
    from rich.table import Table

    table = Table(title="compressed layers", title_justify="left")
    for column, justify in (
        ("layer", "left"), ("op", "left"), ("weight", "left"), ("rank", "right"),
        ("params", "right"), ("FLOPs", "right"), ("weight rel. err", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    kept = {}
    for row in report["layers"]:
        if row["action"] != "factorize":
            kept[row["reason"]] = kept.get(row["reason"], 0) + 1
            continue
        table.add_row(
            row["name"],
            row["op"],
            "x".join(str(d) for d in row["weight_shape"]),
            str(row["rank"]) if row.get("rank") is not None else f"{row['method']} {row.get('ranks')}",
            f"{human(row['params_before'])} -> {human(row['params_after'])}",
            f"{human(row['flops_before'])} -> {human(row['flops_after'])}",
            f"{row['weight_rel_error']:.4f}" if "weight_rel_error" in row else "-",
        )
    out = console()
    out.print(table)
    totals = report["totals"]
    before, after = totals["model_params_before"], totals["model_params_after"]
    line = f"model params {human(before)} -> {human(after)} ({after / before:.1%} kept)"
    if "layer_flops_before" in totals:
        fb, fa = totals["layer_flops_before"], totals["layer_flops_after"]
        line += f"; Gemm/MatMul/Conv FLOPs {human(fb)} -> {human(fa)} ({fa / fb:.1%})"
    line += f"; file {human(report['input']['bytes'], 'B')} -> {human(report['output']['bytes'], 'B')}"
    line += f"; {report['seconds']:.2f} s"
    out.print(line)
    if kept:
        out.print("kept dense: " + ", ".join(f"{count} {reason}" for reason, count in sorted(kept.items())))


def _size_with_data(path: str) -> int:
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.exists(data) else 0)
