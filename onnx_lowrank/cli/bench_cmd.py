"""``onnx-lowrank bench``: latency percentiles and throughput, and a side-by-side speedup."""

from __future__ import annotations

import click

from onnx_lowrank import __version__
from onnx_lowrank.cli.common import console, echo_json, info, input_shape_option, json_option, progress, write_json
from onnx_lowrank.cli.validate_cmd import make_runtime, runtime_options
from onnx_lowrank.errors import OptionError
from onnx_lowrank.validate import latency
from onnx_lowrank.validate.data import load_dataset, parse_input_map, random_feeds
from onnx_lowrank.validate.latency import DEFAULT_ITERS, DEFAULT_WARMUP, BenchResult, parse_batch_sizes
from onnx_lowrank.validate.runtime import input_specs


@click.command(name="bench")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=str))
@click.argument("other_path", metavar="[OTHER.onnx]", required=False, type=click.Path(path_type=str))
@click.option("--batch", "batch_text", default="1", show_default=True, metavar="B1,B2,...", help="Batch sizes to time.")
@click.option("--warmup", default=DEFAULT_WARMUP, show_default=True, help="Untimed runs per model and batch size.")
@click.option("--iters", default=DEFAULT_ITERS, show_default=True, help="Timed runs per model and batch size.")
@click.option("--data", "data_path", type=click.Path(path_type=str), metavar="FILE.npz",
              help="Take inputs from this .npz (cycled to each batch size) instead of random ones.")
@click.option("--input-map", "input_map", multiple=True, metavar="INPUT=KEY", help="Feed npz array KEY to INPUT.")
@input_shape_option
@click.option("--seed", default=0, show_default=True, help="Seed for random inputs.")
@runtime_options
@click.option("--cuda-graph", is_flag=True, help="CUDA EP enable_cuda_graph (static shapes; needs --provider cuda).")
@click.option("--samples", is_flag=True, help="Include every run time in the JSON.")
@click.option("--report", "report_path", type=click.Path(path_type=str), help="Also write the JSON result here.")
@json_option
def bench_command(
    model_path, other_path, batch_text, warmup, iters, data_path, input_map, input_shapes, seed, provider, threads,
    tf32, spin, cuda_graph, samples, report_path, as_json,
):
    """Time MODEL.onnx on ONNX Runtime with I/O binding: p50/p90/p99 latency and throughput.

    With OTHER.onnx, both are timed interleaved on the same inputs and the speedup
    time(MODEL) / time(OTHER) is the median of the per-pair ratios (with its interquartile
    range). Fails (exit 2) if the provider cannot be loaded; never times a fallback.
    """
    batches = parse_batch_sizes(batch_text)
    options = make_runtime(provider, threads, tf32, spin, cuda_graph)
    specs = input_specs(model_path)
    if data_path is not None:
        if input_shapes:
            raise OptionError("--input-shape applies to random inputs; with --data the shapes come from the file")
        dataset = load_dataset(data_path, specs, input_map=parse_input_map(input_map), want_labels=False)
        for note in dataset.notes:
            info(note)
        feeds_for = dataset.take
    else:
        if input_map:
            raise OptionError("--input-map needs --data")
        notes: list[str] = []
        random_feeds(specs, 1, shapes=input_shapes, seed=seed, notes=notes)  # validate shapes up front
        for note in notes:
            info(note)

        def feeds_for(batch: int):
            return random_feeds(specs, batch, shapes=input_shapes, seed=seed)

    with progress("bench", len(batches)) as advance:
        result = latency.bench(
            model_path, other_path, batches, feeds_for, options=options, warmup=warmup, iters=iters,
            labels=(model_path, other_path or ""), on_batch=advance,
        )
    payload = {"tool": {"name": "onnx-lowrank", "version": __version__}, "latency": result.to_json(samples=samples)}
    payload["latency"]["settings"] = {"warmup": warmup, "iters": iters, "batches": list(batches), "seed": seed}
    if report_path:
        write_json(report_path, payload)
    if as_json:
        echo_json(payload)
    else:
        print_bench(result)


bench = bench_command  # the registry imports the attribute named after the command


def print_bench(result: BenchResult) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="latency (ms, I/O binding)", title_justify="left")
    for column in ("model", "batch", "p50", "p90", "p99", "samples/s"):
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    if len(result.labels) > 1:
        table.add_column("speedup (IQR)", justify="right")
    for row in result.rows:
        timings = [row.a] if row.pair is None else [row.pair.a, row.pair.b]
        for index, timing in enumerate(timings):
            cells = [
                escape(timing.label), str(row.batch), f"{timing.p50:.4f}", f"{timing.p90:.4f}", f"{timing.p99:.4f}",
                f"{timing.throughput:,.0f}",
            ]
            if row.pair is not None:
                low, high = row.pair.iqr
                cells.append(f"{row.pair.speedup:.3f}x ({low:.3f}-{high:.3f})" if index == 1 else "")
            table.add_row(*cells)
    out = console()
    out.print(table)
    runtime = result.runtime
    line = (
        f"provider {result.provider_used}, threads {runtime['threads']}, spinning {'on' if runtime['spin'] else 'off'}, "
        f"onnxruntime {runtime['onnxruntime']}"
    )
    if "tf32" in runtime:
        line += f", TF32 {'on' if runtime['tf32'] else 'off'}, CUDA graph {'on' if runtime['cuda_graph'] else 'off'}"
    out.print(line)
