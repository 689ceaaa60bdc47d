"""Normalise a digit crop to the MNIST format: 20x20 box, centre of mass at the centre of 28x28.

Besides MNIST's own recipe (bounding box scaled to 20 px keeping the aspect ratio, anti-aliased,
centre of mass moved to the centre), :func:`to_mnist` brings the stroke width near MNIST's: real
scans have strokes that are far thinner (fine pens on big digits) or thicker (felt pens on small
digits) than MNIST's once scaled to a 20 px box, and an MNIST-trained model reads those badly.
It also removes most of a digit's slant. Both steps leave clean MNIST digits (almost) unchanged:
MNIST test digits run through :func:`to_mnist` are read as well as the originals.
"""

from __future__ import annotations

import cv2
import numpy as np

IMAGE_SIZE = 28  # MNIST images are 28x28 ...
BOX_SIZE = 20  # ... with the digit's bounding box scaled to fit 20x20
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)

STROKE_WIDTH = 2.2  # median MNIST stroke width (px, 28x28 frame, ink > 0.5), measured as 2 * area / perimeter
STROKE_TOLERANCE = (0.7, 1.5)  # widths within these factors of the target are left alone
_UPSAMPLE = 4  # stroke width is adjusted at this multiple of the final resolution
DESLANT = 0.75  # fraction of a digit's slant (from its second moments) that is removed


def to_mnist(
    ink: np.ndarray, *, stroke_width: float | None = STROKE_WIDTH, deslant: float = DESLANT
) -> np.ndarray:
    """Turn one digit's ink into an MNIST-style image.

    Follows how MNIST was made: the digit's bounding box is scaled (anti-aliased) so that its
    longer side is 20 px, keeping the aspect ratio (a thin '1' stays thin), then placed in a 28x28
    image so that its centre of mass lies at the centre. If the stroke width at that scale is far
    from MNIST's, the strokes are thickened or thinned (grey-level dilation or erosion at 4x the
    final resolution, then area averaging: soft, MNIST-like edges). Strokes within STROKE_TOLERANCE
    of the target are left as they are, so clean MNIST-like input keeps its strokes.

    Args:
        ink: (H, W) array, ink bright on a dark background: uint8 in [0, 255], bool, or float in [0, 1].
        stroke_width: target stroke width in px of the 28x28 image; None keeps the input's strokes.
        deslant: fraction of the digit's slant to remove (shear from its second moments); 0 keeps it.
            Three quarters by default: MNIST digits lean too, but slanted handwriting reads better
            mostly straightened.

    Returns:
        (28, 28) float32 in [0, 1], white ink on black. All zeros if ``ink`` has no ink.
    """
    ink = _as_float(ink)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    crop = _ink_bbox_crop(ink)
    if crop is None:
        return out
    if deslant:
        crop = _deslant(crop, deslant)
    if stroke_width is not None:
        crop = _fix_stroke_width(crop, stroke_width)
        if crop is None:
            return out
    h, w = crop.shape
    scale = BOX_SIZE / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = np.clip(cv2.resize(crop, (new_w, new_h), interpolation=interpolation), 0, 1)
    total = float(small.sum())
    if total <= 0:
        return out
    cy = float(small.sum(axis=1) @ np.arange(new_h)) / total
    cx = float(small.sum(axis=0) @ np.arange(new_w)) / total
    # Shift so the centre of mass lands on (14, 14), keeping the whole box inside the image.
    top = int(np.clip(round(IMAGE_SIZE / 2 - cy), 0, IMAGE_SIZE - new_h))
    left = int(np.clip(round(IMAGE_SIZE / 2 - cx), 0, IMAGE_SIZE - new_w))
    out[top : top + new_h, left : left + new_w] = small
    return out


def _deslant(crop: np.ndarray, fraction: float) -> np.ndarray:
    """Shear ``crop`` so that ``fraction`` of its slant (from its second moments) is removed."""
    # (Not cv2.moments: it takes an (N, 2) array for a contour.)
    total = float(crop.sum())
    if total <= 0:
        return crop
    h, w = crop.shape
    dy = np.arange(h, dtype=np.float32) - float(crop.sum(axis=1) @ np.arange(h)) / total
    dx = np.arange(w, dtype=np.float32) - float(crop.sum(axis=0) @ np.arange(w)) / total
    mu02 = float(crop.sum(axis=1) @ (dy * dy))
    if mu02 <= 0:
        return crop
    cy = float(crop.sum(axis=1) @ np.arange(h)) / total
    slant = float(dy @ crop @ dx) / mu02  # x change per row down
    shear = -fraction * slant
    if abs(shear * h) < 0.5:
        return crop
    pad = int(np.ceil(abs(shear) * h)) + 1
    matrix = np.float32([[1, shear, pad - shear * cy], [0, 1, 0]])
    sheared = cv2.warpAffine(crop, matrix, (w + 2 * pad, h), flags=cv2.INTER_LINEAR)
    return _ink_bbox_crop(sheared) if sheared.max() > 0.02 else crop


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
    x, y, w, h = cv2.boundingRect((ink > 0.02).astype(np.uint8))
    if w == 0 or h == 0:
        return None
    return ink[y : y + h, x : x + w]


def _fix_stroke_width(crop: np.ndarray, target: float) -> np.ndarray | None:
    """Re-draw ``crop`` at 4x the final scale with strokes near ``target`` px (final scale) wide.

    Returns the crop unchanged when its strokes are already close to the target.
    """
    h, w = crop.shape
    low, high = STROKE_TOLERANCE
    # Cheap first look at the crop's own resolution; most crops need nothing more.
    width = stroke_width_of(crop > 0.5 * float(crop.max())) * BOX_SIZE / max(h, w)
    if width <= 0 or low * target <= width <= high * target:
        return crop
    up = _UPSAMPLE * BOX_SIZE / max(h, w)
    big_w, big_h = max(1, round(w * up)), max(1, round(h * up))
    interpolation = cv2.INTER_AREA if up < 1 else cv2.INTER_LINEAR
    big = cv2.resize(crop, (big_w, big_h), interpolation=interpolation)
    mask = (big > 0.5 * max(float(big.max()), 1e-6)).astype(np.uint8)  # hairlines fade when reduced
    width = stroke_width_of(mask) / _UPSAMPLE
    if width <= 0 or low * target <= width <= high * target:
        return crop
    radius = round((target - width) * _UPSAMPLE / 2)
    if radius == 0:
        return crop
    # Grey-level dilation / erosion at 4x keeps the soft edges of the ink.
    pad = abs(radius) + 1
    grey = np.clip(big / max(float(big.max()), 1e-6), 0, 1).astype(np.float32)  # hairlines fade when reduced
    grey = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(radius) + 1, 2 * abs(radius) + 1))
    if radius > 0:
        grey = cv2.dilate(grey, kernel)
    else:
        thinned = cv2.erode(grey, kernel)
        if np.count_nonzero(thinned > 0.5) >= 0.3 * np.count_nonzero(grey > 0.5):  # do not erase the digit
            grey = thinned
    return _ink_bbox_crop(grey)


def _as_float(ink: np.ndarray) -> np.ndarray:
    """Ink as float32 in [0, 1]."""
    if ink.ndim != 2:
        raise ValueError(f"ink must be a 2-D (H, W) array, got shape {ink.shape}")
    if ink.dtype == bool:
        return ink.astype(np.float32)
    if np.issubdtype(ink.dtype, np.integer):
        return ink.astype(np.float32) / 255.0
    return np.clip(ink.astype(np.float32), 0.0, 1.0)
