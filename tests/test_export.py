"""Writing and reading back the output tables (export stage) and when a run rewrites them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import openpyxl

import hwr_batch.export as export
import hwr_batch.pipeline as pipeline
from hwr_batch.config import Options
from hwr_batch.export import read_tables, to_frame, write_tables


def digit_rows(count: int) -> list[dict]:
    return [
        {"file": f"scan_{i // 3:03d}.png", "page": 0, "field": 0, "position": i % 3, "x": i, "y": 0, "width": 5,
         "height": 9, "digit": str(i % 10), "confidence": 0.9, "second_choice": "7", "second_confidence": 0.05,
         "flagged": False}
        for i in range(count)
    ]


def test_a_table_longer_than_a_sheet_continues_on_further_sheets(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "XLSX_MAX_ROWS", 4)  # Excel's 1,048,575 would take minutes to fill
    tables = {"digits": to_frame("digits", digit_rows(10)), "fields": to_frame("fields", []), "errors": to_frame("errors", [])}
    write_tables(tables, tmp_path, "xlsx")
    workbook = openpyxl.load_workbook(tmp_path / "results.xlsx", read_only=True)
    assert workbook.sheetnames == ["digits", "digits (2)", "digits (3)", "fields", "errors"]
    assert [workbook[s].max_row for s in ("digits", "digits (2)", "digits (3)")] == [5, 5, 3]  # with headers
    back = read_tables(tmp_path, "xlsx")
    assert back["digits"]["x"].tolist() == list(range(10))  # all rows, in order
    assert back["digits"]["digit"].tolist() == [str(i % 10) for i in range(10)]
    assert len(back["fields"]) == 0 and list(back["fields"].columns) == list(export.FIELD_COLUMNS)


def test_write_is_due_once_the_last_write_has_been_paid_for(monkeypatch):
    unwritten = pipeline._Unwritten()
    assert not unwritten.write_due()  # nothing classified since the last write
    unwritten.files.append((Path("a.png"), None, 1))
    assert unwritten.write_due()  # the first write (cost unknown) is due at once
    unwritten.last_write_seconds = 30.0  # a big workbook: wait 4 x 30 s before the next write
    assert not unwritten.write_due()
    unwritten.last_write_ended = time.perf_counter() - 121.0
    assert unwritten.write_due()


def test_files_classified_after_the_last_due_write_are_written_and_marked_at_the_end(
    tmp_path, monkeypatch, mnist_test_small, confident_digits
):
    from test_unattended import write_scans

    truth = write_scans(tmp_path / "scans", mnist_test_small, confident_digits, 5, seed=3)
    monkeypatch.setattr(pipeline, "FILES_PER_BATCH", 1)  # one classification per file ...
    monkeypatch.setattr(pipeline, "WRITE_INTERVAL_FACTOR", 1e9)  # ... but no write due after the first
    writes = []
    real_write = pipeline._write
    monkeypatch.setattr(pipeline, "_write", lambda tables, options: writes.append(len(tables["fields"])) or real_write(tables, options))
    out = tmp_path / "out"
    report = pipeline.run_batch(Options(inputs=(tmp_path / "scans",), out_dir=out, jobs=1))
    assert writes == [1, 5]  # the first batch, then the other four together at the end
    assert report.processed == 5 and report.pages == 5
    fields = read_tables(out)["fields"]
    assert dict(zip(fields["file"], fields["digits"])) == truth
    db = sqlite3.connect(out / ".hwr-batch" / pipeline.STATE_DB_NAME)
    try:
        assert db.execute("SELECT COUNT(*) FROM files WHERE status = 'done'").fetchone()[0] == 5
    finally:
        db.close()
