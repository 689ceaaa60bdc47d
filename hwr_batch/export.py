"""Write results as CSV files or one spreadsheet workbook, atomically, through pandas."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from .atomic import atomic_output, atomic_path, display_text, reason_without_file
from .errors import OutputError

log = logging.getLogger(__name__)

# Column order of each table: a stable interface for spreadsheets and scripts.
DIGIT_COLUMNS = (
    "file", "page", "field", "position", "x", "y", "width", "height",
    "digit", "confidence", "second_choice", "second_confidence", "flagged",
)
FIELD_COLUMNS = (
    "file", "page", "field", "x", "y", "width", "height",
    "digits", "digit_count", "confidence", "min_confidence", "flagged", "flag_reason",
    "reviewed_digits", "review_status",  # from `hwr-batch review` (see corrections.py); empty: not reviewed
)
# Columns added after tables were first written: a table read back without them gets them empty.
ADDED_COLUMNS = {"fields": ("reviewed_digits", "review_status")}
ERROR_COLUMNS = ("file", "page", "stage", "reason")
# One row per page read, so that a page with no field, a blank page or a dead scan is visible too.
PAGE_COLUMNS = ("file", "page", "fields", "digit_count", "flagged_fields", "status", "dpi")
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "digits": DIGIT_COLUMNS, "fields": FIELD_COLUMNS, "errors": ERROR_COLUMNS, "pages": PAGE_COLUMNS,
}
# Whole-number columns: kept integer (nullable Int64) whatever a table read back holds, so they never turn float.
INTEGER_COLUMNS = ("page", "field", "position", "x", "y", "width", "height", "digit_count", "fields", "flagged_fields")
TEXT_COLUMNS = (
    "file", "digits", "digit", "second_choice", "stage", "reason", "flag_reason", "status", "reviewed_digits",
    "review_status",
)
FORMATS = ("csv", "xlsx")
XLSX_MAX_ROWS = 1_048_575  # data rows a worksheet holds (Excel's 1,048,576 less the header)


def error_row(file: os.PathLike[str] | str, page: int | None, stage: str, reason: str) -> dict[str, object]:
    """A row of the ``errors`` table. The reason loses the file name a logged message starts with:
    the row's ``file`` column says it already."""
    return {"file": str(file), "page": page, "stage": stage, "reason": reason_without_file(file, reason)}


def empty_tables(forms: Mapping[str, list[str]] | None = None) -> dict[str, pd.DataFrame]:
    """The tables (digits, fields, errors, pages, and the ``forms`` tables named) with their columns and no rows."""
    return {name: pd.DataFrame(columns=list(columns)) for name, columns in {**TABLE_COLUMNS, **(forms or {})}.items()}


def to_frame(name: str, rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    """Rows (dicts keyed by column) -> a DataFrame with the table's columns in order.

    This is where new rows become cells: every text value is escaped here, once, with
    :func:`~hwr_batch.atomic.display_text` (file names that are not UTF-8 or hold control
    characters, and the reasons that name them), so no cell of any table can break a CSV line,
    fail to encode, or show two files alike. Rows hold the exact text (``str(path)``).
    ``columns``: those of a forms table (one per template field, see :func:`hwr_batch.template.form_columns`).
    """
    frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS[name]) if columns is None else columns)
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column].dtype):
            frame[column] = frame[column].map(lambda v: display_text(v) if isinstance(v, str) else v)
    return _typed(frame, name)


def _column_types(name: str, columns: Sequence[str]) -> tuple[Sequence[str], Sequence[str]]:
    """(text columns, whole-number columns) of the table ``name`` with ``columns``: in a forms table every
    column but ``page`` is text, whatever its field is named."""
    if name in TABLE_COLUMNS:
        return TEXT_COLUMNS, INTEGER_COLUMNS
    return [c for c in columns if c != "page"], ("page",)


def _typed(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Text columns as strings (the digit string "007" must not become 7), whole numbers as Int64."""
    text, integers = _column_types(name, list(frame.columns))
    for column in frame.columns:
        if column in text:
            frame[column] = frame[column].astype("string")
        elif column in integers:  # a value that is not a whole number becomes missing
            numbers = pd.to_numeric(frame[column], errors="coerce")
            frame[column] = numbers.where(numbers == numbers.round()).astype("Int64")
    return frame


def output_paths(out_dir: Path, fmt: str) -> dict[str, Path]:
    """Where each table goes: ``digits.csv``/``fields.csv``/``errors.csv``/``pages.csv``, or sheets of ``results.xlsx``."""
    out_dir = Path(out_dir)
    if fmt == "xlsx":
        return {name: out_dir / "results.xlsx" for name in TABLE_COLUMNS}
    return {name: out_dir / f"{name}.csv" for name in TABLE_COLUMNS}


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: Path, fmt: str = "csv") -> list[Path]:
    """Write the tables atomically: each file is either its old self or complete, never partial.

    Cells that a spreadsheet would run as formulas (starting with ``=``, ``+``, ``-``, ``@``) are
    neutralised with a leading apostrophe.

    Args:
        tables: ``{"digits": df, "fields": df, "errors": df, "pages": df}`` (any of them).
        out_dir: an existing or creatable folder.
        fmt: ``"csv"`` (one UTF-8 file per table) or ``"xlsx"`` (one workbook, a sheet per table;
            a table longer than a sheet holds continues on sheets "digits (2)", "digits (3)", ...).

    Returns:
        The files written.

    Raises:
        OutputError: the folder or a file cannot be written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    out_dir = Path(out_dir)
    safe = {name: neutralise_formulas(frame) for name, frame in tables.items()}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    if fmt == "xlsx":
        path = out_dir / "results.xlsx"
        try:
            with atomic_path(path) as tmp, pd.ExcelWriter(tmp, engine="openpyxl") as workbook:
                # The fields sheet first: a workbook opens on it, and it is what a person checks in the morning.
                for name in sorted(safe, key=lambda name: name != "fields"):
                    frame = _without_control_characters(safe[name])
                    for number, start in enumerate(range(0, max(len(frame), 1), XLSX_MAX_ROWS), start=1):
                        sheet = name if number == 1 else f"{name} ({number})"
                        part = frame.iloc[start : start + XLSX_MAX_ROWS]
                        part.to_excel(workbook, sheet_name=sheet, index=False)
                        _format_sheet(workbook.sheets[sheet], name, list(part.columns), len(part))
        except OSError as e:
            raise OutputError(f"{path}: cannot write results ({e.strerror or e})") from None
        return [path]
    written = []
    for name, frame in safe.items():
        path = out_dir / f"{name}.csv"
        try:
            with atomic_output(path, newline="") as f:
                frame.to_csv(f, index=False)
        except OSError as e:
            raise OutputError(f"{path}: cannot write results ({e.strerror or e})") from None
        written.append(path)
    return written


# Rows a person should look at, per table: (column, condition on its cell) for the sheet's highlight.
FLAGGED_ROWS = {"digits": ("flagged", "=TRUE"), "fields": ("flagged", "=TRUE"), "pages": ("flagged_fields", ">0")}
FLAGGED_FILL = "FFF2CC"  # light amber: visible, and the text stays legible when printed


def _format_sheet(sheet, name: str, columns: list[str], rows: int) -> None:
    """Frozen header, an autofilter over the table, and flagged rows highlighted (one conditional format,
    so that a sheet of a million rows costs nothing more to write)."""
    from openpyxl.formatting.rule import FormulaRule
    from openpyxl.styles import PatternFill
    from openpyxl.utils import get_column_letter

    last = get_column_letter(len(columns))
    sheet.freeze_panes = "A2"
    sheet.auto_filter.ref = f"A1:{last}{rows + 1}"
    if name in FLAGGED_ROWS and FLAGGED_ROWS[name][0] in columns and rows:
        column, condition = FLAGGED_ROWS[name]
        letter = get_column_letter(columns.index(column) + 1)
        fill = PatternFill(start_color=FLAGGED_FILL, end_color=FLAGGED_FILL, fill_type="solid")
        sheet.conditional_formatting.add(f"A2:{last}{rows + 1}", FormulaRule(formula=[f"${letter}2{condition}"], fill=fill))


def _without_control_characters(frame: pd.DataFrame) -> pd.DataFrame:
    """Replace the control characters a worksheet cannot hold (e.g. in odd file names) with "?"."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column].dtype):
            out[column] = out[column].map(lambda v: ILLEGAL_CHARACTERS_RE.sub("?", v) if isinstance(v, str) else v)
    return out


def read_tables(out_dir: Path, fmt: str = "csv", forms: Mapping[str, list[str]] | None = None) -> dict[str, pd.DataFrame]:
    """Read back tables written by :func:`write_tables` (empty tables where none exist yet).

    ``forms``: the forms tables to read too, with the columns their templates give them; one whose columns
    are not those (its template was edited) is read as empty, so its files are read again.

    Rows that cannot be whole (a CSV file cut short, as by a partial restore, ends inside its last
    row; a row missing its file or a whole-number value) are dropped with a warning: the run then
    finds their files' rows short of what the state database records, and reads them again. Where a
    CSV file was cut, ``frame.attrs[CUT_SHORT_AT]`` says from which file on rows may be missing.

    Raises:
        OutputError: a table exists but cannot be read, or lacks its columns; names the file.
    """
    forms = forms or {}
    tables = empty_tables(forms)
    paths = output_paths(out_dir, fmt)
    paths |= {name: Path(out_dir) / (f"{name}.csv" if fmt == "csv" else "results.xlsx") for name in forms}
    for name, path in paths.items():
        if not path.is_file():
            continue
        text_columns = dict.fromkeys(_column_types(name, forms.get(name, ()))[0], "string")
        cut_at = None
        try:
            if fmt == "xlsx":
                frame = _read_sheets(path, name, text_columns)
                if frame is None:  # a workbook written before this table existed
                    continue
            else:
                frame = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""])
                if len(frame) and not _ends_with_newline(path):  # cut inside its last row
                    log.warning("%s: the table ends inside a row (cut short?); its last row is dropped", path)
                    frame = frame.iloc[:-1]
                    # Rows are sorted by file: those before the last whole row's file are whole.
                    last = frame["file"].iloc[-1] if len(frame) else None
                    cut_at = "" if last is None or pd.isna(last) else str(last)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise OutputError(
                f"{path}: cannot read the results table back ({type(e).__name__}: {e}); restore it from a backup, "
                "or move it aside: the next run then reads again every file whose rows it held"
            ) from None
        if name in forms and list(frame.columns) != list(forms[name]):
            log.warning("%s: the %s table's columns are not its template's (edited?): its files are read again", path, name)
            continue
        for column in ADDED_COLUMNS.get(name, ()):
            if column not in frame.columns:
                frame[column] = pd.NA
        missing = [c for c in TABLE_COLUMNS.get(name, ()) if c not in frame.columns]
        if missing:
            raise OutputError(
                f"{path}: the {name} table has no column(s) {', '.join(missing)}; it was edited or damaged. "
                "Move it aside (and use --force to rebuild it) or restore it"
            )
        for column in TEXT_COLUMNS:
            if column in frame:  # written before cells were escaped: tab, CR, LF were kept raw
                frame[column] = frame[column].str.replace(_RAW_CONTROLS, lambda m: display_text(m.group()), regex=True)
        frame = _typed(frame, name)
        whole = frame["file"].notna() & (frame["file"] != "")
        for column in REQUIRED_INTEGERS.get(name, ["page"]):  # a forms table: each row is a page
            whole &= frame[column].notna()
        if not whole.all():
            log.warning("%s: %d damaged row(s) of the %s table dropped; their files are read again", path, (~whole).sum(), name)
            frame = frame[whole].reset_index(drop=True)
        if name == "errors":  # rows written before 2026-12-07 began their reason with the row's file name
            frame["reason"] = [
                reason_without_file(f, r) if isinstance(r, str) else r for f, r in zip(frame["file"], frame["reason"])
            ]
        frame.attrs[CUT_SHORT_AT] = cut_at
        tables[name] = frame
    return tables


# frame.attrs key: for a table cut inside a row, the file of the last whole row before the cut (tables are
# written sorted by file, so every file from that one on may have lost rows); None if the table is whole.
CUT_SHORT_AT = "cut_short_at"


# Whole-number columns every row of a table has.
REQUIRED_INTEGERS = {
    "digits": [c for c in DIGIT_COLUMNS if c in INTEGER_COLUMNS],
    "fields": [c for c in FIELD_COLUMNS if c in INTEGER_COLUMNS],
    "errors": [],  # page is empty when the whole file failed
    "pages": [c for c in PAGE_COLUMNS if c in INTEGER_COLUMNS],
}


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


_RAW_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _read_sheets(path: Path, name: str, dtype: dict[str, str]) -> pd.DataFrame | None:
    """Table ``name`` of a workbook: its sheet and any continuation sheets ("name (2)", ...), in order;
    None if the workbook has no such sheet."""
    continuation = re.compile(rf"{re.escape(name)} \((\d+)\)")
    with pd.ExcelFile(path, engine="openpyxl") as workbook:
        if name not in workbook.sheet_names:
            return None
        numbered = {int(m[1]): s for s in workbook.sheet_names if (m := continuation.fullmatch(s))}
        sheets = [name] + [numbered[n] for n in sorted(numbered)]
        frames = [
            pd.read_excel(workbook, sheet_name=s, dtype=dtype, keep_default_na=False, na_values=[""]) for s in sheets
        ]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# Cells starting with these are formulas (or DDE payloads) to Excel, LibreOffice and Sheets:
# OWASP "CSV Injection".
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    """One cell as :func:`neutralise_formulas` writes it: a string a spreadsheet would run as a
    formula gets a leading apostrophe; anything else is returned as it is."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS) else value


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` safe to open in a spreadsheet (OWASP CSV injection defence).

    Every string cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a
    leading apostrophe, so Excel, LibreOffice and Sheets show it as text instead of evaluating
    it (and openpyxl writes it as a string, not a formula). Only ``str`` values are changed:
    numeric, boolean and date columns, and numbers inside mixed object columns (``-1`` as an
    int), are left alone; the string ``"-1"`` is neutralised. String column labels and index
    labels are treated the same way, as they become header cells.

    Args:
        df: the table to export.

    Returns:
        A new DataFrame; ``df`` is not modified.
    """
    out = df.copy()
    for i in range(out.shape[1]):
        col = out.iloc[:, i]
        dtype = col.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cats = dtype.categories
            if cats.dtype == object or pd.api.types.is_string_dtype(cats.dtype):
                try:
                    out.isetitem(i, col.cat.rename_categories([neutralise_cell(c) for c in cats]))
                except ValueError:  # a fixed name collides with an existing category
                    out.isetitem(i, col.astype(object).map(neutralise_cell, na_action="ignore"))
            continue
        if not (dtype == object or pd.api.types.is_string_dtype(dtype)):
            continue
        out.isetitem(i, col.map(neutralise_cell, na_action="ignore").astype(dtype))
    out.columns = _fix_index(out.columns, neutralise_cell)
    out.index = _fix_index(out.index, neutralise_cell)
    return out


def _fix_index(index: pd.Index, fix: Callable[[object], object]) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        return index.set_levels([_fix_index(level, fix) for level in index.levels], verify_integrity=False)
    if index.dtype == object or pd.api.types.is_string_dtype(index.dtype):
        return index.map(fix)
    return index
