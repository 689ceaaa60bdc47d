"""Turning classified readings into table rows: a digit row per digit read, a field row per field
(its digit string and why it is flagged), a page row per page, an error row per file not read."""

from __future__ import annotations

import time

import numpy as np

from .classify import Classifier, predict_scores, top_two
from .normalise import IMAGE_SIZE
from .read import FieldReading, FileReading
from .segment import read_field


def classify_readings(
    readings: list[FileReading], classifier: Classifier, *, min_confidence: float
) -> tuple[list[dict], list[dict], float]:
    """Classify the candidates of many files in one call, pick each field's reading, build table rows.

    Returns:
        (digit rows, field rows, seconds spent in the model).
    """
    stacks = [r.images for r in readings if len(r.images)]
    started = time.perf_counter()
    images = np.concatenate(stacks) if stacks else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    probabilities, reject_probabilities = predict_scores(classifier, images)
    seconds = time.perf_counter() - started
    labels = classifier.labels
    digit_rows: list[dict] = []
    field_rows: list[dict] = []
    offset = 0
    for reading in readings:
        file = str(reading.path)  # the exact name; to_frame escapes it (see store.file_text)
        for page in reading.pages:
            for number, found in enumerate(page.fields, start=1):
                pieces = found.candidates.pieces
                span = slice(offset + found.first, offset + found.first + len(pieces))
                field_probabilities = probabilities[span]
                choice = read_field(
                    found.candidates, field_probabilities, reject_probabilities[span] if classifier.rejects else None
                )
                chosen = choice.digits
                top = top_two(field_probabilities[chosen]) if chosen else None
                digits = []
                for position, piece_index in enumerate(chosen):
                    px, py, pw, ph = pieces[piece_index].bbox
                    confidence = float(top.confidence[position])
                    digits.append(labels[top.label[position]])
                    digit_rows.append(
                        {
                            "file": file, "page": page.index + 1, "field": number, "position": position + 1,
                            "x": found.origin[0] + px, "y": found.origin[1] + py, "width": pw, "height": ph,
                            "digit": labels[top.label[position]], "confidence": round(confidence, 4),
                            "second_choice": labels[top.second[position]],
                            "second_confidence": round(float(top.second_confidence[position]), 4),
                            "flagged": confidence < min_confidence,
                        }
                    )
                reasons = field_flags(found, chosen, top, min_confidence=min_confidence)
                x, y, w, h = found.bbox
                field_rows.append(
                    {
                        "file": file, "page": page.index + 1, "field": number, "x": x, "y": y, "width": w, "height": h,
                        "digits": "".join(digits), "digit_count": len(digits),
                        "min_confidence": round(float(top.confidence.min()), 4) if top is not None else None,
                        "flagged": bool(reasons), "flag_reason": "; ".join(reasons),
                    }
                )
        offset += len(reading.images)
    return digit_rows, field_rows, seconds


def page_rows(readings: list[FileReading], field_rows: list[dict]) -> list[dict]:
    """One row per page of ``readings``: fields, digits and flagged fields on it, its status and dpi.

    Status: ``read``, ``no digits`` (fields, but nothing in them), ``no fields``, ``blank`` or ``all black``.
    """
    per_page: dict[tuple[str, int], list[dict]] = {}
    for row in field_rows:
        per_page.setdefault((row["file"], row["page"]), []).append(row)
    rows = []
    for reading in readings:
        file = str(reading.path)  # the exact name, as the other tables' rows (to_frame escapes it)
        for page in reading.pages:
            fields = per_page.get((file, page.index + 1), [])
            digits = sum(row["digit_count"] for row in fields)
            if page.blank:
                status = page.blank
            elif not fields:
                status = "no fields"
            else:
                status = "read" if digits else "no digits"
            rows.append({
                "file": file, "page": page.index + 1, "fields": len(fields), "digit_count": digits,
                "flagged_fields": sum(bool(row["flagged"]) for row in fields), "status": status,
                "dpi": round(page.dpi, 1),
            })
    return rows


def field_flags(found: FieldReading, chosen: list[int], top, *, min_confidence: float) -> list[str]:
    """Why a field needs a person's eye (empty list: it does not)."""
    reasons = []
    if not chosen:
        reasons.append("no digits found")
        return reasons
    low = int((top.confidence < min_confidence).sum())
    if low:
        reasons.append(f"{low} digit(s) below confidence {min_confidence:g}")
    height = found.candidates.digit_height
    widths = [found.candidates.pieces[i].bbox[2] for i in chosen]
    if height and max(widths) > 1.2 * height:
        reasons.append("a digit is wider than it is tall (touching digits?)")
    return reasons


def error_rows(readings: list[FileReading]) -> list[dict]:
    """One row per file of ``readings`` that could not be read: its page (if one), the stage and the reason."""
    return [
        {"file": str(r.path), "page": r.error_page, "stage": r.error[0], "reason": r.error[1]}
        for r in readings if r.error
    ]
