"""Draw what was read onto each page, for checking results by eye (``process --annotate DIR``)."""

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
    from .pipeline import FileReading

log = logging.getLogger(__name__)

GOOD = (40, 160, 40)  # BGR: fields read with confidence
FLAGGED = (0, 0, 220)  # fields a person should check
DIGIT = (200, 90, 0)


def draw_page(gray: np.ndarray, fields: list[dict], digits: list[dict]) -> np.ndarray:
    """A colour copy of ``gray`` with field boxes (green, or red if flagged), digit boxes and the digits read.

    Args:
        gray: (H, W) uint8 page.
        fields: rows of the fields table for this page.
        digits: rows of the digits table for this page.

    Returns:
        (H, W, 3) uint8 BGR image.
    """
    canvas = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    scale = max(gray.shape) / 2000  # line widths and text that read at any resolution
    thick = max(1, round(2 * scale))
    for row in digits:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
        cv2.rectangle(canvas, (x, y), (x + w, y + h), DIGIT, max(1, thick // 2))
    for row in fields:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
        colour = FLAGGED if row["flagged"] else GOOD
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thick)
        label = str(row["digits"]) or "?"
        origin = (x, max(int(20 * scale), y - int(6 * scale)))
        cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale, colour, thick, cv2.LINE_AA)
    return canvas


def write_png(path: Path, image: np.ndarray) -> None:
    """Write ``image`` as a PNG file, atomically. Encoded in memory and written by Python, never by
    ``cv2.imwrite``, which crashes on a path that is not valid UTF-8 (the name of the scan is in it).

    Raises:
        OSError: the file cannot be written.
    """
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the page as PNG")
    with atomic_output(path, "wb") as f:
        f.write(png.tobytes())


def annotation_path(annotate_dir: Path, source: Path, page: int) -> Path:
    """``<stem>-p<page>-<hash>.png``: readable, and unique even for same-named files in different folders."""
    tag = hashlib.sha1(str(source).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return Path(annotate_dir) / f"{source.stem}-p{page}-{tag}.png"


def annotate_files(readings: list[FileReading], digit_rows: list[dict], field_rows: list[dict], options: Options) -> None:
    """Write an annotated PNG of every page of ``readings`` into ``options.annotate_dir``.

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
                    write_png(target, image)
                except OSError as e:
                    raise OutputError(f"{target}: cannot write the annotation ({e.strerror or e})") from None
        except InputFileError as e:  # it was read a moment ago: changed or removed since
            log.warning("%s: no annotation written (%s)", reading.path, e)
