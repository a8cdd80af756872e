"""``onnx-lowrank finetune``: distill a compressed model's factors toward the original (torch)."""

from __future__ import annotations

from pathlib import Path

import click

from onnx_lowrank.cli.common import console, echo_json, info, json_option, progress, write_json
from onnx_lowrank.errors import UnsupportedError
from onnx_lowrank.model import check_output_path, file_uses_external_data, load_model, save_model


@click.command()
@click.argument("original_path", metavar="ORIGINAL.onnx", type=click.Path(path_type=str))
@click.argument("compressed_path", metavar="COMPRESSED.onnx", type=click.Path(path_type=str))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=str),
              help="Inputs (.npz, batch first) to distill on; labels are optional.")
@click.option("--labels", "labels_path", type=click.Path(path_type=str), help="Class labels (.npy) for a task loss.")
@click.option("--labels-key", help="Use this npz array as the labels.")
@click.option("--input-map", multiple=True, metavar="NAME=KEY", help="Feed model input NAME from npz array KEY. Repeatable.")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=str),
              help="Where to write the fine-tuned model.")
@click.option("--epochs", default=10, show_default=True, help="Passes over the training part of the data.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate (cosine decay to 0).")
@click.option("--batch", "batch_size", default=64, show_default=True, help="Samples per step.")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, the shuffles and torch.")
@click.option("--train", "train_set", type=click.Choice(["factors", "all"]), default="factors", show_default=True,
              help="Train the low-rank factors only, or every float weight.")
@click.option("--loss", type=click.Choice(["mse", "kl", "mean-cosine"]), default="mse", show_default=True,
              help="MSE on the outputs, KL of the softmax (for classifier logits), or 1 - cosine of the "
                   "outputs mean-pooled over axis 1 (sentence embeddings).")
@click.option("--mask-input", metavar="NAME",
              help="Model input holding a [batch, positions] padding mask (e.g. attention_mask): MSE ignores "
                   "padded positions, mean-cosine pools over the real ones.")
@click.option("--temperature", default=2.0, show_default=True, help="Softmax temperature of the KL loss.")
@click.option("--label-weight", default=0.5, show_default=True,
              help="With labels: loss = (1-w) * distillation + w * cross-entropy.")
@click.option("--holdout", default=0.1, show_default=True, help="Fraction of the data held out for before/after figures.")
@click.option("--anneal", is_flag=True, help="Start at 2x the compressed ranks and shrink to them while training (SVD truncation).")
@click.option("--threads", default=1, show_default=True, help="torch threads (fixed, for reproducible results).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--report", "report_path", type=click.Path(path_type=str), help="Write a JSON report.")
@json_option
def finetune(
    original_path, compressed_path, data_path, labels_path, labels_key, input_map, output_path, epochs, lr,
    batch_size, seed, train_set, loss, mask_input, temperature, label_weight, holdout, anneal, threads, overwrite,
    report_path, as_json,
):
    """Fine-tune COMPRESSED.onnx's low-rank factors so its outputs match ORIGINAL.onnx's.

    Distillation on --data (no labels needed); only the factor weights change, written back by
    name, so the graph is otherwise identical to COMPRESSED.onnx. Needs torch.
    """
    try:
        import torch  # noqa: F401  (only to turn a missing extra into a one-line message)
    except ImportError:
        raise UnsupportedError("finetune needs torch: pip install 'onnx-lowrank[torch]'") from None
    from onnx_lowrank.torch.finetune import FinetuneOptions
    from onnx_lowrank.torch.finetune import finetune as run_finetune
    from onnx_lowrank.validate.data import load_dataset, parse_input_map
    from onnx_lowrank.validate.runtime import input_specs

    options = FinetuneOptions(
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, train=train_set, loss=loss, mask_input=mask_input,
        temperature=temperature, label_weight=label_weight, holdout=holdout, anneal=anneal, threads=threads,
    )
    mapping = parse_input_map(input_map)
    check_output_path(Path(output_path), overwrite=overwrite, input_path=compressed_path)
    check_output_path(Path(output_path), overwrite=overwrite, input_path=original_path)
    original = load_model(original_path)
    compressed = load_model(compressed_path)
    dataset = load_dataset(
        data_path, input_specs(compressed), input_map=mapping, labels_path=labels_path, labels_key=labels_key
    )
    for note in dataset.notes:
        info(note)
    with progress("finetune", epochs) as advance:
        result = run_finetune(original, compressed, dataset.feeds, dataset.labels, options, on_epoch=advance)
    external = True if file_uses_external_data(compressed_path) else None
    save_model(result.model, output_path, overwrite=overwrite, input_path=compressed_path, external_data=external)
    report = {
        "original": original_path,
        "compressed": compressed_path,
        "output": output_path,
        "data": dataset.to_json(),
        **result.to_json(),
    }
    if report_path:
        write_json(report_path, report)
    if as_json:
        echo_json(report)
        return
    _print_summary(report)
    info(f"wrote {output_path}")


def _print_summary(report: dict) -> None:
    from rich.table import Table

    out = console()
    epochs = Table(title="training (mean loss per epoch)", title_justify="left")
    for column in ("epoch", "loss", "distillation", "task (CE)", "s"):
        epochs.add_column(column, justify="right")
    for row in report["history"]:
        task = "-" if row["task"] is None else f"{row['task']:.4g}"
        epochs.add_row(str(row["epoch"]), f"{row['loss']:.4g}", f"{row['distill']:.4g}", task, f"{row['seconds']:.2f}")
    out.print(epochs)
    where = report["evaluated_on"]
    figures = Table(title=f"on the {report['after']['samples']} {where} samples", title_justify="left")
    for column, justify in (("model", "left"), ("accuracy", "right"), ("agreement with original", "right"),
                            ("output rel. error", "right")):
        figures.add_column(column, justify=justify)
    for label, key in (("original", "original"), ("compressed", "before"), ("fine-tuned", "after")):
        row = report[key]
        figures.add_row(label, _pct(row["accuracy"]), _pct(row["agreement"]), f"{row['rel_error']:.4f}")
    out.print(figures)
    line = (
        f"trained {len(report['trained_tensors'])} tensors ({report['trained_values']} values) in "
        f"{report['seconds']:.1f} s; interpreter vs onnxruntime max rel. error {report['interpreter_max_rel_error']:.2g}"
    )
    if "anneal" in report:
        ranks = ", ".join(f"{name} {r['start']}->{r['target']}" for name, r in report["anneal"].items())
        line += f"; annealed ranks: {ranks}"
    out.print(line)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"
