"""Options of a batch run: one frozen dataclass, validated before any work starts.

A leaf module (the standard library only, no OpenCV, pandas or ONNX Runtime), so that the command
line imports it at once: ``hwr-batch process`` takes each option's default and type from
:class:`Options`, and the config file reader each setting's name and type (:data:`CONFIG_TYPES`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args

from .errors import BadArgsError

# The allowed values of --format and --fields, as Literal types: --help lists them and a wrong one is a
# usage error. export.py and layout.py (which import pandas and OpenCV) implement them; a test keeps
# them equal to export.FORMATS and layout.MODES.
Format = Literal["csv", "xlsx"]
FieldMode = Literal["auto", "boxes", "whole", "lines"]
FORMATS: tuple[str, ...] = get_args(Format)
FIELD_MODES: tuple[str, ...] = get_args(FieldMode)

DEFAULT_OUT_DIR = Path("hwr-results")
DEFAULT_TARGET_ERROR = 0.01  # the chance of a wrong reading that an accepted field may carry


@dataclass(frozen=True)
class Options:
    """Everything that decides what ``process`` does.

    Attributes:
        inputs: files and folders of scans (folders are walked recursively).
        out_dir: where digits/fields/errors tables (or results.xlsx) are written.
        fmt: ``"csv"`` or ``"xlsx"``.
        per_run: write each run's rows to a new folder ``out_dir/run-NNNNN`` instead of keeping
            cumulative tables in ``out_dir`` (the default) that hold every file's latest rows.
        model: ONNX model file; None for the default (``$HWR_BATCH_MODEL`` or the shipped one).
        include: glob patterns; only matching files in folders are read.
        exclude: glob patterns of files or folders to skip.
        field_mode: ``"auto"``, ``"boxes"`` (only inside printed boxes), ``"lines"`` or ``"whole"``
            (each image is one field).
        target_error: the error rate among accepted fields (not flagged for review) to aim at: a field is
            accepted when its confidence reaches the calibration record's threshold for it
            (:func:`hwr_batch.confidence.accept_threshold`) and no rule flags it.
        min_confidence: an explicit confidence threshold instead of the target's (None: from the target).
        pdf_dpi: resolution at which PDF pages are rendered.
        dpi: resolution of every scanned image, whatever its tag says; None: the tag, checked against
            the page's size (see :func:`hwr_batch.layout.choose_dpi`).
        max_megapixels: larger pages are refused (decompression-bomb guard).
        jobs: worker processes for decoding and segmentation; 0 = one per core.
        annotate_dir: if set, a JPEG per page with the fields and digits read drawn on it.
        state_dir: folder of the state database and lock; default ``out_dir/.hwr-batch``.
        force: reprocess every file, even those already done with this model.
        retry_failed: reprocess files that failed before (otherwise they are skipped).
        reprocess_stale: reprocess files done with a different model (otherwise only counted as stale).
        prune: drop the rows and records of files that no longer exist under an input folder.
        batch_digits: digits collected before one classification call.
        dask: read and classify the files on a Dask cluster: a scheduler's address (``tcp://HOST:PORT``)
            or ``local:N`` (a cluster of N worker processes on this machine); None: ``jobs`` local processes.
        templates: form templates (TOML, see :mod:`hwr_batch.template`): each page is registered to the best
            one and its named fields written to a ``forms`` table; empty: no forms table.
    """

    inputs: tuple[Path, ...]
    out_dir: Path = DEFAULT_OUT_DIR
    fmt: Format = "csv"
    per_run: bool = False
    model: Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    field_mode: FieldMode = "auto"
    target_error: float = DEFAULT_TARGET_ERROR
    min_confidence: float | None = None
    pdf_dpi: int = 300
    dpi: float | None = None
    max_megapixels: float = 200.0
    jobs: int = 0
    annotate_dir: Path | None = None
    state_dir: Path | None = None
    force: bool = False
    retry_failed: bool = False
    reprocess_stale: bool = False
    prune: bool = False
    batch_digits: int = 4096
    dask: str | None = None
    templates: tuple[Path, ...] = ()

    def validated(self) -> Options:
        """Check every option; return a copy with defaults resolved.

        Raises:
            BadArgsError: naming the option and the bad value.
        """
        if not self.inputs:
            raise BadArgsError("no input files or folders given")
        if self.fmt not in FORMATS:
            raise BadArgsError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.field_mode not in FIELD_MODES:
            raise BadArgsError(f"--fields must be one of {', '.join(FIELD_MODES)}, got {self.field_mode!r}")
        for name in ("target_error", "min_confidence", "max_megapixels"):  # nan passes every comparison below
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise BadArgsError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not 0.0 < self.target_error < 1.0:
            raise BadArgsError(f"--target-error must be between 0 and 1 (e.g. 0.01 for 1%), got {self.target_error}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise BadArgsError(f"--min-confidence must be between 0 and 1, got {self.min_confidence}")
        if not 50 <= self.pdf_dpi <= 1200:
            raise BadArgsError(f"--pdf-dpi must be between 50 and 1200, got {self.pdf_dpi}")
        if self.dpi is not None and not 50 <= self.dpi <= 2400:
            raise BadArgsError(f"--dpi must be between 50 and 2400, got {self.dpi}")
        if self.max_megapixels <= 0:
            raise BadArgsError(f"--max-megapixels must be positive, got {self.max_megapixels}")
        if self.jobs < 0:
            raise BadArgsError(f"--jobs must be 0 (all cores) or more, got {self.jobs}")
        if self.batch_digits < 1:
            raise BadArgsError(f"batch_digits must be at least 1, got {self.batch_digits}")
        if self.dask is not None and not re.fullmatch(DASK_ADDRESS, self.dask):
            raise BadArgsError(
                f"--dask must be a scheduler's address (tcp://HOST:PORT, or tls://, ws://, wss://, inproc://) or local:N "
                f"(N worker processes on this machine), got {self.dask!r}"
            )
        for template in self.templates:
            if not Path(template).is_file():
                raise BadArgsError(f"--template {template}: no such file")
        return replace(
            self,
            inputs=tuple(Path(p) for p in self.inputs),
            templates=tuple(Path(p) for p in self.templates),
            out_dir=Path(self.out_dir),
            jobs=self.jobs or os.cpu_count() or 1,
            state_dir=Path(self.state_dir) if self.state_dir else Path(self.out_dir) / ".hwr-batch",
        )


    def result_settings(self) -> dict[str, object]:
        """The options that change what is read from a file (not how fast, nor where it goes), by name."""
        # Unset ones are left out, so that a setting added later, at its default, changes no hash.
        settings = {name: getattr(self, name) for name in RESULT_SETTINGS if getattr(self, name) is not None}
        if self.templates:  # by their contents: editing a template (a field's box, name or rules) changes results
            settings["templates"] = [_file_sha256(Path(p)) for p in self.templates]
        return settings

    def settings_sha(self) -> str:
        """A hash of :meth:`result_settings`, recorded with each file: a file read with other settings is stale."""
        import hashlib
        import json

        text = json.dumps(self.result_settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    from .state import hash_file

    try:
        return hash_file(path)
    except OSError as e:
        raise BadArgsError(f"--template {path}: cannot read it ({e.strerror or e})") from None


# A scheduler's address, as Dask's protocols spell them, or local:N (N >= 1 worker processes on this machine).
DASK_ADDRESS = r"(tcp|tls|ws|wss|inproc|ucx)://\S+|local:[1-9][0-9]*"

# Options that change results; a change is treated like a change of model (stale, redone with --reprocess-stale).
RESULT_SETTINGS = ("field_mode", "target_error", "min_confidence", "pdf_dpi", "dpi")


def option_names() -> list[str]:
    """Names of the options, as a config file spells them."""
    return [f.name for f in fields(Options)]


# Options whose name on the command line (and in a config file) is not their name in Options.
CLI_NAMES = {"out_dir": "out", "field_mode": "fields", "annotate_dir": "annotate", "templates": "template"}


def cli_name(name: str) -> str:
    """The name of option ``name`` (a field of :class:`Options`) as a ``process`` parameter and a config key."""
    return CLI_NAMES.get(name, name)


def options_from(settings: Mapping[str, object]) -> Options:
    """Options from settings keyed by their command-line names (:func:`cli_name`), one for each option,
    with values as the command line or a config file gives them (lists, text, None for unset)."""
    return Options(**{f.name: _OPTION_TYPES[f.type][1](settings[cli_name(f.name)]) for f in fields(Options)})


# By the type of an Options field: its type in a config file, and how a command-line or config value becomes it.
_OPTION_TYPES = {
    "tuple[Path, ...]": ("paths", lambda v: tuple(Path(p) for p in v or ())),
    "Path": ("path", Path),
    "Path | None": ("path", lambda v: Path(v) if v else None),
    "str | None": ("text", lambda v: v or None),
    "Format": ("text", lambda v: v),
    "FieldMode": ("text", lambda v: v),
    "tuple[str, ...]": ("texts", lambda v: tuple(v or ())),
    "bool": ("bool", bool),
    "int": ("int", int),
    "float": ("number", float),
    "float | None": ("number", lambda v: float(v) if v is not None else None),
}


CONFIG_ENV = "HWR_BATCH_CONFIG"
CONFIG_SECTION = "process"


def read_config_file(path: Path) -> dict[str, object]:
    """Read the ``[process]`` table of a TOML config file.

    Keys are the long option names of ``hwr-batch process`` (``out``, ``format``, ``model``,
    ``min-confidence`` ...; dashes or underscores), plus ``inputs``, a list of files or folders.
    Relative paths are taken relative to the config file's folder.
    Values given on the command line or in ``HWR_BATCH_*`` environment variables win.

    Raises:
        BadArgsError: the file is missing, not valid TOML, or has an unknown key; names the file.
    """
    import tomllib

    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadArgsError(f"{path}: cannot read config file ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadArgsError(f"{path}: not a valid TOML config file ({e})") from None
    table = document.get(CONFIG_SECTION, document)
    if not isinstance(table, dict):
        raise BadArgsError(f"{path}: [{CONFIG_SECTION}] must be a table")
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        name = CONFIG_ALIASES.get(name, name)
        if name not in CONFIG_TYPES:
            known = ", ".join(sorted(_spelling(k) for k in CONFIG_TYPES))
            raise BadArgsError(f"{path}: unknown setting {key!r} (known: {known})")
        expected = CONFIG_TYPES[name]
        if not _has_type(value, expected):
            raise BadArgsError(f"{path}: setting {key!r} must be {_TYPE_WORDS[expected]}, got {value!r}")
        if expected == "number" and not math.isfinite(value):  # TOML has nan and inf; no setting means them
            raise BadArgsError(f"{path}: setting {key!r} must be a finite number, got {value!r}")
        # Relative paths are relative to the config file, not to wherever cron starts the job.
        if expected == "path":
            value = str(path.parent / value)
        elif expected == "paths":
            value = [str(path.parent / v) for v in value]
        settings[name] = value
    return settings


# Settings a config file may hold (the `process` command's parameter names) and their TOML types.
CONFIG_TYPES: dict[str, str] = {cli_name(f.name): _OPTION_TYPES[f.type][0] for f in fields(Options)}
CONFIG_ALIASES = {"format": "fmt", "output": "out", "out_dir": "out"}
_TYPE_WORDS = {
    "paths": "a list of paths", "path": "a path (text)", "text": "text", "texts": "a list of texts",
    "bool": "true or false", "int": "a whole number", "number": "a number",
}


def _has_type(value: object, expected: str) -> bool:
    if expected in ("paths", "texts"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected in ("path", "text"):
        return isinstance(value, str)
    if expected == "bool":
        return isinstance(value, bool)
    if expected == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _spelling(name: str) -> str:
    """A setting's name as the command line spells it."""
    return {"fmt": "format"}.get(name, name.replace("_", "-"))
