"""Corrections a person made in ``hwr-batch review``: which field row each belongs to, the tables' columns
``reviewed_digits`` and ``review_status``, and ``OUT/corrections.csv`` (what ``hwr-batch learn OUT`` reads).

A correction is stored in the state database (:func:`~hwr_batch.state.save_corrections`) with the SHA-256 of
its scan's content and the field's box. It belongs to a field row when the scan's content is still that, on
the same page, and the boxes overlap (IoU at least ``MIN_BOX_IOU``): the best overlap wins, the same field
number breaks ties. Field numbers alone would not do: another model or other settings may find one field
more or fewer on a page and shift the numbers after it. A correction of a file whose content changed stays
in the database (it applies again if the content changes back) but is shown nowhere: not in the tables and
not in corrections.csv, where ``learn`` would re-read a different field under its number.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from .atomic import atomic_write, parse_display_text
from .layout import box_iou
from .state import CorrectionRecord, path_key

STATUSES = ("accepted", "corrected", "not_a_field", "unreadable")
CORRECTION_COLUMNS = ("file", "page", "field", "digits", "status", "reviewed_at")
CORRECTIONS_CSV = "corrections.csv"
MIN_BOX_IOU = 0.5  # fields on a page do not overlap: half is far above any neighbour's overlap


@dataclass(frozen=True)
class FieldKey:
    """What identifies a row of the fields table: its file (as the table shows it), page, number and box."""

    file: str
    page: int
    field: int
    box: tuple[int, int, int, int]


@lru_cache(maxsize=4096)
def table_file_key(text: str) -> bytes:
    """The state database's key of the file a table cell names (cells show odd names escaped)."""
    return path_key(parse_display_text(text))


def match_corrections(
    fields: Sequence[FieldKey], corrections: Sequence[CorrectionRecord], content_sha: Mapping[bytes, str | None]
) -> list[CorrectionRecord | None]:
    """The correction that belongs to each field (None: none), given each file's current content hash
    (by :func:`~hwr_batch.state.path_key`; a file missing there has no correction shown)."""
    by_page: dict[tuple[bytes, int], list[CorrectionRecord]] = {}
    for c in corrections:
        key = path_key(c.path)
        if content_sha.get(key) == c.sha256:
            by_page.setdefault((key, c.page), []).append(c)
    matched: list[CorrectionRecord | None] = []
    for f in fields:
        candidates = by_page.get((table_file_key(f.file), f.page), ()) if by_page else ()
        scored = [(box_iou(c.box, f.box), c.field == f.field, c.reviewed_at, c) for c in candidates]
        best = max(scored, key=lambda s: s[:3], default=None)
        matched.append(best[3] if best is not None and best[0] >= MIN_BOX_IOU else None)
    return matched


def field_keys(fields: pd.DataFrame) -> list[FieldKey]:
    """The :class:`FieldKey` of each row of a fields table (rows without a box get an empty one)."""
    columns = [fields[c].tolist() for c in ("file", "page", "field", "x", "y", "width", "height")]
    return [
        FieldKey(str(file), int(page), int(field), tuple(0 if pd.isna(v) else int(v) for v in (x, y, w, h)))
        for file, page, field, x, y, w, h in zip(*columns, strict=True)
    ]


def with_reviews(
    fields: pd.DataFrame, corrections: Sequence[CorrectionRecord], content_sha: Mapping[bytes, str | None]
) -> pd.DataFrame:
    """A copy of the fields table with ``reviewed_digits`` and ``review_status`` set from ``corrections``
    (empty where none applies; recomputed whole, so a table read back never keeps an outdated review)."""
    out = fields.copy()
    digits = pd.Series(pd.NA, index=out.index, dtype="string")
    status = pd.Series(pd.NA, index=out.index, dtype="string")
    if corrections and len(out):
        matched = match_corrections(field_keys(out), corrections, content_sha)
        digits = pd.Series([c.digits if c else pd.NA for c in matched], index=out.index, dtype="string")
        status = pd.Series([c.status if c else pd.NA for c in matched], index=out.index, dtype="string")
    out["reviewed_digits"], out["review_status"] = digits, status
    return out


def write_corrections_csv(
    out_dir: Path, fields: Sequence[FieldKey], matched: Sequence[CorrectionRecord | None]
) -> Path:
    """Write OUT/corrections.csv atomically: one row per field with a correction, numbered as the table numbers
    it now (file, page, field, digits, status, reviewed_at)."""
    rows = sorted(
        (f.file, f.page, f.field, c.digits, c.status, c.reviewed_at)
        for f, c in zip(fields, matched, strict=True) if c is not None
    )

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(CORRECTION_COLUMNS)
        writer.writerows(rows)

    path = Path(out_dir) / CORRECTIONS_CSV
    atomic_write(path, write, newline="", encoding="utf-8")
    return path
