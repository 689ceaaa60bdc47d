"""The batch recipe: find scans -> read pages (workers) -> classify in large batches -> write tables.

Reading a file (decode, layout, segmentation, normalisation) is CPU work on one file and runs in
worker processes (:mod:`hwr_batch.read`); classification gathers the digits of many files into one
ONNX Runtime call in the main process, and its results become table rows (:mod:`hwr_batch.rows`);
results are written atomically as they come, so memory stays flat and a crash loses nothing that
was already written.
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
from typing import Protocol

import pandas as pd

from .annotate import annotate_files
from .atomic import check_writable, display_path, remove_stale_temp_files
from .classify import Classifier, load_classifier
from .config import Options
from .errors import ExitCode, HwrError, InputFileError, OutputError
from .export import CUT_SHORT_AT, empty_tables, neutralise_cell, read_tables, to_frame, write_tables
from .load import find_inputs
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
)
from .rows import classify_readings, error_rows, page_rows
from .runlock import acquire_lock
from .state import (
    STATE_DB_NAME,
    Decision,
    StateDB,
    UnstableFileError,
    begin_run,
    finish_run,
    forget,
    mark_done,
    mark_failed,
    open_state,
    plan,
    recorded_files,
    stale_files,
    with_sha256,
)

# The API (README, scripts/, benchmarks/): the run, and the reading and row building it is made of, whose
# own modules are read.py and rows.py.
__all__ = [
    "BatchReport", "FieldReading", "FileReading", "PageReading", "Progress", "ReadSettings", "check_inputs_exist",
    "check_outputs_writable", "classify_readings", "field_image", "iter_field_images", "read_file", "read_page",
    "run_batch", "segmenting_scale",
]

log = logging.getLogger(__name__)
file_log = logging.getLogger("hwr_batch.files")  # one line per file; shown with -v (see cli)


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
    failed: int = 0
    stale: int = 0
    pages: int = 0
    digits: int = 0
    fields: int = 0
    flagged_fields: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    outputs: list[Path] = field(default_factory=list)
    run_id: int | None = None

    @property
    def exit_code(self) -> ExitCode:
        """ok, partial_failure (some files failed) or ctrl_c (stopped early)."""
        if self.interrupted:
            return ExitCode.ctrl_c
        return ExitCode.partial_failure if self.failed else ExitCode.ok

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """One line for the log."""
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        return (
            f"{self.files_found} files found: {self.processed} processed, {self.skipped} skipped, "
            f"{self.failed} failed, {self.stale} stale (another model or settings); {self.pages} pages, {self.fields} fields, "
            f"{self.digits} digits, {self.flagged_fields} fields flagged; {self.seconds:.1f}s "
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
    started = time.perf_counter()
    report = BatchReport()
    check_inputs_exist(options.inputs)
    check_outputs_writable(options)  # before the lock, whose file is in OUT: an unwritable OUT is exit 5
    # One lock on the state folder, and one on the output folder: two runs writing the same tables
    # with different state folders would otherwise overwrite each other's rows. Taken first, so that
    # a second run exits at once instead of loading the model and walking the inputs to no purpose.
    lock_dirs = dict.fromkeys([options.state_dir, options.out_dir / ".hwr-batch"])
    with ExitStack() as stack:
        for directory in lock_dirs:
            stack.enter_context(acquire_lock(directory))
        classifier = load_classifier(options.model)
        # Never read our own outputs (or the state folder) back as scans when they sit inside an input folder.
        own = [d for d in (options.out_dir, options.state_dir, options.annotate_dir) if d is not None]
        files, problems = find_inputs(options.inputs, include=options.include, exclude=options.exclude, skip_dirs=own)
        report.files_found = len(files)
        db = stack.enter_context(open_state(options.state_dir / STATE_DB_NAME))
        run_id = begin_run(db, model_sha=classifier.sha256, settings_sha=options.settings_sha())
        report.run_id = run_id
        try:
            _run(files, problems, options, classifier, db, report, should_stop, progress)
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
        try:
            check_writable(directory)
        except OSError as e:
            raise OutputError(f"{directory}: cannot write to the {what} folder ({e.strerror or e}); nothing was read") from None


def _run(
    files: list[Path],
    problems: list[tuple[Path, str]],
    options: Options,
    classifier: Classifier,
    db: StateDB,
    report: BatchReport,
    should_stop: Callable[[], bool],
    progress: Progress | None,
) -> None:
    """The body of :func:`run_batch`, under its locks and run record."""
    run_id = report.run_id
    if options.out_dir.is_dir():
        remove_stale_temp_files(options.out_dir)
    decisions = plan(
        db, files, model_sha=classifier.sha256, force=options.force, retry_failed=options.retry_failed,
        reprocess_stale=options.reprocess_stale, settings_sha=options.settings_sha(),
    )
    _log_stale(decisions, options)
    if options.per_run:  # this run's rows only, in a folder of their own (never an earlier run's)
        out_dir = options.out_dir / f"run-{run_id:05d}"
        suffix = 1
        while out_dir.exists():
            suffix += 1
            out_dir = options.out_dir / f"run-{run_id:05d}-{suffix}"
        options = replace(options, out_dir=out_dir)
        tables = empty_tables()
    else:  # cumulative: every file's latest rows, carried over from earlier runs
        tables = read_tables(options.out_dir, options.fmt)
        decisions = _redo_files_whose_rows_do_not_match(tables, decisions)
    pruned = _deleted_files(db, options.inputs) if options.prune else []
    if pruned:
        tables = _replace_rows(tables, pruned)
        log.info("pruning %d files deleted from the input folders (their rows and records)", len(pruned))
    todo = {d.path: d for d in decisions if d.process}
    report.skipped = sum(1 for d in decisions if not d.process and d.kind != "unreadable")
    # Folders that cannot be listed, and files that cannot even be stat-ed, are errors of this run.
    unreadable = [(Path(os.path.abspath(path)), "find", reason) for path, reason in problems]
    for d in decisions:
        if d.kind == "unreadable":
            unreadable.append((d.path, "read", d.error or "unreadable"))
            mark_failed(db, d.path, d.fingerprint, stage="read", reason=d.error or "unreadable", run_id=run_id)
    for path, _stage, reason in unreadable:
        _log_file_error(path, reason)
    tables = _replace_rows(tables, [p for p, _, _ in unreadable], errors=[
        {"file": str(p), "page": None, "stage": s, "reason": r} for p, s, r in unreadable
    ])
    report.failed += len(unreadable)
    log.info(
        "%d files found: %d to process, %d already done or skipped, %d unreadable",
        len(files), len(todo), report.skipped, len(unreadable),
    )
    if progress:
        progress.start(len(todo))
    settings = ReadSettings(options.field_mode, options.pdf_dpi, options.max_megapixels, options.dpi)
    pending: list[FileReading] = []
    pending_digits = 0
    unwritten = _Unwritten()
    paths = _until(list(todo), should_stop, report)
    try:
        for reading in iter_readings(paths, settings, jobs=min(options.jobs, len(todo))):
            for stage, seconds in reading.seconds.items():
                report.stage_seconds[stage] += seconds
            if progress:  # as each file is read: writing waits for a batch, or longer (see _Unwritten)
                progress.advance(reading.path, "failed" if reading.error else "read")
            pending.append(reading)
            pending_digits += len(reading.images)
            if pending_digits >= options.batch_digits or len(pending) >= FILES_PER_BATCH:
                tables = _classify_batch(pending, tables, unwritten, classifier, options, report)
                pending, pending_digits = [], 0
                if unwritten.write_due():
                    _flush(tables, unwritten, todo, db, classifier, options, report)
        tables = _classify_batch(pending, tables, unwritten, classifier, options, report)
    except Exception:
        # A failure outside writing (annotating, a bug): first save what earlier batches read, so
        # the next run need not redo it. (A failed write is not tried again: _flush takes the files first.)
        if unwritten.files:
            try:
                _flush(tables, unwritten, todo, db, classifier, options, report)
            except HwrError as also:  # the first failure is the one to report
                log.error("%s", also)
        raise
    if unwritten.files:
        _flush(tables, unwritten, todo, db, classifier, options, report)
    if not report.outputs or pruned:  # nothing to process: still leave valid (possibly empty) tables
        report.outputs = _write(tables, options)
    if pruned:  # only now that the tables no longer hold them: a crash before this line prunes them next time
        forget(db, pruned)
    report.stale = len(stale_files(db, classifier.sha256, options.settings_sha()))


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


def _redo_files_whose_rows_do_not_match(tables: dict[str, pd.DataFrame], decisions: list[Decision]) -> list[Decision]:
    """Files the state records as read whose rows in the tables read back are not what it recorded
    (the tables were deleted, written in the other format, cut short by a partial restore, or
    edited): process them again, so the cumulative tables never silently lose or keep wrong rows.

    A done file must have as many digit rows as the digits recorded, and field rows whose digit
    counts add up to as many; a failed file (not retried) must have its row in the errors table.
    """
    digit_rows = tables["digits"]["file"].value_counts().to_dict()
    field_digits = tables["fields"].groupby("file")["digit_count"].sum().to_dict()
    error_files = set(tables["errors"]["file"])
    # A table cut inside a row lost every row from that row's file on (tables are sorted by file),
    # even rows the counts cannot miss, such as the fields of a file that had no digits.
    def cut(*names: str) -> str | None:
        return min((c for n in names if (c := tables[n].attrs.get(CUT_SHORT_AT)) is not None), default=None)

    cut_done, cut_failed = cut("digits", "fields"), cut("errors")  # done files have rows in those, failed ones here
    redone = []
    for d in decisions:
        previous = d.previous
        if not d.process and previous is not None and d.kind in ("done", "stale-model", "stale-settings", "failed"):
            keys = {file_text(d.path), neutralise_cell(file_text(d.path))}
            if previous.status == "done":
                recorded = previous.digits or 0
                matches = recorded == sum(digit_rows.get(k, 0) for k in keys) == sum(field_digits.get(k, 0) for k in keys)
                cut_at = cut_done
            else:
                matches = bool(keys & error_files)
                cut_at = cut_failed
            if not matches or (cut_at is not None and max(keys) >= cut_at):
                d = _redo(d)
        redone.append(d)
    count = sum(1 for old, new in zip(decisions, redone) if new.process and not old.process)
    if count:
        log.warning(
            "%d file(s) read again: their rows in the output tables are not what the state database records "
            "(tables deleted, cut short, or edited)", count,
        )
    return redone


def _redo(decision: Decision) -> Decision:
    """``decision`` turned into "process it", with the content hash marking the file needs."""
    fingerprint, previous = decision.fingerprint, decision.previous
    if fingerprint is not None and fingerprint.sha256 is None:
        if previous is not None and previous.sha256 is not None:  # unchanged since it was hashed
            fingerprint = replace(fingerprint, sha256=previous.sha256)
        else:  # it could not be read last time: hash it now
            try:
                fingerprint = with_sha256(decision.path, fingerprint)
            except (OSError, UnstableFileError):
                return decision
    return replace(decision, process=True, fingerprint=fingerprint)


def file_text(path: Path) -> str:
    """A file name as the tables hold it (:func:`~hwr_batch.atomic.display_path`): bytes that are
    not UTF-8 and control characters escaped, in a form that never shows two names alike, so the
    tables key each file's rows on it."""
    return display_path(path)


def _log_file_error(path: Path, reason: str) -> None:
    log.error("%s", reason if reason.startswith(f"{path}:") else f"{path}: {reason}")


FILES_PER_BATCH = 64  # classify at least this often (then write the outputs if due, see _Unwritten)


def _until(paths: list[Path], should_stop: Callable[[], bool], report: BatchReport) -> Iterator[Path]:
    """Yield paths until ``should_stop()``; then note the interruption."""
    for path in paths:
        if should_stop():
            report.interrupted = True
            log.warning("stopping: the files already read are finished and written; re-run to do the rest")
            return
        yield path


@dataclass
class _Unwritten:
    """Files classified, with their rows in the tables, but not yet written out nor marked done.

    The tables are rewritten whole, so writing them after every batch costs O(N^2) over a long run
    (an xlsx workbook of 100,000 digits takes 13 s to write). They are written once the time since
    the last write is WRITE_INTERVAL_FACTOR times what that write took, and at most
    MAX_SECONDS_UNWRITTEN: small CSV tables after every batch, as before; a large workbook every
    minute or so. (1,000 pages to xlsx: 257 s -> 106 s.)
    """

    # path, error, pages, digits, fields, flagged fields
    files: list[tuple[Path, tuple[str, str] | None, int, int, int, int]] = field(default_factory=list)
    last_write_ended: float = field(default_factory=time.perf_counter)
    last_write_seconds: float = 0.0

    def write_due(self) -> bool:
        elapsed = time.perf_counter() - self.last_write_ended
        wait = min(WRITE_INTERVAL_FACTOR * self.last_write_seconds, MAX_SECONDS_UNWRITTEN)
        return bool(self.files) and elapsed >= wait


WRITE_INTERVAL_FACTOR = 4.0
MAX_SECONDS_UNWRITTEN = 300.0  # however slow the write, at most this much work waits to be written


def _classify_batch(
    readings: list[FileReading],
    tables: dict[str, pd.DataFrame],
    unwritten: _Unwritten,
    classifier: Classifier,
    options: Options,
    report: BatchReport,
) -> dict[str, pd.DataFrame]:
    """Classify a batch of files and put their rows in the tables (in memory); annotate their pages."""
    if not readings:
        return tables
    good = [r for r in readings if r.error is None]
    digit_rows, field_rows, seconds = classify_readings(good, classifier, min_confidence=options.min_confidence)
    report.stage_seconds["classify"] += seconds
    for r in readings:
        for note in r.notes:
            log.warning("%s: %s", r.path, note)
        if r.error:
            _log_file_error(r.path, r.error[1])
    tables = _replace_rows(
        tables, [r.path for r in readings], digit_rows, field_rows, error_rows(readings), page_rows(good, field_rows)
    )
    if options.annotate_dir:
        started = time.perf_counter()
        annotate_files(good, digit_rows, field_rows, options)
        report.stage_seconds["write"] += time.perf_counter() - started
    # Keep only what marking the files needs: their normalised images can be freed now.
    digits_per_file = Counter(row["file"] for row in digit_rows)
    fields_per_file = Counter(row["file"] for row in field_rows)
    flagged_per_file = Counter(row["file"] for row in field_rows if row["flagged"])
    unwritten.files.extend(
        (r.path, r.error, len(r.pages), digits_per_file[key], fields_per_file[key], flagged_per_file[key])
        for r in readings
        for key in [str(r.path)]
    )
    report.fields += len(field_rows)
    report.flagged_fields += sum(row["flagged"] for row in field_rows)
    return tables


def _flush(
    tables: dict[str, pd.DataFrame],
    unwritten: _Unwritten,
    todo: dict[Path, Decision],
    db: StateDB,
    classifier: Classifier,
    options: Options,
    report: BatchReport,
) -> None:
    """Write the tables, then mark the files classified since the last write as done (or failed)."""
    files, unwritten.files = unwritten.files, []
    started = time.perf_counter()
    report.outputs = _write(tables, options)
    unwritten.last_write_ended = time.perf_counter()
    unwritten.last_write_seconds = unwritten.last_write_ended - started
    report.stage_seconds["write"] += unwritten.last_write_seconds
    # Only now, with the outputs on disk, are the files marked: a crash before this line means
    # the next run processes them again and replaces (never duplicates) their rows.
    for path, error, pages, digits, fields, flagged in files:
        decision = todo[path]
        if error:
            mark_failed(db, path, decision.fingerprint, stage=error[0], reason=error[1], run_id=report.run_id)
            report.failed += 1
            file_log.info("%s: failed in %s", path, error[0])
        else:
            file_log.info(
                "%s: done (%s): %d pages, %d fields, %d digits, %d fields flagged",
                path, decision.kind, pages, fields, digits, flagged,
            )
            mark_done(
                db, path, decision.fingerprint, model_sha=classifier.sha256, pages=pages, digits=digits,
                run_id=report.run_id, settings_sha=options.settings_sha(),
            )
            report.processed += 1
            report.pages += pages
            report.digits += digits


def _replace_rows(
    tables: dict[str, pd.DataFrame],
    files: list[Path],
    digits: list[dict] = (),
    fields: list[dict] = (),
    errors: list[dict] = (),
    pages: list[dict] = (),
) -> dict[str, pd.DataFrame]:
    """Drop every row of ``files`` from the tables, then append the new rows: a file's rows are replaced, never duplicated."""
    keys = {file_text(f) for f in files}
    keys |= {neutralise_cell(k) for k in keys}  # tables read back hold neutralised names
    new = {"digits": digits, "fields": fields, "errors": errors, "pages": pages}
    out = {}
    for name, frame in tables.items():
        kept = frame[~frame["file"].isin(keys)] if len(frame) else frame
        added = to_frame(name, list(new[name]))
        out[name] = pd.concat([kept, added], ignore_index=True) if len(added) and len(kept) else (added if len(added) else kept)
    return out


def _write(tables: dict[str, pd.DataFrame], options: Options) -> list[Path]:
    ordered = {name: frame.sort_values(SORT_KEYS[name], kind="stable") for name, frame in tables.items()}
    return write_tables(ordered, options.out_dir, options.fmt)


SORT_KEYS = {
    "digits": ["file", "page", "field", "position"], "fields": ["file", "page", "field"], "errors": ["file"],
    "pages": ["file", "page"],
}
