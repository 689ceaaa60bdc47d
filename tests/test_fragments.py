"""Non-digit training images: wrong cuts, normalised as digits are."""

from __future__ import annotations

import numpy as np

from hwr_batch.fragments import _part, _side_by_side, make_fragments


def test_fragments_are_mnist_format_images_and_reproducible(mnist_train_small):
    images = mnist_train_small.images
    frags = make_fragments(images, 30, np.random.default_rng(1))
    assert frags.shape == (30, 28, 28) and frags.dtype == np.float32
    assert frags.min() >= 0.0 and frags.max() <= 1.0
    assert all(f.sum() > 10 for f in frags)  # each has real ink
    # MNIST format: the ink's box fits 20x20 (one pixel of anti-aliasing aside).
    for f in frags:
        ys, xs = np.nonzero(f > 0.05)
        assert np.ptp(ys) < 21 and np.ptp(xs) < 21
    np.testing.assert_array_equal(frags, make_fragments(images, 30, np.random.default_rng(1)))
    assert not np.array_equal(frags, make_fragments(images, 30, np.random.default_rng(2)))


def test_a_part_is_a_side_of_the_digit_and_never_a_slim_slice():
    ink = np.ones((60, 80), np.float32)
    rng = np.random.default_rng(0)
    parts = [_part(ink, rng) for _ in range(50)]
    kept = [p for p in parts if p is not None]
    assert kept, "no part was kept"
    for p in kept:
        assert p.shape[0] == 60 and 0.35 * 60 <= p.shape[1] <= 0.45 * 80 + 1
    assert len(kept) < len(parts)  # narrow draws are refused: they would look like a '1'


def test_two_digits_side_by_side_keep_both_inks():
    left = np.ones((50, 30), np.float32)
    right = np.full((40, 20), 0.5, np.float32)
    apart = _side_by_side(left, right, 0.1, np.random.default_rng(0))
    assert apart.shape[1] == 30 + 5 + 20
    assert apart.sum() == left.sum() + right.sum()
    overlapping = _side_by_side(left, right, -0.1, np.random.default_rng(0))
    assert overlapping.shape[1] == 30 - 5 + 20  # overlapping by a tenth of the height
