"""``onnx-lowrank search``: plan ranks under a budget (or a sweep of budgets) without rewriting.

    onnx-lowrank search model.onnx --budget params=0.4 --method global -o plan.json
    onnx-lowrank search model.onnx --method global --sweep 0.2,0.3,0.5,0.7 -o plans/ --emit models/
    onnx-lowrank search model.onnx --method calibrated --calib data.npz --budget params=0.3 -o plan.json
    onnx-lowrank search model.onnx --provider cpu --budget latency-ms=1.5 -o plan.json
    onnx-lowrank search --list-methods
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from onnx_lowrank.cli.common import (
    console,
    echo_json,
    human,
    info,
    input_shape_option,
    json_option,
    parse_pairs,
    progress,
)
from onnx_lowrank.errors import NothingToDo, OptionError, OutputError
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import check_output_path, load_model, model_sha256, save_model
from onnx_lowrank.search import registry
from onnx_lowrank.search.budget import Budget, parse_budget
from onnx_lowrank.search.cache import open_cache
from onnx_lowrank.search.engine import DEFAULT_MIN_PARAMS, plan_totals, prepare_search, run_search
from onnx_lowrank.search.plan import RankPlan
from onnx_lowrank.validate.data import parse_input_map


def floor_options(data_flag: str):
    """--floor, --minimize, --holdout, --output-name, --max-evals, --time-budget (compress and search)."""
    options = (
        click.option("--floor", "floor_texts", multiple=True, metavar="METRIC=VALUE",
                     help=f"Accuracy floor on {data_flag}'s held-back part: top1-agreement=0.99, cosine=0.995, "
                     "rel-error=0.02, accuracy-drop=0.5 (points, needs labels). Repeatable; replaces the budget flags."),
        click.option("--minimize", type=click.Choice(["params", "flops", "latency"]), default="params",
                     show_default=True, help="With --floor: what to minimize (latency is measured per layer on --provider)."),
        click.option("--holdout", default=0.3, show_default=True,
                     help=f"With --floor: fraction of {data_flag} held back for the final check."),
        click.option("--output-name", help="With --floor: the model output the floors apply to (default: the first)."),
        click.option("--max-evals", type=int, metavar="N", help="With --floor: at most N new layer x rank evaluations."),
        click.option("--time-budget", type=float, metavar="SECONDS",
                     help="With --floor: stop new evaluations after this long."),
    )

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@dataclasses.dataclass(frozen=True)
class Target:
    """One budget to plan, with where its plan (and model) go."""

    budget: Budget
    label: str
    plan_path: Path | None
    model_path: Path | None


@click.command()
@click.argument("model_path", metavar="MODEL.onnx", required=False, type=click.Path(path_type=str))
@click.option("--budget", "budget_text", metavar="KIND=VALUE", help="params=0.4, flops=50%, params=1.5M or latency-ms=2.5 (needs --provider).")
@click.option("--sweep", "sweep_text", metavar="[KIND=]F,F,...", help="Several fractions kept (default kind params), e.g. 0.2,0.3,0.5,0.7: one analysis, one plan each; -o is then a directory.")
@click.option("--method", default="global", show_default=True, help="Search method (see --list-methods).")
@click.option("--option", "option_texts", multiple=True, metavar="KEY=VALUE", help="A method option, e.g. --option beta=2 (repeatable).")
@click.option("-o", "--output", "output_path", type=click.Path(path_type=str), help="Plan file (a directory with --sweep).")
@click.option("--emit", "emit_dir", type=click.Path(path_type=str), help="Also write the compressed model of every plan into this directory.")
@click.option("--seed", default=0, show_default=True, help="Seed of every random choice (same seed, same plan).")
@click.option("--min-params", default=DEFAULT_MIN_PARAMS, show_default=True, help="Leave layers with fewer weight values alone.")
@click.option("--calib", "calib_path", type=click.Path(path_type=str), help="Calibration inputs (.npz, arrays named after the model inputs, batch first).")
@click.option("--input-map", "input_map_texts", multiple=True, metavar="NAME=KEY", help="Feed model input NAME from the .npz array KEY (repeatable).")
@click.option("--calib-random", type=int, metavar="N", help="N random calibration inputs instead of --calib (a weak proxy).")
@click.option("--calib-batch", default=32, show_default=True, help="Calibration batch size (bounds activation memory).")
@click.option("--provider", help="Measure per-layer latency on this execution provider (cpu, cuda or tensorrt): latency guard and latency budgets.")
@click.option("--rank-multiple", type=int, help="Ranks are multiples of this [default: 16 with --provider cpu, 8 with cuda, else 1].")
@click.option("--cache-dir", type=click.Path(path_type=str), help="Cache of spectra and measurements [default: $ONNX_LOWRANK_CACHE or ~/.cache/onnx-lowrank].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the cache.")
@click.option("--overwrite", is_flag=True, help="Replace existing plan and model files.")
@click.option("--inputs-as-constants", is_flag=True, help="Factorize weights that are also graph inputs (IR >= 4).")
@click.option("--list-methods", is_flag=True, help="List the search methods (built-in and plugins) and exit.")
@floor_options("--calib")
@input_shape_option
@json_option
def search(
    model_path, budget_text, sweep_text, method, option_texts, output_path, emit_dir, seed, min_params, calib_path,
    input_map_texts, calib_random, calib_batch, provider, rank_multiple, cache_dir, no_cache, overwrite,
    inputs_as_constants, list_methods, input_shapes, as_json, floor_texts=(), minimize="params", holdout=0.3,
    output_name=None, max_evals=None, time_budget=None,
):
    """Choose per-layer ranks for MODEL.onnx under a budget and write the RankPlan.

    Give --budget for one plan or --sweep for several from one analysis; apply a plan with
    `onnx-lowrank compress MODEL --plan plan.json` (or write models directly with --emit).
    """
    if list_methods:
        _list_methods(as_json)
        return
    if model_path is None:
        raise OptionError("give MODEL.onnx (or --list-methods)")
    if floor_texts:
        _search_floor(
            model_path, floor_texts, method, minimize, holdout, output_name, max_evals, time_budget, output_path,
            overwrite, seed, min_params, calib_path, input_map_texts, provider, cache_dir, no_cache, as_json,
            conflicts=(budget_text, sweep_text, emit_dir, calib_random),
        )
        return
    chosen = registry.get_method(method)
    options = chosen.resolve_options(parse_pairs(option_texts, "--option"))
    if chosen.needs_calibration and not (calib_path or calib_random):
        raise OptionError(f"--method {method} needs calibration data: give --calib data.npz (or --calib-random N)")
    if calib_batch < 1:
        raise OptionError(f"--calib-batch must be positive, got {calib_batch}")
    budgets = _budgets(budget_text, sweep_text)
    started = time.perf_counter()
    model = load_model(model_path)
    targets = _targets(model_path, budgets, sweep_text is not None, output_path, emit_dir, method, overwrite)
    layers = find_layers(model, input_shapes, treat_inputs_as_constants=inputs_as_constants)
    if not any(layer.supported for layer in layers):
        raise NothingToDo(f"{model_path}: nothing to search (no supported Gemm/MatMul/Conv layer); no file written")
    if input_map_texts and not (calib_path or calib_random):
        raise OptionError("--input-map needs --calib")
    data = calibration_data(
        model, calib_path, calib_random, input_map_texts, seed, input_shapes, needed=chosen.needs_calibration
    )
    cache = open_cache(cache_dir, enabled=not no_cache)
    ctx = prepare_search(
        model, layers, min_params=min_params, seed=seed, model_sha256=model_sha256(model_path), cache=cache,
        provider=provider, rank_multiple=rank_multiple, input_shapes=input_shapes, calibration=data,
        calibration_batch=calib_batch, progress=progress,
    )
    results = []
    with progress("search", len(targets)) as advance:
        for target in targets:
            plan = run_search(ctx, chosen, target.budget, options)
            results.append((target, plan, plan_totals(ctx, plan)))
            advance()
    rows = [_write(model_path, model, layers, target, plan, totals, overwrite, ctx) for target, plan, totals in results]
    report = {
        "model": model_path,
        "method": chosen.name,
        "seconds": round(time.perf_counter() - started, 3),
        "cache": dataclasses.asdict(cache.stats) | {"directory": str(cache.directory) if cache.enabled else None},
        "plans": rows,
    }
    if as_json:
        echo_json(report)
    elif len(rows) == 1:
        _print_plan(rows[0], results[0][1])
    else:
        _print_sweep(report)


def _search_floor(
    model_path, floor_texts, method, minimize, holdout, output_name, max_evals, time_budget, output_path, overwrite,
    seed, min_params, calib_path, input_map_texts, provider, cache_dir, no_cache, as_json, *, conflicts,
):
    """``search --floor``: the plan of :func:`onnx_lowrank.floor.compress_to_floor` (no model written)."""
    from onnx_lowrank.floor import compress_to_floor, parse_floors
    from onnx_lowrank.validate.data import load_dataset
    from onnx_lowrank.validate.runtime import input_specs

    floors = parse_floors(floor_texts, output=output_name)
    if any(v is not None for v in conflicts):
        raise OptionError("--floor replaces --budget/--sweep/--emit and needs real data with --calib (not --calib-random)")
    if calib_path is None:
        raise OptionError("--floor needs --calib FILE.npz (split into calibration and held-back parts)")
    methods = {"global": "floor", "floor": "floor", "greedy": "greedy"}
    if method not in methods:
        raise OptionError(f"--method with --floor must be floor or greedy, got {method!r}")
    if output_path is not None:
        check_output_path(Path(output_path), overwrite=overwrite, input_path=model_path)
    model = load_model(model_path)
    data = load_dataset(calib_path, input_specs(model), input_map=parse_input_map(input_map_texts), flag="--calib")
    result = compress_to_floor(
        model, find_layers(model), data, floors, minimize, method=methods[method], provider=provider or "cpu",
        seed=seed, holdout=holdout, cache=open_cache(cache_dir, enabled=not no_cache), progress=progress,
        max_evals=max_evals, time_budget=time_budget, min_params=min_params, model_sha256=model_sha256(model_path),
    )
    if output_path is not None:
        result.plan.save(output_path)
    report = {"model": model_path, "plan": result.plan.to_json(), "floor": result.report}
    if output_path is not None:
        report["plan_path"] = output_path
    if as_json:
        echo_json(report)
        return
    chosen, held = result.report["chosen"], result.report["held_back"]
    console().print(
        f"floor plan ({result.report['method']}): {len(result.plan.factorized())} layers factorized, "
        f"{minimize} kept {chosen['cost_kept']:.1%}; held back: "
        + ", ".join(f"{k} {v:.4f}" for k, v in held["realized"].items() if k in chosen["predicted"] and v is not None)
    )
    if output_path is not None:
        info(f"wrote {output_path}")


def _budgets(budget_text: str | None, sweep_text: str | None) -> list[Budget]:
    if (budget_text is None) == (sweep_text is None):
        raise OptionError("give exactly one of --budget or --sweep")
    if budget_text is not None:
        return [parse_budget(budget_text)]
    kind, sep, values = sweep_text.partition("=")
    if not sep:
        kind, values = "params", sweep_text
    parts = [v.strip() for v in values.split(",") if v.strip()]
    if not parts:
        raise OptionError(f"--sweep {sweep_text!r}: expected fractions such as 0.2,0.3,0.5")
    budgets = [parse_budget(f"{kind.strip()}={part}", flag="--sweep") for part in parts]
    if len(set(budgets)) != len(budgets):
        raise OptionError(f"--sweep {sweep_text!r}: a budget is repeated")
    return budgets


def _label(budget: Budget) -> str:
    value = budget.fraction if budget.fraction is not None else budget.absolute
    return f"{budget.kind}-{value:g}"


def _targets(model_path, budgets, sweep: bool, output_path, emit_dir, method, overwrite) -> list[Target]:
    """Every budget with its output paths, all checked before the search runs."""
    stem = Path(model_path).stem
    plan_dir = emit = None
    if output_path is not None and sweep:
        plan_dir = _directory(output_path, "-o")
    if emit_dir is not None:
        emit = _directory(emit_dir, "--emit")
    targets = []
    for budget in budgets:
        label = _label(budget)
        if output_path is None:
            plan_path = None
        elif sweep:
            plan_path = plan_dir / f"{stem}.{method}.{label}.plan.json"
        else:
            plan_path = Path(output_path)
        model_out = emit / f"{stem}.{method}.{label}.onnx" if emit is not None else None
        for path in (plan_path, model_out):
            if path is not None:
                check_output_path(path, overwrite=overwrite, input_path=model_path)
        targets.append(Target(budget, label, plan_path, model_out))
    return targets


def _directory(text: str, flag: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a directory")
    if not path.exists():
        if not (path.parent if str(path.parent) else Path(".")).is_dir():
            raise OutputError(f"{flag} {path}: its parent directory does not exist")
        path.mkdir()
    return path


def calibration_data(model, calib_path, calib_random, input_map_texts, seed, input_shapes, *, needed: bool = True):
    """The calibration inputs --calib (matched with --input-map) or --calib-random describe, or None."""
    if calib_path and calib_random:
        raise OptionError("give one of --calib or --calib-random, not both")
    if not (calib_path or calib_random):
        return None
    if not needed:
        info("note: this method is data-free; the calibration data is not used")
        return None
    from onnx_lowrank.calibrate import load_calibration, random_calibration

    if calib_path:
        return load_calibration(calib_path, model, input_map=parse_input_map(input_map_texts))
    info(f"warning: {calib_random} random calibration inputs are a weak proxy for real data; prefer --calib")
    return random_calibration(model, calib_random, seed=seed, input_shapes=input_shapes)

def _write(model_path, model, layers, target: Target, plan: RankPlan, totals: dict, overwrite: bool, ctx) -> dict:
    row = {"budget": plan.budget, "label": target.label, "totals": totals, "plan": plan.to_json()}
    if target.plan_path is not None:
        check_output_path(target.plan_path, overwrite=overwrite, input_path=model_path)
        plan.save(target.plan_path)
        row["plan_path"] = str(target.plan_path)
    if target.model_path is not None:
        if not plan.factorized():
            info(f"{target.label}: the plan keeps every layer dense; no model written")
        else:
            compressed = _apply(model, layers, plan, ctx)
            save_model(compressed.model, target.model_path, overwrite=overwrite, input_path=model_path)
            row["model_path"] = str(target.model_path)
            row["model_params_after"] = compressed.totals["model_params_after"]
            row["model_params_before"] = compressed.totals["model_params_before"]
    return row


def _apply(model, layers, plan: RankPlan, ctx):
    from onnx_lowrank.search.calibrated import apply_calibrated_plan

    covariances = ctx.calibration.covariances if ctx.calibration is not None else None
    return apply_calibrated_plan(model, layers, plan, covariances)

def _list_methods(as_json: bool) -> None:
    entries = registry.discover()
    if as_json:
        echo_json({"methods": [entry.to_json() for entry in entries.values()]})
        return
    from rich.table import Table

    table = Table(title="search methods", title_justify="left")
    for column in ("method", "origin", "status", "options"):
        table.add_column(column, overflow="fold")
    for entry in entries.values():
        status = entry.method.description if entry.available else f"unavailable: {entry.error}"
        options = ", ".join(f"{k}={v.default}" for k, v in entry.method.options.items()) if entry.available else ""
        table.add_row(entry.name, entry.origin, status, options)
    console().print(table)


def _print_plan(row: dict, plan: RankPlan) -> None:
    from rich.table import Table

    table = Table(title=f"plan ({plan.method}, {row['label']})", title_justify="left")
    timed = any("latency_ms" in d.predicted for d in plan.factorized().values())
    columns = [("layer", "left"), ("method", "left"), ("rank", "right"), ("params", "right"), ("pred. error", "right")]
    for column, justify in columns + ([("latency ms", "right")] if timed else []):
        table.add_column(column, justify=justify, overflow="fold")
    kept: dict[str, int] = {}
    for name, decision in plan.layers.items():
        if decision.action != "factorize":
            kept[decision.reason or "keep"] = kept.get(decision.reason or "keep", 0) + 1
            continue
        predicted = decision.predicted
        error = predicted.get("output_rel_error", predicted.get("rel_error"))
        latency = (
            f"{predicted['dense_latency_ms']:.4f} -> {predicted['latency_ms']:.4f}" if "latency_ms" in predicted else ""
        )
        cells = [name, decision.method, str(decision.rank), human(predicted.get("params"))]
        cells.append(f"{error:.4f}" if error is not None else "")
        table.add_row(*cells, *([latency] if timed else []))
    out = console()
    if plan.factorized():
        out.print(table)
    else:
        out.print(f"plan ({plan.method}, {row['label']}): every candidate layer stays dense (the budget does not bind)")
    out.print(_totals_line(row["totals"]))
    if kept:
        out.print("kept dense: " + ", ".join(f"{count} {reason}" for reason, count in sorted(kept.items())))
    for key in ("plan_path", "model_path"):
        if key in row:
            info(f"wrote {row[key]}")


def _totals_line(totals: dict) -> str:
    parts = [f"{totals['layers_factorized']}/{totals['layers_candidate']} candidate layers factorized"]
    parts.append(
        f"params {human(totals['params_dense'])} -> {human(totals['params_planned'])} ({totals['params_kept']:.1%})"
    )
    if "flops_dense" in totals:
        parts.append(f"FLOPs {human(totals['flops_dense'])} -> {human(totals['flops_planned'])} ({totals['flops_kept']:.1%})")
    if "latency_ms_dense" in totals:
        parts.append(
            f"layer latency {totals['latency_ms_dense']:.3f} -> {totals['latency_ms_planned']:.3f} ms "
            f"({totals['latency_ms_kept']:.1%})"
        )
    return "; ".join(parts)


def _print_sweep(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{report['model']}: {report['method']} sweep", title_justify="left")
    for column, justify in (("budget", "left"), ("factorized", "right"), ("params kept", "right"), ("FLOPs kept", "right"), ("files", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in report["plans"]:
        totals = row["totals"]
        files = ", ".join(row[k] for k in ("plan_path", "model_path") if k in row)
        table.add_row(
            row["label"],
            f"{totals['layers_factorized']}/{totals['layers_candidate']}",
            f"{totals['params_kept']:.1%}",
            f"{totals['flops_kept']:.1%}" if "flops_kept" in totals else "?",
            files,
        )
    out = console()
    out.print(table)
    out.print(f"{len(report['plans'])} plans from one analysis in {report['seconds']:.2f} s")
