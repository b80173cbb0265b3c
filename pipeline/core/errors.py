"""User-facing errors: each is printed by the CLI as one line and exits with status 2."""

from __future__ import annotations


class SentimergeError(Exception):
    """A problem with the user's input (config, data, model path); reported as one line, exit status 2."""

    exit_code = 2


class ConfigError(SentimergeError):
    """A config or tasks file that does not validate."""


class DataError(SentimergeError):
    """A data file whose rows do not match the task spec."""


class ModelError(SentimergeError):
    """A model reference that cannot be resolved or loaded."""


class StageNotImplemented(SentimergeError):
    """A stage that this version of sentimerge does not implement yet."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (for one-line reports)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
