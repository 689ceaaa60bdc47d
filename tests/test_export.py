"""Writing and reading back the output tables (export stage)."""

from __future__ import annotations

import openpyxl

import hwr_batch.export as export
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
