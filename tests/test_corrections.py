"""Which field row a saved review belongs to: same content, same page, overlapping box (field number breaks ties)."""

from __future__ import annotations

from pathlib import Path

from hwr_batch.corrections import FieldKey, match_corrections
from hwr_batch.state import CorrectionRecord, path_key

SCAN = Path("/scans/a.png")
SHA = "s" * 64


def correction(field: int, box, digits: str, *, sha: str = SHA, page: int = 1) -> CorrectionRecord:
    return CorrectionRecord(SCAN, sha, page, field, box, "0", digits, "corrected", "2026-12-03T12:00:00+00:00")


def test_a_review_follows_its_box_when_the_field_numbers_shift():
    # Reviewed as fields 1 and 2; a later reading found one more field above them: now 2 and 3.
    saved = [correction(1, (100, 100, 300, 60), "11"), correction(2, (100, 300, 300, 60), "22")]
    fields = [FieldKey(str(SCAN), 1, 1, (100, 20, 300, 50)), FieldKey(str(SCAN), 1, 2, (102, 101, 298, 60)),
              FieldKey(str(SCAN), 1, 3, (100, 300, 300, 60)), FieldKey(str(SCAN), 2, 2, (100, 300, 300, 60))]
    matched = match_corrections(fields, saved, {path_key(SCAN): SHA})
    assert [m.digits if m else None for m in matched] == [None, "11", "22", None]  # page 2 has none


def test_a_review_of_other_content_or_of_a_file_without_a_hash_is_not_shown():
    saved = [correction(1, (100, 100, 300, 60), "11", sha="t" * 64)]
    fields = [FieldKey(str(SCAN), 1, 1, (100, 100, 300, 60))]
    assert match_corrections(fields, saved, {path_key(SCAN): SHA}) == [None]
    assert match_corrections(fields, saved, {}) == [None]


def test_equal_overlap_is_decided_by_the_field_number():
    saved = [correction(4, (0, 0, 100, 50), "44"), correction(5, (0, 0, 100, 50), "55")]
    fields = [FieldKey(str(SCAN), 1, 5, (0, 0, 100, 50))]
    assert match_corrections(fields, saved, {path_key(SCAN): SHA})[0].digits == "55"
