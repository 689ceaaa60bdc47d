"""Learn from fields labelled with their digit string only: force-align the label to the segmenter's cuts.

Most real training data (and every correction a user makes) says what a field reads, not where each
digit is. The segmenter already proposes every plausible way to cut a field
(:func:`hwr_batch.segment.segment_field_candidates`); :func:`align_label` picks the path through those
candidates that reads exactly the label, maximising the model's log-probabilities. Each piece may also be
"not a digit" (a separator, a stray mark, printed text), so the path can step over marks the label does
not mention. The aligned pieces become labelled digits; the candidates the path refuses (merges of two
digits, fragments of one, marks read as "not a digit") become examples of the model's reject class.

Iterate: align with the current model, train, align again with the better model::

    fields = [segment_labelled(gray, digits) for gray, digits in labelled]
    examples, report = examples_from_fields(fields, classifier, source="my fields")  # digits + rejects
    # train on images (hwr_batch.train), then align again with the new classifier
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import box_iou
from .normalise import IMAGE_SIZE, to_mnist
from .segment import FieldCandidates, segment_field_candidates

REJECT = -1  # the class given to a path piece that is "not a digit"
# Before the model has a reject class, a piece that the path calls "not a digit" costs this log-probability:
# about what a digit the model reads poorly costs, so a separator is stepped over but a digit is not.
UNTRAINED_REJECT_LOG_PROB = float(np.log(0.02))
NEAR_DUPLICATE_IOU = 0.8  # a refused candidate this similar to an aligned digit is not a wrong cut


@dataclass(frozen=True)
class SegmentedField:
    """A labelled field cut into its candidate digits.

    Attributes:
        digits: the label, the field's true digit string.
        candidates: the field's candidate digits (their ink dropped: boxes and cut structure only).
        images: (len(candidates.pieces), 28, 28) uint8, each candidate normalised to the MNIST format.
        key: where the field came from (a path, or file/page/field), for records and folds.
    """

    digits: str
    candidates: FieldCandidates
    images: np.ndarray
    key: str


@dataclass(frozen=True)
class Alignment:
    """The path through a field's candidates that reads its label.

    Attributes:
        pieces: candidate indices on the path, left to right.
        classes: per path piece, the digit class it is aligned to, or REJECT.
        log_probs: per aligned digit (REJECT pieces left out), the model's log-probability of its label.
    """

    pieces: tuple[int, ...]
    classes: tuple[int, ...]
    log_probs: tuple[float, ...]

    @property
    def digit_pieces(self) -> list[int]:
        """The candidate indices aligned to digits, left to right."""
        return [p for p, c in zip(self.pieces, self.classes) if c != REJECT]


def segment_labelled(gray: np.ndarray, digits: str, key: str = "") -> SegmentedField:
    """Segment one labelled field as ``process`` does and normalise its candidates."""
    cands = segment_field_candidates(gray)
    images = np.zeros((len(cands.pieces), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, piece in enumerate(cands.pieces):
        images[i] = np.round(to_mnist(piece.ink) * 255).astype(np.uint8)
    return SegmentedField(digits, cands.without_ink(), images, key)


def align_label(
    cands: FieldCandidates, log_probs: np.ndarray, label: str, *, reject_log_probs: np.ndarray
) -> Alignment | None:
    """The best path through a field's candidates that reads exactly ``label``.

    Every unit of the field is crossed from its left edge to its right edge along candidate spans; each
    span on the path is either the next digit of the label (scoring the model's log-probability of that
    digit) or "not a digit" (scoring ``reject_log_probs``). Dynamic programming over (cut, digits read).

    Args:
        cands: from :func:`hwr_batch.segment.segment_field_candidates`.
        log_probs: (len(cands.pieces), >= 10) log-probabilities; columns 0-9 are the digits.
        label: the field's digits, e.g. ``"2250"``.
        reject_log_probs: (len(cands.pieces),) log-probability of each piece being "not a digit".

    Returns:
        The alignment, or None when no path reads the label (too few or too many candidates).
    """
    if not label.isdigit() or not cands.units:
        return None
    target = [int(ch) for ch in label]
    length = len(target)
    # At each unit boundary b: boundary[b][k] = best score having read k label digits, trails[b][k] its path.
    boundary = [np.full(length + 1, -np.inf)]
    boundary[0][0] = 0.0
    trails: list[list[list[tuple[int, int]]]] = [[[] for _ in range(length + 1)]]
    joins_ending = cands.joins_ending()

    def step(value: np.ndarray, k: int, index: int, into: np.ndarray, moves: dict, key: int, origin) -> None:
        """Relax the two ways to read piece ``index`` after ``k`` digits: not a digit, or digit k."""
        if value[k] + reject_log_probs[index] > into[k]:
            into[k] = value[k] + reject_log_probs[index]
            moves[(key, k)] = (origin, k, index, REJECT)
        if k < length and value[k] + log_probs[index, target[k]] > into[k + 1]:
            into[k + 1] = value[k] + log_probs[index, target[k]]
            moves[(key, k + 1)] = (origin, k, index, target[k])

    for u, unit in enumerate(cands.units):
        score = np.full((unit.n_cuts, length + 1), -np.inf)
        moves: dict = {}
        score[0] = boundary[u]
        for start, end, index in sorted(unit.spans):
            for k in np.flatnonzero(np.isfinite(score[start])):
                step(score[start], int(k), index, score[end], moves, end, start)
        last = unit.n_cuts - 1
        here = score[last].copy()
        trail: list[list[tuple[int, int]]] = [[] for _ in range(length + 1)]
        for k in np.flatnonzero(np.isfinite(here)):
            steps: list[tuple[int, int]] = []
            node, kk = last, int(k)
            while node > 0:
                start, kk, index, cls = moves[(node, kk)]
                steps.append((index, cls))
                node = start
            trail[int(k)] = trails[u][kk] + steps[::-1]
        # A joined candidate crosses this unit and the one before it in one step.
        for first, index in joins_ending.get(u + 1, []):
            join_moves: dict = {}
            joined = np.full(length + 1, -np.inf)
            for k in np.flatnonzero(np.isfinite(boundary[first])):
                step(boundary[first], int(k), index, joined, join_moves, 0, first)
            for k in np.flatnonzero(joined > here):
                _, kk, index_, cls = join_moves[(0, int(k))]
                here[k] = joined[k]
                trail[int(k)] = trails[first][kk] + [(index_, cls)]
        boundary.append(here)
        trails.append(trail)
    if not np.isfinite(boundary[-1][length]):
        return None
    path = trails[-1][length]
    digit_lp = tuple(float(log_probs[i, c]) for i, c in path if c != REJECT)
    return Alignment(tuple(i for i, _ in path), tuple(c for _, c in path), digit_lp)


def refused_pieces(cands: FieldCandidates, alignment: Alignment) -> list[int]:
    """Candidates the alignment shows to be wrong cuts: "not a digit" examples.

    The path's "not a digit" pieces, and every candidate off the path that is not a near-duplicate of an
    aligned digit (merges of two digits, fragments of one, a digit with a sliver of its neighbour).
    """
    on_path = set(alignment.pieces)
    digits = [cands.pieces[i].bbox for i in alignment.digit_pieces]
    refused = [p for p, c in zip(alignment.pieces, alignment.classes) if c == REJECT]
    for i, piece in enumerate(cands.pieces):
        if i in on_path:
            continue
        if all(box_iou(piece.bbox, box) < NEAR_DUPLICATE_IOU for box in digits):
            refused.append(i)
    return refused


@dataclass(frozen=True)
class AlignmentReport:
    """How a set of labelled fields aligned: counts for the training record."""

    fields: int
    aligned: int
    dropped_low_probability: int
    digits: int
    rejects: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def aligned_examples(
    fields: list[SegmentedField],
    log_probs: np.ndarray,
    reject_log_probs: np.ndarray,
    *,
    reject_class: int = 10,
    min_digit_prob: float = 0.002,
    rejects_per_digit: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, AlignmentReport]:
    """Training examples from labelled fields: their aligned digits and their refused candidates.

    Args:
        fields: segmented labelled fields.
        log_probs: (total candidates, >= 10) log-probabilities of every candidate of every field, fields
            in order, each field's candidates in order.
        reject_log_probs: (total candidates,) log-probability of "not a digit" per candidate.
        reject_class: the class index given to refused candidates.
        min_digit_prob: a field whose alignment gives any digit less than this probability is dropped
            (its label is probably wrong, or its segmentation lost a digit).
        rejects_per_digit: at most this many refused candidates per aligned digit, drawn at random.

    Returns:
        (N, 28, 28) uint8 images, (N,) int64 labels (digits, and ``reject_class``), and the counts.
    """
    rng = np.random.default_rng(seed)
    digit_images, digit_labels, reject_images = [], [], []
    start = aligned = dropped = 0
    floor = np.log(min_digit_prob)
    for f in fields:
        end = start + len(f.images)
        alignment = align_label(
            f.candidates, log_probs[start:end], f.digits, reject_log_probs=reject_log_probs[start:end]
        )
        start = end
        if alignment is None:
            continue
        if alignment.log_probs and min(alignment.log_probs) < floor:
            dropped += 1
            continue
        aligned += 1
        for index, cls in zip(alignment.pieces, alignment.classes):
            if cls != REJECT:
                digit_images.append(f.images[index])
                digit_labels.append(cls)
        reject_images.extend(f.images[i] for i in refused_pieces(f.candidates, alignment))
    keep = min(len(reject_images), int(rejects_per_digit * len(digit_images)))
    picked = [reject_images[i] for i in sorted(rng.choice(len(reject_images), keep, replace=False))] if keep else []
    images = np.array(digit_images + picked, np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.array(digit_labels + [reject_class] * len(picked), np.int64)
    report = AlignmentReport(len(fields), aligned, dropped, len(digit_labels), len(picked))
    return images, labels, report


def examples_from_fields(
    fields: list[SegmentedField], classifier, *, source: str, repeat: int = 1, seed: int = 0
):
    """Align labelled fields with a model's readings and return them as training images.

    Args:
        fields: segmented labelled fields.
        classifier: a :class:`hwr_batch.classify.Classifier`; without a reject class, "not a digit"
            costs UNTRAINED_REJECT_LOG_PROB per piece.
        source: a name for the images' ``source``.
        repeat: how many times each example appears (to weigh a small set up).

    Returns:
        (:class:`hwr_batch.mnist.LabelledImages`, :class:`AlignmentReport`).
    """
    from .classify import predict_scores
    from .labelled import stack_images
    from .mnist import LabelledImages

    images, _ = stack_images(fields)
    probabilities, rejects = predict_scores(classifier, images)
    log_probs = np.log(np.maximum(probabilities, 1e-9))
    if classifier.rejects:
        reject_log_probs = np.log(np.maximum(rejects, 1e-9))
    else:
        reject_log_probs = np.full(len(images), UNTRAINED_REJECT_LOG_PROB)
    x, y, report = aligned_examples(fields, log_probs, reject_log_probs, seed=seed)
    if repeat > 1:
        x, y = np.tile(x, (repeat, 1, 1)), np.tile(y, repeat)
    return LabelledImages(x, y, source), report


def read_segmented(fields: list[SegmentedField], classifier) -> list[str]:
    """What ``process`` reads in each segmented field (one batched model call for all of them)."""
    return [string for string, _ in judge_segmented(fields, classifier)]


def judge_segmented(fields: list[SegmentedField], classifier) -> list[tuple[str, np.ndarray]]:
    """What ``process`` reads in each segmented field, and the evidence its confidence is computed from
    (:func:`hwr_batch.confidence.field_evidence`); one batched model call for all of them."""
    from .classify import predict_scores
    from .confidence import field_evidence
    from .labelled import stack_images
    from .segment import read_field

    images, starts = stack_images(fields)
    probabilities, rejects = predict_scores(classifier, images)
    out = []
    for i, f in enumerate(fields):
        p, r = probabilities[starts[i] : starts[i + 1]], rejects[starts[i] : starts[i + 1]]
        r = r if classifier.rejects else None
        reading = read_field(f.candidates, p, r)
        string = "".join(classifier.labels[int(np.argmax(p[k]))] for k in reading.digits)
        out.append((string, field_evidence(f.candidates, p, r, reading)))
    return out
