"""``onnx-lowrank validate``: how far the compressed model's outputs are from the original's.

Also home of the data and runtime options that ``bench`` and ``check`` share.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from onnx_lowrank import __version__
from onnx_lowrank.cli.common import console, echo_json, info, input_shape_option, json_option, progress, write_json
from onnx_lowrank.errors import CheckFailed, OptionError
from onnx_lowrank.validate.accuracy import ComparisonResult, Thresholds, check_thresholds, compare_models
from onnx_lowrank.validate.data import Dataset, load_dataset, parse_input_map, random_dataset
from onnx_lowrank.validate.runtime import PROVIDERS, RuntimeOptions, input_specs


def data_options(func: Callable) -> Callable:
    """--data/--random, labels, --input-map, --input-shape, --seed."""
    for decorator in reversed((
        click.option("--data", "data_path", type=click.Path(path_type=str), metavar="FILE.npz",
                     help="Inputs as an .npz of batch-first arrays named after the model inputs."),
        click.option("--random", "random_n", type=int, metavar="N", help="Use N seeded random samples instead of --data."),
        click.option("--labels", "labels_path", type=click.Path(path_type=str), metavar="FILE.npy",
                     help="Class labels [n] (or one-hot [n, classes]) for accuracy."),
        click.option("--labels-key", metavar="KEY", help="The npz array holding labels (default: 'labels' if present)."),
        click.option("--input-map", "input_map", multiple=True, metavar="INPUT=KEY",
                     help="Feed npz array KEY to model input INPUT. Repeatable."),
        input_shape_option,
        click.option("--seed", default=0, show_default=True, help="Seed for --random inputs."),
    )):
        func = decorator(func)
    return func


def runtime_options(func: Callable) -> Callable:
    """--provider, --threads, --tf32/--no-tf32, --spin/--no-spin."""
    for decorator in reversed((
        click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True,
                     help="ONNX Runtime execution provider; never falls back silently."),
        click.option("--threads", type=int, help="Intra-op threads (default: onnxruntime's, one per physical core)."),
        click.option("--tf32/--no-tf32", default=True, show_default=True, help="CUDA EP use_tf32 (TF32 MatMul/Conv)."),
        click.option("--spin/--no-spin", default=False, show_default=True,
                     help="Let idle ORT threads busy-wait (ORT's default; off keeps timings steady on shared machines)."),
    )):
        func = decorator(func)
    return func


def make_runtime(provider: str, threads: int | None, tf32: bool, spin: bool, cuda_graph: bool = False) -> RuntimeOptions:
    return RuntimeOptions(provider=provider, threads=threads, tf32=tf32, cuda_graph=cuda_graph, spin=spin)


def make_dataset(
    model_path: str, data_path, random_n, labels_path, labels_key, input_map, input_shapes, seed,
    *, default_random: int | None = None,
) -> Dataset:
    """The inputs the data options describe, matched to ``model_path``'s inputs."""
    if data_path is not None and random_n is not None:
        raise OptionError("give --data or --random, not both")
    if data_path is None and random_n is None:
        if default_random is None:
            raise OptionError("give --data FILE.npz or --random N")
        random_n = default_random
    specs = input_specs(model_path)
    if random_n is not None:
        if labels_path or labels_key or input_map:
            raise OptionError("--labels, --labels-key and --input-map need --data")
        return random_dataset(specs, random_n, shapes=input_shapes, seed=seed)
    return load_dataset(
        data_path, specs, input_map=parse_input_map(input_map), labels_path=labels_path, labels_key=labels_key
    )


@click.command()
@click.argument("original_path", metavar="ORIGINAL.onnx", type=click.Path(path_type=str))
@click.argument("compressed_path", metavar="COMPRESSED.onnx", type=click.Path(path_type=str))
@data_options
@click.option("--batch-size", default=64, show_default=True, help="Samples per inference call.")
@runtime_options
@click.option("--max-rel-error", type=float, metavar="E", help="Fail if any output's relative L2 error exceeds E.")
@click.option("--min-cosine", type=float, metavar="C", help="Fail if any output's mean cosine similarity is below C.")
@click.option("--min-top1-agreement", type=float, metavar="F", help="Fail if top-1 agreement (0-1) is below F.")
@click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Fail if accuracy drops by more than POINTS (needs labels).")
@click.option("--report", "report_path", type=click.Path(path_type=str), help="Also write the JSON result here.")
@json_option
def validate(
    original_path, compressed_path, data_path, random_n, labels_path, labels_key, input_map, input_shapes, seed,
    batch_size, provider, threads, tf32, spin, max_rel_error, min_cosine, min_top1_agreement, max_accuracy_drop,
    report_path, as_json,
):
    """Compare COMPRESSED.onnx's outputs with ORIGINAL.onnx's on the same inputs.

    Per output: max absolute error, relative L2 error, cosine similarity and, for
    [batch, classes] outputs, top-1 agreement; with labels, both accuracies. Exits 1 when a
    threshold is not met, naming the value that would have passed.
    """
    thresholds = Thresholds(max_rel_error, min_cosine, min_top1_agreement, max_accuracy_drop)
    if batch_size < 1:
        raise OptionError(f"--batch-size must be a positive integer, got {batch_size}")
    options = make_runtime(provider, threads, tf32, spin)
    dataset = make_dataset(original_path, data_path, random_n, labels_path, labels_key, input_map, input_shapes, seed)
    if max_accuracy_drop is not None and dataset.labels is None:
        raise OptionError("--max-accuracy-drop needs labels (--labels, --labels-key or an npz key 'labels')")
    with progress("validate", dataset.n_batches(batch_size)) as advance:
        result = compare_models(
            original_path, compressed_path, dataset, options=options, batch_size=batch_size, on_batch=advance
        )
    failures = check_thresholds(result, thresholds)
    payload = {
        "tool": {"name": "onnx-lowrank", "version": __version__},
        "validation": {
            "original": original_path,
            "compressed": compressed_path,
            "data": dataset.to_json(),
            **result.to_json(),
            "thresholds": thresholds.to_json(),
            "failures": [f.to_json() for f in failures],
            "passed": not failures,
        },
    }
    if report_path:
        write_json(report_path, payload)
    if as_json:
        echo_json(payload)
    else:
        for note in result.notes:
            info(note)
        print_comparison(result)
        if thresholds.active() and not failures:
            console().print("thresholds: all met")
    if failures:
        raise CheckFailed(f"{len(failures)} threshold(s) not met: " + "; ".join(f.message for f in failures))


def print_comparison(result: ComparisonResult) -> None:
    """Per-output metrics table, then accuracy and the provider used."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"compressed vs original ({result.samples} samples)", title_justify="left")
    for column, justify in (
        ("output", "left"), ("shape", "left"), ("max abs err", "right"), ("rel L2 err", "right"),
        ("cosine mean / min", "right"), ("top-1 agree", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for m in result.outputs:
        table.add_row(
            escape(m.name),
            escape("[" + ", ".join(["n", *map(str, m.shape)]) + "]"),
            f"{m.max_abs_error:.4g}",
            f"{m.rel_l2_error:.4g}",
            f"{m.cosine:.5f} / {m.cosine_min:.5f}",
            f"{m.top1_agreement:.2%}" if m.top1_agreement is not None else "-",
        )
    out = console()
    out.print(table)
    if result.accuracy is not None:
        acc = result.accuracy
        out.print(
            f"accuracy on {escape(acc.output)} ({acc.samples} labels): original {acc.original:.2%} -> compressed "
            f"{acc.compressed:.2%} (drop {acc.drop_points:.2f} points)"
        )
    runtime = result.runtime
    out.print(f"provider {runtime['provider_used']}, threads {runtime['threads']}, onnxruntime {runtime['onnxruntime']}")
