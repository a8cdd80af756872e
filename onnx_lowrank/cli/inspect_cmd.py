"""``onnx-lowrank inspect``: list the layers that can be factorized and what each would cost."""

from __future__ import annotations

import click

from onnx_lowrank.cli.common import console, echo_json, human, input_shape_option, json_option, progress
from onnx_lowrank.cli.fold_cmd import print_groups
from onnx_lowrank.fold import inspect_groups
from onnx_lowrank.inspection import inspect_model
from onnx_lowrank.layers import find_layers
from onnx_lowrank.model import load_model


@click.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=True, path_type=str))
@input_shape_option
@click.option("--inputs-as-constants", is_flag=True, help="Treat weights that are also graph inputs as constants.")
@click.option("--no-spectrum", is_flag=True, help="Skip the SVDs (faster on very large models).")
@json_option
def inspect(model_path, input_shapes, inputs_as_constants, no_spectrum, as_json):
    """Show every Gemm/MatMul/Conv layer: size, FLOPs, break-even and energy ranks, support."""
    model = load_model(model_path)
    layers = find_layers(model, input_shapes, treat_inputs_as_constants=inputs_as_constants)
    with progress("SVD", sum(1 for la in layers if la.supported) if not no_spectrum else 0) as advance:
        result = inspect_model(
            model, layers, spectra=not no_spectrum, on_layer=lambda la: la.supported and advance()
        )
    result["model"] = model_path
    result["fold"] = inspect_groups(model, input_shapes)
    if as_json:
        echo_json(result)
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{result['model']}: candidate layers", title_justify="left")
    for column, justify in (
        ("layer", "left"), ("op", "left"), ("weight", "left"), ("params", "right"), ("FLOPs", "right"),
        ("break-even r", "right"), ("r@90%", "right"), ("r@99%", "right"), ("status", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in result["layers"]:
        status = "ok" if row["supported"] else f"skip: {row['reason']}"
        table.add_row(
            row["name"],
            row["op"],
            "x".join(str(d) for d in row["weight_shape"]),
            human(row["params"]),
            human(row["flops"]),
            str(row.get("break_even_rank", "")),
            str(row.get("rank_energy_90", "")),
            str(row.get("rank_energy_99", "")),
            status,
        )
    out = console()
    out.print(table)
    totals = result["totals"]
    out.print(
        f"model params {human(totals['model_params'])}; {totals['layers_supported']}/{totals['layers']} layers "
        f"supported holding {human(totals['supported_params'])} params, "
        f"{human(totals['supported_flops'])} FLOPs per inference"
    )
    by_method = [row for row in result["layers"] if row.get("params_at_energy")]
    if by_method:
        methods = Table(title="values stored to keep 90% / 99% of the energy (- : not smaller than dense)", title_justify="left")
        methods.add_column("layer", overflow="fold")
        for name in ("svd", "tucker", "tt"):
            methods.add_column(name, justify="right")
        for row in by_method:
            cells = []
            for name in ("svd", "tucker", "tt"):
                levels = row["params_at_energy"].get(name)
                cells.append(" / ".join(human(v) if v else "-" for v in levels.values()) if levels else "n/a")
            methods.add_row(row["name"], *cells)
        out.print(methods)
    skipped = [row for row in result["layers"] if not row["supported"]]
    for row in skipped:
        out.print(f"  skipped {row['name']}: {row['detail']}")
    print_groups(result["fold"], title="channel groups that `onnx-lowrank fold` can merge")
