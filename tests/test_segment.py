"""Tests of the field reader's segmenter on small synthetic fields drawn with OpenCV, and on real scans."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SHIPPED_ONNX, digit_strip

from hwr_batch.segment import (
    DigitCrop,
    FieldCandidates,
    choose_reading,
    segment_field,
    segment_field_candidates,
)

PAPER, INK = 225, 40


def paper(h: int = 60, w: int = 160) -> np.ndarray:
    return np.full((h, w), PAPER, np.uint8)


def draw_one(img: np.ndarray, x: int, y: int, h: int = 34, thickness: int = 3) -> None:
    """A '1': a vertical stroke from (x, y) down h px, with a small flag."""
    cv2.line(img, (x, y), (x, y + h), INK, thickness)
    cv2.line(img, (x, y), (x - 7, y + 8), INK, thickness)


def draw_zero(img: np.ndarray, cx: int, cy: int, rx: int = 11, ry: int = 17, thickness: int = 3) -> None:
    cv2.ellipse(img, (cx, cy), (rx, ry), 0, 0, 360, INK, thickness)


def draw_seven(img: np.ndarray, x: int, y: int, h: int = 34, thickness: int = 3) -> None:
    cv2.line(img, (x, y), (x + 20, y), INK, thickness)
    cv2.line(img, (x + 20, y), (x + 6, y + h), INK, thickness)


def assert_valid(digits: list[DigitCrop], shape: tuple[int, int]) -> None:
    xs = [d.bbox[0] for d in digits]
    assert xs == sorted(xs), "digits must come left to right"
    for d in digits:
        x, y, w, h = d.bbox
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= shape[1] and y + h <= shape[0]
        assert d.ink.shape == (h, w) and d.ink.dtype == np.float32
        assert 0.0 <= float(d.ink.min()) and float(d.ink.max()) <= 1.0 and d.ink.max() > 0.5


@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_images_give_no_digits(value):
    assert segment_field(np.full((50, 120), value, np.uint8)) == []
    cands = segment_field_candidates(np.full((50, 120), value, np.uint8))
    assert cands.pieces == () and cands.units == () and choose_reading(cands, np.zeros((0, 10))) == []


def test_empty_and_tiny_images():
    assert segment_field(np.zeros((0, 0), np.uint8)) == []
    assert segment_field(np.full((3, 3), 200, np.uint8)) == []


def test_faint_noise_only_is_blank():
    rng = np.random.default_rng(0)
    img = np.clip(PAPER + rng.normal(0, 3, (60, 160)), 0, 255).astype(np.uint8)
    assert segment_field(img) == []


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        segment_field(np.zeros((2, 3, 4, 5), np.uint8))


def test_separate_digits_in_order():
    img = paper()
    draw_one(img, 30, 12)
    draw_zero(img, 70, 29)
    draw_seven(img, 100, 12)
    digits = segment_field(img)
    assert len(digits) == 3
    assert_valid(digits, img.shape)
    x, y, w, h = digits[1].bbox  # the zero: ellipse centre (70, 29), radii 11 x 17, 3 px pen
    assert abs(x - 58) <= 2 and abs(y - 11) <= 2 and abs(w - 25) <= 3 and abs(h - 37) <= 3


def test_mnist_digits_strip(mnist_test_small):
    img = digit_strip(mnist_test_small, [0, 1, 2, 3])
    digits = segment_field(img)
    assert len(digits) == 4
    assert_valid(digits, img.shape)


def test_ruling_line_is_removed_but_crossing_strokes_stay():
    img = paper(60, 200)
    draw_zero(img, 60, 28)
    draw_one(img, 110, 10, h=40)
    cv2.line(img, (0, 40), (199, 40), INK, 2)  # a guide line through the lower part of both digits
    digits = segment_field(img)
    assert len(digits) == 2
    assert_valid(digits, img.shape)
    zero, one = digits
    assert zero.bbox[2] <= 30, "the line must not stay attached to the zero"
    assert one.bbox[2] <= 14 and one.bbox[3] >= 38, "the one keeps its whole stroke across the line"


def test_underline_touching_the_digits_is_removed():
    img = paper(60, 200)
    draw_zero(img, 60, 26)
    draw_zero(img, 100, 26)
    cv2.line(img, (5, 44), (195, 44), INK, 2)  # touches the bottoms of both zeros
    digits = segment_field(img)
    assert len(digits) == 2
    assert all(d.bbox[3] <= 40 for d in digits)


def test_specks_comma_dash_and_equals_are_dropped():
    img = paper(60, 220)
    draw_seven(img, 20, 12)
    cv2.circle(img, (55, 44), 2, INK, -1)  # a dot on the baseline
    draw_zero(img, 80, 29)
    cv2.line(img, (100, 44), (96, 52), INK, 3)  # a comma
    draw_one(img, 130, 12)
    cv2.line(img, (150, 30), (170, 30), INK, 3)  # a dash
    cv2.line(img, (180, 24), (200, 24), INK, 2)  # '='
    cv2.line(img, (180, 32), (200, 32), INK, 2)
    for x, y in [(10, 5), (120, 55), (210, 8)]:
        img[y, x] = INK  # specks
    digits = segment_field(img)
    assert len(digits) == 3
    assert [d.bbox[0] for d in digits] == sorted(d.bbox[0] for d in digits)
    assert digits[0].bbox[0] < 30 and 60 < digits[1].bbox[0] < 75 and 115 < digits[2].bbox[0] < 135


def test_black_scanner_margin_is_ignored():
    img = paper(150, 140)
    img[:, :35] = 8  # black margin
    img[:, 35:40] = np.linspace(8, PAPER, 5).astype(np.uint8)  # its soft edge
    cv2.line(img, (110, 0), (110, 149), 120, 1)  # a ruling line
    draw_one(img, 70, 55)
    draw_zero(img, 90, 72, rx=9, ry=16, thickness=2)
    digits = segment_field(img)
    assert len(digits) == 2
    assert_valid(digits, img.shape)
    assert all(d.bbox[0] > 45 for d in digits)


def test_touching_digits_are_split():
    img = paper(60, 120)
    draw_zero(img, 40, 29, rx=13)
    draw_zero(img, 66, 29, rx=13)  # the two zeros overlap by a stroke
    assert cv2.connectedComponents((img < 128).astype(np.uint8))[0] - 1 == 1
    digits = segment_field(img)
    assert len(digits) == 2
    assert_valid(digits, img.shape)
    assert digits[0].bbox[0] + digits[0].bbox[2] <= digits[1].bbox[0] + 6
    # Each half keeps only its own strokes.
    assert all(18 <= d.bbox[2] <= 30 for d in digits)


def test_candidates_and_choose_reading():
    img = paper(60, 120)
    draw_zero(img, 40, 29)
    draw_zero(img, 62, 29)
    cands = segment_field_candidates(img)
    assert isinstance(cands, FieldCandidates) and len(cands.units) == 1
    unit = cands.units[0]
    whole = [i for s, e, i in unit.spans if s == 0 and e == unit.n_cuts - 1]
    assert len(whole) == 1 and len(cands.pieces) > 1
    # A model sure of two zeros and unsure of the whole blob: the reading is the split.
    probs = np.full((len(cands.pieces), 10), 0.01, np.float32)
    probs[:, 0] = 0.91
    probs[whole[0]] = 0.1
    reading = choose_reading(cands, probs)
    assert len(reading) == 2 and whole[0] not in reading
    # Sure of the whole blob and unsure of every part: one digit.
    probs = np.full((len(cands.pieces), 10), 0.1, np.float32)
    probs[whole[0], 8] = 0.99
    assert choose_reading(cands, probs) == whole


def test_broken_digit_stays_one():
    img = paper(60, 80)
    # A 5 whose hat is not connected to its body.
    cv2.line(img, (30, 12), (50, 12), INK, 3)
    cv2.line(img, (28, 16), (27, 28), INK, 3)
    cv2.ellipse(img, (36, 36), (11, 10), 0, 200, 500, INK, 3)
    digits = segment_field(img)
    assert len(digits) == 1
    assert digits[0].bbox[1] <= 12 and digits[0].bbox[3] >= 34


# ------------------------------------------------------------------------------------------- real scans


def _model_path() -> Path:
    path = Path(os.environ.get("HWR_BATCH_MODEL") or SHIPPED_ONNX)
    if not path.is_file():
        pytest.skip(f"no model at {path} (set HWR_BATCH_MODEL to an .onnx file)")
    return path


def _read_strings(folder: Path, rows: list[dict[str, str]], model: Path) -> list[str]:
    from hwr_batch.align import read_segmented, segment_labelled
    from hwr_batch.classify import load_classifier

    fields = [segment_labelled(cv2.imread(str(folder / r["image"]), cv2.IMREAD_GRAYSCALE), r["digits"]) for r in rows]
    return read_segmented(fields, load_classifier(model))


@pytest.mark.parametrize(
    ("name", "first_row", "minimum"),
    [
        # Fold B of the cheques only (rows 540 on): the shipped model trained on fold A.
        ("orand_car_a", 540, 0.55),
        ("danish_row_numbers", 0, 0.82),
    ],  # measured 0.65 and 0.90 with the shipped model (2026-12-02); the MNIST-only seed model: 0.42, 0.82
)
def test_real_scans_accuracy(real_data_dir, name, first_row, minimum):
    """String exact match over 60 unseen fields spread over the set stays above a floor a bit under what was measured."""
    model = _model_path()
    folder = real_data_dir / name
    if not (folder / "truth.csv").is_file():
        pytest.skip(f"{folder} has no truth.csv")
    with open(folder / "truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))[first_row:]
    rows = [r for r in rows if r.get("digits_only", "yes") == "yes"]
    rows = rows[:: max(1, len(rows) // 60)][:60]
    strings = _read_strings(folder, rows, model)
    accuracy = float(np.mean([s == r["digits"] for s, r in zip(strings, rows)]))
    assert accuracy >= minimum, f"{name}: {accuracy:.2f} exact match over {len(rows)} fields"


def test_a_line_of_small_printed_text_does_not_outweigh_the_handwritten_digit():
    # A register cell as scanned: one handwritten digit high up, the form's bold printed footer at the
    # bottom (letters half the digit's height, more ink in all than the digit). The digit is the field's
    # biggest mark, so its line is the one read (the footer used to be read as "20" or "222").
    img = paper(190, 120)
    draw_seven(img, 50, 42, h=20, thickness=2)
    cv2.putText(img, "Trykt for", (30, 170), cv2.FONT_HERSHEY_SIMPLEX, 0.4, INK, 2, cv2.LINE_AA)
    cands = segment_field_candidates(img)
    assert cands.pieces
    assert all(p.bbox[1] + p.bbox[3] < 100 for p in cands.pieces), [p.bbox for p in cands.pieces]


def test_a_digit_too_small_to_be_read_is_measured_as_left_out():
    # "107" with the 0 written at a quarter of the others' height: it is dropped as a speck would be, and
    # nothing the model sees says a digit is missing, so the candidates say how much ink was left out.
    img = paper()
    draw_one(img, 30, 12)
    draw_zero(img, 62, 42, rx=4, ry=4, thickness=2)
    draw_seven(img, 100, 12)
    cands = segment_field_candidates(img)
    assert len(cands.default_reading()) == 2
    assert cands.left_out > 0.2, cands.left_out
    clean = paper()
    draw_one(clean, 30, 12)
    draw_zero(clean, 70, 29)
    draw_seven(clean, 100, 12)
    assert segment_field_candidates(clean).left_out == 0.0


@pytest.mark.parametrize("second", ["zero", "one"])
def test_a_slim_one_beside_a_digit_it_nearly_touches_is_read_not_swallowed(shipped_model, second):
    # "10" and "11" with a small gap: the two units may be joined as one digit drawn in two strokes, and the
    # join reads as the other digit; a reading must not lose the 1 just because it then has fewer digits.
    from hwr_batch.classify import load_classifier, predict_scores
    from hwr_batch.normalise import to_mnist
    from hwr_batch.segment import read_field

    img = paper()
    draw_one(img, 50, 12)
    if second == "zero":
        draw_zero(img, 68, 29)
    else:
        draw_one(img, 65, 12)
    cands = segment_field_candidates(img)
    assert cands.joins, "the two units are close enough to be offered as one digit"
    classifier = load_classifier(shipped_model)
    probs, rejects = predict_scores(classifier, np.stack([to_mnist(p.ink) for p in cands.pieces]))
    text = "".join(classifier.labels[int(np.argmax(probs[i]))] for i in read_field(cands, probs, rejects).digits)
    assert text == ("10" if second == "zero" else "11")
