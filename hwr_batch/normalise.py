"""Normalise a digit crop to the MNIST format: 20x20 box, centre of mass at the centre of 28x28.

Besides MNIST's own recipe (bounding box scaled to 20 px keeping the aspect ratio, anti-aliased,
centre of mass moved to the centre), :func:`to_mnist` brings the stroke width near MNIST's: real
scans have strokes that are far thinner (fine pens on big digits) or thicker (felt pens on small
digits) than MNIST's once scaled to a 20 px box, and an MNIST-trained model reads those badly.
"""

from __future__ import annotations

import cv2
import numpy as np

IMAGE_SIZE = 28  # MNIST images are 28x28 ...
BOX_SIZE = 20  # ... with the digit's bounding box scaled to fit 20x20
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
DIGIT_LABELS = "0123456789"
LETTER_LABELS = "abcdefghijklmnopqrstuvwxyz"

STROKE_WIDTH = 2.2  # median MNIST stroke width (px, 28x28 frame, ink > 0.5), measured as 2 * area / perimeter
STROKE_TOLERANCE = (0.8, 1.3)  # widths within these factors of the target are left alone
_UPSAMPLE = 4  # stroke width is adjusted at this multiple of the final resolution


def to_mnist(ink: np.ndarray, *, stroke_width: float | None = STROKE_WIDTH) -> np.ndarray:
    """Turn one digit's ink into an MNIST-style image.

    Follows how MNIST was made: the digit's bounding box is scaled (anti-aliased) so that its
    longer side is 20 px, keeping the aspect ratio (a thin '1' stays thin), then placed in a 28x28
    image so that its centre of mass lies at the centre. If the stroke width at that scale is far
    from MNIST's, the strokes are thickened or thinned (at 4x the final resolution, then reduced
    with area averaging, which gives MNIST-like soft edges). Clean MNIST-like input is left as is.

    Args:
        ink: (H, W) array, ink bright on a dark background: uint8 in [0, 255], bool, or float in [0, 1].
        stroke_width: target stroke width in px of the 28x28 image; None keeps the input's strokes.

    Returns:
        (28, 28) float32 in [0, 1], white ink on black. All zeros if ``ink`` has no ink.
    """
    ink = _as_float(ink)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    crop = _ink_bbox_crop(ink)
    if crop is None:
        return out
    if stroke_width is not None:
        crop = _fix_stroke_width(crop, stroke_width)
        if crop is None:
            return out
    h, w = crop.shape
    scale = BOX_SIZE / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = np.clip(cv2.resize(crop, (new_w, new_h), interpolation=interpolation), 0, 1)
    total = small.sum()
    if total <= 0:
        return out
    yy, xx = np.mgrid[0:new_h, 0:new_w]
    cy, cx = (yy * small).sum() / total, (xx * small).sum() / total
    # Shift so the centre of mass lands on (14, 14), keeping the whole box inside the image.
    top = int(np.clip(round(IMAGE_SIZE / 2 - cy), 0, IMAGE_SIZE - new_h))
    left = int(np.clip(round(IMAGE_SIZE / 2 - cx), 0, IMAGE_SIZE - new_w))
    out[top : top + new_h, left : left + new_w] = small
    return out


def stroke_width_of(mask: np.ndarray) -> float:
    """Mean stroke width of a binary shape in px, estimated as 2 * area / perimeter (0 if empty)."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    area = float(np.count_nonzero(m))
    if area == 0:
        return 0.0
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    return 2.0 * area / max(perimeter, 1.0)


def _ink_bbox_crop(ink: np.ndarray) -> np.ndarray | None:
    """The part of ``ink`` inside the bounding box of its ink, or None if there is none."""
    rows, cols = np.nonzero(ink > 0.02)
    if rows.size == 0:
        return None
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _fix_stroke_width(crop: np.ndarray, target: float) -> np.ndarray | None:
    """Re-draw ``crop`` at 4x the final scale with strokes near ``target`` px (final scale) wide.

    Returns the crop unchanged when its strokes are already close to the target.
    """
    h, w = crop.shape
    up = _UPSAMPLE * BOX_SIZE / max(h, w)
    big_w, big_h = max(1, round(w * up)), max(1, round(h * up))
    interpolation = cv2.INTER_AREA if up < 1 else cv2.INTER_LINEAR
    big = cv2.resize(crop, (big_w, big_h), interpolation=interpolation)
    mask = (big > 0.5).astype(np.uint8)
    width = stroke_width_of(mask) / _UPSAMPLE
    if width <= 0:
        return crop
    low, high = STROKE_TOLERANCE
    if low * target <= width <= high * target:
        return crop
    radius = round((target - width) * _UPSAMPLE / 2)
    if radius == 0:
        return crop
    pad = abs(radius) + 1
    mask = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate(mask, kernel)
    else:
        area = np.count_nonzero(mask)
        for r in range(-radius, 0, -1):  # thin as far as possible without erasing the digit
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            thinned = cv2.erode(mask, kernel)
            if np.count_nonzero(thinned) >= 0.3 * area and _n_parts(thinned) <= _n_parts(mask):
                mask = thinned
                break
    shape = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), _UPSAMPLE / 3)
    return _ink_bbox_crop(shape)


def _n_parts(mask: np.ndarray) -> int:
    """Number of 8-connected parts of a binary mask."""
    return cv2.connectedComponents(mask, connectivity=8)[0] - 1


def _as_float(ink: np.ndarray) -> np.ndarray:
    """Ink as float32 in [0, 1]."""
    if ink.ndim != 2:
        raise ValueError(f"ink must be a 2-D (H, W) array, got shape {ink.shape}")
    if ink.dtype == bool:
        return ink.astype(np.float32)
    if np.issubdtype(ink.dtype, np.integer):
        return ink.astype(np.float32) / 255.0
    return np.clip(ink.astype(np.float32), 0.0, 1.0)
