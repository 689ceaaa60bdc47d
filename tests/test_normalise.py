"""Tests of the MNIST normaliser: MNIST's recipe for clean input, stroke width and slant for real ink."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hwr_batch.normalise import BOX_SIZE, IMAGE_SIZE, INPUT_SHAPE, STROKE_WIDTH, stroke_width_of, to_mnist


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    m = cv2.moments(img.astype(np.float32))
    return m["m01"] / m["m00"], m["m10"] / m["m00"]


def box(img: np.ndarray, level: float = 0.02) -> tuple[int, int]:
    ys, xs = np.nonzero(img > level)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def test_constants():
    assert (IMAGE_SIZE, BOX_SIZE, INPUT_SHAPE) == (28, 20, (28, 28, 1))


@pytest.mark.parametrize(
    "ink", [np.zeros((10, 10), np.uint8), np.zeros((5, 7), np.float32), np.zeros((4, 4), bool)]
)
def test_blank_gives_zeros(ink):
    out = to_mnist(ink)
    assert out.shape == (28, 28) and out.dtype == np.float32 and not out.any()


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        to_mnist(np.zeros((2, 3, 3)))


def test_mnist_digits_keep_mnist_geometry(mnist_test_small):
    for img in mnist_test_small.images[:50]:
        out = to_mnist(img)
        assert out.shape == (28, 28) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        cy, cx = centre_of_mass(out)
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
        assert max(box(out)) == 20


def test_mnist_digits_stay_nearly_unchanged(mnist_test_small):
    """Clean MNIST input is left (almost) as MNIST made it: same strokes, small slant correction only."""
    diffs = [
        np.abs(to_mnist(img) - img.astype(np.float32) / 255).mean() for img in mnist_test_small.images[:100]
    ]
    assert np.median(diffs) < 0.05
    plain = [
        np.abs(to_mnist(img, stroke_width=None, deslant=0) - img / 255).mean()
        for img in mnist_test_small.images[:100]
    ]
    assert np.median(plain) < 0.01


def test_input_types_agree():
    ink = np.zeros((40, 30), np.uint8)
    cv2.ellipse(ink, (15, 20), (10, 16), 0, 0, 360, 255, 4)
    a = to_mnist(ink)
    b = to_mnist(ink.astype(np.float32) / 255)
    c = to_mnist(ink > 127)
    assert np.allclose(a, b, atol=1e-5) and np.allclose(a, c, atol=1e-5)


def test_thin_strokes_are_thickened():
    ink = np.zeros((200, 140), np.float32)
    cv2.ellipse(ink, (70, 100), (60, 90), 0, 0, 360, 1.0, 1)  # a hairline zero, 1 px at ~10x MNIST scale
    out = to_mnist(ink)
    assert 0.6 * STROKE_WIDTH <= stroke_width_of(out > 0.5) <= 1.5 * STROKE_WIDTH
    assert (
        stroke_width_of(to_mnist(ink, stroke_width=None) > 0.5) < 0.6 * STROKE_WIDTH
        or not (to_mnist(ink, stroke_width=None) > 0.5).any()
    )


def test_thick_strokes_are_thinned():
    ink = np.zeros((30, 24), np.float32)
    cv2.ellipse(ink, (12, 15), (9, 12), 0, 0, 360, 1.0, 6)  # felt pen: strokes ~1/4 of the digit
    out = to_mnist(ink, deslant=0)
    assert stroke_width_of(out > 0.5) <= 1.4 * STROKE_WIDTH
    assert stroke_width_of(to_mnist(ink, stroke_width=None, deslant=0) > 0.5) > 1.5 * STROKE_WIDTH
    assert box(out)[0] == 20  # the hole stays open, the box is MNIST's


def test_a_one_stays_narrow():
    ink = np.zeros((60, 6), np.float32)
    ink[:, 2:4] = 1.0
    out = to_mnist(ink)
    h, w = box(out, 0.3)
    assert h >= 19 and w <= 5
    cy, cx = centre_of_mass(out)
    assert abs(cx - 14) <= 0.5 + 1e-6 and abs(cy - 14) <= 0.5 + 1e-6  # MNIST shifts by whole pixels


def test_slant_is_reduced():
    ink = np.zeros((60, 40), np.float32)
    cv2.line(ink, (30, 2), (10, 57), 1.0, 3)  # a '1' leaning right
    out = to_mnist(ink)
    straight = to_mnist(ink, deslant=0)
    assert box(out, 0.3)[1] < box(straight, 0.3)[1]


def test_mnist_accuracy_after_renormalising(mnist_dir):
    """The shipped model reads MNIST test digits run through to_mnist as well as the originals (1,000 digits)."""
    import os
    from pathlib import Path

    from conftest import SHIPPED_ONNX

    from hwr_batch.classify import load_classifier, predict_proba
    from hwr_batch.mnist import load_mnist

    model = Path(os.environ.get("HWR_BATCH_MODEL") or SHIPPED_ONNX)
    if not model.is_file():
        pytest.skip(f"no model at {model}")
    test = load_mnist("test", mnist_dir, verify=False)
    images, labels = test.images[:1000], test.labels[:1000]
    clf = load_classifier(model)
    raw = (predict_proba(clf, images).argmax(1) == labels).mean()
    renorm = (predict_proba(clf, np.stack([to_mnist(i) for i in images])).argmax(1) == labels).mean()
    assert renorm >= raw - 0.005
