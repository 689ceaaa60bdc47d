"""The ``hwr-batch`` command line: a thin layer over the Python API.

Heavy libraries (TensorFlow, OpenCV, ONNX Runtime, pandas) are imported inside the commands
that need them, so ``hwr-batch --help`` starts fast. Exceptions become exit codes in one place,
:func:`main`.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import Counter
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .config import FieldMode, Format, Options
from .errors import ExitCode, HwrError, require_extra

log = logging.getLogger("hwr_batch")

# The options' allowed values (Literal types: --help lists them, a wrong one is a usage error) and defaults,
# from config (a leaf module, quick to import), so that each is written once.
FormatChoice = Format
FieldChoice = FieldMode
DEFAULTS = Options(inputs=())

app = typer.Typer(
    name="hwr-batch",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"hwr-batch {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="A log line per file (-vv: debug detail too).")
    ] = 0,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q",
            help="Only warnings and errors on stderr (with --log-file, the file still gets the run's summary: "
            "cron then mails only when something went wrong).",
        ),
    ] = False,
    log_file: Annotated[
        Path | None, typer.Option(envvar="HWR_BATCH_LOG_FILE", help="Also append log lines to this file.", dir_okay=False)
    ] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", envvar="HWR_BATCH_JSON_LOGS", help="Log one JSON object per line.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Read handwritten digits off scanned forms, in batches, into CSV and spreadsheets.

    Exit codes: 0 ok, 1 some input files failed, 2 bad arguments, 3 input missing or unreadable,
    4 model missing or unusable, 5 output not writable, 6 state database unusable,
    7 another run holds the lock, 15 other error, 130 interrupted.
    """
    level = logging.DEBUG if verbose > 1 else logging.INFO
    configure_logging(logging.WARNING if quiet else level, log_file=log_file, file_level=level, json_lines=json_logs)
    # One line per file only with -v: a nightly run over thousands of files logs its summary, not each file.
    logging.getLogger("hwr_batch.files").setLevel(logging.NOTSET if verbose else logging.WARNING)


class TextFormatter(logging.Formatter):
    """``time LEVEL message``, one line per event: the message is escaped as the tables escape cells
    (:func:`~hwr_batch.atomic.display_text`), so a file name with a line break or bytes that are not
    UTF-8 can neither forge a log line nor break the log file's encoding."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        from .atomic import display_text

        record = logging.makeLogRecord(record.__dict__)  # other handlers get the record as it was
        record.msg, record.args = display_text(record.getMessage()), None
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message (escaped like TextFormatter's)."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import datetime

        from .atomic import display_text

        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": display_text(record.getMessage()),
        }
        if isinstance(getattr(record, "report", None), dict):  # a run's figures, as numbers
            entry["report"] = record.report
        if record.exc_info:  # kept multi-line; undecodable bytes in it as \udcNN
            entry["traceback"] = self.formatException(record.exc_info).encode("utf-8", "backslashreplace").decode()
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(
    level: int, *, log_file: Path | None = None, file_level: int | None = None, json_lines: bool = False
) -> None:
    """Log to stderr (stdout is for data) at ``level``, and optionally to a file at ``file_level`` (default:
    ``level``), under the ``hwr_batch`` logger only."""
    formatter = JsonFormatter() if json_lines else TextFormatter()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(level)
    handlers: list[logging.Handler] = [stderr]
    if log_file is not None:
        try:
            # backslashreplace: a traceback quoting an undecodable file name must not break the log.
            to_file = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            raise typer.BadParameter(f"cannot open log file {log_file}: {e.strerror}", param_hint="--log-file") from None
        to_file.setLevel(level if file_level is None else file_level)
        handlers.append(to_file)
    for handler in handlers:
        handler.setFormatter(formatter)
    log.handlers[:] = handlers
    log.setLevel(min(handler.level for handler in handlers))
    log.propagate = False


DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder holding the four MNIST IDX .gz files. Default: $HWR_BATCH_MNIST_DIR, else ~/.cache/hwr-batch/mnist.",
        file_okay=False,
    ),
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model", "-m", envvar="HWR_BATCH_MODEL",
        help="ONNX model (.onnx; a .keras path uses its .onnx twin). Default: the shipped model.",
    ),
]


@app.command()
def process(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Scans to read: files or folders (walked recursively). PNG, JPEG, TIFF, BMP, WebP, GIF, PNM, PDF.", show_default=False,
            metavar="SCANS...",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(envvar="HWR_BATCH_CONFIG", help="TOML file with a [process] table of these options (and `inputs`); "
                     "the command line and HWR_BATCH_* variables override it.", dir_okay=False),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", envvar="HWR_BATCH_OUT", help="Folder for fields.csv, digits.csv, errors.csv, pages.csv (or results.xlsx).")
    ] = DEFAULTS.out_dir,
    fmt: Annotated[
        FormatChoice,
        typer.Option(
            "--format", "-f", envvar="HWR_BATCH_FORMAT",
            help="csv: a CSV file per table; xlsx: one workbook, a sheet per table.",
        ),
    ] = DEFAULTS.fmt,
    per_run: Annotated[
        bool,
        typer.Option(
            "--per-run/--cumulative",
            help="Write each run's rows to a new folder OUT/run-NNNNN. Default: cumulative tables in OUT holding "
            "every file's latest rows.",
        ),
    ] = DEFAULTS.per_run,
    model: ModelOption = DEFAULTS.model,
    fields: Annotated[
        FieldChoice,
        typer.Option(
            "--fields",
            help="Where digits are read. auto: inside printed boxes if the page has any, else the whole image if it is "
            "a small crop, else runs of handwriting on lines; boxes: only inside boxes; lines; whole: each image is one field.",
        ),
    ] = DEFAULTS.field_mode,
    target_error: Annotated[
        float,
        typer.Option(
            envvar="HWR_BATCH_TARGET_ERROR", metavar="E",
            help="The share of accepted (unflagged) fields that may be wrong: a field is accepted when its confidence "
            "reaches the threshold at which, on the held-out fields the model's calibration record was fitted on, "
            "that share of the accepted ones was wrong (0.01: about one accepted field in a hundred); the rest are "
            "flagged, with the reason.",
        ),
    ] = DEFAULTS.target_error,
    min_confidence: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, envvar="HWR_BATCH_MIN_CONFIDENCE", metavar="0..1",
            help="Accept fields whose confidence is at least this, instead of the --target-error threshold.",
        ),
    ] = DEFAULTS.min_confidence,
    include: Annotated[
        list[str] | None,
        typer.Option(metavar="GLOB", help="Only files matching this glob (repeatable; case-insensitive), e.g. '*.tif'."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(metavar="GLOB", help="Skip files or folders matching this glob (repeatable; case-insensitive)."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", "-j", min=0, envvar="HWR_BATCH_JOBS", metavar="N", help="Worker processes for reading pages; 0 = one per core."
        ),
    ] = DEFAULTS.jobs,
    dask: Annotated[
        str | None,
        typer.Option(
            "--dask", metavar="tcp://HOST:PORT|local:N",
            help="Read and classify the files on a Dask cluster: the address of a `dask scheduler` with workers, or "
            "local:N for N worker processes here (-j is then not used). Scans and model must be readable on every worker "
            "under the same paths (shared storage); state, tables and lock stay here. Needs: pip install 'hwr-batch[dask]'.",
        ),
    ] = DEFAULTS.dask,
    template: Annotated[
        list[Path] | None,
        typer.Option(
            "--template", "-t", metavar="FORM.toml", dir_okay=False,
            help="A form template (from `hwr-batch template create`; repeatable): register each page to the best one and "
            "write forms.csv (a `forms` sheet with --format xlsx; forms-NAME per template for several): file, page, a "
            "column per field, a <field>_flag each, status. A page that fits none is `unregistered` and in errors.csv.",
        ),
    ] = None,
    annotate: Annotated[
        Path | None, typer.Option(help="Also write a JPEG of each page with the fields, their numbers and the digits read drawn on it.", file_okay=False)
    ] = DEFAULTS.annotate_dir,
    pdf_dpi: Annotated[int, typer.Option(min=50, max=1200, metavar="50..1200", help="Resolution at which PDF pages are rendered.")] = DEFAULTS.pdf_dpi,
    dpi: Annotated[
        float | None,
        typer.Option(min=50, max=2400, metavar="50..2400", help="Resolution of every scan (not PDFs), whatever its file says. Default: the "
                     "file's tag, unless it is missing or implausible for the page's size; then estimated from the size."),
    ] = DEFAULTS.dpi,
    max_megapixels: Annotated[float, typer.Option(min=1.0, metavar="MP", help="Refuse larger pages (decompression-bomb guard).")] = DEFAULTS.max_megapixels,
    state_dir: Annotated[
        Path | None,
        typer.Option(envvar="HWR_BATCH_STATE_DIR", help="Folder of the state database and run lock. Default: OUT/.hwr-batch.", file_okay=False),
    ] = DEFAULTS.state_dir,
    force: Annotated[
        bool, typer.Option("--force/--no-force", help="Reprocess every file, even those already done with this model.")
    ] = DEFAULTS.force,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed/--no-retry-failed", help="Retry files that failed in earlier runs.")
    ] = DEFAULTS.retry_failed,
    reprocess_stale: Annotated[
        bool,
        typer.Option(
            "--reprocess-stale/--no-reprocess-stale",
            help="Redo files read with a different model, or with other settings that change what is read "
                 "(--fields, --dpi, --pdf-dpi, --target-error, --min-confidence, --template); otherwise they are only "
                 "counted as stale.",
        ),
    ] = DEFAULTS.reprocess_stale,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            help="Drop the rows and state records of files deleted from an input folder. A folder none of whose "
            "recorded files is left (an unmounted share) prunes nothing.",
        ),
    ] = DEFAULTS.prune,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Only say what would be processed (stdout: one line per file, its reason and path); "
            "write nothing, take no lock.",
        ),
    ] = False,
    batch_digits: Annotated[
        int, typer.Option(min=1, metavar="N", help="Digits gathered per model call; outputs are also rewritten after each such batch.")
    ] = DEFAULTS.batch_digits,
) -> int:
    """Read the handwritten digits in scanned forms and write them as tables.

    Re-runs are incremental: files already done with the same model are skipped, changed files
    are redone and their rows replaced. Exit code 0 if every file was read, 1 if some failed or, with
    --template, some pages fit no template (see errors.csv), 130 if interrupted (re-run to finish).
    """
    from .config import options_from, read_config_file
    from .errors import BadArgsError
    from .pipeline import run_batch

    params = dict(ctx.params)
    given = {name for name in params if (source := ctx.get_parameter_source(name)) is not None and source.name != "DEFAULT"}
    if config is not None:  # the file fills in only what the command line and environment left at default
        for name, value in read_config_file(config).items():
            if name not in given:
                params[name] = value
                given.add(name)
    if not params["inputs"]:
        raise BadArgsError("no scans given: name files or folders, or set `inputs` in the --config file")
    options = options_from(params)
    if options.min_confidence is not None and "target_error" in given:
        log.warning("--min-confidence %g is used and --target-error %g is not: give one of the two",
                    options.min_confidence, options.target_error)
    if dry_run:
        return _dry_run(options)
    with _stop_on_signals() as stop_requested, _progress_bar() as progress:
        try:
            report = run_batch(options, should_stop=stop_requested, progress=progress)
        except KeyboardInterrupt:  # a second Ctrl-C (Typer would turn it into a silent exit 130)
            log.warning(
                "stopped at once by a second Ctrl-C; files read but not yet written are not marked "
                "done, and the next run reads them again"
            )
            return int(ExitCode.ctrl_c)
    log.info("%s", report.summary(), extra={"report": report.counts()})
    for path in report.outputs:
        typer.echo(str(path))
    return int(report.exit_code)


def _dry_run(options) -> int:
    """``process --dry-run``: the plan, on stdout, and its counts in the log."""
    from .status import plan_run

    run_plan = plan_run(options)
    for decision in run_plan.to_process:
        typer.echo(f"{decision.kind}\t{decision.path}")
    counts = run_plan.counts()
    processed = Counter(d.kind for d in run_plan.to_process)
    skipped = counts - processed
    for path, reason in run_plan.problems:
        log.error("%s: %s", path, reason)
    log.info(
        "dry run: %d files found: %d to process (%s), %d not (%s); nothing was written",
        len(run_plan.decisions), sum(processed.values()), _kinds(processed), sum(skipped.values()), _kinds(skipped),
    )
    return int(ExitCode.partial_failure if run_plan.problems or counts["unreadable"] else ExitCode.ok)


def _kinds(counts) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


@app.command()
def status(
    out: Annotated[Path, typer.Argument(help="The --out folder of the runs.", show_default=False, metavar="OUT")],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="Scans to check for pending work (as given to process).", show_default=False, metavar="[SCANS]..."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(envvar="HWR_BATCH_STATE_DIR", help="Folder of the state database. Default: OUT/.hwr-batch.", file_okay=False),
    ] = None,
) -> int:
    """What the state database says: files done, failed and stale, the last run, and (given SCANS) what is pending.

    Stale: done with a model or settings other than the last run's. Reads only; safe while a run is going on.
    """
    from .atomic import display_path, reason_without_file
    from .status import read_status

    report = read_status(out, state_dir=state_dir, inputs=tuple(inputs or ()))
    counts, last = report.summary, report.last_run
    typer.echo(f"state     {report.database}")
    typer.echo(f"files     {counts.files} recorded: {counts.done} done, {counts.failed} failed, {counts.stale} stale")
    if last is None:
        typer.echo("last run  none")
    else:
        skipped = "" if last.skipped is None else f", {last.skipped} skipped"  # None: stopped before its plan
        ended = (
            f"finished {last.finished}, exit {last.exit_status}, {last.done} done, {last.failed} failed{skipped}"
            if last.finished else "did not finish (still running, or killed: the next run finishes its work)"
        )
        typer.echo(f"last run  #{last.id} started {last.started}; {ended}")
    if report.pending is not None:
        to_do = Counter(d.kind for d in report.pending.to_process)
        typer.echo(f"pending   {sum(to_do.values())} to process ({_kinds(to_do)}) of {len(report.pending.decisions)} found")
    for record in report.failed[:STATUS_FAILED_SHOWN]:
        reason = reason_without_file(record.path, record.error or "")  # the line names the file already
        typer.echo(f"failed    {display_path(record.path)} ({record.error_stage}): {reason}")
    if len(report.failed) > STATUS_FAILED_SHOWN:
        typer.echo(f"failed    ... and {len(report.failed) - STATUS_FAILED_SHOWN} more (see errors.csv)")
    return int(ExitCode.ok)


STATUS_FAILED_SHOWN = 20


def _stderr_level() -> int:
    """The level logged to stderr (a --log-file may take more: see configure_logging)."""
    for handler in log.handlers:
        if type(handler) is logging.StreamHandler:  # not a FileHandler, which is one too
            return handler.level or log.getEffectiveLevel()
    return log.getEffectiveLevel()


@contextmanager
def _progress_bar():
    """A rich progress bar on stderr when it is a terminal and logging there is not quiet; else nothing."""
    if not sys.stderr.isatty() or _stderr_level() > logging.INFO:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("reading scans", total=None)

        class Display:
            def start(self, total: int) -> None:
                bar.update(task, total=total)

            def advance(self, path: Path, outcome: str) -> None:
                bar.update(task, advance=1, description=f"reading scans ({path.name})")

        yield Display()


@contextmanager
def _stop_on_signals():
    """SIGTERM or a first Ctrl-C asks the run to stop after the current files; a second Ctrl-C aborts."""
    import signal

    requested: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("%s received: finishing the files in hand, then stopping", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model, its run record and curves.")] = Path(
        "trained-model"
    ),
    data_dir: DataDirOption = None,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs; early stopping on the validation loss may end sooner.")] = 40,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    validation_size: Annotated[int, typer.Option(min=1, help="Training images held out for validation.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed for the split, the weights and the augmentation.")] = 20261123,
    augment: Annotated[bool, typer.Option(help="Distort training digits (rotation, slant, size, shift, pen width).")] = True,
    fragments: Annotated[
        float,
        typer.Option(min=0.0, help="Non-digits (parts of digits, two digits as one) to add per training digit, "
                     "trained to low confidence so that `process` can tell good cuts from bad ones (0.3 helped on "
                     "generated forms but hurt real scans; see models/MODEL_CARD.md); 0 = none."),
    ] = 0.0,
    limit: Annotated[int | None, typer.Option(min=100, help="Train on the first N training images only (quick trials).")] = None,
    architecture: Annotated[
        str,
        typer.Option(metavar="original|wide",
                     help="original: the original design's CNN (424,810 parameters for 10 classes); wide: 64 "
                     "filters in the second convolution, dropout (about twice the multiply-adds)."),
    ] = "original",
    schedule: Annotated[
        str,
        typer.Option(metavar="plateau|cosine",
                     help="plateau: halve the learning rate when the validation loss stalls, stop early, keep the "
                     "best epoch; cosine: a fixed decay over --epochs, keep the last (for --real, whose 'not a "
                     "digit' examples make the validation loss too noisy to choose an epoch by)."),
    ] = "plateau",
    name: Annotated[str, typer.Option(help="Base name of the output files.")] = "hwr-digits",
    images: Annotated[
        Path | None, typer.Option(help="Train on this IDX images file instead of MNIST (needs --labels; e.g. EMNIST letters).")
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="IDX labels file that goes with --images (classes 0..C-1).")] = None,
    real: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR[a:b][*N]",
            help="Also train on real fields labelled with their digit strings: a folder with truth.csv "
            "(columns image, digits). [a:b] takes rows a to b-1 of its digits-only fields; *N repeats them. "
            "Repeat the option for several sets. Gives the model a 'not a digit' output (see README).",
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="With --real: alignment-and-training rounds.")] = 2,
    forms: Annotated[
        int,
        typer.Option(min=0, help="With --real: also align the fields of this many generated form pages of MNIST "
                     "training digits (their wrong cuts teach 'not a digit' on MNIST-style handwriting)."),
    ] = 0,
    start_model: Annotated[
        Path | None,
        typer.Option(help="With --real: the .onnx model that aligns the first round (its .keras twin is the "
                     "starting weights). Default: the shipped model.", dir_okay=False),
    ] = None,
) -> None:
    """Train the CNN (MNIST digits by default); write NAME.keras, NAME.onnx, NAME.json (run record), NAME-curves.png.

    Needs the training extra: pip install 'hwr-batch[train]'.
    """
    from .errors import BadArgsError
    from .mnist import load_idx_pair

    require_extra("train", "train")
    from .train import RealFieldSet, TrainConfig, train_on_real
    from .train import train as run_training

    if (images is None) != (labels is None):
        raise BadArgsError("--images and --labels go together")
    if architecture not in ("original", "wide"):
        raise BadArgsError(f"--architecture must be original or wide, not {architecture!r}")
    if schedule not in ("plateau", "cosine"):
        raise BadArgsError(f"--schedule must be plateau or cosine, not {schedule!r}")
    if real and images is not None:
        raise BadArgsError("--real trains a digit model on MNIST plus real fields; it does not go with --images")
    data = load_idx_pair(images, labels) if images is not None else None

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        validation_size=validation_size,
        seed=seed,
        augment=augment,
        fragments=fragments,
        architecture=architecture,
        schedule=schedule,
        limit=limit,
    )
    if real:
        try:
            sets = [RealFieldSet.parse(spec) for spec in real]
        except ValueError as e:
            raise BadArgsError(f"--real {e}") from None
        result = train_on_real(
            out, sets, rounds=rounds, start_model=start_model, data_dir=data_dir, config=config, name=name, jobs=2,
            forms=forms,
        )
    else:
        result = run_training(out, data=data, data_dir=data_dir, config=config, name=name)
    typer.echo(f"best validation accuracy {result.best_val_accuracy:.4f}; model {result.onnx_path}")


@app.command()
def learn(
    corrections: Annotated[
        Path,
        typer.Argument(
            help="A CSV with columns file, page, field, digits: rows of fields.csv whose digits a person "
            "corrected or confirmed (digits = the true string); or a run folder, whose corrections.csv "
            "(written by `hwr-batch review`) is read. Rows whose digits are empty or not digits are left out.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the new model (never the shipped model's).")] = Path(
        "learned-model"
    ),
    model: ModelOption = None,
    mnist_dir: Annotated[
        Path | None,
        typer.Option(help="MNIST folder: a sample of its digits is mixed in so the model keeps what it knew. "
                     "Default: the download folder of `hwr-batch download-mnist`.", file_okay=False),
    ] = None,
    holdout: Annotated[float, typer.Option(min=0.05, max=0.9, help="Share of the fields held back to measure on.")] = 0.2,
    epochs: Annotated[int, typer.Option(min=1, help="Most fine-tuning epochs (early stopping may end sooner).")] = 10,
    fields: Annotated[
        str, typer.Option(help="How the scans were read by `process` (auto, boxes, lines, whole): field numbers follow it.")
    ] = DEFAULTS.field_mode,
    pdf_dpi: Annotated[int, typer.Option(min=50, max=1200, help="As given to `process`.")] = DEFAULTS.pdf_dpi,
) -> None:
    """Adapt the model to your own forms: fine-tune it on corrected fields, measure before and after.

    Re-reads each corrected field from its scan, aligns its true digits to the segmenter's cuts, fine-tunes
    from the current model, and reads a held-back share of the fields with the old and the new model.
    Writes OUT/hwr-digits.onnx (use it with `process --model`), its Keras twin, the training record and
    OUT/learn.json (base model, data, figures). Says plainly whether the new model is better.
    """
    require_extra("learn", "train", "lightgbm", "onnxmltools")  # its calibration record
    if corrections.is_dir():
        corrections = corrections / "corrections.csv"
    from .learn import LearnConfig
    from .learn import learn as run_learn
    from .read import ReadSettings

    result = run_learn(
        corrections, out, base_model=model, mnist_dir=mnist_dir,
        config=LearnConfig(holdout=holdout, epochs=epochs),
        settings=ReadSettings(field_mode=fields, pdf_dpi=pdf_dpi),
    )
    typer.echo(result.summary())
    typer.echo(f"model {result.model_path}; record {result.record_path}")


@app.command()
def review(
    out: Annotated[Path, typer.Argument(help="The run folder `process` wrote (with fields.csv).", file_okay=False)],
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Only print the URL.")] = False,
    all_fields: Annotated[bool, typer.Option("--all", help="Offer every field, not only the flagged ones.")] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(envvar="HWR_BATCH_STATE_DIR", help="Folder of the state database (the corrections are "
                     "saved there too). Default: OUT/.hwr-batch.", file_okay=False),
    ] = None,
) -> None:
    """Check flagged fields in the browser; corrections go to the state database (the next `process` writes
    them into fields.csv as reviewed_digits/review_status) and to OUT/corrections.csv for `hwr-batch learn OUT`.

    Serves a local page on 127.0.0.1 with a random token in its URL (printed here); requests without it
    are refused. Crops are cut from the scans named in fields.csv, so they must still be there. Ctrl+C stops.
    """
    require_extra("review", "review")
    from .review import start_review

    server = start_review(out, port=port, include_all=all_fields, state_dir=state_dir)
    typer.echo(server.url)
    sys.stdout.flush()
    if not no_browser:
        import webbrowser

        webbrowser.open(server.url)
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # saves are already durable: just stop
    try:
        while server.is_running():
            server.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command()
def evaluate(
    model: ModelOption = None,
    data_dir: DataDirOption = None,
    images: Annotated[Path | None, typer.Option(help="IDX images file to score instead of MNIST's test set (needs --labels).")] = None,
    labels: Annotated[Path | None, typer.Option(help="IDX labels file that goes with --images.")] = None,
    folder: Annotated[
        Path | None,
        typer.Option(help="Folder of your own labelled digit images, one sub-folder per class (FOLDER/7/x.png).", file_okay=False),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N images.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json and the PNG reports.")] = Path("evaluation"),
) -> None:
    """Score a model: accuracy, per-class precision/recall/F1, confusion matrix and worst mistakes.

    By default on the 10,000 MNIST test images; or on an IDX pair (--images/--labels), or on a
    folder of labelled digit images (--folder).
    """
    from .classify import load_classifier
    from .errors import BadArgsError
    from .evaluate import evaluate as run_evaluation
    from .evaluate import load_labelled_folder, write_reports
    from .mnist import LabelledImages, load_idx_pair, load_mnist

    if (images is None) != (labels is None):
        raise BadArgsError("--images and --labels go together")
    if folder is not None and images is not None:
        raise BadArgsError("give either --folder or --images/--labels, not both")
    classifier = load_classifier(model)
    if folder is not None:
        data = load_labelled_folder(folder, classifier.labels)
    elif images is not None:
        data = load_idx_pair(images, labels)
    else:
        data = load_mnist("test", data_dir)
    if limit:
        data = LabelledImages(data.images[:limit], data.labels[:limit], data.source)
    result = run_evaluation(classifier, data)
    paths = write_reports(result, data, out)
    per_class = "  ".join(
        f"{label}:{result.per_class[label]['f1-score']:.3f}" for label in classifier.labels if label in result.per_class
    )
    typer.echo(f"model      {classifier.path}")
    typer.echo(f"data       {data.source} ({len(data)} images)")
    typer.echo(f"accuracy   {result.accuracy:.4f} ({int(result.confusion.sum() - result.confusion.trace())} errors)")
    typer.echo(f"F1         {per_class}")
    typer.echo(f"reports    {', '.join(str(p) for p in paths.values())}")


@app.command("export-onnx")
def export_onnx(
    keras_model: Annotated[Path, typer.Argument(help="A .keras model saved by `hwr-batch train`.", exists=True, dir_okay=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The .onnx file. Default: beside the .keras file.")] = None,
) -> None:
    """Convert a trained .keras model to ONNX, which `process` and `evaluate` run without TensorFlow.

    Needs the training extra: pip install 'hwr-batch[train]'.
    """
    require_extra("export-onnx", "train")
    from .train import export_onnx as run_export

    path = run_export(keras_model, out or keras_model.with_suffix(".onnx"))
    typer.echo(str(path))


@app.command("download-mnist")
def download_mnist(data_dir: DataDirOption = None) -> None:
    """Download the four MNIST files (checksum-verified) into the data folder. Needs internet."""
    from .mnist import download_mnist as run_download

    typer.echo(str(run_download(data_dir)))


template_app = typer.Typer(
    help="Form templates: named fields of one printed layout (see README, 'Named fields: templates').",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(template_app, name="template")


def _load_gray(path: Path):
    """The first page of a sample scan and the dpi to read it at."""
    from .layout import choose_dpi
    from .load import iter_pages

    page = next(iter(iter_pages(path)))
    return page.gray, choose_dpi(page.dpi, page.gray.shape)[0]


@template_app.command("create")
def template_create(
    sample: Annotated[Path, typer.Argument(help="A blank or filled page of the form.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The template to write.")] = Path("form.toml"),
) -> None:
    """Find the printed boxes and combs of SAMPLE and write a template: rename its fields, add rules.

    Rules per [[field]]: digits = N, min = N, max = N, pattern = "regex", optional = true.
    """
    from .atomic import atomic_write
    from .template import create_template, dumps

    gray, dpi = _load_gray(sample)
    template = create_template(gray, dpi=dpi, name=out.stem)
    atomic_write(out, lambda f: f.write(dumps(template)), encoding="utf-8")
    log.info("%s: %d fields", out, len(template.fields))
    typer.echo(str(out))


def _load_templates(paths: list[Path]):
    from .errors import BadArgsError
    from .template import load_templates

    try:
        return load_templates(paths)
    except ValueError as e:
        raise BadArgsError(str(e)) from e


@template_app.command("show")
def template_show(
    template: Annotated[Path, typer.Argument(help="A template (TOML).", exists=True, dir_okay=False)],
    sample: Annotated[Path, typer.Argument(help="A page to draw it on.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The picture to write (PNG or JPEG).")] = Path("preview.png"),
) -> None:
    """Draw the template's fields, with names and cell counts, where they register on SAMPLE."""
    import cv2

    from .atomic import atomic_write
    from .errors import InputFileError
    from .template import draw, register

    (form,) = _load_templates([template])
    gray, dpi = _load_gray(sample)
    reg = register(gray, form, dpi=dpi)
    if not reg.ok:
        raise InputFileError(f"{sample}: does not match the template {template} (score {reg.score:.2f})")
    _, data = cv2.imencode(out.suffix if out.suffix.lower() in (".png", ".jpg", ".jpeg") else ".png", draw(gray, form, reg))
    atomic_write(out, lambda f: f.write(data.tobytes()), mode="wb")
    typer.echo(str(out))


@template_app.command("read")
def template_read(
    scans: Annotated[list[Path], typer.Argument(help="Files or folders of scans.", exists=True)],
    template: Annotated[list[Path], typer.Option("--template", "-t", help="A template (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("results"),
    min_confidence: Annotated[
        float | None, typer.Option(help="Flag a digit under this confidence (default: as process).")
    ] = None,
) -> None:
    """Register each page to the best template and write one row per form: forms.csv (forms-NAME.csv for several).

    Columns: file, page, each field in template order, each <field>_flag, status (read or unregistered).
    Unregistered pages and unreadable files also go to forms-errors.csv.
    """
    import pandas as pd

    from .atomic import atomic_write
    from .classify import load_classifier
    from .export import error_row, neutralise_formulas
    from .load import find_inputs
    from .template import form_columns, read_forms, table_names

    forms = _load_templates(template)
    paths, unusable = find_inputs(scans)
    tables, errors = read_forms(paths, forms, load_classifier(), threshold=min_confidence)
    errors += [error_row(p, None, "load", reason) for p, reason in unusable]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for form, table in zip(forms, table_names(forms).values()):
        frame = neutralise_formulas(pd.DataFrame(tables[form.name], columns=form_columns(form)))
        path = out / f"{table}.csv"
        atomic_write(path, lambda f, frame=frame: frame.to_csv(f, index=False), newline="", encoding="utf-8")
        written.append(path)
    frame = pd.DataFrame(errors, columns=["file", "page", "stage", "reason"])
    path = out / "forms-errors.csv"
    atomic_write(path, lambda f: frame.to_csv(f, index=False), newline="", encoding="utf-8")
    for p in [*written, path]:
        typer.echo(str(p))
    if errors:
        raise typer.Exit(int(ExitCode.partial_failure))


GLOBAL_FLAGS = frozenset({"-q", "--quiet", "-v", "-vv", "-vvv", "--verbose", "--json-logs"})
GLOBAL_VALUE_OPTIONS = frozenset({"--log-file"})


def hoist_global_options(args: list[str]) -> list[str]:
    """``args`` with the global options (-q, -v, --log-file, --json-logs) that follow the command moved before it,
    so that ``hwr-batch process DIR -v`` works as ``hwr-batch -v process DIR`` does. Stops at ``--``."""
    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    position = next((i for i, arg in enumerate(args) if arg in commands), None)
    if position is None:
        return args
    hoisted, rest = [], []
    tail = iter(args[position + 1 :])
    for arg in tail:
        if arg == "--":
            rest += [arg, *tail]
            break
        if arg in GLOBAL_FLAGS or arg.split("=", 1)[0] in GLOBAL_VALUE_OPTIONS and "=" in arg:
            hoisted.append(arg)
        elif arg in GLOBAL_VALUE_OPTIONS:
            hoisted += [arg, *itertools.islice(tail, 1)]
        else:
            rest.append(arg)
    return [*args[:position], *hoisted, args[position], *rest]


def main() -> None:
    """Console entry point: run the app and turn every outcome into a documented exit code."""
    try:
        # Not standalone: typer.Exit and Ctrl-C come back as the exit code (130 for Ctrl-C),
        # usage errors and our own errors are raised, so they all meet here.
        result = app(args=hoist_global_options(sys.argv[1:]), standalone_mode=False)
        code = result if isinstance(result, int) else ExitCode.ok
    except typer.TyperException as e:  # usage errors: print the usage hint and the reason
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _report_fatal(logging.WARNING, "hwr-batch: interrupted")
        code = ExitCode.ctrl_c
    except HwrError as e:
        _report_fatal(logging.ERROR, f"hwr-batch: error: {e}")
        log.debug("traceback", exc_info=True)
        code = e.exit_code
    except Exception:
        log.exception("hwr-batch: unexpected error (please report it with this traceback)")
        code = ExitCode.other_error
    sys.exit(int(code))


def _report_fatal(level: int, message: str) -> None:
    """The reason a run stops, where its log goes (--log-file, --json-logs); on stderr if logging is not set up yet."""
    if log.handlers:
        log.log(level, "%s", message)
    else:
        from .atomic import display_text

        print(display_text(message), file=sys.stderr)
