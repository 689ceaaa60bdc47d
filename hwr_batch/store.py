"""The results of a run: the output tables in memory, when they are written, and marking files in the
state database once their rows are on disk.

Tables read back from an earlier run are checked against the state database
(:func:`redo_files_whose_rows_do_not_match`); rows are keyed by the exact file name
(:func:`file_text`) and replaced per file, never duplicated; the tables are rewritten whole and
atomically, on a schedule that keeps rewriting them from dominating a long run (:class:`_Unwritten`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .atomic import display_path
from .config import Options
from .corrections import field_keys, match_corrections, with_reviews, write_corrections_csv
from .export import CUT_SHORT_AT, TABLE_COLUMNS, neutralise_cell, to_frame, write_tables
from .read import FileReading
from .state import (
    Decision,
    StateDB,
    UnstableFileError,
    content_hashes,
    mark_done,
    mark_failed,
    path_key,
    read_corrections,
    save_corrections,
    with_sha256,
)

if TYPE_CHECKING:
    from .pipeline import BatchReport

log = logging.getLogger("hwr_batch.pipeline")  # the run's logger, named as before this module split off
file_log = logging.getLogger("hwr_batch.files")  # one line per file; shown with -v (see cli)


class ResultStore:
    """The output tables of a run, in memory, and the files whose rows they hold but that are not yet
    written out nor marked in the state database.

    A file's rows are replaced, never duplicated (:meth:`replace_rows`). Files classified are held
    (:meth:`hold`) until :meth:`flush` writes the tables and then marks them done or failed: a crash
    before that means the next run reads them again and replaces their rows.
    """

    def __init__(
        self,
        tables: dict[str, pd.DataFrame],
        *,
        options: Options,
        db: StateDB,
        model_sha: str,
        report: BatchReport,
    ) -> None:
        self.tables = tables
        self.options = options  # out_dir, format, and the settings hash recorded with each file
        self.db = db
        self.model_sha = model_sha
        self.report = report  # counts of files done and failed, time spent writing, outputs written
        self.unwritten = _Unwritten()
        self.content_sha: dict[bytes, str | None] = {}  # this run's view of its files' content (note_content)

    def note_content(self, decisions: list[Decision]) -> None:
        """Note the content hash of each planned file: a review applies to a row only while it matches
        (the state database learns of a changed file only once its new rows are written)."""
        self.content_sha = {path_key(d.path): d.fingerprint.sha256 for d in decisions if d.fingerprint is not None}

    def replace_rows(
        self,
        files: list[Path],
        digits: list[dict] = (),
        fields: list[dict] = (),
        errors: list[dict] = (),
        pages: list[dict] = (),
        forms: dict[str, list[dict]] | None = None,
    ) -> None:
        """Drop every row of ``files`` from the tables, then add the new rows (``forms``: by forms table)."""
        self.tables = _replace_rows(self.tables, files, digits, fields, errors, pages, forms)

    def hold(self, readings: list[FileReading], digit_rows: list[dict], field_rows: list[dict]) -> None:
        """Note the files of ``readings``, whose rows are in the tables, as to be marked once written.

        Keeps only what marking the files needs: their normalised images can be freed now.
        """
        digits_per_file = Counter(row["file"] for row in digit_rows)
        fields_per_file = Counter(row["file"] for row in field_rows)
        flagged_per_file = Counter(row["file"] for row in field_rows if row["flagged"])
        self.unwritten.files.extend(
            (r.path, r.error, len(r.pages), digits_per_file[key], fields_per_file[key], flagged_per_file[key])
            for r in readings
            for key in [str(r.path)]
        )

    def has_unwritten(self) -> bool:
        """Whether files are held that the next :meth:`flush` marks."""
        return bool(self.unwritten.files)

    def write_due(self) -> bool:
        """Whether the tables should be written now (see :class:`_Unwritten`)."""
        return self.unwritten.write_due()

    def flush(self, todo: dict[Path, Decision]) -> None:
        """Write the tables, then mark the files classified since the last write as done (or failed)."""
        report, unwritten = self.report, self.unwritten
        files, unwritten.files = unwritten.files, []
        started = time.perf_counter()
        report.outputs = self.write()
        unwritten.last_write_ended = time.perf_counter()
        unwritten.last_write_seconds = unwritten.last_write_ended - started
        report.stage_seconds["write"] += unwritten.last_write_seconds
        # Only now, with the outputs on disk, are the files marked: a crash before this line means
        # the next run processes them again and replaces (never duplicates) their rows.
        for path, error, pages, digits, fields, flagged in files:
            decision = todo[path]
            if error:
                mark_failed(self.db, path, decision.fingerprint, stage=error[0], reason=error[1], run_id=report.run_id)
                report.failed += 1
                file_log.info("%s: failed in %s", path, error[0])
            else:
                file_log.info(
                    "%s: done (%s): %d pages, %d fields, %d digits, %d fields flagged",
                    path, decision.kind, pages, fields, digits, flagged,
                )
                mark_done(
                    self.db, path, decision.fingerprint, model_sha=self.model_sha, pages=pages, digits=digits,
                    run_id=report.run_id, settings_sha=self.options.settings_sha(),
                )
                report.processed += 1
                report.pages += pages
                report.digits += digits

    def write(self) -> list[Path]:
        """Write the tables as they are (sorted), atomically, the fields with the reviews that apply to them
        (and, if there are reviews, corrections.csv); the files written."""
        corrections = read_corrections(self.db)
        content = {**content_hashes(self.db, [c.path for c in corrections]), **self.content_sha} if corrections else {}
        tables = {**self.tables, "fields": with_reviews(self.tables["fields"], corrections, content)}
        written = _write(tables, self.options)
        if corrections:  # under the database's write lock, so a review saved meanwhile is not lost from it
            keys = field_keys(self.tables["fields"])
            save_corrections(self.db, then=lambda every: written.append(
                write_corrections_csv(self.options.out_dir, keys, match_corrections(keys, every, content))
            ))
        return written


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


def redo_files_whose_rows_do_not_match(
    tables: dict[str, pd.DataFrame], decisions: list[Decision], *, why: str = "tables deleted, cut short, or edited"
) -> list[Decision]:
    """Files the state records as read whose rows in the tables read back are not what it recorded
    (the tables were deleted, written in the other format, cut short by a partial restore, or
    edited): process them again, so the cumulative tables never silently lose or keep wrong rows.

    A done file must have as many digit rows as the digits recorded, and field rows whose digit
    counts add up to as many, and (with templates) a row in the forms tables per page recorded; a failed
    file (not retried) must have its row in the errors table. ``why``: the likely cause the warning gives.
    """
    forms = [name for name in tables if name not in TABLE_COLUMNS]  # process --template: a row per page
    form_rows = Counter(file for name in forms for file in tables[name]["file"])
    digit_rows = tables["digits"]["file"].value_counts().to_dict()
    field_digits = tables["fields"].groupby("file")["digit_count"].sum().to_dict()
    error_files = set(tables["errors"]["file"])
    # A table cut inside a row lost every row from that row's file on (tables are sorted by file),
    # even rows the counts cannot miss, such as the fields of a file that had no digits.
    def cut(*names: str) -> str | None:
        return min((c for n in names if (c := tables[n].attrs.get(CUT_SHORT_AT)) is not None), default=None)

    cut_done, cut_failed = cut("digits", "fields", *forms), cut("errors")  # done files have rows in those, failed ones here
    redone = []
    for d in decisions:
        previous = d.previous
        if not d.process and previous is not None and d.kind in ("done", "stale-model", "stale-settings", "failed"):
            keys = {file_text(d.path), neutralise_cell(file_text(d.path))}
            if previous.status == "done":
                recorded = previous.digits or 0
                matches = recorded == sum(digit_rows.get(k, 0) for k in keys) == sum(field_digits.get(k, 0) for k in keys)
                matches &= not forms or sum(form_rows[k] for k in keys) == (previous.pages or 0)
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
            "(%s)", count, why,
        )
    return redone


def _redo(decision: Decision) -> Decision:
    """``decision`` turned into "process it", with the content hash marking the file needs."""
    fingerprint, previous = decision.fingerprint, decision.previous
    if fingerprint is None:  # it could not even be stat-ed (a broken link): report it again, as it was
        error = previous.error if previous is not None and previous.error else "cannot be stat-ed"
        return replace(decision, kind="unreadable", process=False, error=error)
    if fingerprint.sha256 is None:
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


def _replace_rows(
    tables: dict[str, pd.DataFrame],
    files: list[Path],
    digits: list[dict] = (),
    fields: list[dict] = (),
    errors: list[dict] = (),
    pages: list[dict] = (),
    forms: dict[str, list[dict]] | None = None,
) -> dict[str, pd.DataFrame]:
    """Drop every row of ``files`` from the tables, then append the new rows: a file's rows are replaced, never duplicated."""
    keys = {file_text(f) for f in files}
    keys |= {neutralise_cell(k) for k in keys}  # tables read back hold neutralised names
    new = {"digits": digits, "fields": fields, "errors": errors, "pages": pages, **(forms or {})}
    out = {}
    for name, frame in tables.items():
        kept = frame[~frame["file"].isin(keys)] if len(frame) else frame
        added = to_frame(name, list(new.get(name, ())), None if name in TABLE_COLUMNS else list(frame.columns))
        out[name] = pd.concat([kept, added], ignore_index=True) if len(added) and len(kept) else (added if len(added) else kept)
    return out


def _write(tables: dict[str, pd.DataFrame], options: Options) -> list[Path]:
    ordered = {name: frame.sort_values(SORT_KEYS.get(name, ["file", "page"]), kind="stable") for name, frame in tables.items()}
    return write_tables(ordered, options.out_dir, options.fmt)


SORT_KEYS = {
    "digits": ["file", "page", "field", "position"], "fields": ["file", "page", "field"], "errors": ["file"],
    "pages": ["file", "page"],
}
