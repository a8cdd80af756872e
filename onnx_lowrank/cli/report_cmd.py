"""``onnx-lowrank report``: one self-contained HTML page from JSON reports."""

from __future__ import annotations

from pathlib import Path

import click

from onnx_lowrank.cli.common import info, quiet_option
from onnx_lowrank.errors import InputError, OutputError
from onnx_lowrank.jsonfile import read_json, write_text_atomic
from onnx_lowrank.model import check_output_path
from onnx_lowrank.report_html import PLOTS_HINT, build_html, merge_reports


@click.command()
@click.argument("report_paths", metavar="REPORT.json [MORE.json ...]", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=str), help="The HTML file to write.")
@click.option("--png", "png_dir", type=click.Path(path_type=str), metavar="DIR", help="Also write each plot as DIR/<name>.png.")
@click.option("--title", help="Page title (default: from the report).")
@click.option("--no-plots", is_flag=True, help="Tables only, even with matplotlib installed.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@quiet_option
def report(report_paths, output_path, png_dir, title, no_plots, overwrite):
    """Render the JSON of compress --report, validate --report and bench --report as one HTML
    page: rank allocation, spectra, accuracy-versus-size sweep, validation and latency.

    Several JSON files are merged (later sections win). Plots need the [plots] extra.
    """
    target = Path(output_path)
    check_output_path(target, overwrite=overwrite)
    if png_dir is not None and not Path(png_dir).is_dir():
        if Path(png_dir).exists():
            raise OutputError(f"--png {png_dir}: not a directory")
        Path(png_dir).mkdir(parents=True)
    reports = [_read(path) for path in report_paths]
    merged, notes = merge_reports(reports)
    page = build_html(merged, title=title, plots=not no_plots)
    write_text_atomic(target, page.html)
    if png_dir is not None:
        for name, data in page.images.items():
            (Path(png_dir) / f"{name}.png").write_bytes(data)
        if not page.images:
            info(f"--png {png_dir}: no plots were drawn")
    for note in [*notes, *page.notes]:
        info(note if note != PLOTS_HINT else f"tables only: {PLOTS_HINT}")
    info(f"wrote {output_path} ({len(page.images)} plot(s))")


def _read(path: str) -> dict:
    data = read_json(path, what="report")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data
