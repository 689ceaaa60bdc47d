"""Exit codes and the exceptions that carry them.

The library raises; only :mod:`hwr_batch.cli` turns exceptions into exit codes.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes: a stable interface for cron jobs and scripts."""

    ok = 0
    partial_failure = 1  # the run finished, but some input files could not be read
    bad_args = 2  # same code Typer/Click use for usage errors
    input_file = 3  # a named input (data set, folder) is missing or unreadable
    model = 4  # the model file is missing, corrupt, or a dependency is missing
    output = 5  # an output could not be written
    state_db = 6  # the state database is unusable
    lock_held = 7  # another run holds the lock on the state directory
    other_error = 15
    ctrl_c = 130


class HwrError(Exception):
    """Base class of every error hwr-batch reports to a user.

    Subclasses set ``exit_code``; the message should name the file or option at fault
    and, where there is one, the remedy.
    """

    exit_code: ExitCode = ExitCode.other_error


class BadArgsError(HwrError):
    """An option or argument has a value that cannot work."""

    exit_code = ExitCode.bad_args


class InputFileError(HwrError):
    """An input file or folder is missing, unreadable, or not what it claims to be."""

    exit_code = ExitCode.input_file


class DatasetError(InputFileError):
    """A data set file (IDX, labelled folder) is missing, truncated, or fails its checksum."""


class ModelError(HwrError):
    """The model file is missing, unreadable, or not a model hwr-batch can use."""

    exit_code = ExitCode.model


class OutputError(HwrError):
    """An output file or folder could not be written."""

    exit_code = ExitCode.output


class StateDbError(HwrError):
    """The state database is corrupt, not an hwr-batch database, from a newer version, or unwritable."""

    exit_code = ExitCode.state_db


class LockHeldError(HwrError):
    """Another hwr-batch run holds the lock on the state directory."""

    exit_code = ExitCode.lock_held
