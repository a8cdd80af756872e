"""What every subcommand shares: the error boundary, shared options, progress and output.

The CLI only parses, calls the library and prints. Errors a user can cause
(:class:`LowRankError`) become one line on stderr and their exit code; anything else is an
internal error, shown as one line too unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator

import click

from onnx_lowrank.errors import LowRankError, NothingToDo
from onnx_lowrank.jsonfile import json_default
from onnx_lowrank.shapes import parse_input_shape


class Settings:
    """Global flags, set by the group callback and read by subcommands."""

    debug = bool(os.environ.get("ONNX_LOWRANK_DEBUG"))
    quiet = False


class LowRankGroup(click.Group):
    """A click group that turns library errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NothingToDo as exc:
            click.echo(str(exc), err=True)
            ctx.exit(exc.exit_code)
        except LowRankError as exc:
            if Settings.debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # the boundary: a bug still gets one readable line
            if Settings.debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(
                f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
                err=True,
            )
            ctx.exit(1)


def input_shape_option(func: Callable) -> Callable:
    """``--input-shape NAME=1x3x224x224`` (repeatable), parsed into a dict."""
    return click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        callback=_parse_shapes,
        metavar="NAME=DIMS",
        help="Pin a dynamic input shape (e.g. input=1x3x224x224); unknown dims default to 1. Repeatable.",
    )(func)


def quiet_option(func: Callable) -> Callable:
    """``-q/--quiet`` on a subcommand too (``onnx-lowrank compress ... -q``)."""

    def _set(ctx, param, value):
        del ctx, param
        Settings.quiet = Settings.quiet or value

    return click.option(
        "-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set,
        help="No progress bars or status lines.",
    )(func)


def json_option(func: Callable) -> Callable:
    option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON to stdout.")
    return quiet_option(option(func))


def _parse_shapes(ctx, param, values) -> dict[str, tuple[int, ...]]:
    del ctx, param
    shapes = {}
    for text in values:
        try:
            name, dims = parse_input_shape(text)
        except LowRankError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None
        shapes[name] = dims
    return shapes


def parse_pairs(texts, flag: str) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options into a dict; a malformed one is an error naming ``flag``."""
    from onnx_lowrank.errors import OptionError

    pairs = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{flag} {text!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def show_progress() -> bool:
    """Progress bars only on an interactive terminal, never in CI or with --quiet."""
    return not Settings.quiet and sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (or nothing); yields ``advance(*_)``."""
    if not show_progress() or total <= 0:
        yield lambda *_: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda *_: bar.advance(task)


def console():
    """The stdout console for tables (plain text when not a terminal)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=json_default))


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (see :mod:`onnx_lowrank.jsonfile`)."""
    from onnx_lowrank.jsonfile import write_json as write

    write(path, data)

def info(message: str) -> None:
    """A status line on stderr, silenced by --quiet."""
    if not Settings.quiet:
        sys.stdout.flush()  # keep tables on stdout ahead of the status line
        click.echo(message, err=True)


def human(value: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M' with an optional unit."""
    if value is None:
        return "?"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"
