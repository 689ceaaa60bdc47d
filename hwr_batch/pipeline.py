"""The batch recipe: find scans -> read pages (workers) -> classify in large batches -> write tables.

Reading a file (decode, layout, segmentation, normalisation) is CPU work on one file and runs in
worker processes (:mod:`hwr_batch.read`); classification gathers the digits of many files into one
ONNX Runtime call in the main process, and its results become table rows (:mod:`hwr_batch.rows`);
a result store (:mod:`hwr_batch.store`) holds the tables, writes them atomically when due and only
then marks their files done, so memory stays flat and a crash loses nothing that was already written.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pandas as pd

from .annotate import annotate_files, annotation_path
from .atomic import check_writable, remove_stale_temp_files
from .classify import Classifier, load_classifier
from .cluster import check_workers, connect, iter_cluster_readings, require_dask
from .confidence import accept_threshold
from .config import Options
from .errors import BadArgsError, ExitCode, HwrError, InputFileError, OutputError
from .export import FORMATS, empty_tables, error_row, output_paths, read_tables
from .load import OWN_FOLDER_MARKER, find_inputs
from .read import (
    STAGES,
    FieldReading,
    FileReading,
    PageReading,
    ReadSettings,
    field_image,
    iter_field_images,
    iter_readings,
    read_file,
    read_page,
    segmenting_scale,
    start_worker_server,
)
from .rows import classify_readings, error_rows, page_rows
from .runlock import acquire_lock
from .state import (
    STATE_DB_NAME,
    Decision,
    StateDB,
    begin_run,
    finish_run,
    forget,
    mark_failed,
    open_state,
    plan,
    recorded_files,
    stale_files,
)
from .store import ResultStore, redo_files_whose_rows_do_not_match
from .template import Template, form_columns, load_templates, process_form_rows, table_names

if TYPE_CHECKING:
    from distributed import Client

# The API (README, scripts/, benchmarks/): the run, and the reading and row building it is made of
# (whose own modules are read.py and rows.py).
__all__ = [
    "BatchReport", "FieldReading", "FileReading", "PageReading", "Progress", "ReadSettings", "check_inputs_exist",
    "check_outputs_writable", "classify_readings", "field_image", "iter_field_images", "read_file", "read_page",
    "run_batch", "segmenting_scale",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the run


class Progress(Protocol):
    """Receives progress of a run (for a progress bar); called from the main process only."""

    def start(self, total: int) -> None: ...

    def advance(self, path: Path, outcome: str) -> None: ...


@dataclass
class BatchReport:
    """What a run did: counts, time per stage, and where the results are."""

    files_found: int = 0
    processed: int = 0
    skipped: int = 0
    known_failures: int = 0  # of the skipped: files that failed in an earlier run and have not changed
    failed: int = 0
    stale: int = 0
    pages: int = 0
    digits: int = 0
    fields: int = 0
    flagged_fields: int = 0
    unregistered_pages: int = 0  # process --template: pages that fit no template (each also an error row)
    interrupted: bool = False
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    outputs: list[Path] = field(default_factory=list)
    run_id: int | None = None

    @property
    def exit_code(self) -> ExitCode:
        """ok, partial_failure (some files failed, or pages fit no template: see errors.csv) or ctrl_c (stopped early)."""
        if self.interrupted:
            return ExitCode.ctrl_c
        return ExitCode.partial_failure if self.failed or self.unregistered_pages else ExitCode.ok

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    @property
    def accepted_fields(self) -> int:
        """Fields read in this run that need no review."""
        return self.fields - self.flagged_fields

    def counts(self) -> dict[str, int | float | bool]:
        """The run's figures as plain values (the JSON log's ``report``)."""
        return {
            "files_found": self.files_found, "processed": self.processed, "skipped": self.skipped,
            "known_failures": self.known_failures, "failed": self.failed, "stale": self.stale, "pages": self.pages, "fields": self.fields,
            "accepted_fields": self.accepted_fields, "flagged_fields": self.flagged_fields, "digits": self.digits,
            "unregistered_pages": self.unregistered_pages,
            "seconds": round(self.seconds, 3), "pages_per_second": round(self.pages_per_second, 3),
            **{f"{stage}_seconds": round(seconds, 3) for stage, seconds in self.stage_seconds.items()},
            "interrupted": self.interrupted,
        }

    def summary(self) -> str:
        """One line for the log."""
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        return (
            f"{self.files_found} files found: {self.processed} processed, {self.skipped} skipped"
            + (f" ({self.known_failures} failed in an earlier run and have not changed; --retry-failed tries "
               "them again)" if self.known_failures else "")
            + f", {self.failed} failed, {self.stale} stale (another model or settings); {self.pages} pages, {self.fields} fields, "
            f"{self.digits} digits; {self.accepted_fields} fields accepted, {self.flagged_fields} flagged for review; "
            + (f"{self.unregistered_pages} pages fit no template; " if self.unregistered_pages else "")
            + f"{self.seconds:.1f}s "
            f"({self.pages_per_second:.2f} pages/s; {stages})"
        )


def run_batch(
    options: Options,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
) -> BatchReport:
    """Process the scans named in ``options``: the whole batch job, safe to run unattended.

    Takes the run lock, plans from the state database which files need work (new, changed,
    or forced), reads them in worker processes, classifies their digits in large batches,
    rewrites the output tables atomically (after each batch, or less often once the tables are
    so large that rewriting them would dominate the run) and only then marks the files done, so a
    crash at any moment loses nothing already written and a re-run duplicates nothing.

    Args:
        options: validated or not; see :class:`hwr_batch.config.Options`.
        should_stop: polled between files; when it returns True the run finishes the files
            already read, writes, and returns with ``interrupted`` set (SIGTERM/SIGINT).
        progress: told how many files will be processed, then of each file as it is read.

    Raises:
        HwrError: for problems that stop the whole run (bad options, model, lock, state, output).
    """
    options = options.validated()
    if options.dask:
        require_dask()  # before anything is written
    try:
        templates = tuple(load_templates(list(options.templates)))
    except ValueError as e:
        raise BadArgsError(str(e)) from None
    started = time.perf_counter()
    report = BatchReport()
    check_inputs_exist(options.inputs)
    check_annotation_folder(options)
    check_outputs_writable(options)  # before the lock, whose file is in OUT: an unwritable OUT is exit 5
    # One lock on the state folder, and one on the output folder: two runs writing the same tables
    # with different state folders would otherwise overwrite each other's rows. Taken first, so that
    # a second run exits at once instead of loading the model and walking the inputs to no purpose.
    lock_dirs = dict.fromkeys([options.state_dir, options.out_dir / ".hwr-batch"])
    with ExitStack() as stack:
        for directory in lock_dirs:
            stack.enter_context(acquire_lock(directory))
        classifier = load_classifier(options.model)
        _log_threshold(classifier, options)
        client = None
        if options.dask:  # the workers read the files: before any work, check they can (see cluster.py)
            client = stack.enter_context(connect(options.dask))
            check_workers(client, model=classifier.path, model_sha=classifier.sha256, inputs=options.inputs)
        # Never read our own outputs (or the state folder) back as scans when they sit inside an input folder.
        own = [d for d in (options.out_dir, options.state_dir, options.annotate_dir) if d is not None]
        files, problems = find_inputs(options.inputs, include=options.include, exclude=options.exclude, skip_dirs=own)
        report.files_found = len(files)
        db = stack.enter_context(open_state(options.state_dir / STATE_DB_NAME))
        run_id = begin_run(db, model_sha=classifier.sha256, settings_sha=options.settings_sha())
        report.run_id = run_id
        try:
            _run(files, problems, options, templates, classifier, db, report, should_stop, progress, client)
        except BaseException as error:
            code = ExitCode.ctrl_c if isinstance(error, KeyboardInterrupt) else getattr(error, "exit_code", ExitCode.other_error)
            try:
                finish_run(db, run_id, exit_status=int(code))
            except HwrError as also:  # e.g. a full disk: the state fails too; report what failed first
                log.error("%s", also)
            raise
        report.seconds = time.perf_counter() - started
        finish_run(db, run_id, exit_status=int(report.exit_code), planned=report.files_found, skipped=report.skipped)
    return report


def check_annotation_folder(options: Options) -> None:
    """Refuse an ``--annotate`` folder that is an input folder or holds one: its pictures would be read as
    scans, and its marker (:data:`~hwr_batch.load.OWN_FOLDER_MARKER`) would hide the scans from later walks.

    Raises:
        BadArgsError: naming both folders (exit code 2); nothing has been read or written.
    """
    if options.annotate_dir is None:
        return
    annotations = Path(os.path.realpath(options.annotate_dir))
    for source in options.inputs:
        folder = Path(os.path.realpath(source))
        if not folder.is_dir():  # a file named: the pictures would land beside it, among the scans
            folder = folder.parent
        if folder == annotations or annotations in folder.parents:
            raise BadArgsError(
                f"--annotate {options.annotate_dir}: the annotation folder is, or holds, the input folder {source}; "
                "its pictures would be read as scans: choose a folder of their own (inside an input folder is fine)"
            )


def check_inputs_exist(inputs: Iterable[Path]) -> None:
    """Refuse to start when a named input is missing: an unmounted share must not look like a quiet night.

    Raises:
        InputFileError: naming every missing input (exit code 3); nothing has been read or written.
    """
    missing = [os.path.abspath(p) for p in inputs if not os.path.lexists(p)]
    if missing:
        raise InputFileError(
            f"input not found: {', '.join(missing)} (an unmounted share or a typo in the config?); "
            "nothing was read or written"
        )


def check_outputs_writable(options: Options) -> None:
    """Create the output (and annotation) folder and write a test file in each, before any work.

    Raises:
        OutputError: naming the folder and the system's reason (exit code 5): read-only, no
            permission, or no space left. (Without this check, the lock and state files in
            ``OUT/.hwr-batch`` failed first and reported the state database, exit code 6.)
    """
    for what, directory in (("output", options.out_dir), ("annotation", options.annotate_dir)):
        if directory is None:
            continue
        if os.path.isfile(directory):  # (os.path: a folder that cannot be searched is check_writable's to report)
            raise OutputError(f"{directory}: the {what} folder is a file, not a folder; nothing was read")
        try:
            check_writable(directory)
            if what == "annotation":
                mark_own_folder(directory)
        except OSError as e:
            raise OutputError(f"{directory}: cannot write to the {what} folder ({e.strerror or e}); nothing was read") from None


def mark_own_folder(directory: Path) -> None:
    """Mark a folder of annotated pages so that no later run reads them as scans (see :func:`find_inputs`)."""
    marker = Path(directory) / OWN_FOLDER_MARKER
    if not marker.exists():
        marker.write_text("Annotated pages written by hwr-batch: not read as scans when found in an input folder.\n")


def _run(
    files: list[Path],
    problems: list[tuple[Path, str]],
    options: Options,
    templates: tuple[Template, ...],
    classifier: Classifier,
    db: StateDB,
    report: BatchReport,
    should_stop: Callable[[], bool],
    progress: Progress | None,
    client: Client | None,
) -> None:
    """The body of :func:`run_batch`, under its locks and run record."""
    if options.out_dir.is_dir():
        remove_stale_temp_files(options.out_dir)
    decisions = plan(
        db, files, model_sha=classifier.sha256, force=options.force, retry_failed=options.retry_failed,
        reprocess_stale=options.reprocess_stale, settings_sha=options.settings_sha(),
    )
    _log_stale(decisions, options)
    if options.jobs > 1 and client is None and sum(d.process for d in decisions) > 1:
        start_worker_server()  # a pool will read them: its imports overlap reading the tables back
    options, tables, decisions = _tables_to_update(options, templates, decisions, report.run_id)
    _log_missing_annotations(decisions, options)
    store = ResultStore(tables, options=options, db=db, model_sha=classifier.sha256, report=report)
    store.note_content(decisions)
    pruned = _drop_deleted_files(store, db, options)
    todo = {d.path: d for d in decisions if d.process}
    report.skipped = sum(1 for d in decisions if not d.process and d.kind != "unreadable")
    report.known_failures = sum(1 for d in decisions if not d.process and d.kind == "failed")
    unreadable = _record_unreadable(store, db, decisions, problems, report)
    log.info(
        "%d files found: %d to process, %d already done or skipped, %d unreadable",
        len(files), len(todo), report.skipped, unreadable,
    )
    if progress:
        progress.start(len(todo))
    settings = ReadSettings.of(options, templates)
    _read_classify_and_store(todo, store, classifier, options, settings, report, should_stop, progress, client)
    if not report.outputs or pruned:  # nothing to process: still leave valid (possibly empty) tables
        report.outputs = store.write()
    if pruned:  # only now that the tables no longer hold them: a crash before this line prunes them next time
        forget(db, pruned)
    report.stale = len(stale_files(db, classifier.sha256, options.settings_sha()))


def _tables_to_update(
    options: Options, templates: tuple[Template, ...], decisions: list[Decision], run_id: int
) -> tuple[Options, dict[str, pd.DataFrame], list[Decision]]:
    """The tables this run adds its rows to (with templates, a forms table each), the options with their folder,
    and the decisions with the files whose rows in the tables are not what the state records turned into "process it"."""
    forms = {table: form_columns(t) for t, table in zip(templates, table_names(list(templates)).values())}
    if options.per_run:  # this run's rows only, in a folder of their own (never an earlier run's)
        out_dir = options.out_dir / f"run-{run_id:05d}"
        suffix = 1
        while out_dir.exists():
            suffix += 1
            out_dir = options.out_dir / f"run-{run_id:05d}-{suffix}"
        return replace(options, out_dir=out_dir), empty_tables(forms), decisions
    # cumulative: every file's latest rows, carried over from earlier runs
    tables = read_tables(options.out_dir, options.fmt, forms)
    others = {p.name for fmt in FORMATS if fmt != options.fmt for p in output_paths(options.out_dir, fmt).values() if p.exists()}
    if others and not output_paths(options.out_dir, options.fmt)["fields"].exists():  # a switch of --format
        why = (f"the tables are now written as {options.fmt}; the {', '.join(sorted(others))} "
               "of earlier runs stay as they were and are no longer updated")
        return options, tables, redo_files_whose_rows_do_not_match(tables, decisions, why=why)
    return options, tables, redo_files_whose_rows_do_not_match(tables, decisions)


def _log_missing_annotations(decisions: list[Decision], options: Options) -> None:
    """Say how many files done before (and not read again now) lack an annotated page in the annotation folder.

    They are not read again for it: an annotation folder is often cleared to save space, and a
    nightly run should not then redo every file. ``--force`` redraws them.
    """
    if options.annotate_dir is None:
        return
    try:  # one listing, not a stat per page: the folder may be on a network share
        drawn: set[str] | None = set(os.listdir(options.annotate_dir))
    except OSError:  # a folder that can be entered but not listed: a stat per page
        drawn = None

    def is_drawn(path: Path) -> bool:
        return path.exists() if drawn is None else path.name in drawn

    missing = sum(
        1 for d in decisions
        if not d.process and d.kind == "done" and d.previous is not None and d.previous.pages
        and not all(is_drawn(annotation_path(options.annotate_dir, d.path, page)) for page in range(1, d.previous.pages + 1))
    )
    if missing:
        log.info(
            "%d file%s done before %s no annotated page in %s (done without --annotate, or the pictures were "
            "removed); not read again for it: --force redraws them",
            missing, "s" if missing > 1 else "", "have" if missing > 1 else "has", options.annotate_dir,
        )


def _drop_deleted_files(store: ResultStore, db: StateDB, options: Options) -> list[Path]:
    """With ``--prune``: drop the rows of recorded files deleted from an input folder; those files."""
    pruned = _deleted_files(db, options.inputs) if options.prune else []
    if pruned:
        store.replace_rows(pruned)
        log.info("pruning %d files deleted from the input folders (their rows and records)", len(pruned))
    return pruned


def _record_unreadable(
    store: ResultStore,
    db: StateDB,
    decisions: list[Decision],
    problems: list[tuple[Path, str]],
    report: BatchReport,
) -> int:
    """Folders that cannot be listed, and files that cannot even be stat-ed, are errors of this run:
    logged, given error rows, counted as failed (the files marked failed at once). Returns their number."""
    unreadable = [(Path(os.path.abspath(path)), "find", reason) for path, reason in problems]
    for d in decisions:
        if d.kind == "unreadable":
            unreadable.append((d.path, "read", d.error or "unreadable"))
            mark_failed(db, d.path, d.fingerprint, stage="read", reason=d.error or "unreadable", run_id=report.run_id)
    for path, _stage, reason in unreadable:
        _log_file_error(path, reason)
    store.replace_rows([p for p, _, _ in unreadable], errors=[error_row(p, None, s, r) for p, s, r in unreadable])
    report.failed += len(unreadable)
    return len(unreadable)


def _read_classify_and_store(
    todo: dict[Path, Decision],
    store: ResultStore,
    classifier: Classifier,
    options: Options,
    settings: ReadSettings,
    report: BatchReport,
    should_stop: Callable[[], bool],
    progress: Progress | None,
    client: Client | None,
) -> None:
    """Read the files to do in workers (local processes, or a Dask cluster's workers, which classify them too),
    classify them in batches, write the tables when due and mark the files."""
    pending: list[FileReading] = []
    pending_digits = 0
    paths = _until(list(todo), should_stop, report)
    if client is not None:
        readings = iter_cluster_readings(client, paths, settings, model=classifier.path, model_sha=classifier.sha256)
    else:
        readings = iter_readings(paths, settings, jobs=min(options.jobs, len(todo)))
    try:
        for reading in readings:
            for stage, seconds in reading.seconds.items():
                report.stage_seconds[stage] += seconds
            if progress:  # as each file is read: writing waits for a batch, or longer (see store._Unwritten)
                progress.advance(reading.path, "failed" if reading.error else "read")
            pending.append(reading)
            pending_digits += reading.candidates
            if pending_digits >= options.batch_digits or len(pending) >= FILES_PER_BATCH:
                _classify_batch(pending, store, classifier, options, settings.templates, report)
                pending, pending_digits = [], 0
                if store.write_due():
                    store.flush(todo)
        _classify_batch(pending, store, classifier, options, settings.templates, report)
    except Exception:
        # A failure outside writing (annotating, a bug): first save what earlier batches read, so
        # the next run need not redo it. (A failed write is not tried again: flush takes the files first.)
        if store.has_unwritten():
            try:
                store.flush(todo)
            except HwrError as also:  # the first failure is the one to report
                log.error("%s", also)
        raise
    if store.has_unwritten():
        store.flush(todo)


def _deleted_files(db: StateDB, inputs: Iterable[Path]) -> list[Path]:
    """Recorded files that no longer exist, inside an input folder that does.

    An input folder none of whose recorded files is left prunes nothing: that is an unmounted share
    (its empty mount point) far more often than a deliberate deletion of everything.
    """
    roots = [Path(os.path.abspath(p)) for p in inputs if Path(p).is_dir()]
    under: dict[Path, list[tuple[Path, bool]]] = {root: [] for root in roots}
    for record in recorded_files(db):
        root = next((r for r in roots if record.path.is_relative_to(r)), None)
        if root is not None:
            under[root].append((record.path, os.path.lexists(record.path)))
    deleted = []
    for root, files in under.items():
        gone = [path for path, exists in files if not exists]
        if gone and len(gone) == len(files):
            log.warning("%s: none of the %d files recorded under it is left (an unmounted share?); not pruned", root, len(gone))
        else:
            deleted += gone
    return deleted


def _log_stale(decisions: list[Decision], options: Options) -> None:
    """Say how many files were read with another model, or other settings, and whether they are redone."""
    counts = Counter(d.kind for d in decisions if d.kind in ("stale-model", "stale-settings"))
    what = {"stale-model": "another model", "stale-settings": "other settings that change results"}
    for kind, count in sorted(counts.items()):
        now = ""
        if kind == "stale-settings":
            now = " (now " + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in options.result_settings().items()) + ")"
        action = "redone" if options.reprocess_stale or options.force else "kept: --reprocess-stale redoes them"
        log.warning("%d files were read with %s%s: stale, %s", count, what[kind], now, action)


def _log_file_error(path: Path, reason: str) -> None:
    log.error("%s", reason if reason.startswith(f"{path}:") else f"{path}: {reason}")


FILES_PER_BATCH = 64  # classify at least this often (then write the outputs if due, see store._Unwritten)


def _until(paths: list[Path], should_stop: Callable[[], bool], report: BatchReport) -> Iterator[Path]:
    """Yield paths until ``should_stop()``; then note the interruption."""
    for path in paths:
        if should_stop():
            report.interrupted = True
            log.warning("stopping: the files already read are finished and written; re-run to do the rest")
            return
        yield path


def _log_threshold(classifier: Classifier, options: Options) -> None:
    threshold = accept_threshold(classifier.calibration, options.target_error, options.min_confidence)
    if options.min_confidence is not None:
        source = "--min-confidence"
    elif classifier.calibration is not None and classifier.calibration.accept_curve:
        source = f"the calibration record's threshold for {options.target_error * 100:g}% error among accepted fields"
    else:
        source = f"1 - --target-error {options.target_error:g}: the calibration record has no accept curve"
    log.info("fields are accepted at confidence >= %.4f (%s)", threshold, source)
    if threshold >= 1.0 and options.min_confidence is None:
        log.warning("--target-error %g: the calibration record never reached so low an error among accepted "
                    "fields, so (nearly) every field will be flagged for review", options.target_error)


def _classify_batch(
    readings: list[FileReading],
    store: ResultStore,
    classifier: Classifier,
    options: Options,
    templates: tuple[Template, ...],
    report: BatchReport,
) -> None:
    """Classify a batch of files and put their rows in the store's tables (in memory); annotate their pages.

    With templates, the pages registered to them are classified too, into a forms row per page; a page that
    fits none also gets an error row (its file is done: its other rows stand), and the run's exit code is 1."""
    if not readings:
        return
    good = [r for r in readings if r.error is None]
    threshold = accept_threshold(classifier.calibration, options.target_error, options.min_confidence)
    digit_rows, field_rows, seconds = classify_readings(good, classifier, threshold=threshold)
    report.stage_seconds["classify"] += seconds
    forms, unregistered = {}, []
    if templates:
        forms, unregistered, seconds = process_form_rows(good, templates, classifier, threshold=threshold)
        report.stage_seconds["classify"] += seconds
        report.unregistered_pages += len(unregistered)
    for r in readings:
        for note in r.notes:
            log.warning("%s: %s", r.path, note)
        if r.error:
            _log_file_error(r.path, r.error[1])
    for row in unregistered:
        log.error("%s: page %d: %s", row["file"], row["page"], row["reason"])
    store.replace_rows(
        [r.path for r in readings], digit_rows, field_rows, error_rows(readings) + unregistered,
        page_rows(good, field_rows), forms,
    )
    if options.annotate_dir:
        started = time.perf_counter()
        annotate_files(good, digit_rows, field_rows, options)
        report.stage_seconds["write"] += time.perf_counter() - started
    store.hold(readings, digit_rows, field_rows)
    report.fields += len(field_rows)
    report.flagged_fields += sum(row["flagged"] for row in field_rows)
