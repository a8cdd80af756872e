"""The ``onnx-lowrank`` command line.

Subcommands are registered explicitly from their own modules; one whose module fails to
import (a missing optional dependency, say) shows up as an "unavailable" command that explains
why, instead of breaking the whole CLI.
"""

from __future__ import annotations

import importlib
import logging

import click

from onnx_lowrank import __version__
from onnx_lowrank.cli.common import LowRankGroup, Settings

# (command name, module, attribute). The single registry of built-in subcommands.
COMMANDS = (
    ("inspect", "onnx_lowrank.cli.inspect_cmd", "inspect"),
    ("compress", "onnx_lowrank.cli.compress_cmd", "compress"),
    ("search", "onnx_lowrank.cli.search_cmd", "search"),
    ("fold", "onnx_lowrank.cli.fold_cmd", "fold"),
    ("validate", "onnx_lowrank.cli.validate_cmd", "validate"),
    ("bench", "onnx_lowrank.cli.bench_cmd", "bench"),
    ("check", "onnx_lowrank.cli.check_cmd", "check"),
    ("report", "onnx_lowrank.cli.report_cmd", "report"),
    ("finetune", "onnx_lowrank.cli.finetune_cmd", "finetune"),
)


@click.group(cls=LowRankGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-lowrank")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or status lines.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")
def main(debug: bool, quiet: bool, verbose: bool) -> None:
    """Make exported ONNX models smaller and faster with low-rank factorizations, and prove it."""
    Settings.debug = Settings.debug or debug
    Settings.quiet = quiet
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _unavailable(name: str, reason: str) -> click.Command:
    @click.command(name=name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args):
        del args
        raise click.ClickException(f"'{name}' is unavailable: {reason}")

    return command


def _register() -> None:
    for name, module_name, attribute in COMMANDS:
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except ImportError as exc:
            command = _unavailable(name, f"{exc}")
        main.add_command(command, name)


_register()
