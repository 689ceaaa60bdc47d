"""Forced alignment of digit-string labels to the segmenter's cuts, and reading with a reject class."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import digit_strip

from hwr_batch.align import REJECT, align_label, aligned_examples, refused_pieces, segment_labelled
from hwr_batch.segment import DigitCrop, FieldCandidates, Unit, read_field

NO_INK = np.zeros((0, 0), np.float32)


def _field(spans_per_unit: list[list[tuple[int, int]]], joins: tuple = ()) -> FieldCandidates:
    """Candidates with the given spans per unit; piece i gets a distinct box (x = 10 * i)."""
    pieces, units = [], []
    for spans in spans_per_unit:
        indexed = []
        for start, end in spans:
            indexed.append((start, end, len(pieces)))
            pieces.append(DigitCrop((10 * len(pieces), 0, 8 + 10 * (end - start - 1), 20), NO_INK))
        n_cuts = max(end for _, end in spans) + 1
        units.append(Unit(n_cuts, tuple(indexed), (indexed[-1][2],)))
    for _ in joins:
        pieces.append(DigitCrop((10 * len(pieces), 0, 14, 20), NO_INK))
    return FieldCandidates(tuple(pieces), tuple(units), 20.0, tuple(joins))


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, 1e-9))


def test_alignment_reads_exactly_the_label_even_where_the_model_prefers_another_cut():
    # One unit, cuts 0-1-2: two halves (pieces 0, 1) or the whole (piece 2).
    cands = _field([[(0, 1), (1, 2), (0, 2)]])
    probs = np.full((3, 10), 0.01)
    probs[0, 1], probs[1, 7], probs[2, 4] = 0.6, 0.6, 0.9  # the model reads the whole as a 4
    rejects = np.full(3, _log(np.array(0.02)))
    two = align_label(cands, _log(probs), "17", reject_log_probs=rejects)
    assert two is not None and two.pieces == (0, 1) and two.classes == (1, 7)
    one = align_label(cands, _log(probs), "4", reject_log_probs=rejects)
    assert one is not None and one.digit_pieces == [2]
    # The halves are fragments of the 4 and the whole is a merge of "17": both are refused cuts.
    assert sorted(refused_pieces(cands, one)) == [0, 1]
    assert refused_pieces(cands, two) == [2]
    # Three digits cannot come out of one unit with at most two pieces.
    assert align_label(cands, _log(probs), "117", reject_log_probs=rejects) is None


def test_alignment_steps_over_a_separator_the_label_does_not_mention():
    cands = _field([[(0, 1)], [(0, 1)], [(0, 1)]])  # "2", ",", "5"
    probs = np.full((3, 10), 0.05)
    probs[0, 2], probs[2, 5] = 0.9, 0.9
    probs[1, 1] = 0.5  # a comma looks a bit like a 1
    alignment = align_label(cands, _log(probs), "25", reject_log_probs=_log(np.array([0.01, 0.6, 0.01])))
    assert alignment is not None
    assert alignment.pieces == (0, 1, 2) and alignment.classes == (2, REJECT, 5)
    assert alignment.digit_pieces == [0, 2] and refused_pieces(cands, alignment) == [1]


def test_alignment_may_join_two_units_into_one_digit():
    # A 5 whose top stands apart: units 0 and 1, and a joined candidate (piece 2).
    cands = _field([[(0, 1)], [(0, 1)]], joins=((0, 1, 2),))
    probs = np.full((3, 10), 0.05)
    probs[0, 7], probs[1, 6], probs[2, 5] = 0.3, 0.5, 0.95
    rejects = _log(np.full(3, 0.02))
    alignment = align_label(cands, _log(probs), "5", reject_log_probs=rejects)
    assert alignment is not None and alignment.pieces == (2,) and alignment.classes == (5,)
    assert sorted(refused_pieces(cands, alignment)) == [0, 1]


def test_reading_with_a_reject_class_steps_over_what_is_not_a_digit():
    cands = _field([[(0, 1)], [(0, 1)], [(0, 1)]])
    comma = replace(cands.pieces[1], bbox=(12, 14, 4, 6))  # small and narrow: cheap to step over
    cands = replace(cands, pieces=(cands.pieces[0], comma, cands.pieces[2]))
    probs = np.full((3, 10), 0.004)
    probs[0, 2], probs[1, 1], probs[2, 5] = 0.95, 0.04, 0.95
    rejects = np.array([0.01, 0.95, 0.01])
    reading = read_field(cands, probs, rejects)
    assert reading.digits == [0, 2] and reading.rejected == [1]
    # Without a reject class every unit is a digit.
    assert read_field(cands, probs).digits == [0, 1, 2]
    # A digit-sized piece is not dropped on the same odds: its ink has to be explained.
    digit_sized = tuple(DigitCrop((20 * i, 0, 16, 20), NO_INK) for i in range(3))
    assert read_field(replace(cands, pieces=digit_sized), probs, rejects).digits == [0, 1, 2]


def test_reading_prefers_two_digits_to_one_rejected_merge():
    cands = _field([[(0, 1), (1, 2), (0, 2)]])
    probs = np.full((3, 10), 0.01)
    probs[0, 3], probs[1, 0] = 0.9, 0.9
    probs[2, 8] = 0.15
    rejects = np.array([0.02, 0.02, 0.8])  # the model knows the whole is two digits, not one
    assert read_field(cands, probs, rejects).digits == [0, 1]


def test_joined_candidates_are_read_only_by_a_model_with_a_reject_class():
    cands = _field([[(0, 1)], [(0, 1)]], joins=((0, 1, 2),))
    probs = np.full((3, 10), 0.01)
    probs[0, 1], probs[1, 1], probs[2, 5] = 0.4, 0.4, 0.95
    rejects = np.array([0.55, 0.55, 0.02])
    assert read_field(cands, probs, rejects).digits == [2]
    assert read_field(cands, probs).digits == [0, 1]


def test_aligned_examples_from_a_real_segmentation(mnist_test_small):
    """A generated two-digit field: segmented, aligned with a model sure of the right digits."""
    labels = mnist_test_small.labels
    first, second = int(np.flatnonzero(labels == 3)[0]), int(np.flatnonzero(labels == 8)[0])
    field = segment_labelled(digit_strip(mnist_test_small, [first, second]), "38", key="strip")
    n = len(field.images)
    assert n >= 2 and field.images.dtype == np.uint8 and field.images.shape[1:] == (28, 28)
    # A stand-in model that reads the two uncut units right and everything else poorly.
    log_probs = np.full((n, 10), np.log(0.05))
    whole = [i for unit in field.candidates.units for s, e, i in unit.spans if (s, e) == (0, unit.n_cuts - 1)]
    assert len(whole) == 2
    log_probs[whole[0], 3] = log_probs[whole[1], 8] = np.log(0.95)
    images, targets, report = aligned_examples(
        [field], log_probs, np.full(n, np.log(0.02)), rejects_per_digit=10.0
    )
    assert report.aligned == 1 and report.digits == 2
    assert targets[:2].tolist() == [3, 8] and set(targets[2:].tolist()) <= {10}
    np.testing.assert_array_equal(images[0], field.images[whole[0]])
    assert report.rejects == len(targets) - 2 == len(refused_pieces(field.candidates, align_label(
        field.candidates, log_probs, "38", reject_log_probs=np.full(n, np.log(0.02)))))
