"""Cut one field image (a crop holding a handwritten digit string) into its digits.

Pipeline, all on the field's own pixels (nothing is tuned per image):

1. Black scanner margins (large dark areas reaching the border) are masked out, with a zone around them.
2. The paper background, textured or unevenly lit, is estimated with a grey-level closing and divided out.
3. Ink is binarised with hysteresis: strong ink is darker than half the local ink level, than a share of
   the field's Otsu level and than a few times the paper's typical darkness (textured cheques); weaker
   pixels connected to strong ink are kept, so faint pen strokes survive and paper texture does not.
4. Straight horizontal and vertical lines longer than digits (ruling, guide lines) are removed and the
   strokes that cross them re-joined.
5. Components are measured against the field's digit height: specks, dots, commas, dashes, '=' and
   underlines are dropped, and only the text line and the cluster of ink nearest the field's middle
   are kept (printed captions, neighbours' strokes and ruling rests are not).
6. The kept ink is deslanted (a shear per field); components whose horizontal extents overlap by more
   than half (a 5's hat, a broken 4) form one unit; wide units (touching digits) get candidate cuts
   where the column profile is low or the top or bottom contour has a valley.

:func:`segment_field` returns one reading chosen by shape alone (about 0.8 digit heights per digit).
:func:`segment_field_candidates` returns all candidate digits of a field (every plausible way to cut each
unit); classify the candidates of many fields in one batch, then :func:`choose_reading` picks, per field,
the cuts whose digits the model reads most confidently::

    cands = [segment_field_candidates(gray) for gray in fields]
    probs = predict_proba(classifier, np.stack([to_mnist(p.ink) for c in cands for p in c.pieces]))
    # split probs by len(c.pieces), then per field: digits = [c.pieces[i] for i in choose_reading(c, p)]

Each candidate's ink comes from the original (not deslanted) field, masked to its own strokes; its bbox
is in the field's pixel coordinates.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from .layout import Field, Layout


@dataclass(frozen=True)
class DigitCrop:
    """One digit cut from a field.

    Attributes:
        bbox: (x, y, w, h) in the field image's pixel coordinates.
        ink: (h, w) float32 in [0, 1], ink bright on black, only this digit's strokes.
    """

    bbox: tuple[int, int, int, int]
    ink: np.ndarray


@dataclass(frozen=True)
class Unit:
    """A group of strokes that holds one or more digits, with the ways it may be cut.

    Attributes:
        n_cuts: number of cut positions (0 = left edge, n_cuts - 1 = right edge).
        spans: (start_cut, end_cut, piece_index) for every candidate digit of this unit.
        default: piece indices of the reading chosen by shape alone.
    """

    n_cuts: int
    spans: tuple[tuple[int, int, int], ...]
    default: tuple[int, ...]


@dataclass(frozen=True)
class FieldCandidates:
    """All candidate digits of one field.

    Attributes:
        pieces: every candidate digit, in no particular order; classify them all.
        units: the field's units, left to right; a reading picks one path of spans per unit.
        digit_height: the field's estimated digit height in px (0 if there is no ink).
        joins: (first_unit, last_unit, piece_index): a candidate digit made of two neighbouring units
            (a digit drawn in two strokes, such as a 5 whose top stands apart); a reading may take it
            in place of both units' own paths.
        left_out: the biggest mark of the field left out of its candidates (too short for a digit, in
            another line or another cluster of ink), in ink relative to the median candidate mark's; 0 if
            none. A digit left out this way (a small one, one drawn apart) never reaches the model, so
            nothing else says that it is missing.
    """

    pieces: tuple[DigitCrop, ...]
    units: tuple[Unit, ...]
    digit_height: float
    joins: tuple[tuple[int, int, int], ...] = ()
    left_out: float = 0.0

    def default_reading(self) -> list[int]:
        """Piece indices of the shape-only reading, left to right."""
        return [i for unit in self.units for i in unit.default]

    def joins_ending(self) -> dict[int, list[tuple[int, int]]]:
        """The joins by the unit boundary they end at (last unit + 1): {boundary: [(first unit, piece)]}."""
        ending: dict[int, list[tuple[int, int]]] = {}
        for first, last, index in self.joins:
            ending.setdefault(last + 1, []).append((first, index))
        return ending

    def without_ink(self, scale: float = 1.0) -> FieldCandidates:
        """The same candidates with their ink dropped (small to keep or send between processes), and
        boxes and digit height measured on an image resized by ``scale`` given back in original pixels."""
        pieces = tuple(DigitCrop(_rescale(p.bbox, 1 / scale), _NO_INK) for p in self.pieces)
        return replace(self, pieces=pieces, digit_height=self.digit_height / scale)


@dataclass(frozen=True)
class Reading:
    """The cuts chosen for one field.

    Attributes:
        digits: piece indices read as digits, left to right.
        rejected: piece indices on the chosen path that the model calls "not a digit" (separators,
            stray marks, printed text): stepped over, never read.
    """

    digits: list[int]
    rejected: list[int]


# Scoring of candidate readings (see choose_reading).
PIECE_BONUS = -1.0  # log-probability added per digit, for a model without a reject class
# With a reject class every span of the path scores its own log-probability: a digit's plus DIGIT_BONUS, or
# "not a digit"'s minus REJECT_COST per digit height of the span's width, since ink has to be explained:
# stepping over a comma is cheap, dropping a digit-sized blob is dear. Chosen on the training folds of the
# real sets and on generated forms of MNIST training digits (never on the measuring sets): models/MODEL_CARD.md.
# REJECT_COST was 6 until cheques the model had not seen could be tuned on (fold A read by a twin model trained
# on fold B): there, small digits after a thousands separator ("30.000") were stepped over; 10-15 read them.
DIGIT_BONUS = -0.5
REJECT_COST = 12.0
JOIN_GAP = 0.25  # neighbouring units closer than this many digit heights may be one digit in two strokes
JOIN_WIDTH = 1.1  # ... if together they are at most this many digit heights wide
# ... and a joined candidate read as a digit pays this: with DIGIT_BONUS below zero a reading of fewer
# digits saves a bonus, so without it a slim 1 beside a digit it nearly touches was swallowed by the
# join, which still reads as the other digit ("70167" read "7067"). Chosen on the tuning sets (model card).
JOIN_PENALTY = 1.0
ASPECT_PENALTY = 3.0  # penalty per digit height of width beyond WIDE_LIMIT (and of height below 0.35)
WIDE_LIMIT = 0.9  # candidates wider than this many digit heights are probably two digits
SLIM_LIMIT = 0.3  # candidates narrower than this share of their height are slim ...
SLIM_PENALTY = 2.0  # ... and pay this unless the model reads them as '1'
# Straight runs longer than this many digit heights are printed lines (ruling, boxes, underlines), not
# strokes: horizontally 1.5 (a digit's longest flat stroke, a 7's bar or a 2's base, is under one
# height), vertically 3 (a slanted 1 with its flag can be 1.5); both chosen on the tuning halves of the
# real sets (scripts/score_real.py).
HLINE = 1.5
VLINE = 3.0


# The resolution fields are segmented at (see segmenting_scale).
SEGMENT_DPI = 200


def segmenting_scale(layout: Layout) -> float:
    """The factor by which a page's fields are resized before they are segmented.

    Fields on a page scanned finer than SEGMENT_DPI are segmented at SEGMENT_DPI: digits 5-8 mm tall
    are then 40-63 px, plenty for a 20x20 box, and segmenting a 300 dpi page costs 40% less
    (measured on 30 generated pages: same digit accuracy, field exact-match 82.7% -> 85.1%).
    Crops of a single field ("whole") keep their resolution: their dpi is unknown.
    """
    return SEGMENT_DPI / layout.dpi if layout.mode != "whole" and layout.dpi > SEGMENT_DPI * 1.15 else 1.0


def field_image(found: Field, scale: float) -> np.ndarray:
    """A field's image as it is segmented (resized by ``scale``)."""
    if scale == 1.0:
        return found.image
    return cv2.resize(found.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def segment_field(
    gray: np.ndarray, *, min_height: float = 0.45, line_gap: float = 2.5, max_span: int = 3
) -> list[DigitCrop]:
    """Cut a field into its digits, left to right, choosing cuts by shape alone (no model).

    Args:
        gray: (H, W) uint8 grayscale scan, dark ink on light paper.
        min_height, line_gap, max_span: as for :func:`segment_field_candidates`.

    Returns:
        The digits, left to right; [] for a blank or constant image.
    """
    cands = segment_field_candidates(gray, min_height=min_height, line_gap=line_gap, max_span=max_span)
    return [cands.pieces[i] for i in cands.default_reading()]


def segment_field_candidates(
    gray: np.ndarray,
    *,
    min_height: float = 0.45,
    line_gap: float = 2.5,
    max_span: int = 3,
) -> FieldCandidates:
    """All candidate digits of a field: every plausible way to cut each group of strokes.

    Args:
        gray: (H, W) uint8 grayscale scan, dark ink on light paper.
        min_height: components shorter than this fraction of the digit height are not digits
            (dots, commas, dashes, '=').
        line_gap: horizontal gaps wider than this many digit heights split the field into
            clusters; only the cluster with the most ink is read.
        max_span: most cut intervals one candidate digit may span.

    Returns:
        The candidates; classify ``pieces`` then call :func:`choose_reading`.
    """
    gray = _as_gray(gray)
    empty = FieldCandidates((), (), 0.0)
    if gray.size == 0 or int(gray.max()) - int(gray.min()) < 16:
        return empty
    darkness, mask, zone = _binarise(gray)
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    comps = [c for c in _components(mask) if not _touches(c, zone)]
    if not comps:
        return empty
    keep = np.zeros(n, bool)
    keep[[c.label for c in comps]] = True
    mask = keep[labels].astype(np.uint8)
    mask = _remove_lines(mask, _digit_height(comps, gray.shape))
    comps = _components(mask)
    if not comps:
        return empty
    height = _digit_height(comps, gray.shape)
    comps, left_out = _select_digit_components(comps, height, gray.shape, min_height=min_height, line_gap=line_gap)
    if not comps:
        return empty
    labels = cv2.connectedComponents(mask, connectivity=8)[1]
    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[[c.label for c in comps]] = True
    selected = keep[labels]
    # Cut in a deslanted frame: shift each row so that slanted handwriting stands upright.
    offsets = _deslant_offsets(selected)
    sheared = _shear(selected, offsets)
    comps = _components(sheared)
    labels = cv2.connectedComponents(sheared, connectivity=8)[1]
    pieces: list[DigitCrop] = []
    units: list[Unit] = []
    groups = _merge_overlapping(comps)
    for group in groups:
        units.append(_unit_candidates(group, labels, darkness, offsets, height, pieces, max_span=max_span))
    joins = _join_candidates(groups, labels, darkness, offsets, height, pieces)
    return FieldCandidates(tuple(pieces), tuple(units), float(height), tuple(joins), left_out)


def choose_reading(
    cands: FieldCandidates, probabilities: np.ndarray, reject_probabilities: np.ndarray | None = None
) -> list[int]:
    """Piece indices of the digits of :func:`read_field`'s reading, left to right."""
    return read_field(cands, probabilities, reject_probabilities).digits


def read_field(
    cands: FieldCandidates,
    probabilities: np.ndarray,
    reject_probabilities: np.ndarray | None = None,
    *,
    digit_bonus: float | None = None,
    reject_cost: float = REJECT_COST,
) -> Reading:
    """Pick the cuts of the field whose digits the model reads most confidently.

    Each unit is crossed from its left edge to its right edge along candidate spans; two neighbouring
    units may instead be crossed by one joined candidate. Without a reject class each span is a digit
    scoring log(top probability) + PIECE_BONUS. With one, each span is either a digit scoring
    log(top digit probability) + DIGIT_BONUS or "not a digit" scoring log(its reject probability) minus
    REJECT_COST per digit height of its width, so separators, stray marks and merges are stepped over
    but a digit-sized blob is not dropped lightly. Digits pay a penalty for an implausible width/height
    ratio. The best total wins (dynamic programming).

    Args:
        cands: from :func:`segment_field_candidates`.
        probabilities: (len(cands.pieces), labels) label probabilities of the pieces, in order.
        reject_probabilities: (len(cands.pieces),) "not a digit" probabilities, or None for a model
            without a reject class.
        digit_bonus: overrides DIGIT_BONUS (or PIECE_BONUS without a reject class).
        reject_cost: overrides REJECT_COST.

    Returns:
        The chosen digits and the pieces on the path read as "not a digit".
    """
    if len(cands.pieces) == 0:
        return Reading([], [])
    rejects = reject_probabilities is not None
    digit_score, _, reject_score = span_scores(
        cands, probabilities, reject_probabilities, digit_bonus=digit_bonus, reject_cost=reject_cost
    )
    if rejects:
        is_digit = digit_score >= reject_score
        score = np.where(is_digit, digit_score, reject_score)
    else:
        is_digit = np.ones(len(digit_score), bool)
        score = digit_score
    # Best path per unit, then the best way through the units, with or without joins.
    unit_paths = [_best_unit_path(unit, score) for unit in cands.units]
    n = len(cands.units)
    best = np.full(n + 1, -np.inf)
    best[0] = 0.0
    back: list[tuple[int, list[int]] | None] = [None] * (n + 1)
    joins_ending = cands.joins_ending() if rejects else {}  # joins need a model that can say "not a digit"
    for u in range(1, n + 1):
        value, path = unit_paths[u - 1]
        best[u], back[u] = best[u - 1] + value, (u - 1, path)
        for first, index in joins_ending.get(u, []):
            if best[first] + score[index] > best[u]:
                best[u], back[u] = best[first] + score[index], (first, [index])
    chosen: list[int] = []
    node = n
    while node > 0:
        previous, path = back[node]  # type: ignore[misc]
        chosen[:0] = path
        node = previous
    return Reading([i for i in chosen if is_digit[i]], [i for i in chosen if not is_digit[i]])


def span_scores(
    cands: FieldCandidates,
    probabilities: np.ndarray,
    reject_probabilities: np.ndarray | None = None,
    *,
    digit_bonus: float | None = None,
    reject_cost: float = REJECT_COST,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each candidate adds to a reading's score (see :func:`read_field`), three ways.

    Returns:
        (read as its top digit, read as its second digit, read as "not a digit"), each
        (len(cands.pieces),) float64; the last is -inf throughout for a model without a reject class.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if digit_bonus is None:
        digit_bonus = DIGIT_BONUS if reject_probabilities is not None else PIECE_BONUS
    order = np.argsort(-probs, axis=1)
    rows = np.arange(len(probs))
    height = max(cands.digit_height, 1.0)
    shape = np.array([-ASPECT_PENALTY * _aspect_misfit(piece.bbox, height) for piece in cands.pieces])
    slim = np.array([piece.bbox[2] < SLIM_LIMIT * piece.bbox[3] for piece in cands.pieces])
    joined = np.zeros(len(cands.pieces), bool)
    joined[[index for _, _, index in cands.joins]] = True
    shape = shape - JOIN_PENALTY * joined
    scores = []
    for rank in (0, 1):
        label = order[:, rank] if probs.shape[1] > rank else order[:, 0]
        score = np.log(np.maximum(probs[rows, label], 1e-9)) + digit_bonus + shape
        scores.append(score - SLIM_PENALTY * (slim & (label != 1)))
    if reject_probabilities is None:
        return scores[0], scores[1], np.full(len(probs), -np.inf)
    widths = np.array([piece.bbox[2] for piece in cands.pieces], np.float64) / height
    reject = np.log(np.maximum(np.asarray(reject_probabilities, np.float64), 1e-9)) - reject_cost * widths
    return scores[0], scores[1], reject


def reading_margin(
    cands: FieldCandidates, probabilities: np.ndarray, reject_probabilities: np.ndarray | None = None
) -> float:
    """How much better :func:`read_field`'s reading scores than the best reading of another digit string.

    Every path through the candidates, with each piece read as its top digit, its second digit or
    "not a digit", is a reading; the margin is the best one's score minus the best score of a path
    that spells a different string (log-probability units; ``inf`` if there is no other string).
    A small margin means the field could as well read otherwise: a cut, a join or a digit in doubt.
    """
    if len(cands.pieces) == 0:
        return float("inf")
    top, second, reject = span_scores(cands, probabilities, reject_probabilities)
    labels = np.argsort(-np.asarray(probabilities), axis=1)[:, :2]
    options = [
        [(float(top[i]), chr(48 + int(labels[i, 0]))), (float(second[i]), chr(48 + int(labels[i, -1])))]
        + ([(float(reject[i]), "")] if reject_probabilities is not None else [])
        for i in range(len(cands.pieces))
    ]
    boundary: list[list[tuple[float, str]]] = [[(0.0, "")]]
    joins_ending = cands.joins_ending() if reject_probabilities is not None else {}
    for u, unit in enumerate(cands.units, start=1):
        best: list[tuple[float, str]] = []
        for score, text in _two_best_unit_readings(unit, options):
            for before, prefix in boundary[u - 1]:
                _keep_two_best(best, before + score, prefix + text)
        for first, index in joins_ending.get(u, []):
            for score, text in options[index]:
                for before, prefix in boundary[first]:
                    _keep_two_best(best, before + score, prefix + text)
        boundary.append(best)
    final = boundary[-1]
    return final[0][0] - final[1][0] if len(final) > 1 else float("inf")


def _two_best_unit_readings(unit: Unit, options: list[list[tuple[float, str]]]) -> list[tuple[float, str]]:
    """The two best-scoring distinct strings across a unit (the shape-only path if none crosses it)."""
    nodes: list[list[tuple[float, str]]] = [[] for _ in range(unit.n_cuts)]
    nodes[0] = [(0.0, "")]
    for start, end, index in sorted(unit.spans):
        for before, prefix in nodes[start]:
            for score, text in options[index]:
                _keep_two_best(nodes[end], before + score, prefix + text)
    if nodes[-1]:
        return nodes[-1]
    default = [max(options[i]) for i in unit.default]
    return [(sum(score for score, _ in default), "".join(text for _, text in default))]


def _keep_two_best(best: list[tuple[float, str]], score: float, text: str) -> None:
    """Add (score, text) to ``best``, which keeps the two best scores of distinct texts, best first."""
    for k, (other, known) in enumerate(best):
        if known == text:
            if score > other:
                best[k] = (score, text)
                best.sort(reverse=True)
            return
    best.append((score, text))
    best.sort(reverse=True)
    del best[2:]


def _best_unit_path(unit: Unit, score: np.ndarray) -> tuple[float, list[int]]:
    """The highest-scoring path of spans across a unit, and its score (the shape-only path if none)."""
    best = np.full(unit.n_cuts, -np.inf)
    back: list[tuple[int, int] | None] = [None] * unit.n_cuts
    best[0] = 0.0
    for start, end, index in sorted(unit.spans):
        if best[start] == -np.inf:
            continue
        value = best[start] + score[index]
        if value > best[end]:
            best[end], back[end] = value, (start, index)
    chosen: list[int] = []
    node = unit.n_cuts - 1
    while node > 0 and back[node] is not None:
        start, index = back[node]  # type: ignore[misc]
        chosen.append(index)
        node = start
    if node != 0:
        return float(sum(score[i] for i in unit.default)), list(unit.default)
    return float(best[-1]), chosen[::-1]


# --------------------------------------------------------------------------------------------- internals

_NO_INK = np.zeros((0, 0), np.float32)


def _rescale(bbox: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    """A box (x, y, w, h) measured on an image resized by 1/factor, in the original image's pixels."""
    if factor == 1.0:
        return bbox
    x, y, w, h = bbox
    return (round(x * factor), round(y * factor), max(1, round(w * factor)), max(1, round(h * factor)))


_OTSU_FACTOR = 0.6  # strong ink is at least this fraction of the field's Otsu level ...
_PEAK_FACTOR = 0.4  # ... and of the local ink level (darkest ink nearby)
_WEAK_FACTOR = 0.6  # hysteresis: weak ink connected to strong ink, down to this fraction of the strong level
_NOISE_STRONG = 2.0  # textured paper: strong ink is at least this many times the paper's typical darkness
_NOISE_WEAK = 1.5  # ... and weak ink this many times
_HEIGHT_AREA = 0.5  # the digit height is measured on components at least this big relative to the biggest
# Ink within this fraction of the field's size (at least 7 px) from a black margin is not trusted. Register
# row numbers stand close to the paper's edge: at 0.12 the zone covered two thirds of such cells and hid
# their first digit (a Danish training-fold cell read 77.5% -> 84.9% exact at 0.03; chosen on that fold).
_ZONE = 0.03
_CUT_MIN_WIDTH = 0.75  # units narrower than this many digit heights are not cut
_CUT_MARGIN = 0.2  # no cut closer than this many digit heights to a unit's side
_CUT_SPACING = 0.3  # candidate cuts at least this many digit heights apart
_MAX_CUTS = 4  # most candidate cuts per unit
_SHEARS = np.round(np.arange(-0.6, 0.61, 0.1), 2)  # slants tried when deslanting (x shift per row)
_SHEAR_PRIOR = 0.1  # preference for small shears


@dataclass(frozen=True)
class _Comp:
    """A connected component of the binary ink."""

    label: int
    x: int
    y: int
    w: int
    h: int
    area: int


def _as_gray(gray: np.ndarray) -> np.ndarray:
    """The image as a 2-D uint8 array."""
    gray = np.asarray(gray)
    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
    if gray.ndim != 2:
        raise ValueError(f"gray must be a 2-D (H, W) array, got shape {gray.shape}")
    if gray.dtype != np.uint8:
        if np.issubdtype(gray.dtype, np.floating) and gray.size and gray.max() <= 1.0:
            gray = gray * 255.0
        gray = np.clip(gray, 0, 255).astype(np.uint8)
    return gray


def _binarise(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binarise a field.

    Returns:
        Background-corrected darkness (float32, 0 = paper, 1 = black), the binary ink mask (uint8 0/1),
        and the zone around black scanner margins (uint8 0/1) where ink is not trusted.
    """
    h, w = gray.shape
    paper = float(np.percentile(gray, 90))
    # Black scanner margins: large areas much darker than the paper, reaching the image border.
    k_margin = max(15, round(0.15 * min(h, w))) | 1
    dark = (gray < 0.45 * paper).astype(np.uint8)
    margin = cv2.morphologyEx(
        dark, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (k_margin, k_margin))
    )
    zone = np.zeros_like(margin)
    if margin.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(margin, connectivity=8)
        x, y, bw, bh = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
        at_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
        at_border[0] = False
        margin = at_border[labels].astype(np.uint8)
    if margin.any():
        margin = cv2.dilate(margin, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 7)))
        k_zone = max(7, round(_ZONE * min(h, w))) | 1
        zone = cv2.dilate(margin, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * k_zone + 1, 2 * k_zone + 1)))
    img = gray.astype(np.float32)
    img[margin > 0] = paper
    k_bg = max(15, min(h, w) // 4) | 1
    bg = cv2.morphologyEx(img, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (k_bg, k_bg)))
    bg = cv2.blur(bg, (k_bg, k_bg))
    darkness = np.clip(1.0 - img / np.maximum(bg, 1.0), 0.0, 1.0)
    darkness[margin > 0] = 0.0
    darkness = cv2.GaussianBlur(darkness, (0, 0), 0.7)
    d8 = np.round(darkness * 255).astype(np.uint8)
    otsu, _ = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    # Strong ink: darker than half the local ink level (pens differ in darkness within a field), and
    # than a global floor; weak ink (hysteresis) down to 60 % of that.
    k_peak = max(9, min(h, w) // 3) | 1
    peak = cv2.blur(
        cv2.dilate(darkness, cv2.getStructuringElement(cv2.MORPH_RECT, (k_peak, k_peak))), (k_peak, k_peak)
    )
    noise = float(np.percentile(darkness, 60))  # most of a field is paper: its typical darkness
    floor = max(_OTSU_FACTOR * otsu / 255.0, 0.15, _NOISE_STRONG * noise)
    strong_level = np.maximum(_PEAK_FACTOR * peak, floor)
    weak_level = np.maximum(_WEAK_FACTOR * strong_level, _NOISE_WEAK * noise)
    weak = (darkness > weak_level).astype(np.uint8)
    strong = darkness > strong_level
    n, labels = cv2.connectedComponents(weak, connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    mask = keep[labels].astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) | (strong & (mask > 0)).astype(
        np.uint8
    )
    return darkness, mask, zone


def _touches(c: _Comp, zone: np.ndarray) -> bool:
    """Whether a component's box reaches into a zone."""
    return bool(zone[c.y : c.y + c.h, c.x : c.x + c.w].any())


def _remove_lines(mask: np.ndarray, height: float) -> np.ndarray:
    """Remove long horizontal and vertical straight lines, re-joining strokes that cross them.

    A line is a straight run longer than digits are: HLINE digit heights horizontally, VLINE vertically.
    """
    out = mask
    for horizontal in (True, False):
        length = max(round((HLINE if horizontal else VLINE) * height), 25)
        kernel = np.ones((1, length) if horizontal else (length, 1), np.uint8)
        # Close small gaps and jitter across the line's direction first, so slightly slanted or broken
        # ruling lines still give long straight runs.
        across = np.ones((3, 1) if horizontal else (1, 3), np.uint8)
        along = np.ones((1, 5) if horizontal else (5, 1), np.uint8)
        joined = out if horizontal else cv2.morphologyEx(cv2.dilate(out, across), cv2.MORPH_CLOSE, along)
        lines = cv2.morphologyEx(joined, cv2.MORPH_OPEN, kernel)
        if not lines.any():
            continue
        lines = cv2.dilate(lines, np.ones((3, 1) if horizontal else (1, 3), np.uint8)) & out
        kept = out & (1 - lines)
        # Repair strokes that cross the line: close across it, but only inside the removed line.
        thickness = _line_thickness(lines, horizontal)
        bridge = np.ones((thickness + 3, 1) if horizontal else (1, thickness + 3), np.uint8)
        repaired = cv2.morphologyEx(kept, cv2.MORPH_CLOSE, bridge) & lines
        out = kept | repaired
    return out


def _line_thickness(lines: np.ndarray, horizontal: bool) -> int:
    """Typical thickness in px of the lines in a line mask."""
    runs = lines.sum(axis=0 if horizontal else 1)
    runs = runs[runs > 0]
    return int(np.median(runs)) if runs.size else 1


def _components(mask: np.ndarray) -> list[_Comp]:
    """Connected components (8-connectivity) of a binary mask."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [_Comp(i, *map(int, stats[i, :5])) for i in range(1, n)]


def _digit_height(comps: list[_Comp], shape: tuple[int, int]) -> float:
    """Estimate the height of the field's digits (px) from its sizable, not line-like components."""
    h = shape[0]
    if not comps:
        return 0.0
    sizable = [
        c for c in comps if c.area >= 12 and c.h >= 5 and c.w <= 6 * c.h and c.h <= 6 * c.w and c.h < 0.95 * h
    ]
    sizable = sizable or comps
    # The digits are the field's biggest marks: the median height of the components at least half as
    # big (in ink) as the biggest.
    biggest = max(c.area for c in sizable)
    return float(np.median([c.h for c in sizable if c.area >= _HEIGHT_AREA * biggest]))


def _select_digit_components(
    comps: list[_Comp], height: float, shape: tuple[int, int], *, min_height: float, line_gap: float
) -> tuple[list[_Comp], float]:
    """Drop non-digit marks and stray ink; keep the main text line's components.

    Returns:
        (the components kept, the biggest one left out, as ``FieldCandidates.left_out`` measures it).
    """
    big = [c for c in comps if c.h >= min_height * height and c.area >= max(6, 0.02 * height * height)]
    # Dashes, underlines and their rests: long and flat.
    big = [c for c in big if not (c.w >= 2.5 * c.h and c.h < 0.5 * height)]
    if not big:
        return [], 0.0
    # Fields are cut around their content: ink near the middle counts more (printed captions, neighbours'
    # strokes and ruling rests sit near the edges).
    weights = np.array([c.area * _centrality(c, shape) * min(1.0, c.h / height) ** 2 for c in big], float)
    # The text line: the band around the weighted median vertical centre.
    centres = np.array([c.y + c.h / 2 for c in big])
    order = np.argsort(centres)
    mid = centres[order][np.searchsorted(np.cumsum(weights[order]), 0.5 * weights.sum())]
    band = [(c, wt) for c, wt in zip(big, weights) if abs(c.y + c.h / 2 - mid) <= 0.6 * height]
    if not band:
        return [], 0.0
    # Horizontal clusters separated by wide gaps; keep the one with the most (weighted) ink.
    band.sort(key=lambda cw: cw[0].x)
    clusters: list[list[tuple[_Comp, float]]] = [[band[0]]]
    right = band[0][0].x + band[0][0].w
    for c, wt in band[1:]:
        if c.x - right > line_gap * height:
            clusters.append([])
        clusters[-1].append((c, wt))
        right = max(right, c.x + c.w)
    best = [c for c, _ in max(clusters, key=lambda cl: sum(wt for _, wt in cl))]
    return best, _left_out(comps, best)


def _left_out(comps: list[_Comp], kept: list[_Comp]) -> float:
    """The ink of the biggest of ``comps`` not ``kept``, over the median ink of the kept ones."""
    chosen = {c.label for c in kept}
    out = [c.area for c in comps if c.label not in chosen]
    return float(max(out) / max(np.median([c.area for c in kept]), 1.0)) if out else 0.0


def _centrality(c: _Comp, shape: tuple[int, int]) -> float:
    """1 for a component centred in the field, down to 0.25 at a corner."""
    h, w = shape
    dy = min(1.0, abs(c.y + c.h / 2 - h / 2) / (h / 2))
    dx = min(1.0, abs(c.x + c.w / 2 - w / 2) / (w / 2))
    return (1 - 0.5 * dy) * (1 - 0.5 * dx)


def _merge_overlapping(comps: list[_Comp]) -> list[list[_Comp]]:
    """Group components whose horizontal extents overlap by more than half the narrower one."""
    comps = sorted(comps, key=lambda c: c.x)
    groups: list[list[_Comp]] = []
    for c in comps:
        for g in groups:
            gx0 = min(d.x for d in g)
            gx1 = max(d.x + d.w for d in g)
            overlap = min(gx1, c.x + c.w) - max(gx0, c.x)
            if overlap > 0.5 * min(c.w, gx1 - gx0):
                g.append(c)
                break
        else:
            groups.append([c])
    groups.sort(key=lambda g: min(d.x for d in g))
    return groups


def _unit_candidates(
    group: list[_Comp],
    labels: np.ndarray,
    darkness: np.ndarray,
    offsets: np.ndarray,
    height: float,
    pieces: list[DigitCrop],
    *,
    max_span: int,
) -> Unit:
    """Candidate cuts of one unit; appends its candidate digits to ``pieces``."""
    x0 = min(c.x for c in group)
    y0 = min(c.y for c in group)
    x1 = max(c.x + c.w for c in group)
    y1 = max(c.y + c.h for c in group)
    sub = np.isin(labels[y0:y1, x0:x1], [c.label for c in group]).astype(np.uint8)
    width = x1 - x0
    cuts = [0, *_cut_positions(sub, height), width]
    spans: list[tuple[int, int, int]] = []
    last = len(cuts) - 1
    for i in range(last):
        for j in range(i + 1, last + 1):
            # Short spans up to a wide digit's width, and the whole unit (it may be one wide digit).
            if (i, j) == (0, last) or (j - i <= max_span and cuts[j] - cuts[i] <= 1.6 * height):
                piece = _piece(sub, darkness, offsets, cuts[i], cuts[j], x0, y0, height)
                if piece is not None:
                    spans.append((i, j, len(pieces)))
                    pieces.append(piece)
    default = _default_path(cuts, spans, pieces, height)
    return Unit(len(cuts), tuple(spans), default)


def _join_candidates(
    groups: list[list[_Comp]],
    labels: np.ndarray,
    darkness: np.ndarray,
    offsets: np.ndarray,
    height: float,
    pieces: list[DigitCrop],
) -> list[tuple[int, int, int]]:
    """Candidate digits made of two neighbouring units that nearly touch and are together digit-sized.

    A digit drawn in two strokes (a 5's detached top, a 4 in two strokes, a 1's lead-in) falls apart
    into two units; the joined candidate lets the model read it whole. Appends to ``pieces``.
    """
    joins = []
    for i in range(len(groups) - 1):
        left, right = groups[i], groups[i + 1]
        x0 = min(c.x for c in left + right)
        x1 = max(c.x + c.w for c in left + right)
        gap = min(c.x for c in right) - max(c.x + c.w for c in left)
        if gap > JOIN_GAP * height or x1 - x0 > JOIN_WIDTH * height:
            continue
        y0 = min(c.y for c in left + right)
        y1 = max(c.y + c.h for c in left + right)
        sub = np.isin(labels[y0:y1, x0:x1], [c.label for c in left + right]).astype(np.uint8)
        piece = _piece(sub, darkness, offsets, 0, x1 - x0, x0, y0, height, keep_all=True)
        if piece is not None:
            joins.append((i, i + 1, len(pieces)))
            pieces.append(piece)
    return joins


def _cut_positions(sub: np.ndarray, height: float) -> list[int]:
    """Candidate x positions (inside the unit) where touching digits may be cut."""
    w = sub.shape[1]
    if w < _CUT_MIN_WIDTH * height:
        return []
    profile = sub.sum(axis=0).astype(np.float32)
    margin = max(2, int(_CUT_MARGIN * height))
    xs = np.arange(margin, w - margin)
    if xs.size == 0:
        return []
    # Three cues for where two digits meet: few ink pixels in the column, a valley reaching down
    # from the top contour, a valley reaching up from the bottom contour (touching loops).
    h = sub.shape[0]
    has_ink = profile > 0
    top = np.where(has_ink, np.argmax(sub > 0, axis=0), h).astype(np.float32)
    bottom = np.where(has_ink, h - 1 - np.argmax(sub[::-1] > 0, axis=0), -1).astype(np.float32)
    kernel = np.ones(3, np.float32) / 3
    costs = [
        np.convolve(profile, kernel, mode="same") / max(float(profile.max()), 1.0),
        1.0 - np.convolve(top, kernel, mode="same") / h,
        np.convolve(bottom, kernel, mode="same") / h,
    ]
    # Each cue's local minima, best first; the cues take turns so that each gets its best cuts in.
    ranked = []
    for cost in costs:
        is_min = (cost[xs] <= cost[xs - 1]) & (cost[xs] <= cost[xs + 1])
        minima = xs[is_min]
        ranked.append(minima[np.argsort(cost[minima], kind="stable")])
    order = [x for turn in itertools.zip_longest(*ranked) for x in turn if x is not None]
    chosen: list[int] = []
    spacing = max(3, _CUT_SPACING * height)
    for x in order:
        if all(abs(int(x) - c) >= spacing for c in chosen):
            chosen.append(int(x))
        if len(chosen) >= _MAX_CUTS:
            break
    return sorted(chosen)


def _piece(
    sub: np.ndarray,
    darkness: np.ndarray,
    offsets: np.ndarray,
    a: int,
    b: int,
    x0: int,
    y0: int,
    height: float,
    *,
    keep_all: bool = False,
) -> DigitCrop | None:
    """The candidate digit between columns a and b of a (deslanted) unit, slivers of neighbours removed.

    Its ink is taken from the field's original (slanted) frame. ``keep_all`` keeps small strokes too.
    """
    part = sub[:, a:b]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(part), connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = keep_all | (areas >= 0.15 * areas.max()) | (stats[1:, cv2.CC_STAT_HEIGHT] >= 0.4 * height)
    ys, xs = np.nonzero(keep[labels])
    ys = ys + y0
    xs = xs + x0 + a - offsets[ys]  # back to the original frame
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    m = np.zeros((bottom - top, right - left), bool)
    m[ys - top, xs - left] = True
    ink = np.where(m, darkness[top:bottom, left:right], 0.0).astype(np.float32)
    peak = float(ink.max())
    if peak > 0:
        ink = np.clip(ink / (0.8 * peak), 0, 1) * m
    return DigitCrop((left, top, right - left, bottom - top), ink.astype(np.float32))


def _deslant_offsets(mask: np.ndarray) -> np.ndarray:
    """Per-row x shifts (int, >= 0) that make the ink's strokes most nearly vertical.

    Tries shears in _SHEARS and keeps the one whose column profile is most peaked (largest sum of
    squared column counts), the usual deslanting criterion.
    """
    h = mask.shape[0]
    ys, xs = np.nonzero(mask)
    best_value, best_shear = -1.0, 0.0
    cy = float(ys.mean()) if ys.size else h / 2
    if ys.size >= 20:
        for shear in _SHEARS:
            shifted = np.round(xs + shear * (ys - cy)).astype(np.int64)
            counts = np.bincount(shifted - shifted.min()).astype(np.float64)
            value = float((counts**2).sum()) * (1.0 if shear == 0 else 1.0 - _SHEAR_PRIOR * abs(shear))
            if value > best_value:
                best_value, best_shear = value, float(shear)
    offsets = np.round(best_shear * (np.arange(h) - cy)).astype(np.int64)
    return offsets - offsets.min()


def _shear(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Shift row y of a binary mask right by offsets[y] (the image widens by the largest shift)."""
    h, w = mask.shape
    out = np.zeros((h, w + int(offsets.max())), np.uint8)
    ys, xs = np.nonzero(mask)
    out[ys, xs + offsets[ys]] = 1
    return out


def _aspect_misfit(bbox: tuple[int, int, int, int], height: float) -> float:
    """How far a candidate's width (relative to the digit height) is outside the usual digit range."""
    _, _, w, h = bbox
    rel = w / height
    return max(0.0, rel - WIDE_LIMIT) + max(0.0, 0.35 - h / height)


def _default_path(
    cuts: list[int], spans: list[tuple[int, int, int]], pieces: list[DigitCrop], height: float
) -> tuple[int, ...]:
    """Shape-only reading of a unit: digits about 0.8 digit heights wide, cut at the nearest candidates.

    The number of digits comes from the unit's width as written (deslanting widens some digits).
    """
    width = cuts[-1] - cuts[0]
    lookup = {(i, j): p for i, j, p in spans}
    whole = lookup.get((0, len(cuts) - 1))
    written = pieces[whole].bbox[2] if whole is not None else width
    n = int(np.clip(round(written / (0.8 * height)), 1, len(cuts) - 1))
    # Choose n-1 inner cuts nearest to equal spacing.
    chosen = [0]
    for k in range(1, n):
        target = cuts[0] + k * width / n
        best = min(range(chosen[-1] + 1, len(cuts) - 1), key=lambda i: abs(cuts[i] - target), default=None)
        if best is None:
            break
        chosen.append(best)
    chosen.append(len(cuts) - 1)
    path = [lookup.get((a, b)) for a, b in itertools.pairwise(chosen)]
    if all(p is not None for p in path):
        return tuple(p for p in path if p is not None)
    return (whole,) if whole is not None else ()
