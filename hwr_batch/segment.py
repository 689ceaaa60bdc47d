"""Cut one field image (a crop holding a handwritten digit string) into its digits.

Pipeline, all on the field's own pixels (nothing tuned per image):

1. Black scanner margins (large dark areas) are masked out.
2. The paper background, textured or unevenly lit, is estimated with a grey-level closing and divided out.
3. Ink is binarised with hysteresis: Otsu on the background-corrected darkness gives the strong level,
   pixels connected to strong ink down to half that level are kept (faint pen strokes survive, paper
   texture does not).
4. Long horizontal and vertical ruling / guide lines are removed; strokes crossing them are repaired.
5. Connected components are measured against the field's digit height: specks, dots, commas, dashes,
   '=' and stray ink away from the main text line are dropped.
6. Components that overlap horizontally (a 5's hat, a broken 4) are merged into units; wide units
   (touching digits) get candidate cut points at minima of their column profile.

:func:`segment_field` returns one reading chosen by shape alone. :func:`segment_field_candidates` returns
all candidate digits of a field (every plausible way to cut each unit); classify the candidates of many
fields in one batch, then :func:`choose_reading` picks, per field, the cuts whose digits the model reads
most confidently.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


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
    """

    pieces: tuple[DigitCrop, ...]
    units: tuple[Unit, ...]
    digit_height: float

    def default_reading(self) -> list[int]:
        """Piece indices of the shape-only reading, left to right."""
        return [i for unit in self.units for i in unit.default]


# Scoring of candidate readings (see choose_reading).
PIECE_BONUS = -0.5  # log-probability credit per digit, so that cutting is not always penalised
ASPECT_PENALTY = 3.0  # penalty per digit height of width beyond WIDE_LIMIT (and of height below 0.35)
WIDE_LIMIT = 1.1  # candidates wider than this many digit heights are probably two digits
SLIM_PENALTY = 2.0  # penalty for a slim candidate (width < 0.3 height) that the model does not read as '1'


def segment_field(gray: np.ndarray, **options: float) -> list[DigitCrop]:
    """Cut a field into its digits, left to right, choosing cuts by shape alone.

    Args:
        gray: (H, W) uint8 grayscale scan, dark ink on light paper.
        **options: keyword-only tuning options of :func:`segment_field_candidates`.

    Returns:
        The digits, left to right; [] for a blank or constant image.
    """
    cands = segment_field_candidates(gray, **options)
    return [cands.pieces[i] for i in cands.default_reading()]


def segment_field_candidates(
    gray: np.ndarray,
    *,
    min_height: float = 0.45,
    line_gap: float = 2.5,
    max_span: int = 4,
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
    comps = _select_digit_components(comps, height, gray.shape, min_height=min_height, line_gap=line_gap)
    if not comps:
        return empty
    labels = cv2.connectedComponents(mask, connectivity=8)[1]
    pieces: list[DigitCrop] = []
    units: list[Unit] = []
    for group in _merge_overlapping(comps):
        units.append(_unit_candidates(group, labels, darkness, height, pieces, max_span=max_span))
    return FieldCandidates(tuple(pieces), tuple(units), float(height))


def choose_reading(cands: FieldCandidates, probabilities: np.ndarray) -> list[int]:
    """Pick the cuts of each unit whose digits the model reads most confidently.

    Each candidate digit scores log(top probability) + PIECE_BONUS minus a penalty for an implausible
    width/height ratio; per unit, the path of spans from the left edge to the right edge with the highest
    total score wins (dynamic programming).

    Args:
        cands: from :func:`segment_field_candidates`.
        probabilities: (len(cands.pieces), classes) class probabilities of the pieces, in order.

    Returns:
        Piece indices of the chosen digits, left to right.
    """
    if len(cands.pieces) == 0:
        return []
    probs = np.asarray(probabilities, dtype=np.float64)
    score = np.log(np.maximum(probs.max(axis=1), 1e-9)) + PIECE_BONUS
    height = max(cands.digit_height, 1.0)
    best_label = probs.argmax(axis=1)
    for i, piece in enumerate(cands.pieces):
        score[i] -= ASPECT_PENALTY * _aspect_misfit(piece.bbox, height)
        _, _, w, h = piece.bbox
        if w < 0.3 * h and best_label[i] != 1:
            score[i] -= SLIM_PENALTY
    reading: list[int] = []
    for unit in cands.units:
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
        reading.extend(reversed(chosen) if node == 0 else unit.default)
    return reading


# --------------------------------------------------------------------------------------------- internals

_OTSU_FACTOR = 0.6  # strong ink is at least this fraction of the field's Otsu level ...
_PEAK_FACTOR = 0.5  # ... and of the local ink level (darkest ink nearby)
_WEAK_FACTOR = 0.6  # hysteresis: weak ink connected to strong ink, down to this fraction of the strong level
_NOISE_STRONG = 2.5  # textured paper: strong ink is at least this many times the paper's typical darkness
_NOISE_WEAK = 1.8  # ... and weak ink this many times


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
    margin = cv2.morphologyEx(dark, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (k_margin, k_margin)))
    zone = np.zeros_like(margin)
    if margin.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(margin, connectivity=8)
        x, y, bw, bh = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
        at_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
        at_border[0] = False
        margin = at_border[labels].astype(np.uint8)
    if margin.any():
        margin = cv2.dilate(margin, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 7)))
        k_zone = max(7, round(0.06 * min(h, w))) | 1
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
    peak = cv2.blur(cv2.dilate(darkness, cv2.getStructuringElement(cv2.MORPH_RECT, (k_peak, k_peak))), (k_peak, k_peak))
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
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) | (strong & (mask > 0)).astype(np.uint8)
    return darkness, mask, zone


def _touches(c: _Comp, zone: np.ndarray) -> bool:
    """Whether a component's box reaches into a zone."""
    return bool(zone[c.y : c.y + c.h, c.x : c.x + c.w].any())


def _remove_lines(mask: np.ndarray, height: float) -> np.ndarray:
    """Remove long horizontal and vertical straight lines, re-joining strokes that cross them.

    A line is a straight run longer than digits are: horizontally 2.5 digit heights (and 60 % of the
    field), vertically 2 digit heights.
    """
    h, w = mask.shape
    out = mask
    for horizontal in (True, False):
        length = max(round(2.5 * height), 6 * w // 10, 25) if horizontal else max(round(2 * height), 25)
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
    """Estimate the height of the field's digits from its components' heights, weighted by ink."""
    h, w = shape
    if not comps:
        return 0.0
    sizable = [c for c in comps if c.area >= 12 and c.h >= 5 and c.w <= 6 * c.h and c.h <= 6 * c.w and c.h < 0.95 * h]
    sizable = sizable or comps
    heights = np.array([c.h for c in sizable], float)
    weights = np.array([float(c.area) ** 2 for c in sizable])
    order = np.argsort(heights)
    cum = np.cumsum(weights[order])
    return float(heights[order][np.searchsorted(cum, 0.6 * cum[-1])])


def _select_digit_components(
    comps: list[_Comp], height: float, shape: tuple[int, int], *, min_height: float, line_gap: float
) -> list[_Comp]:
    """Drop non-digit marks and stray ink; keep the main text line's components."""
    h, w = shape
    big = [c for c in comps if c.h >= min_height * height and c.area >= max(6, 0.02 * height * height)]
    # Dashes, underlines and their rests: long and flat.
    big = [c for c in big if not (c.w >= 2.5 * c.h and c.h < 0.5 * height)]
    if not big:
        return []
    # Fields are cut around their content: ink near the middle counts more (printed captions, neighbours'
    # strokes and ruling rests sit near the edges).
    weights = np.array([c.area * _centrality(c, shape) for c in big], float)
    # The text line: the band around the weighted median vertical centre.
    centres = np.array([c.y + c.h / 2 for c in big])
    order = np.argsort(centres)
    mid = centres[order][np.searchsorted(np.cumsum(weights[order]), 0.5 * weights.sum())]
    band = [(c, wt) for c, wt in zip(big, weights) if abs(c.y + c.h / 2 - mid) <= 0.6 * height]
    if not band:
        return []
    # Horizontal clusters separated by wide gaps; keep the one with the most (weighted) ink.
    band.sort(key=lambda cw: cw[0].x)
    clusters: list[list[tuple[_Comp, float]]] = [[band[0]]]
    right = band[0][0].x + band[0][0].w
    for c, wt in band[1:]:
        if c.x - right > line_gap * height:
            clusters.append([])
        clusters[-1].append((c, wt))
        right = max(right, c.x + c.w)
    best = max(clusters, key=lambda cl: sum(wt for _, wt in cl))
    return [c for c, _ in best]


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
    soft = darkness[y0:y1, x0:x1]
    width = x1 - x0
    cuts = [0, *_cut_positions(sub, height), width]
    spans: list[tuple[int, int, int]] = []
    for i in range(len(cuts) - 1):
        for j in range(i + 1, min(len(cuts), i + 1 + max_span)):
            if i == 0 and j == len(cuts) - 1 or cuts[j] - cuts[i] <= 1.6 * height:
                piece = _piece(sub, soft, cuts[i], cuts[j], x0, y0, height)
                if piece is not None:
                    spans.append((i, j, len(pieces)))
                    pieces.append(piece)
    default = _default_path(cuts, spans, pieces, height)
    return Unit(len(cuts), tuple(spans), default)


def _cut_positions(sub: np.ndarray, height: float) -> list[int]:
    """Candidate x positions (inside the unit) where touching digits may be cut."""
    w = sub.shape[1]
    if w < 0.7 * height:
        return []
    profile = sub.sum(axis=0).astype(np.float32)
    smooth = np.convolve(profile, np.ones(3, np.float32) / 3, mode="same")
    margin = max(2, int(0.25 * height))
    cands = [
        x
        for x in range(margin, w - margin)
        if smooth[x] <= smooth[x - 1] and smooth[x] <= smooth[x + 1] and smooth[x] < 0.8 * smooth.max()
    ]
    # Keep the deepest minima, at least a third of a digit height apart.
    cands.sort(key=lambda x: (smooth[x], x))
    chosen: list[int] = []
    for x in cands:
        if all(abs(x - c) >= max(3, 0.3 * height) for c in chosen):
            chosen.append(x)
        if len(chosen) >= 6:
            break
    return sorted(chosen)


def _piece(
    sub: np.ndarray, soft: np.ndarray, a: int, b: int, x0: int, y0: int, height: float
) -> DigitCrop | None:
    """The candidate digit between columns a and b of a unit, slivers of neighbours removed."""
    part = sub[:, a:b]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(part), connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = (areas >= 0.15 * areas.max()) | (stats[1:, cv2.CC_STAT_HEIGHT] >= 0.4 * height)
    m = keep[labels]
    ys, xs = np.nonzero(m)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = m[top:bottom, left:right]
    ink = np.where(m, np.maximum(soft[:, a:b][top:bottom, left:right], 0.0), 0.0).astype(np.float32)
    peak = float(ink.max())
    if peak > 0:
        ink = np.clip(ink / (0.8 * peak), 0, 1) * m
    return DigitCrop((x0 + a + int(left), y0 + int(top), int(right - left), int(bottom - top)), ink.astype(np.float32))


def _aspect_misfit(bbox: tuple[int, int, int, int], height: float) -> float:
    """How far a candidate's width (relative to the digit height) is outside the usual digit range."""
    _, _, w, h = bbox
    rel = w / height
    misfit = max(0.0, rel - WIDE_LIMIT) + max(0.0, 0.35 - h / height)
    return misfit


def _default_path(cuts: list[int], spans: list[tuple[int, int, int]], pieces: list[DigitCrop], height: float) -> tuple[int, ...]:
    """Shape-only reading of a unit: digits about 0.75 digit heights wide, cut at the nearest candidates."""
    width = cuts[-1] - cuts[0]
    n = int(np.clip(round(width / (0.8 * height)), 1, len(cuts) - 1))
    # Choose n-1 inner cuts nearest to equal spacing.
    chosen = [0]
    for k in range(1, n):
        target = cuts[0] + k * width / n
        best = min(range(chosen[-1] + 1, len(cuts) - 1), key=lambda i: abs(cuts[i] - target), default=None)
        if best is None:
            break
        chosen.append(best)
    chosen.append(len(cuts) - 1)
    lookup = {(i, j): p for i, j, p in spans}
    path = [lookup.get((a, b)) for a, b in zip(chosen, chosen[1:])]
    if all(p is not None for p in path):
        return tuple(p for p in path if p is not None)
    whole = lookup.get((0, len(cuts) - 1))
    return (whole,) if whole is not None else ()
