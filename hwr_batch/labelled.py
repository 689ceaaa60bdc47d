"""Labelled real fields: folders of field crops with a ``truth.csv`` (image, digits), segmented for training.

A truth folder holds field images and a ``truth.csv`` whose ``image`` column is a path relative to the
folder and whose ``digits`` column is the field's digit string (the layout of the real sets in
``../shared/data/real/``; a ``digits_only`` column, where present, marks labels that are not digits only).
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .align import SegmentedField, segment_labelled
from .errors import DatasetError
from .normalise import IMAGE_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledCrop:
    """One field image on disk and the digits it holds."""

    path: Path
    digits: str


def read_truth_folder(folder: Path) -> list[LabelledCrop]:
    """The digits-only rows of a truth folder's ``truth.csv``, in file order.

    Raises:
        DatasetError: no ``truth.csv``, or it lacks the ``image`` and ``digits`` columns.
    """
    folder = Path(folder)
    truth = folder / "truth.csv"
    try:
        with open(truth, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DatasetError(f"{truth}: cannot read the labels ({e.strerror or e})") from None
    if rows and not {"image", "digits"} <= set(rows[0]):
        raise DatasetError(f"{truth}: needs the columns image and digits, has {', '.join(rows[0])}")
    return [
        LabelledCrop(folder / row["image"], row["digits"].strip())
        for row in rows
        if row.get("digits_only", "yes") == "yes" and row["digits"].strip().isdigit()
    ]


def segment_crops(crops: Sequence[LabelledCrop], *, jobs: int = 1) -> list[SegmentedField | None]:
    """Segment every crop (None where the image cannot be read), in ``jobs`` processes."""
    if jobs <= 1 or len(crops) < 64:
        return [_segment_crop(c) for c in crops]
    context = multiprocessing.get_context("forkserver")
    with context.Pool(jobs, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        return pool.map(_segment_crop, crops, chunksize=64)


def cached_segmentation(
    crops: Sequence[LabelledCrop], cache: Path | None, *, jobs: int = 1
) -> list[SegmentedField | None]:
    """:func:`segment_crops`, kept in a pickle file so that repeated runs segment once.

    The cache is keyed by the crops' paths and labels and by the segmenter's source code, so an edit to
    the segmenter or the normaliser invalidates it.
    """
    key = _cache_key(f"{crop.path}\t{crop.digits}" for crop in crops)
    return _cached(cache, key, lambda: segment_crops(crops, jobs=jobs))


def cached_form_fields(digits, pages: int, cache: Path | None, *, seed: int = 0) -> list[SegmentedField]:
    """:func:`generated_form_fields`, kept in a pickle file keyed like :func:`cached_segmentation`."""
    key = _cache_key([f"generated forms: {pages} pages, seed {seed}, digits {digits.source} ({len(digits)})"])
    return _cached(cache, key, lambda: generated_form_fields(digits, pages, seed=seed))


def _cached(cache: Path | None, key: str, compute):
    """``compute()``, or what an earlier call stored in ``cache`` under the same ``key``."""
    if cache is not None and cache.is_file():
        with open(cache, "rb") as f:
            stored_key, value = pickle.load(f)
        if stored_key == key:
            return value
    value = compute()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump((key, value), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(cache)
    return value


def _segment_crop(crop: LabelledCrop) -> SegmentedField | None:
    gray = cv2.imread(str(crop.path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        log.warning("%s: cannot read the image; left out", crop.path)
        return None
    return segment_labelled(gray, crop.digits, key=str(crop.path))


def _init_worker(main_pid: int) -> None:
    """Single-threaded (the parallelism is across crops), and gone when the main process is, even after a SIGKILL."""
    from ._lifeline import exit_when_gone

    exit_when_gone(main_pid)
    cv2.setNumThreads(1)


def _cache_key(lines: Iterable[str]) -> str:
    """A digest of the segmenter's and normaliser's source code and of ``lines`` (what was segmented)."""
    import hashlib

    from . import normalise, segment

    digest = hashlib.sha256()
    for module in (segment, normalise):
        digest.update(Path(module.__file__).read_bytes())
    for line in lines:
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()


def stack_images(fields: Sequence[SegmentedField]) -> tuple[np.ndarray, np.ndarray]:
    """All candidates of many fields in one (N, 28, 28) uint8 stack, and each field's first index."""
    counts = [len(f.images) for f in fields]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    images = np.concatenate([f.images for f in fields]) if fields else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return images, starts


def generated_form_fields(
    digits, pages: int, *, seed: int = 0, min_iou: float = 0.5
) -> list[SegmentedField]:
    """Labelled fields from generated form pages (:mod:`hwr_batch.synth`), read as ``process`` reads them.

    Each page is laid out by the product's own layout step; every found field that matches a drawn
    field (box IoU >= ``min_iou``) is segmented and labelled with the drawn digits. Train with pages
    drawn from MNIST's *training* digits, so that the generated-forms score (test digits) stays clean.
    """
    from .layout import analyse_page, box_iou
    from .segment import field_image, segmenting_scale
    from .synth import make_form

    fields = []
    for k in range(pages):
        rng = np.random.default_rng([seed, k])
        page, truth = make_form(rng, digits, dpi=int(rng.integers(200, 301)))
        layout = analyse_page(page, dpi=truth["dpi"])
        scale = segmenting_scale(layout)
        for number, found in enumerate(layout.fields, start=1):
            best = max(truth["fields"], key=lambda t: box_iou(t["bbox"], found.bbox), default=None)
            if best is None or box_iou(best["bbox"], found.bbox) < min_iou or not best["text"]:
                continue
            fields.append(segment_labelled(field_image(found, scale), best["text"], key=f"form{seed}-{k}#{number}"))
    return fields
