"""One exception family for every error a user can cause.

The CLI turns a :class:`LowRankError` into a one-line message and its ``exit_code``; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes are part of the CLI contract (documented in README.md).
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a validation threshold or regression gate was not met
EXIT_USAGE = 2  # bad input: path, file, option, budget
EXIT_FLOOR_NOT_MET = 3  # no compression keeps the requested accuracy floor


class LowRankError(Exception):
    """Base of every error a user can cause; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_USAGE


class InputError(LowRankError):
    """The input model or data file is missing, unreadable or not what it claims to be."""


class OptionError(LowRankError):
    """An option value is malformed or options contradict each other."""


class OutputError(LowRankError):
    """The output cannot be written (would overwrite the input, exists, directory missing)."""


class BudgetError(LowRankError):
    """The requested budget cannot be met by any allocation."""


class UnsupportedError(LowRankError):
    """The model uses something this tool cannot handle at all."""


class NothingToDo(LowRankError):
    """There is nothing to compress; the CLI reports it and exits 0."""

    exit_code = EXIT_OK


class CheckFailed(LowRankError):
    """A validation threshold or a regression gate was not met."""

    exit_code = EXIT_CHECK_FAILED


class FloorNotMet(LowRankError):
    """No compression keeps the requested accuracy floor; nothing was written."""

    exit_code = EXIT_FLOOR_NOT_MET
