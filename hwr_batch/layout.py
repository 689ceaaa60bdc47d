"""Page layout: deskew a scanned page and find the fields that hold handwriting.

Coordinates: ``Field.bbox`` is in the **original** (skewed) page's pixels: the axis-aligned box of
the field's deskewed rectangle mapped back onto the page (what a person sees in the scan).
``Field.image`` is cut from the **deskewed** page, so the field is straight in it; ``Field.inner``
and ``Field.cells`` are in that image's coordinates. ``Layout.angle`` uses OpenCV's convention
(positive = content rotated counter-clockwise on screen, as ``cv2.getRotationMatrix2D``); the page
is straightened by rotating it by ``-angle`` about its centre (:func:`deskew`).

Modes:

* ``"boxes"``: only printed rectangles are fields. Long horizontal and vertical line masks
  (morphological opening at ~150 dpi) are combined; the holes of that line grid are box interiors
  (or comb cells, which are merged into one field when they share a frame and a row). Printed text
  outside boxes is never returned.
* ``"whole"``: the whole image is one field (a crop of a single field, e.g. a cheque amount).
* ``"lines"``: for pages without boxes: printed rules are removed, ink components are kept if they
  look handwritten (4-16 mm tall, strokes >= 0.4 mm wide) and grouped into text lines and runs
  (split at gaps wider than ~0.9 x the run's height). Runs that look printed are dropped:
  >= 3 components with near-identical tops, bottoms and heights (type), or > 14 components
  (sentences). This is a heuristic; bold large print (a title) may still be returned.
* ``"auto"``: ``boxes`` if the page has any box; else ``whole`` if the image is small
  (< 400 px tall: a crop of one field); else ``lines``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

MODES = ("auto", "boxes", "whole", "lines")
WORK_DPI = 150.0  # detection runs at about this resolution
MM_PER_INCH = 25.4
SMALL_IMAGE_PX = 400


@dataclass(frozen=True)
class Field:
    """One field to read.

    Attributes:
        bbox: (x, y, w, h) in original page pixels (see module docstring).
        image: (h, w) uint8 grayscale, dark on light, from the deskewed page: the box with a margin
            around it, its border lines and comb ticks whitened (strokes crossing them are kept), and
            ink outside the box that does not reach into it whitened too.
        kind: ``"box"`` (incl. combs), ``"line"`` (a run of handwriting) or ``"whole"``.
        inner: (x, y, w, h) of the box's interior in ``image`` (whole image for line/whole).
        cells: comb cells as (x0, x1) column ranges in ``image``, left to right; empty for a plain box.
        to_page: 2x3 affine taking ``image`` pixel coordinates to original page coordinates
            (e.g. to draw a digit's box on the scan): ``page_xy = to_page @ (x, y, 1)``.
    """

    bbox: tuple[int, int, int, int]
    image: np.ndarray = field(repr=False, compare=False)
    kind: str
    inner: tuple[int, int, int, int] = (0, 0, 0, 0)
    cells: tuple[tuple[int, int], ...] = ()
    to_page: np.ndarray = field(default_factory=lambda: np.array([[1.0, 0, 0], [0, 1.0, 0]]), repr=False, compare=False)


@dataclass(frozen=True)
class Layout:
    """What :func:`analyse_page` found.

    Attributes:
        angle: estimated skew in degrees (OpenCV convention; 0 if no long lines were found).
        fields: in reading order (top to bottom, then left to right).
        mode: the mode actually used (``auto`` resolved to ``boxes``, ``whole`` or ``lines``).
        dpi: the resolution assumed for physical sizes.
    """

    angle: float
    fields: list[Field]
    mode: str
    dpi: float


# --------------------------------------------------------------------------------------- helpers


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x, y, w, h) pixel boxes (0 when they do not meet): how a field found is
    matched to a truth field, a template zone or a saved review."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / max(1, aw * ah + bw * bh - inter)


def guess_dpi(shape: tuple[int, ...]) -> float:
    """The page's dpi if it looks like an A4 or US Letter page, else 300."""
    return _full_page_dpi(shape) or 300.0


def _full_page_dpi(shape: tuple[int, ...]) -> float | None:
    """The dpi of a page with A4 or US Letter proportions, taken as a full page; None for other shapes."""
    h, w = shape[:2]
    if w >= 800 and h > w:
        ratio = h / w
        if 1.38 <= ratio <= 1.45:
            return w / (210 / MM_PER_INCH)
        if 1.25 <= ratio < 1.38:
            return w / 8.5
    return None


# Paper a form is printed on, (width, height) in mm. Not A6: a 300 dpi A4 page tagged 600 dpi would pass for one.
PAPER_SIZES_MM = {"A3": (297, 420), "A4": (210, 297), "A5": (148, 210), "Letter": (215.9, 279.4), "Legal": (215.9, 355.6)}
PLAUSIBLE_DPI = (100.0, 1200.0)  # scanners write 72 or 1 (no unit) where they mean "unknown"


def choose_dpi(tagged: float | None, shape: tuple[int, ...]) -> tuple[float, str]:
    """The resolution to read a scanned page at, and why the file's tag was ignored ("" if it was not).

    The tag is ignored when it is missing, outside :data:`PLAUSIBLE_DPI`, or when the page has the
    proportions of an A4/Letter page but the tag would make it a paper size no form is printed on
    (:data:`PAPER_SIZES_MM`); the resolution is then estimated from the page's size (:func:`guess_dpi`).
    """
    guessed = guess_dpi(shape)
    if tagged is None or tagged <= 0:
        return guessed, ""
    if not PLAUSIBLE_DPI[0] <= tagged <= PLAUSIBLE_DPI[1]:
        how = "estimated from its size" if _full_page_dpi(shape) else "the default for an image that is not a full page"
        return guessed, f"its {tagged:.0f} dpi tag is implausible; read at {guessed:.0f} dpi, {how}"
    h, w = shape[:2]
    size = (w / tagged * MM_PER_INCH, h / tagged * MM_PER_INCH)
    standard = any(
        abs(size[0] - pw) <= 0.04 * pw and abs(size[1] - ph) <= 0.04 * ph
        for pw, ph in (*PAPER_SIZES_MM.values(), *(p[::-1] for p in PAPER_SIZES_MM.values()))
    )
    if not standard and _full_page_dpi(shape) and abs(tagged / guessed - 1) > 0.1:
        return guessed, (
            f"its {tagged:.0f} dpi tag would make it a {size[0]:.0f}x{size[1]:.0f} mm page; "
            f"read as a full page at {guessed:.0f} dpi, estimated from its size"
        )
    return float(tagged), ""


def _downscale(gray: np.ndarray, dpi: float) -> tuple[np.ndarray, int]:
    """Shrink by an integer factor towards ~150 dpi."""
    f = max(1, round(dpi / WORK_DPI))
    return shrink_by(gray, f), f


def shrink_by(gray: np.ndarray, factor: int) -> np.ndarray:
    """``gray`` shrunk by an integer ``factor``, each output pixel the mean of a factor x factor block
    (INTER_AREA on an integer factor: about 20 times faster than on a fractional one); the last rows and
    columns that do not fill a block are left out. ``gray`` itself for a factor of 1 or less."""
    if factor <= 1:
        return gray
    h, w = gray.shape
    g = gray[: h - h % factor, : w - w % factor]
    return cv2.resize(g, None, fx=1.0 / factor, fy=1.0 / factor, interpolation=cv2.INTER_AREA)


def _as_gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if img.ndim != 2:
        raise ValueError(f"expected a (H, W) grayscale image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.dtype.kind == "f" and img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return img


def _odd(v: float) -> int:
    return max(3, int(v) | 1)


def _binarise(gray: np.ndarray, block: int, c: float = 12.0) -> np.ndarray:
    """Ink mask (255 = ink) robust to uneven lighting."""
    return cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, _odd(block), c)


def _open(mask: np.ndarray, kw: int, kh: int) -> np.ndarray:
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(1, kw), max(1, kh))))


def estimate_skew(gray: np.ndarray, *, dpi: float | None = None, max_angle: float = 6.0) -> float:
    """Skew of a page in degrees (OpenCV convention) from its long printed lines; 0 if it has none.

    Horizontal line fragments are isolated with a short opening at ~150 dpi; each component at
    least 25 mm long and thin gets a least-squares line fit; the answer is the length-weighted median.
    """
    gray = _as_gray(gray)
    dpi = dpi or guess_dpi(gray.shape)
    small, f = _downscale(gray, dpi)
    return _skew_small(_binarise(small, 6 * dpi / f / MM_PER_INCH), dpi / f, max_angle)


def _cc_stats(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Connected components (8-connected) with stats, using the fastest algorithm for sparse masks."""
    n, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_GRANA)
    return n, labels, stats


def _skew_small(bw: np.ndarray, dpi: float, max_angle: float) -> float:
    px_mm = dpi / MM_PER_INCH
    hor = _open(bw, int(2.5 * px_mm), 1)
    contours, _ = cv2.findContours(hor, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    tan = math.tan(math.radians(max_angle))
    angles, weights = [], []
    for c in contours:
        _x, _y, w, h = cv2.boundingRect(c)
        if w < 25 * px_mm or h > w * tan + 1.5 * px_mm:
            continue
        pts = c.reshape(-1, 2).astype(np.float64)
        xs, ys = pts[:, 0] - pts[:, 0].mean(), pts[:, 1]
        slope = float((xs * (ys - ys.mean())).sum() / max((xs * xs).sum(), 1e-9))
        angles.append(-math.degrees(math.atan(slope)))
        weights.append(float(w))
    if not angles:
        return 0.0
    order = np.argsort(angles)
    a, wts = np.asarray(angles)[order], np.asarray(weights)[order]
    cum = np.cumsum(wts)
    return float(a[np.searchsorted(cum, cum[-1] / 2)])


def _rotation(shape: tuple[int, ...], angle: float) -> np.ndarray:
    """2x3 matrix taking original page pixels to deskewed ones (rotation by -angle about the centre)."""
    h, w = shape[:2]
    return cv2.getRotationMatrix2D((w / 2.0, h / 2.0), -angle, 1.0)


def deskew(gray: np.ndarray, angle: float) -> np.ndarray:
    """The page rotated by ``-angle`` about its centre, same size, white outside."""
    if not angle:
        return gray
    h, w = gray.shape[:2]
    return cv2.warpAffine(gray, _rotation(gray.shape, angle), (w, h), flags=cv2.INTER_LINEAR, borderValue=255)


def _cut(gray: np.ndarray, m: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The deskewed region ``box`` (x, y, w, h), sampled straight from the original page."""
    x, y, w, h = box
    mc = m.copy()
    mc[:, 2] -= (x, y)
    if not m[0, 1] and m[0, 0] == 1:
        y0, x0 = max(y, 0), max(x, 0)
        out = np.full((h, w), 255, np.uint8)
        part = gray[y0 : y + h, x0 : x + w]
        out[y0 - y : y0 - y + part.shape[0], x0 - x : x0 - x + part.shape[1]] = part
        return out
    return cv2.warpAffine(gray, mc, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _to_page(m_inv: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    x, y, w, h = box
    pts = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64) @ m_inv[:, :2].T + m_inv[:, 2]
    H, W = shape[:2]
    x0, y0 = np.clip(pts.min(axis=0), 0, [W, H])
    x1, y1 = np.clip(pts.max(axis=0), 0, [W, H])
    return round(x0), round(y0), round(x1 - x0), round(y1 - y0)


def _shifted(m_inv: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """``m_inv`` (deskewed page -> page) preceded by a shift from crop to deskewed page coordinates."""
    out = m_inv.copy()
    out[:, 2] += m_inv[:, :2] @ np.array([x0, y0], np.float64)
    return out


def _reading_order(boxes: list[tuple[int, int, int, int]]) -> list[int]:
    """Indices of ``boxes`` top to bottom, left to right (a box joins a row if its centre is inside it)."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][1])
    rows: list[list[int]] = []
    row_y1 = -1.0
    for i in order:
        _x, y, _w, h = boxes[i]
        if rows and y + h / 2 < row_y1:
            rows[-1].append(i)
            row_y1 = max(row_y1, min(row_y1, y + h))
        else:
            rows.append([i])
            row_y1 = y + h
    return [i for row in rows for i in sorted(row, key=lambda j: boxes[j][0])]


# --------------------------------------------------------------------------------------- boxes


def _ruled(hor: np.ndarray, ver: np.ndarray, hole: tuple[int, int, int, int], pad: int = 3) -> bool:
    """True if a hole of the line grid is bounded by straight lines on all four sides (a printed box)."""
    x, y, w, h = hole
    above = hor[max(0, y - pad) : y + 1, x : x + w]
    below = hor[y + h - 1 : y + h + pad, x : x + w]
    top, bottom = above.any(axis=0).mean(), below.any(axis=0).mean()
    left = ver[y : y + h, max(0, x - pad) : x + 1].any(axis=1).mean()
    right = ver[y : y + h, x + w - 1 : x + w + pad].any(axis=1).mean()
    return bool(min(top, bottom) >= 0.85 and min(left, right) >= 0.7)


def _merge_split_holes(holes: list[tuple[int, int, int, int]], hor: np.ndarray, ver: np.ndarray, px_mm: float) -> list[tuple[int, int, int, int]]:
    """Merge neighbouring holes of one frame that are separated by a pen stroke rather than a printed line.

    A straight stretch of handwriting can survive the line openings and cut a box's interior in two;
    a printed separator spans the whole side it divides, a stroke does not.
    """
    holes = list(holes)
    gap = int(2.5 * px_mm) + 3
    merged = True
    while merged and len(holes) > 1:
        merged = False
        for i in range(len(holes)):
            for j in range(i + 1, len(holes)):
                (ax, ay, aw, ah), (bx, by, bw, bh) = holes[i], holes[j]
                x0, y0 = min(ax, bx), min(ay, by)
                x1, y1 = max(ax + aw, bx + bw), max(ay + ah, by + bh)
                ox = min(ax + aw, bx + bw) - max(ax, bx)
                oy = min(ay + ah, by + bh) - max(ay, by)
                if ox > 0.6 * min(aw, bw) and -gap <= oy <= 0.8 * min(ah, bh):  # stacked
                    g0, g1 = sorted((min(ay + ah, by + bh), max(ay, by)))
                    if hor[g0 - 1 : g1 + 2, x0:x1].mean(axis=1).max(initial=0) >= 0.9 * 255:
                        continue  # divided by a full-width printed rule
                elif oy > 0.6 * min(ah, bh) and -gap <= ox <= 0.8 * min(aw, bw):  # side by side
                    g0, g1 = sorted((min(ax + aw, bx + bw), max(ax, bx)))
                    if ver[y0:y1, g0 - 1 : g1 + 2].mean(axis=0).max(initial=0) >= 0.9 * 255:
                        continue  # divided by a full-height printed separator
                else:
                    continue
                holes[i] = (x0, y0, x1 - x0, y1 - y0)
                del holes[j]
                merged = True
                break
            if merged:
                break
    return holes


def _find_boxes(
    bw: np.ndarray, px_mm: float, min_h_mm: float = 6.0
) -> list[tuple[tuple[int, int, int, int], list[tuple[int, int, int, int]]]]:
    """Box interiors in a deskewed ink mask: [(interior (x, y, w, h), cell interiors)], cells left to right."""
    hor = _open(bw, int(4.5 * px_mm), 1)
    ver = _open(bw, 1, int(4.5 * px_mm))
    grid = cv2.dilate(hor | ver, np.ones((3, 3), np.uint8))
    contours, hier = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hier is None:
        return []
    raw: dict[int, list[tuple[int, int, int, int]]] = {}
    area: dict[tuple[int, int, int, int], float] = {}
    _H, W = bw.shape
    for c, (_, _, _, parent) in zip(contours, hier[0]):
        if parent < 0:
            continue
        x, y, w, h = cv2.boundingRect(c)
        if h < 1.0 * px_mm or w < 1.0 * px_mm:
            continue
        raw.setdefault(parent, []).append((x, y, w, h))
        area[(x, y, w, h)] = cv2.contourArea(c)
    holes: dict[int, list[tuple[int, int, int, int]]] = {}
    for parent, hs in raw.items():
        for x, y, w, h in _merge_split_holes(hs, hor, ver, px_mm):
            if not (min_h_mm * px_mm <= h <= 45 * px_mm and w >= 2.5 * px_mm and w <= 0.99 * W):
                continue
            inside = sum(area[b] for b in hs if b[0] >= x and b[1] >= y and b[0] + b[2] <= x + w and b[1] + b[3] <= y + h)
            if inside < 0.5 * w * h or not _ruled(hor, ver, (x, y, w, h)):
                continue
            holes.setdefault(parent, []).append((x, y, w, h))
    out = []
    for parent, cells in holes.items():
        # Split a frame's holes into rows; a row of >= 2 cells is a comb.
        cells.sort(key=lambda b: (b[1], b[0]))
        rows: list[list[tuple[int, int, int, int]]] = []
        for b in cells:
            for row in rows:
                y0, y1 = min(r[1] for r in row), max(r[1] + r[3] for r in row)
                if min(y1, b[1] + b[3]) - max(y0, b[1]) > 0.5 * min(b[3], y1 - y0):
                    row.append(b)
                    break
            else:
                rows.append([b])
        frame = cv2.boundingRect(contours[parent])
        for row in rows:
            row.sort(key=lambda b: b[0])
            if len(rows) == 1:
                row = _recover_end_cells(row, frame, hor, ver)
            x0 = row[0][0]
            y0 = min(b[1] for b in row)
            x1 = max(b[0] + b[2] for b in row)
            y1 = max(b[1] + b[3] for b in row)
            out.append(((x0, y0, x1 - x0, y1 - y0), row if len(row) > 1 else []))
    return out


def _recover_end_cells(
    row: list[tuple[int, int, int, int]], frame: tuple[int, int, int, int], hor: np.ndarray, ver: np.ndarray
) -> list[tuple[int, int, int, int]]:
    """Give a comb back an end cell that a digit hid from the line grid.

    A thick digit that touches a comb's side and separator can break its cell's hole into pieces that
    are not ruled on four sides, and the cell (with its digit) would be lost. The frame's outline still
    reaches past the first or last hole then: by about a cell, and a whole cell is put back, one cell
    pitch on; by the rest of a cell, the hole is what is left of it and takes the cells' width. Either
    only where the printed lines (``hor``, ``ver``) run above and below the cell and stand at its outer
    side, so that a rule or a stroke joined to the frame adds nothing.
    """
    fx, fy, fw, fh = frame
    y0, y1 = min(b[1] for b in row), max(b[1] + b[3] for b in row)
    # The frame line's width as the grid drew it: the thinner of top and bottom, as the digit that broke
    # the cell may poke out of the frame on one side.
    border = max(1, min(y0 - fy, fy + fh - y1))
    if fh > (y1 - y0) + 4 * border + 8:  # not a single row of cells
        return row
    widths = sorted(b[2] for b in row)
    width = widths[len(widths) // 2] if len(row) >= 3 else widths[-1]  # two holes: one may be a rest
    pitches = [b[0] - a[0] for a, b in itertools.pairwise(row)]

    def stride_beside(col: int, step: int) -> int:
        """The cells' pitch: the median one, or with fewer than three holes, the width plus the gap the
        separator beside ``col`` (going by ``step``) makes in the grid (its width and the dilation)."""
        if len(row) >= 3:
            return round(float(np.median(pitches)))
        c, skipped, line = col, 0, 0
        while 0 <= c < ver.shape[1] and (line or skipped < 2):
            if np.count_nonzero(ver[y0:y1, c]) >= 0.5 * (y1 - y0):
                line += 1
            elif line:
                break
            else:
                skipped += 1
            c += step
        return width + (line + 2 if line else border)

    def ruled(a: int, b: int, side: int) -> bool:
        """Printed lines above and below columns a..b, and a vertical one at column ``side``."""
        if b <= a:
            return False
        above = hor[max(0, y0 - border - 3) : y0 + 1, max(0, a) : max(0, b)]
        below = hor[y1 - 1 : y1 + border + 3, max(0, a) : max(0, b)]
        upright = ver[y0 + 1 : y1 - 1, max(0, side - border - 2) : max(0, side + border + 3)]
        return all(m.size > 0 for m in (above, below, upright)) and min(
            above.any(axis=0).mean(), below.any(axis=0).mean(), upright.any(axis=1).mean()
        ) >= 0.7

    def whole_cell_lost(gap: int) -> bool:  # the frame reaches about a cell past the end hole
        return 0.8 * width <= gap <= 1.6 * width

    def rest_of_cell(gap: int, w: int) -> bool:  # the end hole and the gap beyond it make one cell
        return 0.3 * width < gap < 0.8 * width and w <= 0.8 * width and abs(gap + w - width) <= border + 2

    row = list(row)
    x, y, w, h = row[0]
    gap = x - (fx + border)
    stride = stride_beside(x - 1, -1)
    if whole_cell_lost(gap) and ruled(x - stride, x - stride + width, x - stride):
        row.insert(0, (x - stride, y, width, h))
    elif rest_of_cell(gap, w) and ruled(x + w - width, x + w, x + w - width):
        row[0] = (x + w - width, y, width, h)
    x, y, w, h = row[-1]
    gap = fx + fw - border - (x + w)
    stride = stride_beside(x + w, 1)
    if whole_cell_lost(gap) and ruled(x + stride, x + stride + width, x + stride + width):
        row.append((x + stride, y, width, h))
    elif rest_of_cell(gap, w) and ruled(x, x + width, x + width):
        row[-1] = (x, y, width, h)
    return row


def regular_cells(cells: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """A comb's cells with the dividers the layout missed put back, or () if they do not look like a comb's.

    A comb's cells are equally wide, so a cell about k times the median width is k cells (a divider hidden
    under ink or broken in the scan); cells of other widths (say 1.5 times) are not a comb's, and the
    digit count is not checked against them.
    """
    if len(cells) < 2:
        return ()
    width = float(np.median([x1 - x0 for x0, x1 in cells]))
    out: list[tuple[int, int]] = []
    for x0, x1 in cells:
        ratio = (x1 - x0) / max(width, 1.0)
        k = round(ratio)
        if k < 1 or abs(ratio - k) > 0.2:
            return ()
        edges = np.linspace(x0, x1, k + 1).round().astype(int)
        out.extend((int(a), int(b)) for a, b in itertools.pairwise(edges))
    return tuple(out)


def _clean_box(crop: np.ndarray, inner: tuple[int, int, int, int], px_mm: float, seps: list[int] = ()) -> tuple[np.ndarray, list[int]]:
    """Whiten a box's border lines, comb ticks and stray outside ink; return (image, tick x positions).

    ``seps`` are x positions of known full-height cell separators (from the line grid).
    """
    ix, iy, iw, ih = inner
    otsu, ink = cv2.threshold(crop, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    paper = cv2.mean(crop, mask=255 - ink)[0] if cv2.countNonZero(ink) < ink.size else 255.0
    if otsu > paper - 25:  # nothing but paper (and noise): no real ink
        ink = (crop < paper - 60).astype(np.uint8) * 255
    _H, W = crop.shape
    band = max(3, int(0.15 * ih))
    # Horizontal border lines: long runs near the expected top and bottom edges.
    kh = max(5, int(min(0.8 * iw, max(1.0 * ih, 6 * px_mm))))
    near_h = np.zeros_like(ink)
    near_h[max(0, iy - band) : iy + band, :] = 255
    near_h[max(0, iy + ih - band) : iy + ih + band, :] = 255
    hor = _open(ink & near_h, kh, 1)
    rows = np.count_nonzero(hor, axis=1)
    top = rows.max() if rows.size else 0
    thick = max(1, int(np.count_nonzero(rows > 0.3 * top) / 2)) if top else max(1, int(0.3 * px_mm))
    # Vertical lines: straight, thin runs touching the top or bottom line (box sides, comb separators, ticks).
    ver = _open(ink, 1, max(5, int(0.15 * ih)))
    n, labels, stats = _cc_stats(ver)
    touching = np.zeros(n, bool)
    touching[labels[cv2.dilate(hor, np.ones((5, 3), np.uint8)) > 0]] = True
    keep_v = np.zeros(n, bool)
    ticks = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if w > 1.6 * thick + 3 or area > (thick + 2) * h:  # a printed line is thin all along
            continue
        side = abs(x + w / 2 - ix) < band or abs(x + w / 2 - ix - iw) < band
        if not (touching[i] or side):
            continue
        if not side:
            # A tick stays on its side of the line; a pen stroke that reaches the line usually goes on.
            gap = thick + 3
            above = ink[max(0, iy - gap - 4) : max(0, iy - gap), x : x + w] if y < iy + band else None
            below = ink[iy + ih + gap : iy + ih + gap + 4, x : x + w] if y + h > iy + ih - band else None
            if any(b is not None and b.size and b.any() for b in (above, below)):
                continue
        keep_v[i] = True
        cx = x + w / 2
        if ix + 0.5 * thick + 3 < cx < ix + iw - 0.5 * thick - 3 and not side:
            ticks.append(round(cx))
    vmask = (keep_v[labels] * 255).astype(np.uint8) if keep_v.any() else np.zeros_like(ink)
    # Known verticals (box sides, separators): take their straight runs even where a digit touches them.
    r = thick // 2 + 2
    for x in (ix - thick // 2, ix + iw + thick // 2, *seps):
        x0, x1 = max(0, x - r), min(W, x + r + 1)
        vmask[:, x0:x1] |= ver[:, x0:x1]
    # Remove the lines, except under strokes that touch or cross them: a line pixel stays if ink lies
    # right next to the line in the same column (horizontal lines) or row (vertical lines).
    hl = cv2.dilate(hor, np.ones((3, 3), np.uint8))
    vl = cv2.dilate(vmask, np.ones((3, 3), np.uint8))
    lines = hl | vl
    rest = ink & ~lines
    adj = rest & cv2.dilate(lines, np.ones((5, 5), np.uint8))
    k = 2 * thick + 7
    keep = rest | (hl & cv2.dilate(adj, cv2.getStructuringElement(cv2.MORPH_RECT, (1, k))))
    keep |= vl & ~hl & cv2.dilate(adj, cv2.getStructuringElement(cv2.MORPH_RECT, (k, 1)))
    # Keep only ink that reaches into the box interior.
    n, labels = cv2.connectedComponents(keep, connectivity=8)
    good = np.bincount(labels[iy + thick : iy + ih - thick, ix + thick : ix + iw - thick].ravel(), minlength=n) > 0
    good[0] = False
    keep_mask = cv2.dilate(good[labels].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    out = np.full_like(crop, round(paper))
    out[keep_mask] = crop[keep_mask]
    ticks.sort()
    merged: list[int] = []
    for t in ticks:
        if not merged or t - merged[-1] > 2 * thick + 2:
            merged.append(t)
    return out, merged


def _box_fields(gray: np.ndarray, bw: np.ndarray, s: float, dpi: float, m: np.ndarray, min_box_mm: float) -> list[Field]:
    px_mm_small = dpi * s / MM_PER_INCH
    px_mm = dpi / MM_PER_INCH
    m_inv = cv2.invertAffineTransform(m)
    found = []
    for (x, y, w, h), cells in _find_boxes(bw, px_mm_small, min_box_mm):
        # Interior in deskewed full-resolution pixels (the grid was dilated by 1 px at small scale).
        ix, iy = (x - 0.5) / s, (y - 0.5) / s
        iw, ih = (w + 1) / s, (h + 1) / s
        mx, my = int(0.25 * ih + 2), int(0.3 * ih + 2)
        bx0, by0 = math.floor(ix - mx), math.floor(iy - my)
        cw, ch = math.ceil(iw + 2 * mx), math.ceil(ih + 2 * my)
        crop = _cut(gray, m, (bx0, by0, cw, ch))
        inner = (round(ix - bx0), round(iy - by0), round(iw), round(ih))
        seps = [round(((c[0] - 1) + (p[0] + p[2])) / 2 / s - bx0) for p, c in itertools.pairwise(cells)]
        image, ticks = _clean_box(crop, inner, px_mm, seps)
        edges = seps or ticks
        bounds = [inner[0], *edges, inner[0] + inner[2]]
        cell_ranges = tuple((a, b) for a, b in itertools.pairwise(bounds)) if len(bounds) > 2 else ()
        if len(cell_ranges) >= 3:  # a tick a digit hid: the comb would read a cell short (and flag a true reading)
            cell_ranges = regular_cells(cell_ranges) or cell_ranges
        lt = max(1, int(0.15 * px_mm))  # half a typical line width: the truth boxes include the border
        outer = (round(ix) - lt, round(iy) - lt, round(iw) + 2 * lt, round(ih) + 2 * lt)
        found.append(Field(_to_page(m_inv, outer, gray.shape), image, "box", inner, cell_ranges, _shifted(m_inv, bx0, by0)))
    order = _reading_order([f.bbox for f in found])
    return [found[i] for i in order]


# --------------------------------------------------------------------------------------- lines


def _line_fields(gray: np.ndarray, bw: np.ndarray, s: float, dpi: float, m: np.ndarray) -> list[Field]:
    px = dpi * s / MM_PER_INCH
    lines = _open(bw, int(8 * px), 1) | _open(bw, 1, int(20 * px))
    ink = bw & ~cv2.dilate(lines, np.ones((3, 3), np.uint8))
    ink = _open(ink, 2, 2) if px > 4 else ink
    n, labels, stats = _cc_stats(ink)
    dist = cv2.distanceTransform(ink, cv2.DIST_L2, 3)
    comps = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if not (4 * px <= h <= 16 * px) or w > 3 * h or area < 0.6 * px * h:
            continue
        width = 2 * float(dist[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].max())
        if width < 0.4 * px:
            continue
        comps.append((x, y, w, h))
    # Group into text lines (vertical overlap), then runs (horizontal gaps).
    comps.sort(key=lambda b: b[0])
    tlines: list[list[tuple[int, int, int, int]]] = []
    for b in comps:
        for tl in tlines:
            y0 = min(c[1] for c in tl[-3:])
            y1 = max(c[1] + c[3] for c in tl[-3:])
            overlap = min(y1, b[1] + b[3]) - max(y0, b[1])
            if overlap > 0.5 * min(b[3], y1 - y0):
                tl.append(b)
                break
        else:
            tlines.append([b])
    runs = []
    for tl in tlines:
        run = [tl[0]]
        for b in tl[1:]:
            med_h = float(np.median([c[3] for c in run]))
            if b[0] - max(c[0] + c[2] for c in run) > 0.9 * med_h:
                runs.append(run)
                run = [b]
            else:
                run.append(b)
        runs.append(run)
    m_inv = cv2.invertAffineTransform(m)
    out = []
    for run in runs:
        if len(run) > 14:
            continue
        hs = np.array([c[3] for c in run], float)
        tops = np.array([c[1] for c in run], float)
        bots = tops + hs
        med = float(np.median(hs))
        if len(run) >= 3 and tops.std() < 0.03 * med and bots.std() < 0.03 * med and hs.std() < 0.04 * med:
            continue  # type: every glyph the same height on the same baseline
        x0 = min(c[0] for c in run)
        y0 = min(c[1] for c in run)
        x1 = max(c[0] + c[2] for c in run)
        y1 = max(c[1] + c[3] for c in run)
        pad = 0.3 * med
        bx0, by0 = int((x0 - pad) / s), int((y0 - pad) / s)
        bw_, bh_ = int((x1 - x0 + 2 * pad) / s), int((y1 - y0 + 2 * pad) / s)
        img = _cut(gray, m, (bx0, by0, bw_, bh_))
        p = int(pad / s)
        inner = (p, p, bw_ - 2 * p, bh_ - 2 * p)
        img, _ = _clean_box(img, inner, dpi / MM_PER_INCH)  # drops the rule under the digits and stray ink
        core = (bx0 + p, by0 + p, inner[2], inner[3])  # the run's ink, without the margin
        out.append(Field(_to_page(m_inv, core, gray.shape), img, "line", inner, (), _shifted(m_inv, bx0, by0)))
    order = _reading_order([f.bbox for f in out])
    return [out[i] for i in order]


# --------------------------------------------------------------------------------------- API


def analyse_page(
    gray: np.ndarray,
    *,
    mode: str = "auto",
    dpi: float | None = None,
    max_angle: float = 6.0,
    min_box_mm: float = 6.0,
) -> Layout:
    """Deskew a page and find its fields.

    Args:
        gray: (H, W) uint8, dark ink on light paper (BGR is converted).
        mode: ``"auto"``, ``"boxes"``, ``"whole"`` or ``"lines"`` (see module docstring).
        dpi: the scan's resolution; default :func:`guess_dpi` (A4/Letter page size, else 300).
        max_angle: largest skew considered, in degrees.
        min_box_mm: smallest box interior height taken as a field (smaller closed shapes, such as the
            loop of a big handwritten 0, are not boxes).

    Returns:
        A :class:`Layout` with the skew angle and the fields in reading order.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gray = _as_gray(gray)
    H, W = gray.shape
    dpi = float(dpi or guess_dpi(gray.shape))
    whole = Layout(0.0, [Field((0, 0, W, H), gray, "whole", (0, 0, W, H))], "whole", dpi)
    if mode == "whole":
        return whole
    small, f = _downscale(gray, dpi)
    s = 1.0 / f
    px_mm = dpi * s / MM_PER_INCH
    block = 6 * px_mm
    bw = _binarise(small, block)
    angle = _skew_small(bw, dpi * s, max_angle)
    m = _rotation(gray.shape, angle)
    if abs(angle) > 0.1:
        # Rotate the small page about the point matching the full page's centre.
        ms = cv2.getRotationMatrix2D((W * s / 2.0 - 0.5 + 0.5 * s, H * s / 2.0 - 0.5 + 0.5 * s), -angle, 1.0)
        bw = cv2.warpAffine(bw, ms, bw.shape[::-1], flags=cv2.INTER_NEAREST, borderValue=0)
    else:
        angle = angle if abs(angle) > 0.02 else 0.0
        m = _rotation(gray.shape, angle)
    if mode in ("auto", "boxes"):
        fields = _box_fields(gray, bw, s, dpi, m, min_box_mm)
        if fields or mode == "boxes":
            return Layout(angle, fields, "boxes", dpi)
        if H < SMALL_IMAGE_PX:
            return whole
    return Layout(angle, _line_fields(gray, bw, s, dpi, m), "lines", dpi)


def find_fields(gray: np.ndarray, *, mode: str = "auto", dpi: float | None = None, **options: float) -> list[Field]:
    """The fields of a page in reading order: ``analyse_page(gray, mode=mode, dpi=dpi, **options).fields``."""
    return analyse_page(gray, mode=mode, dpi=dpi, **options).fields
