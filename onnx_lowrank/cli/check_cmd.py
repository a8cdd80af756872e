"""``onnx-lowrank check``: a CI gate on accuracy and latency against a stored baseline."""

from __future__ import annotations

from pathlib import Path

import click

from onnx_lowrank import __version__
from onnx_lowrank.cli.common import console, echo_json, info, json_option
from onnx_lowrank.cli.validate_cmd import data_options, make_dataset, make_runtime, runtime_options
from onnx_lowrank.errors import CheckFailed, OptionError
from onnx_lowrank.validate.accuracy import Thresholds
from onnx_lowrank.validate.gate import (
    DEFAULT_ALPHA,
    METRICS,
    Baseline,
    GateReport,
    compare_to_baseline,
    measure_gate,
    parse_tolerances,
    save_baseline,
)

DEFAULT_RANDOM_SAMPLES = 64


@click.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=str))
@click.option("--original", "original_path", required=True, type=click.Path(path_type=str), help="The uncompressed model.")
@click.option("--baseline", "baseline_path", required=True, type=click.Path(path_type=str), help="Baseline JSON to compare with.")
@click.option("--update-baseline", is_flag=True, help="Write the current figures as the new baseline (atomically).")
@data_options
@runtime_options
@click.option("--batch", default=1, show_default=True, help="Batch size of the latency measurement.")
@click.option("--batch-size", default=64, show_default=True, help="Samples per call for the accuracy metrics.")
@click.option("--warmup", default=10, show_default=True, help="Untimed runs per model.")
@click.option("--iters", default=100, show_default=True, help="Timed pairs (original, MODEL interleaved).")
@click.option("--no-latency", is_flag=True, help="Gate on accuracy only.")
@click.option("--tolerance", "tolerance_texts", multiple=True, metavar="METRIC:VALUE[%]",
              help=f"Allowed worsening vs the baseline, e.g. speedup:10% or cosine:0.001 (metrics: {', '.join(METRICS)}). Repeatable.")
@click.option("--alpha", default=DEFAULT_ALPHA, show_default=True, help="Significance level for timing regressions.")
@click.option("--min-speedup", type=float, help="Also fail if the speedup (x) is below this.")
@click.option("--max-rel-error", type=float, help="Also fail if any output's relative L2 error exceeds this.")
@click.option("--min-cosine", type=float, help="Also fail if any output's cosine is below this.")
@click.option("--min-top1-agreement", type=float, help="Also fail if top-1 agreement (0-1) is below this.")
@click.option("--max-accuracy-drop", type=float, help="Also fail if accuracy drops by more points than this.")
@json_option
def check(
    model_path, original_path, baseline_path, update_baseline, data_path, random_n, labels_path, labels_key, input_map,
    input_shapes, seed, provider, threads, tf32, spin, batch, batch_size, warmup, iters, no_latency, tolerance_texts, alpha,
    min_speedup, max_rel_error, min_cosine, min_top1_agreement, max_accuracy_drop, as_json,
):
    """Gate MODEL.onnx (compressed) against --original and a stored --baseline.

    Measures accuracy metrics vs the original (like validate) and the speedup original/MODEL
    timed interleaved, then compares with the baseline. A metric regresses when it is worse
    by more than its tolerance and, for the speedup, significantly so (Mann-Whitney U).
    Exits 1 on a regression or a failed limit, 0 otherwise. Without --data, uses --random 64.
    """
    tolerances = parse_tolerances(tolerance_texts)
    thresholds = Thresholds(max_rel_error, min_cosine, min_top1_agreement, max_accuracy_drop)
    if not 0 < alpha < 1:
        raise OptionError(f"--alpha must be in (0, 1), got {alpha}")
    if no_latency and min_speedup is not None:
        raise OptionError("--min-speedup needs the latency measurement (drop --no-latency)")
    if batch < 1 or batch_size < 1:
        raise OptionError("--batch and --batch-size must be positive integers")
    options = make_runtime(provider, threads, tf32, spin)
    baseline = None
    if Path(baseline_path).exists() or not update_baseline:
        baseline = Baseline.load(baseline_path)
    if data_path is None and random_n is None:
        info(f"no --data: accuracy metrics on {DEFAULT_RANDOM_SAMPLES} seeded random samples (--random N to change)")
    dataset = make_dataset(
        original_path, data_path, random_n, labels_path, labels_key, input_map, input_shapes, seed,
        default_random=DEFAULT_RANDOM_SAMPLES,
    )
    if max_accuracy_drop is not None and dataset.labels is None:
        raise OptionError("--max-accuracy-drop needs labels (--labels, --labels-key or an npz key 'labels')")
    info(f"measuring {model_path} against {original_path} ({dataset.n} samples; {iters} timed pairs at batch {batch})")
    current = measure_gate(
        original_path, model_path, dataset, options=options, batch=batch, batch_size=batch_size, warmup=warmup,
        iters=iters, latency=not no_latency,
    )
    report = compare_to_baseline(
        current, baseline, tolerances=tolerances, alpha=alpha, thresholds=thresholds, min_speedup=min_speedup
    )
    if as_json:
        echo_json({
            "tool": {"name": "onnx-lowrank", "version": __version__},
            "check": {**report.to_json(), "metrics": current.metrics, "baseline": baseline_path,
                      "updated_baseline": update_baseline and not report.failures, "context": current.context},
        })
    else:
        for note in [*current.comparison.notes, *report.notes]:
            info(note)
        print_gate(report, current.metrics, baseline is not None)
    if report.failures:
        raise CheckFailed(report.summary())
    if update_baseline:
        save_baseline(baseline_path, current)
        info(f"wrote baseline {baseline_path}" + (" (regressions accepted)" if report.regressions else ""))
        return
    if not report.passed:
        raise CheckFailed(f"regression against {baseline_path}: {report.summary()}")
    info("check passed")


def print_gate(report: GateReport, metrics: dict, has_baseline: bool) -> None:
    from rich.table import Table

    out = console()
    if has_baseline:
        table = Table(title="check against baseline", title_justify="left")
        for column in ("metric", "baseline", "current", "change", "tolerance", "p", "status"):
            table.add_column(column, justify="left" if column in ("metric", "status") else "right")
        for row in report.table():
            status = row[-1]
            style = {"regressed": "bold red", "improved": "green", "noise": "yellow"}.get(status)
            table.add_row(*row[:-1], f"[{style}]{status}[/]" if style else status)
        out.print(table)
    else:
        out.print("no baseline yet; current figures:")
        for name, value in metrics.items():
            out.print(f"  {METRICS[name].label}: {METRICS[name].fmt.format(value)}")
    for failure in report.failures:
        out.print(f"FAILED {failure.message}")
