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


class ClusterError(HwrError):
    """The Dask cluster of ``process --dask`` cannot be reached, has no workers, or went away during the run.

    Exit code 3, as for an unmounted share: something the run reads from is not there (nothing is lost;
    the files read are written and marked, a re-run does the rest).
    """

    exit_code = ExitCode.input_file


class MissingDependencyError(HwrError):
    """A command needs an optional part of hwr-batch that is not installed (e.g. the ``train`` extra)."""

    exit_code = ExitCode.model  # 4: "the model ... or a dependency is missing"


# Modules of the optional extras (pyproject.toml) that a command needs; `process` and `evaluate` need none.
EXTRA_MODULES = {"train": ("tensorflow", "tf2onnx"), "review": ("flask", "werkzeug")}
EXTRA_NAMES = {"train": "training", "review": "review"}


def require_extra(command: str, extra: str, *also: str) -> None:
    """Raise a :class:`MissingDependencyError` saying how to install ``extra``, unless its modules (and the
    modules ``also`` named, of the same extra, that only this command needs) are importable.

    Call it at the top of every command that needs an extra (``train``, ``export-onnx`` and ``learn``
    the training extra; ``review`` the review extra), before anything is read or written. Only looks
    the modules up: importing TensorFlow takes seconds, and the command does that itself.
    """
    import importlib.util

    missing = []
    for name in (*EXTRA_MODULES[extra], *also):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"`hwr-batch {command}` needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed (reading scans does not need {'it' if len(missing) == 1 else 'them'}). Install the "
            f"{EXTRA_NAMES[extra]} extra: pip install 'hwr-batch[{extra}]' (from a clone: pip install -e '.[{extra}]')"
        )
