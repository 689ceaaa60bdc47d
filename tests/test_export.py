"""Writing and reading back the output tables (export stage) and when a run rewrites them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import openpyxl
import pytest

from hwr_batch import export, pipeline, store
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
    tables = {"digits": to_frame("digits", digit_rows(42)), "fields": to_frame("fields", []), "errors": to_frame("errors", [])}
    write_tables(tables, tmp_path, "xlsx")
    workbook = openpyxl.load_workbook(tmp_path / "results.xlsx", read_only=True)
    digit_sheets = ["digits"] + [f"digits ({n})" for n in range(2, 12)]  # 42 rows: 10 sheets of 4, one of 2
    assert workbook.sheetnames == ["fields", *digit_sheets, "errors"]  # a workbook opens on the fields
    assert [workbook[s].max_row for s in digit_sheets] == [5] * 10 + [3]  # with headers
    back = read_tables(tmp_path, "xlsx")
    assert back["digits"]["x"].tolist() == list(range(42))  # all rows, in order ("digits (10)" after "(9)")
    assert back["digits"]["digit"].tolist() == [str(i % 10) for i in range(42)]
    assert len(back["fields"]) == 0 and list(back["fields"].columns) == list(export.FIELD_COLUMNS)


def test_a_table_of_exactly_a_sheet_stays_on_one(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "XLSX_MAX_ROWS", 4)
    tables = {"digits": to_frame("digits", digit_rows(4)), "fields": to_frame("fields", []), "errors": to_frame("errors", [])}
    write_tables(tables, tmp_path, "xlsx")
    assert openpyxl.load_workbook(tmp_path / "results.xlsx", read_only=True).sheetnames == ["fields", "digits", "errors"]
    assert read_tables(tmp_path, "xlsx")["digits"]["x"].tolist() == [0, 1, 2, 3]


def test_write_is_due_once_the_last_write_has_been_paid_for(monkeypatch):
    unwritten = store._Unwritten()
    assert not unwritten.write_due()  # nothing classified since the last write
    unwritten.files.append((Path("a.png"), None, 1, 3))
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
    monkeypatch.setattr(store, "WRITE_INTERVAL_FACTOR", 1e9)  # ... but no write due after the first
    writes = []
    real_write = store._write
    monkeypatch.setattr(store, "_write", lambda tables, options: writes.append(len(tables["fields"])) or real_write(tables, options))
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


def test_a_failure_while_writes_are_held_back_keeps_what_was_read(
    tmp_path, monkeypatch, mnist_test_small, confident_digits
):
    from test_unattended import write_scans

    truth = write_scans(tmp_path / "scans", mnist_test_small, confident_digits, 6, seed=4)
    monkeypatch.setattr(pipeline, "FILES_PER_BATCH", 1)
    monkeypatch.setattr(store, "WRITE_INTERVAL_FACTOR", 1e9)  # only the first batch is written when due
    real_classify, calls = pipeline.classify_readings, []

    def classify_failing_on_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure in classification")
        return real_classify(*args, **kwargs)

    monkeypatch.setattr(pipeline, "classify_readings", classify_failing_on_the_fourth)
    out = tmp_path / "out"
    options = Options(inputs=(tmp_path / "scans",), out_dir=out, jobs=1)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run_batch(options)
    written = read_tables(out)["fields"]
    assert len(written) == 3  # the three files classified before the failure were written ...
    assert dict(zip(written["file"], written["digits"])) == {f: truth[f] for f in written["file"]}
    db = sqlite3.connect(out / ".hwr-batch" / pipeline.STATE_DB_NAME)
    try:
        done = {row[0] for row in db.execute("SELECT path FROM files WHERE status = 'done'")}
    finally:
        db.close()
    assert done == set(written["file"])  # ... and marked done: exactly those, no more
    monkeypatch.setattr(pipeline, "classify_readings", real_classify)
    report = pipeline.run_batch(options)
    assert report.processed == 3 and report.skipped == 3
    fields = read_tables(out)["fields"]
    assert dict(zip(fields["file"], fields["digits"])) == truth and len(fields) == 6


def test_xlsx_sheets_have_a_frozen_header_a_filter_text_digits_and_flagged_rows_highlighted(tmp_path):
    fields = [
        {"file": "a.png", "page": 1, "field": n, "x": 0, "y": 0, "width": 9, "height": 9, "digits": digits,
         "digit_count": len(digits), "confidence": 0.9, "min_confidence": 0.5, "flagged": flagged, "flag_reason": ""}
        for n, (digits, flagged) in enumerate([("007", False), ("0421", True), ("12", False)], start=1)
    ]
    tables = {"digits": to_frame("digits", digit_rows(3)), "fields": to_frame("fields", fields), "errors": to_frame("errors", [])}
    write_tables(tables, tmp_path, "xlsx")
    workbook = openpyxl.load_workbook(tmp_path / "results.xlsx")
    sheet = workbook["fields"]
    assert sheet.freeze_panes == "A2"
    last = openpyxl.utils.get_column_letter(len(export.FIELD_COLUMNS))
    assert sheet.auto_filter.ref == f"A1:{last}4"
    digits_column = export.FIELD_COLUMNS.index("digits") + 1
    assert [sheet.cell(row, digits_column).value for row in (2, 3, 4)] == ["007", "0421", "12"]  # text: zeros kept
    assert all(sheet.cell(row, digits_column).data_type == "s" for row in (2, 3, 4))
    (rule_range,) = [str(r.sqref) for r in sheet.conditional_formatting]
    (rule,) = sheet.conditional_formatting[rule_range]
    assert rule_range == f"A2:{last}4" and rule.formula == ["$L2=TRUE"] and rule.dxf.fill.fgColor.rgb.endswith("FFF2CC")
    assert sheet.cell(3, export.FIELD_COLUMNS.index("flagged") + 1).value is True  # the row the rule marks
    assert workbook["errors"].freeze_panes == "A2" and not list(workbook["errors"].conditional_formatting)


def test_a_fields_table_written_before_the_review_columns_reads_back_with_them_empty(tmp_path):
    fields = [{"file": "/s/a.png", "page": 1, "field": 1, "x": 0, "y": 0, "width": 9, "height": 9, "digits": "007",
               "digit_count": 3, "confidence": 0.9, "min_confidence": 0.5, "flagged": True, "flag_reason": "x"}]
    old = to_frame("fields", fields).drop(columns=["reviewed_digits", "review_status"])
    old.to_csv(tmp_path / "fields.csv", index=False)
    back = read_tables(tmp_path)["fields"]
    assert list(back.columns) == list(export.FIELD_COLUMNS)
    assert back["reviewed_digits"].isna().all() and back["digits"].tolist() == ["007"]
    reviewed = to_frame("fields", [{**fields[0], "reviewed_digits": "008", "review_status": "corrected"}])
    write_tables({"fields": reviewed}, tmp_path)
    back = read_tables(tmp_path)["fields"]  # the review's digits stay text: "008", not 8
    assert (back["reviewed_digits"].tolist(), back["review_status"].tolist()) == (["008"], ["corrected"])


def test_an_errors_row_written_with_the_file_name_in_its_reason_reads_back_without_it(tmp_path):
    (tmp_path / "errors.csv").write_text(
        "file,page,stage,reason\n"
        "/s/a.png,,load,/s/a.png: empty file (0 bytes)\n"  # as written before 2026-12-07
        "/s/b.png,2,load,page 2 is truncated or corrupt\n"
        "/s/c.png,,read,broken symbolic link (to /s/c.png.old: No such file or directory)\n",
        encoding="utf-8",
    )
    reasons = read_tables(tmp_path)["errors"]["reason"].tolist()
    assert reasons == [
        "empty file (0 bytes)", "page 2 is truncated or corrupt", "broken symbolic link (to /s/c.png.old: No such file or directory)"
    ]
