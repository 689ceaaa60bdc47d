"""Non-digits for training: the wrong cuts a segmenter proposes, normalised as ``process`` normalises digits.

``process`` cuts touching or broken handwriting in several ways and lets the model's confidence choose
(:func:`hwr_batch.segment.choose_reading`). A CNN trained on whole digits only is confident on anything:
the left half of a 4 reads as a 6 at 0.996. Training it to give such fragments a flat distribution
(outlier exposure, Hendrycks et al., ICLR 2019) makes its confidence a usable score for a cut. The
architecture does not change: fragments are trained towards the uniform distribution over the 10 digits.

Three kinds, all built from training digits drawn at field resolution (3x MNIST) and passed through
:func:`hwr_batch.normalise.to_mnist`:

- ``part``: the left or right 20-45 % of one digit's columns (not slices slimmer than a '1');
- ``pair``: two digits side by side, touching or overlapping a little, read as one;
- ``overhang``: a digit with 20-45 % of its neighbour's columns stuck to its side.
"""

from __future__ import annotations

import cv2
import numpy as np

from .normalise import to_mnist

KINDS = ("part", "pair", "overhang")
_UPSCALE = 3  # MNIST digits are 20 px tall; fields are segmented with digits 40-60 px tall


def make_fragments(images: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` fragment images made from ``images``.

    Args:
        images: (N, 28, 28) uint8 MNIST-style digits, white on black.
        count: how many fragments to make (kinds in equal shares).
        rng: the random source.

    Returns:
        (count, 28, 28) float32 in [0, 1], white on black, as :func:`to_mnist` returns.
    """
    out = np.zeros((count, 28, 28), np.float32)
    made = 0
    while made < count:
        kind = KINDS[made % len(KINDS)]
        a = _digit_ink(images[rng.integers(len(images))])
        b = _digit_ink(images[rng.integers(len(images))])
        if kind == "part":
            ink = _part(a, rng)
        elif kind == "pair":
            ink = _side_by_side(a, b, rng.uniform(-0.15, 0.05), rng)
        else:
            w = b.shape[1]
            keep = max(2, round(rng.uniform(0.2, 0.45) * w))
            gap = rng.uniform(-0.1, 0.0)
            if rng.random() < 0.5:  # the neighbour's left edge overhangs on the right of the digit ...
                ink = _side_by_side(a, b[:, :keep], gap, rng)
            else:  # ... or its right edge on the left
                ink = _side_by_side(b[:, w - keep :], a, gap, rng)
        if ink is None or not ink.any():
            continue
        out[made] = to_mnist(ink)
        made += 1
    return out


def _digit_ink(image: np.ndarray) -> np.ndarray:
    """One MNIST digit's ink at field resolution, cropped to its bounding box, float32 in [0, 1]."""
    big = cv2.resize(image, None, fx=_UPSCALE, fy=_UPSCALE, interpolation=cv2.INTER_CUBIC)
    ink = np.clip(big.astype(np.float32) / 255.0, 0.0, 1.0)
    ys, xs = np.nonzero(ink > 0.1)
    return ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _part(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The left or right 20-45 % of a digit's columns, or None for a slice a '1' could be."""
    h, w = ink.shape
    keep = round(rng.uniform(0.2, 0.45) * w)
    if keep < 0.35 * h:  # a slim slice is a '1' in every way the model can see
        return None
    return ink[:, :keep] if rng.random() < 0.5 else ink[:, w - keep :]


def _side_by_side(left: np.ndarray, right: np.ndarray, gap: float, rng: np.random.Generator) -> np.ndarray:
    """Two inks on one baseline (within a tenth of a height), ``gap`` digit heights apart (< 0: overlapping)."""
    h = max(left.shape[0], right.shape[0])
    dx = round(gap * h)
    x_right = max(0, left.shape[1] + dx)
    width = max(left.shape[1], x_right + right.shape[1])
    canvas = np.zeros((h + h // 10 + 1, width), np.float32)
    yl, yr = (int(rng.integers(0, h // 10 + 1)) + h - part.shape[0] for part in (left, right))
    canvas[yl : yl + left.shape[0], : left.shape[1]] = left
    region = canvas[yr : yr + right.shape[0], x_right : x_right + right.shape[1]]
    np.maximum(region, right, out=region)
    return canvas
