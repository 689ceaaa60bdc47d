"""Turning classified readings into table rows: a digit row per digit read, a field row per field
(its digit string, its confidence and why it is flagged), a page row per page, an error row per file not read."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .classify import Classifier, Predictions, predict_scores, top_two
from .confidence import (
    accept_threshold,
    field_confidence,
    field_evidence,
    hard_flags,
    review_reasons,
)
from .export import error_row
from .normalise import IMAGE_SIZE
from .read import FieldReading, FileReading
from .segment import Reading, read_field


@dataclass(frozen=True)
class FieldResult:
    """One field of a file, classified and judged.

    Attributes:
        page: 1-based page number; field: 1-based field number on the page (as in ``fields.csv``).
        found: the field as it was segmented.
        reading: the cuts chosen; ``top`` the top two labels of its digits (None: no digit).
        evidence: the features of :data:`~hwr_batch.confidence.FEATURES`.
        confidence: P(the field's digit string is right).
        reasons: why it is flagged (empty: accepted), as :func:`~hwr_batch.confidence.review_reasons`.
    """

    reading_file: FileReading
    page: int
    field: int
    found: FieldReading
    reading: Reading
    top: Predictions | None
    evidence: np.ndarray
    confidence: float
    reasons: list[str]


def judge_readings(
    readings: list[FileReading],
    classifier: Classifier,
    *,
    threshold: float | None = None,
) -> tuple[list[FieldResult], float]:
    """Classify the candidates of many files in one call, pick each field's reading and judge it
    (its confidence from the classifier's calibration record; a field under ``threshold`` is flagged;
    None: the record's threshold at the default target error, see :func:`~hwr_batch.confidence.accept_threshold`).

    Returns:
        (one result per field, in file, page and field order; seconds spent in the model).
    """
    if threshold is None:
        threshold = accept_threshold(classifier.calibration)
    started = time.perf_counter()
    probabilities, reject_probabilities = score_readings(readings, classifier)
    seconds = time.perf_counter() - started
    results: list[FieldResult] = []
    offset = 0
    for reading in readings:
        for page in reading.pages:
            for number, found in enumerate(page.fields, start=1):
                span = slice(offset + found.first, offset + found.first + len(found.candidates.pieces))
                probs = probabilities[span]
                rejects = reject_probabilities[span] if classifier.rejects else None
                choice = read_field(found.candidates, probs, rejects)
                evidence = field_evidence(found.candidates, probs, rejects, choice)
                confidence = field_confidence(classifier.calibration, evidence)
                hard = hard_flags(found.candidates, probs, rejects, choice, found.cells)
                results.append(FieldResult(
                    reading, page.index + 1, number, found, choice,
                    top_two(probs[choice.digits]) if choice.digits else None,
                    evidence, confidence, review_reasons(confidence, threshold, hard),
                ))
        offset += reading.candidates
    return results, seconds


def classify_readings(
    readings: list[FileReading],
    classifier: Classifier,
    *,
    threshold: float | None = None,
) -> tuple[list[dict], list[dict], float]:
    """:func:`judge_readings`, as table rows.

    A digit is flagged when its own probability is under ``threshold``; a field when it is not accepted.

    Returns:
        (digit rows, field rows, seconds spent in the model).
    """
    if threshold is None:
        threshold = accept_threshold(classifier.calibration)
    results, seconds = judge_readings(readings, classifier, threshold=threshold)
    labels = classifier.labels
    digit_rows: list[dict] = []
    field_rows: list[dict] = []
    for result in results:
        file = str(result.reading_file.path)  # the exact name; to_frame escapes it (see store.file_text)
        found, top = result.found, result.top
        pieces = found.candidates.pieces
        digits = []
        for position, piece_index in enumerate(result.reading.digits):
            px, py, pw, ph = pieces[piece_index].bbox
            confidence = float(top.confidence[position])
            digits.append(labels[top.label[position]])
            digit_rows.append(
                {
                    "file": file, "page": result.page, "field": result.field, "position": position + 1,
                    "x": found.origin[0] + px, "y": found.origin[1] + py, "width": pw, "height": ph,
                    "digit": labels[top.label[position]], "confidence": round(confidence, 4),
                    "second_choice": labels[top.second[position]],
                    "second_confidence": round(float(top.second_confidence[position]), 4),
                    "flagged": confidence < threshold,
                }
            )
        x, y, w, h = found.bbox
        field_rows.append(
            {
                "file": file, "page": result.page, "field": result.field, "x": x, "y": y, "width": w, "height": h,
                "digits": "".join(digits), "digit_count": len(digits),
                "confidence": round(result.confidence, 4),
                "min_confidence": round(float(top.confidence.min()), 4) if top is not None else None,
                "flagged": bool(result.reasons), "flag_reason": "; ".join(result.reasons),
            }
        )
    return digit_rows, field_rows, seconds


def score_readings(readings: list[FileReading], classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """The label (N, labels) and "not a digit" (N,) probabilities of the candidates of ``readings``, in order:
    those a worker computed already (:attr:`FileReading.scores`, on a Dask worker with the same model), the
    others' in one model call."""
    unscored = [r.images for r in readings if r.scores is None and len(r.images)]
    images = np.concatenate(unscored) if unscored else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    probabilities, rejects = predict_scores(classifier, images)  # no model call for no images
    if all(r.scores is None for r in readings):
        return probabilities, rejects
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    at = 0
    for r in readings:
        if r.scores is None:
            parts.append((probabilities[at : at + len(r.images)], rejects[at : at + len(r.images)]))
            at += len(r.images)
        else:
            parts.append(r.scores)
    return np.concatenate([p for p, _ in parts]), np.concatenate([q for _, q in parts])


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


def error_rows(readings: list[FileReading]) -> list[dict]:
    """One row per file of ``readings`` that could not be read: its page (if one), the stage and the reason."""
    return [error_row(r.path, r.error_page, *r.error) for r in readings if r.error]
