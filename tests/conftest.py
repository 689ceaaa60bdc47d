"""Shared fixtures: where the test data and the shipped model are, and how to run the CLI.

Tests that need the full MNIST files or the real scans find them through environment variables
(HWR_BATCH_TEST_DATA: the folder holding mnist/ and real/) or beside the repository at
../shared/data, and skip with the reason when they are absent. Everything else uses the small
fixtures in tests/fixtures, so the suite passes in a fresh clone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hwr_batch.mnist import LabelledImages, load_idx_pair

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHIPPED_ONNX = REPO / "models" / "hwr-digits.onnx"


def shared_data_dir() -> Path:
    """Folder with the full data sets: $HWR_BATCH_TEST_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("HWR_BATCH_TEST_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The full, original MNIST files; skips the test where they are absent."""
    path = shared_data_dir() / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"full MNIST not found at {path} (set HWR_BATCH_TEST_DATA to the folder holding mnist/)")
    return path


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real scans with ground truth; skips the test where they are absent."""
    path = Path(os.environ.get("HWR_BATCH_REAL_DATA") or shared_data_dir() / "real")
    if not (path / "orand_car_a" / "truth.csv").is_file():
        pytest.skip(f"real scans not found at {path} (set HWR_BATCH_REAL_DATA or HWR_BATCH_TEST_DATA)")
    return path


def fixture_idx(split: str) -> tuple[Path, Path]:
    """The small IDX fixture pair: 600 MNIST training or 300 MNIST test digits, gzipped IDX like the originals."""
    count = {"train": 600, "test": 300}[split]
    return (
        FIXTURES / f"mnist-{split}-{count}-images-idx3-ubyte.gz",
        FIXTURES / f"mnist-{split}-{count}-labels-idx1-ubyte.gz",
    )


@pytest.fixture(scope="session")
def mnist_test_small() -> LabelledImages:
    """The first 300 MNIST test digits (ships with the tests)."""
    return load_idx_pair(*fixture_idx("test"))


@pytest.fixture(scope="session")
def mnist_train_small() -> LabelledImages:
    """The first 600 MNIST training digits (ships with the tests)."""
    return load_idx_pair(*fixture_idx("train"))


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The trained model in models/: it ships with the repository, so its absence is a failure."""
    assert SHIPPED_ONNX.is_file(), f"the shipped model {SHIPPED_ONNX} is missing"
    return SHIPPED_ONNX


@pytest.fixture
def cli():
    """Run the real `hwr-batch` command line in a subprocess; returns the CompletedProcess."""

    def run(*args: str | os.PathLike, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "hwr_batch", *map(str, args)],
            check=False,  # the tests look at the exit code
            cwd=cwd,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def digit_strip(data: LabelledImages, indices: list[int], *, height: int = 48, gap: int = 10) -> np.ndarray:
    """A field crop as a scanner would give it: the MNIST digits ``indices`` written left to right,
    dark ink on light paper, ``height`` px tall. Returns (H, W) uint8."""
    import cv2

    pieces = []
    for i in indices:
        ink = data.images[i]
        rows, cols = np.nonzero(ink > 20)
        ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        scale = height / ink.shape[0]
        pieces.append(cv2.resize(ink, (max(1, round(ink.shape[1] * scale)), height), interpolation=cv2.INTER_CUBIC))
    width = sum(p.shape[1] for p in pieces) + gap * (len(pieces) + 1)
    strip = np.zeros((height + 2 * gap, width), np.uint8)
    x = gap
    for piece in pieces:
        strip[gap : gap + height, x : x + piece.shape[1]] = piece
        x += piece.shape[1] + gap
    return (235 - strip.astype(np.int32) * 215 // 255).astype(np.uint8)  # ink ~20 on paper 235


@pytest.fixture(scope="session")
def confident_digits(mnist_test_small, shipped_model) -> dict[int, list[int]]:
    """Indices of fixture test digits the shipped model reads right with confidence > 0.99, per class.

    Tests about plumbing (crash safety, bad input) use these, so that what they check is the
    plumbing and not the model's hard cases.
    """
    from hwr_batch.classify import load_classifier, predict_proba
    from hwr_batch.normalise import to_mnist

    classifier = load_classifier(shipped_model)
    raw = predict_proba(classifier, mnist_test_small.images)
    # ... and read right again after the scan-and-normalise round trip the pipeline makes.
    # (Ink is the darkness below the paper's 235, as the segmenter measures it: paper is black in MNIST format.)
    rescanned = np.stack(
        [to_mnist(np.clip(235 - digit_strip(mnist_test_small, [i]).astype(np.int16), 0, 255).astype(np.uint8))
         for i in range(len(mnist_test_small))]
    )
    again = predict_proba(classifier, rescanned)
    good: dict[int, list[int]] = {d: [] for d in range(10)}
    for i, label in enumerate(mnist_test_small.labels):
        if all(p.argmax() == label and p.max() > 0.99 for p in (raw[i], again[i])):
            good[int(label)].append(i)
    return good


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs: ``tmpfs(folder, size="1m", read_only=False)``; unmounted after the test.

    A real full disk or read-only file system, as a share or a backup disk gives them. Needs root
    (the suite runs as root in CI); skips the test where mounting is not allowed.
    """
    mounted = []

    def mount(folder: Path, *, size: str = "1m", read_only: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=False, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
