"""Draw what was read onto each page, for checking results by eye (``process --annotate DIR``).

Each field is boxed (green, or red when flagged) and labelled with its number in ``fields.csv``,
the digits read and, when flagged, the reason. A label goes where it covers no ink and no other
field (printed text stays legible); where there is no such place on the page, as around a small
crop, the page gets a white margin to hold it. Pages are written as JPEG: a 300 dpi A4 page as
PNG was 13 MB.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .atomic import atomic_output
from .errors import InputFileError, OutputError
from .load import iter_pages

if TYPE_CHECKING:
    from .config import Options
    from .read import FileReading

log = logging.getLogger(__name__)

GOOD = (40, 160, 40)  # BGR: fields read with confidence
FLAGGED = (0, 0, 220)  # fields a person should check
DIGIT = (200, 90, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX
JPEG_QUALITY = 90
INK_LEVEL = 128  # darker pixels are ink (printed or written) that a label must not cover


def field_label(row: dict) -> str:
    """``#3: 0421``, or ``#3: 0421 (1 digit(s) below confidence 0.8)`` for a flagged field; ``?`` for no digits."""
    digits = row["digits"] if isinstance(row["digits"], str) and row["digits"] else "?"
    label = f"#{int(row['field'])}: {digits}"
    reason = row.get("flag_reason")
    return f"{label} ({reason})" if row["flagged"] and isinstance(reason, str) and reason else label


def place_labels(
    gray: np.ndarray, fields: list[dict], sizes: list[tuple[int, int]], gap: int
) -> list[tuple[int, int, int, int]]:
    """Where each field's label goes: (x, y, w, h) in page pixels, possibly outside the page (a margin is added).

    Tries above, below, right and left of its box, and picks the place covering the least ink and
    no field box or label placed before; inside the page is preferred to the margin.
    """
    ink = (gray < INK_LEVEL).astype(np.uint8)
    integral = cv2.integral(ink)  # (H+1, W+1) sums for O(1) rectangle counts
    boxes = [tuple(int(row[k]) for k in ("x", "y", "width", "height")) for row in fields]
    placed: list[tuple[int, int, int, int]] = []
    for (x, y, w, h), (tw, th) in zip(boxes, sizes):
        corners = [
            (x, y - gap - th), (x + w - tw, y - gap - th), (x, y + h + gap), (x + w - tw, y + h + gap),
            (x + w + gap, y + (h - th) // 2), (x - gap - tw, y + (h - th) // 2),
        ]
        rects = [(cx, cy, tw, th) for cx, cy in corners]
        placed.append(min(rects, key=lambda rect: _label_cost(rect, integral, [*boxes, *placed])))
    return placed


def _label_cost(rect: tuple[int, int, int, int], integral: np.ndarray, obstacles: list[tuple[int, int, int, int]]) -> float:
    """How bad a place for a label is: area over field boxes and other labels, then ink covered, then margin used."""
    cx, cy, tw, th = rect
    H, W = integral.shape[0] - 1, integral.shape[1] - 1
    x0, y0, x1, y1 = max(cx, 0), max(cy, 0), min(cx + tw, W), min(cy + th, H)
    inside = max(0, x1 - x0) * max(0, y1 - y0)
    covered = int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) if inside else 0
    outside = tw * th - inside  # in the margin: legible, but the image grows
    clashes = sum(_overlap(rect, other) for other in obstacles)
    return 100.0 * clashes + 10.0 * covered + 0.01 * outside


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Area shared by two (x, y, w, h) rectangles."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)


def draw_page(gray: np.ndarray, fields: list[dict], digits: list[dict]) -> np.ndarray:
    """A colour copy of ``gray`` with field boxes (green, or red if flagged), digit boxes, and a label per field.

    Args:
        gray: (H, W) uint8 page.
        fields: rows of the fields table for this page.
        digits: rows of the digits table for this page.

    Returns:
        (H', W', 3) uint8 BGR image: the page, with a white margin where labels did not fit on it.
    """
    scale = max(gray.shape) / 2000  # line widths and text that read at any resolution
    thick = max(1, round(2 * scale))
    font_scale = max(0.45, 0.8 * scale)
    text_thick = max(1, round(1.6 * scale))
    labels = [field_label(row) for row in fields]
    sizes, ascents = [], []  # label box (w, h); height above the baseline, where putText's origin is
    for label in labels:
        (tw, th), descent = cv2.getTextSize(label, FONT, font_scale, text_thick)
        sizes.append((tw, th + descent))
        ascents.append(th)
    gap = max(2, round(4 * scale))
    rects = place_labels(gray, fields, sizes, gap)
    H, W = gray.shape
    left = max([0, *(-x for x, _, _, _ in rects)])
    top = max([0, *(-y for _, y, _, _ in rects)])
    right = max([0, *(x + w - W for x, _, w, _ in rects)])
    bottom = max([0, *(y + h - H for _, y, _, h in rects)])
    canvas = cv2.copyMakeBorder(
        cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), top, bottom, left, right, cv2.BORDER_CONSTANT, value=(255, 255, 255)
    )
    for row in digits:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
        cv2.rectangle(canvas, (left + x, top + y), (left + x + w, top + y + h), DIGIT, max(1, thick // 2))
    for row, label, (lx, ly, _, _), ascent in zip(fields, labels, rects, ascents):
        x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
        colour = FLAGGED if row["flagged"] else GOOD
        cv2.rectangle(canvas, (left + x, top + y), (left + x + w, top + y + h), colour, thick)
        cv2.putText(canvas, label, (left + lx, top + ly + ascent), FONT, font_scale, colour, text_thick, cv2.LINE_AA)
    return canvas


def write_jpeg(path: Path, image: np.ndarray) -> None:
    """Write ``image`` as a JPEG file (quality JPEG_QUALITY), atomically. Encoded in memory and written by
    Python, never by ``cv2.imwrite``, which crashes on a path that is not valid UTF-8 (the scan's name is in it).

    Raises:
        OSError: the file cannot be written.
    """
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the page as JPEG")
    with atomic_output(path, "wb") as f:
        f.write(jpeg.tobytes())


def annotation_path(annotate_dir: Path, source: Path, page: int) -> Path:
    """``<stem>-p<page>-<hash>.jpg``: readable, and unique even for same-named files in different folders."""
    tag = hashlib.sha1(str(source).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return Path(annotate_dir) / f"{source.stem}-p{page}-{tag}.jpg"


def annotate_files(readings: list[FileReading], digit_rows: list[dict], field_rows: list[dict], options: Options) -> None:
    """Write an annotated JPEG of every page of ``readings`` into ``options.annotate_dir``.

    Pages are decoded again here (only when annotations are asked for), so workers never ship
    page images back. A page that can no longer be decoded is logged and skipped.

    Raises:
        OutputError: an annotation cannot be written (the run stops: files are never marked done
            without their annotations).
    """
    by_page_fields: dict[tuple[str, int], list[dict]] = defaultdict(list)
    by_page_digits: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in field_rows:
        by_page_fields[(row["file"], row["page"])].append(row)
    for row in digit_rows:
        by_page_digits[(row["file"], row["page"])].append(row)
    out_dir = Path(options.annotate_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the annotation folder ({e.strerror or e})") from None
    for reading in readings:
        try:
            for page in iter_pages(reading.path, pdf_dpi=options.pdf_dpi, max_megapixels=options.max_megapixels):
                key = (str(reading.path), page.index + 1)
                image = draw_page(page.gray, by_page_fields[key], by_page_digits[key])
                target = annotation_path(out_dir, reading.path, page.index + 1)
                try:
                    write_jpeg(target, image)
                except OSError as e:
                    raise OutputError(f"{target}: cannot write the annotation ({e.strerror or e})") from None
        except InputFileError as e:  # it was read a moment ago: changed or removed since
            log.warning("%s: no annotation written (%s)", reading.path, e)
