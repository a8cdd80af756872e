"""``onnx-lowrank fold``: merge similar neurons/channels (data-free) and write the model atomically."""

from __future__ import annotations

import os
from pathlib import Path

import click

from onnx_lowrank import __version__
from onnx_lowrank.cli.common import console, echo_json, human, info, input_shape_option, json_option, write_json
from onnx_lowrank.cli.search_cmd import calibration_data
from onnx_lowrank.errors import InputError, NothingToDo, OptionError
from onnx_lowrank.fold import METHODS, FoldReport, fold_model, inspect_groups
from onnx_lowrank.fold.allocate import DEFAULT_WIDTH_MULTIPLE
from onnx_lowrank.fold.pipeline import DATA_METHODS
from onnx_lowrank.fold.regress import DEFAULT_RIDGE
from onnx_lowrank.jsonfile import read_json
from onnx_lowrank.model import check_output_path, load_model, save_model

BUDGET_FLAGS = ("--keep", "--keep-params", "--widths")


@click.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=str))
@click.option("-o", "--output", "output_path", type=click.Path(path_type=str), help="Where to write the folded model.")
@click.option("--keep", type=float, metavar="F", help="Each foldable group keeps ceil(F x its width) channels.")
@click.option(
    "--keep-params", type=float, metavar="F",
    help="The layers the groups scale keep at most F of their weights, allocated by clustering error.",
)
@click.option(
    "--widths", "widths_path", type=click.Path(path_type=str),
    help="Re-apply the widths of a previous run (a --save-widths file or a --report JSON).",
)
@click.option("--magnitude-prune", is_flag=True, help="Baseline: keep the largest-L1 channels instead of merging.")
@click.option(
    "--method", type=click.Choice(METHODS), default=None,
    help="kmeans (default, data-free merge), magnitude (= --magnitude-prune), or regress: keep the channels that "
    "contribute most on --calib data and fold the others into them by least squares (best on transformers).",
)
@click.option("--calib", "calib_path", type=click.Path(path_type=str),
              help="Calibration inputs (.npz, matched like validate --data) for --method regress.")
@click.option("--input-map", "input_map", multiple=True, metavar="INPUT=KEY",
              help="Feed --calib array KEY to model input INPUT. Repeatable.")
@click.option("--width-multiple", type=int, default=DEFAULT_WIDTH_MULTIPLE, show_default=True,
              help="Widths from --keep/--keep-params are multiples of this (kernels work in channel blocks: off a "
              "multiple of 8, onnxruntime's CPU convs lose their fast path); 1 keeps exact fractions.")
@click.option("--mask-input", metavar="NAME",
              help="With --method regress: the model input holding a [batch, positions] padding mask (e.g. "
              "attention_mask); padded positions are left out of the fit.")
@click.option("--ridge", type=float, default=DEFAULT_RIDGE, show_default=True,
              help="Relative ridge weight of --method regress.")
@click.option(
    "--repair/--no-repair", default=True, show_default=True,
    help="Rescale merged channels to undo the variance merging collapses (data-free).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the k-means initialisation.")
@click.option("--list", "list_only", is_flag=True, help="Only list the channel groups (and why others are left alone).")
@click.option("--save-widths", type=click.Path(path_type=str), help="Write the chosen widths as JSON.")
@click.option("--report", "report_path", type=click.Path(path_type=str), help="Write a JSON report.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--external-data/--no-external-data", default=None, help="Store weights in OUTPUT.data (default: only above 2 GB).")
@input_shape_option
@json_option
def fold(
    model_path, output_path, keep, keep_params, widths_path, magnitude_prune, method, calib_path, input_map,
    width_multiple, mask_input, ridge,
    repair, seed, list_only, save_widths, report_path, overwrite, external_data, input_shapes, as_json,
):
    """Merge similar output neurons/channels of MODEL.onnx (model folding).

    Without data (--method kmeans, the default), each foldable layer's neurons are clustered by
    k-means on their weights (bias and a following BatchNorm included), each cluster becomes
    its centroid, the next layer's matching inputs are summed, and the variance the merge
    collapses is repaired. With --method regress --calib DATA, the channels that contribute
    most on DATA are kept as they are and the others are folded into them by least squares.
    Exactly one of --keep, --keep-params or --widths says how much; --list shows what can be
    folded.
    """
    if list_only:
        _list(model_path, input_shapes, as_json)
        return
    widths = _budget_options(keep, keep_params, widths_path)
    if output_path is None:
        raise OptionError("-o/--output is required (or use --list)")
    check_output_path(Path(output_path), overwrite=overwrite, input_path=model_path)
    if magnitude_prune and method not in (None, "magnitude"):
        raise OptionError(f"--magnitude-prune contradicts --method {method}")
    method = "magnitude" if magnitude_prune else (method or "kmeans")
    if method in DATA_METHODS and calib_path is None:
        raise OptionError("--method regress needs --calib FILE.npz (calibration inputs)")
    if ridge < 0:
        raise OptionError(f"--ridge must be >= 0, got {ridge}")
    model = load_model(model_path)
    calibration = calibration_data(
        model, calib_path, None, input_map, seed, input_shapes, needed=method in DATA_METHODS
    )
    folded, report = fold_model(
        model,
        keep=keep,
        keep_params=keep_params,
        widths=widths,
        method=method,
        repair=repair,
        seed=seed,
        input_shapes=input_shapes,
        calibration=calibration,
        ridge=ridge,
        width_multiple=width_multiple,
        mask_input=mask_input,
    )
    if not report.groups:
        reasons = sorted({s["reason"] for s in report.skipped})
        raise NothingToDo(
            f"{model_path}: nothing to fold (no foldable channel group; left alone: {', '.join(reasons) or 'no layers'}); "
            "no file written"
        )
    if not report.modified:
        raise NothingToDo(f"{model_path}: nothing to fold at this budget (every group keeps its width); no file written")
    save_model(folded, output_path, overwrite=overwrite, input_path=model_path, external_data=external_data)
    data = build_report(model_path, output_path, report)
    if save_widths:
        write_json(save_widths, report.widths())
    if report_path:
        write_json(report_path, data)
    if as_json:
        echo_json(data)
    else:
        print_summary(data)
        info(f"wrote {output_path}")


def _budget_options(keep, keep_params, widths_path) -> dict | None:
    given = [flag for flag, value in zip(BUDGET_FLAGS, (keep, keep_params, widths_path)) if value is not None]
    if len(given) != 1:
        what = "none was given" if not given else f"got {', '.join(given)}"
        raise OptionError(f"give exactly one of {', '.join(BUDGET_FLAGS)} ({what})")
    for flag, value in (("--keep", keep), ("--keep-params", keep_params)):
        if value is not None and not 0 < value <= 1:
            raise OptionError(f"{flag}: the fraction kept must be in (0, 1], got {value}")
    if widths_path is None:
        return None
    path = Path(widths_path)
    data = read_json(path, what="widths")
    if isinstance(data, dict) and isinstance(data.get("widths"), dict):
        data = data["widths"]  # a --report file
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of group widths")
    return data


def _list(model_path, input_shapes, as_json) -> None:
    model = load_model(model_path)
    listing = inspect_groups(model, input_shapes)
    listing["model"] = model_path
    if as_json:
        echo_json(listing)
        return
    print_groups(listing, title=f"{model_path}: channel groups")


def print_groups(listing: dict, *, title: str) -> None:
    """The foldable channel groups (and why the others are left alone), as ``fold --list`` and
    ``inspect`` show them."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column, justify in (
        ("group (producer)", "left"), ("op", "left"), ("width", "right"), ("path", "left"),
        ("consumers", "left"), ("params", "right"), ("status", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in listing["groups"]:
        table.add_row(
            row["name"],
            row["op"],
            str(row["width"]),
            " > ".join(row.get("path", [])),
            ", ".join(row.get("consumers", [])),
            human(row.get("params")) if row["foldable"] else "",
            "foldable" if row["foldable"] else f"skip: {row['reason']}",
        )
    out = console()
    out.print(table)
    totals = listing["totals"]
    out.print(
        f"{totals['foldable_groups']}/{totals['groups']} groups foldable: {totals['foldable_channels']} channels, "
        f"{human(totals['foldable_layer_params'])} weights in the layers they scale"
    )
    for row in listing["groups"]:
        if not row["foldable"]:
            out.print(f"  left alone {row['name']}: {row['detail']}")


def build_report(model_path: str, output_path: str, report: FoldReport) -> dict:
    """The JSON report of one fold run."""
    return {
        "tool": {"name": "onnx-lowrank", "version": __version__},
        "input": {"path": model_path, "bytes": os.path.getsize(model_path)},
        "output": {"path": output_path, "bytes": _size_with_data(output_path)},
        **report.to_json(),
    }


def print_summary(data: dict) -> None:
    """Per-group widths, errors and params, then totals."""
    from rich.table import Table

    table = Table(title="folded groups", title_justify="left")
    for column, justify in (
        ("group", "left"), ("op", "left"), ("channels", "right"), ("action", "left"),
        ("rel. error", "right"), ("repair", "right"), ("params", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in data["groups"]:
        table.add_row(
            row["name"],
            row["op"],
            f"{row['width']} -> {row['kept']}",
            row["action"],
            f"{row['rel_error']:.4f}",
            f"x{row['repair']:.3f}" if row["action"] == "fold" and data["repair"] else "-",
            f"{human(row['params_before'])} -> {human(row['params_after'])}",
        )
    out = console()
    out.print(table)
    totals = data["totals"]
    lb, la = totals["layer_params_before"], totals["layer_params_after"]
    mb, ma = totals["model_params_before"], totals["model_params_after"]
    out.print(
        f"foldable layers' weights {human(lb)} -> {human(la)} ({la / lb:.1%} kept); "
        f"model params {human(mb)} -> {human(ma)} ({ma / mb:.1%}); "
        f"file {human(data['input']['bytes'], 'B')} -> {human(data['output']['bytes'], 'B')}; {data['seconds']:.2f} s"
    )
    reasons: dict[str, int] = {}
    for row in data["skipped"]:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    if reasons:
        out.print("left alone: " + ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())))
    if data["not_applied"]:
        out.print("not applied: " + ", ".join(f"{name} ({why})" for name, why in data["not_applied"].items()))


def _size_with_data(path: str) -> int:
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.exists(data) else 0)
