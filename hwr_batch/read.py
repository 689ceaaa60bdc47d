"""Reading files in worker processes: decode, lay out, segment and normalise every page of a file.

This is the CPU work on one file that the batch spreads over worker processes (:func:`iter_readings`);
what comes back (a :class:`FileReading`) holds the candidate digits of every field, normalised and
ready to be classified in large batches in the main process.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import cv2
import numpy as np

from .config import Options
from .errors import HwrError
from .layout import analyse_page, choose_dpi, shrink_by
from .load import iter_pages
from .normalise import IMAGE_SIZE, to_mnist
from .segment import FieldCandidates, field_image, segment_field_candidates, segmenting_scale
from .template import Template, best_registration, to_template_frame

log = logging.getLogger("hwr_batch.pipeline")  # the run's logger, named as before this module split off

STAGES = ("load", "layout", "segment", "normalise", "classify", "write")


@dataclass(frozen=True)
class FieldReading:
    """One field of a page, segmented, waiting for classification.

    Attributes:
        bbox: (x, y, w, h) of the field in page pixels.
        origin: page coordinates of the field image's (0, 0), to place digit boxes on the page.
        kind: layout kind (``box``, ``line``, ``whole``).
        candidates: candidate digits (ink dropped: only boxes and cut structure are kept).
        first: index of this field's first candidate in the file's ``images`` stack.
        cells: a comb's cells as (x0, x1) column ranges in the candidates' coordinates (empty: not a comb).
    """

    bbox: tuple[int, int, int, int]
    origin: tuple[int, int]
    kind: str
    candidates: FieldCandidates
    first: int
    cells: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class PageReading:
    """The fields of one page.

    Attributes:
        dpi: the resolution the page was read at (from the file, or guessed from its size).
        blank: ``"blank"`` or ``"all black"`` for a page of one tone (a dead scan), else ``""``.
    """

    index: int
    fields: tuple[FieldReading, ...]
    shape: tuple[int, int]
    skew_degrees: float
    dpi: float = 0.0
    blank: str = ""


@dataclass
class FileReading:
    """Everything read from one file before classification.

    Attributes:
        path: the input file.
        pages: its pages, in order (possibly fewer than the file has, if one failed).
        images: (N, 28, 28) float32: every candidate digit of every field, normalised.
        error: (stage, reason) if the file could not be read completely.
        seconds: time spent per stage.
        notes: things the main process should log (a resolution tag ignored, per page).
        error_page: the 1-based page the error is on (None: the file as a whole).
        scores: the model's label probabilities (N, labels) and "not a digit" probabilities (N,) of the
            candidates, when they were classified where the file was read (a Dask worker, see
            :mod:`hwr_batch.cluster`); ``images`` is then empty, as they are not needed any more.
        forms: with templates (``process --template``): its pages registered to them (None: no templates).
    """

    path: Path
    pages: list[PageReading] = field(default_factory=list)
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32))
    error: tuple[str, str] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error_page: int | None = None
    scores: tuple[np.ndarray, np.ndarray] | None = None
    forms: FormPages | None = None

    @property
    def candidates(self) -> int:
        """The number of candidate digits read from the file (rows of ``images``, or of ``scores``)."""
        return len(self.images) if self.scores is None else len(self.scores[0])


@dataclass
class FormPages:
    """A file's pages registered to the run's templates (see :mod:`hwr_batch.template`).

    Attributes:
        matched: (1-based page, name of the template it fits best, or None: it fits none) per page.
        reading: the pages that fit, each in its template's frame (upright, the template's size) and read
            as boxes, with their candidates: classified as a file's (:func:`hwr_batch.rows.classify_readings`).
    """

    matched: list[tuple[int, str | None]]
    reading: FileReading


_DEFAULTS = Options(inputs=())


@dataclass(frozen=True)
class ReadSettings:
    """The options a worker needs to read a file (small and picklable): those of :class:`~hwr_batch.config.Options`
    of the same names, with the same defaults."""

    field_mode: str = _DEFAULTS.field_mode
    pdf_dpi: int = _DEFAULTS.pdf_dpi
    max_megapixels: float = _DEFAULTS.max_megapixels
    dpi: float | None = _DEFAULTS.dpi  # resolution of every scan (not PDF), whatever its tag says
    templates: tuple[Template, ...] = ()  # loaded from Options.templates: register each page to them

    @classmethod
    def of(cls, options: Options, templates: tuple[Template, ...] = ()) -> ReadSettings:
        """The settings of ``options``; ``templates``: those ``options.templates`` names, loaded
        (:func:`hwr_batch.template.load_templates`)."""
        names = [f.name for f in dataclass_fields(cls) if f.name != "templates"]
        return cls(**{name: getattr(options, name) for name in names}, templates=tuple(templates))


def read_file(path: Path, settings: ReadSettings = ReadSettings()) -> FileReading:
    """Decode, lay out, segment and normalise every page of a file. Never raises for bad input.

    A file that cannot be read comes back with ``error`` set to (stage, reason); pages read before
    the failure are dropped too, so a file is either read whole or reported.
    """
    reading = FileReading(Path(path))
    seconds = dict.fromkeys(STAGES[:4], 0.0)
    images: list[np.ndarray] = []
    forms = FormPages([], FileReading(Path(path)))
    form_images: list[np.ndarray] = []
    stage = "load"
    try:
        pages = iter_pages(path, pdf_dpi=settings.pdf_dpi, max_megapixels=settings.max_megapixels)
        while True:
            stage, started = "load", time.perf_counter()
            page = next(pages, None)
            seconds["load"] += time.perf_counter() - started
            if page is None:
                break
            stage = "layout"
            dpi = page.dpi if page.rendered else settings.dpi
            if dpi is None:
                dpi, why = choose_dpi(page.dpi, page.gray.shape)
                if why:
                    reading.notes.append(f"page {page.index + 1}: {why} (--dpi sets it)")
            page_reading = _read_page(page.gray, page.index, dpi, settings, images, seconds)
            if settings.templates:  # before the page counts as read: a failure here is on this page
                forms.matched.append((page.index + 1, _read_form_page(page.gray, page.index, dpi, settings.templates,
                                                                      forms.reading.pages, form_images, seconds)))
            reading.pages.append(page_reading)
    except HwrError as e:
        page_number = _failed_page(stage, str(e), len(reading.pages))
        return FileReading(Path(path), error=(stage, str(e)), seconds=seconds, notes=reading.notes, error_page=page_number)
    except Exception as e:  # a bug or an image that breaks OpenCV: report the file, keep the run going
        log.debug("%s: unexpected error in %s", path, stage, exc_info=True)
        reason = f"{path}: {type(e).__name__}: {e}"
        page_number = _failed_page(stage, reason, len(reading.pages))
        return FileReading(Path(path), error=(stage, reason), seconds=seconds, error_page=page_number)
    if images:
        reading.images = np.stack(images)
    if settings.templates:
        if form_images:
            forms.reading.images = np.stack(form_images)
        reading.forms = forms
    reading.seconds = seconds
    return reading


def _read_form_page(
    gray: np.ndarray,
    index: int,
    dpi: float,
    templates: tuple[Template, ...],
    pages: list[PageReading],
    images: list[np.ndarray],
    seconds: dict[str, float],
) -> str | None:
    """Register a page to the best of ``templates`` and, if one fits, lay it out and segment it in the
    template's frame as boxes (as :func:`hwr_batch.template.read_zones` does), appending it to ``pages`` and
    its candidates to ``images``. Returns the template's name, or None if none fits."""
    started = time.perf_counter()
    fit = best_registration(gray, list(templates), dpi=dpi)
    if fit is None:
        seconds["layout"] += time.perf_counter() - started
        return None
    template, registration = fit
    upright = to_template_frame(gray, template, registration)
    seconds["layout"] += time.perf_counter() - started
    pages.append(_read_page(upright, index, template.dpi, TEMPLATE_ZONES, images, seconds))
    return template.name


TEMPLATE_ZONES = ReadSettings(field_mode="boxes")  # how a page registered to a template is read


def _failed_page(stage: str, reason: str, pages_read: int) -> int | None:
    """The 1-based page a file failed on: the one being read after ``pages_read`` good ones, except for a
    failure to open the file at all (in ``load``, before any page, with no page named in the reason)."""
    if stage != "load" or pages_read:
        return pages_read + 1
    named = re.search(r"\bpage (\d+)\b", reason)
    return int(named[1]) if named else None


def _read_page(
    gray: np.ndarray,
    index: int,
    dpi: float | None,
    settings: ReadSettings,
    images: list[np.ndarray],
    seconds: dict[str, float],
) -> PageReading:
    """Lay out one page and segment its fields; appends normalised candidates to ``images``."""
    started = time.perf_counter()
    layout = analyse_page(gray, mode=settings.field_mode, dpi=dpi)
    seconds["layout"] += time.perf_counter() - started
    scale = segmenting_scale(layout)
    fields = []
    for found in layout.fields:
        started = time.perf_counter()
        candidates = segment_field_candidates(field_image(found, scale))
        seconds["segment"] += time.perf_counter() - started
        started = time.perf_counter()
        first = len(images)
        images.extend(to_mnist(piece.ink) for piece in candidates.pieces)
        seconds["normalise"] += time.perf_counter() - started
        x, y, _w, _h = found.bbox
        inner_x, inner_y, _, _ = found.inner
        # The field image is the box plus a margin; its interior starts at `inner` within it.
        origin = (x - inner_x, y - inner_y)
        fields.append(FieldReading(found.bbox, origin, found.kind, candidates.without_ink(scale), first, found.cells))
    return PageReading(index, tuple(fields), gray.shape[:2], layout.angle, layout.dpi, _one_tone(gray))


def _one_tone(gray: np.ndarray) -> str:
    """``"blank"`` or ``"all black"`` if the page holds no visible ink at all (a dead or empty scan), else ``""``.

    The page is looked at shrunk about 600 px on its long side, by an integer factor; the last rows and
    columns that do not fill a block of that factor (under 0.5 mm at 300 dpi) are left out: ink there
    alone is a scanner's edge, not a page's content."""
    h, w = gray.shape
    small = shrink_by(gray, min(-(-max(h, w) // 600), h, w))
    paper = float(np.median(small))
    marked = np.count_nonzero(np.abs(small.astype(np.int16) - paper) > ONE_TONE_CONTRAST)
    if marked > ONE_TONE_MAX_MARKS * small.size:
        return ""
    return "all black" if paper < 128 else "blank"


# A page is of one tone when fewer than this share of its pixels (at ~600 px) differ from its median
# grey by more than ONE_TONE_CONTRAST levels: a single printed word on an A4 page is well above it.
ONE_TONE_CONTRAST = 48
ONE_TONE_MAX_MARKS = 1e-4


def iter_field_images(path: Path, settings: ReadSettings = ReadSettings()) -> Iterator[tuple[int, int, np.ndarray]]:
    """(page, field, image) of every field of a file, numbered as in ``fields.csv`` (from 1), each image
    as ``process`` segments it. Raises :class:`HwrError` for a file that cannot be read."""
    for page in iter_pages(path, pdf_dpi=settings.pdf_dpi, max_megapixels=settings.max_megapixels):
        layout = analyse_page(page.gray, mode=settings.field_mode, dpi=page.dpi)
        scale = segmenting_scale(layout)
        for number, found in enumerate(layout.fields, start=1):
            yield page.index + 1, number, field_image(found, scale)


def read_page(
    gray: np.ndarray, *, index: int = 0, dpi: float | None = None, settings: ReadSettings = ReadSettings()
) -> tuple[PageReading, np.ndarray]:
    """Lay out and segment one page, as ``process`` does: the page's fields and its normalised candidates.

    Returns:
        (page reading, (N, 28, 28) float32 candidates): pass both, as a :class:`FileReading`,
        to :func:`classify_readings`.
    """
    images: list[np.ndarray] = []
    page = _read_page(gray, index, dpi, settings, images, dict.fromkeys(STAGES[:4], 0.0))
    return page, (np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32))


def iter_readings(paths: Iterable[Path], settings: ReadSettings, *, jobs: int = 1) -> Iterator[FileReading]:
    """Read files in order, in ``jobs`` worker processes (1 = in this process).

    At most a few files per worker are in flight, so memory stays flat however many files there are.
    """
    queue = iter(paths)  # consumed lazily: a stop request between files takes effect at once
    if jobs <= 1:
        for path in queue:
            yield read_file(path, settings)
        return
    in_flight: deque[tuple[Path, Future]] = deque()
    pool = _worker_pool(jobs)
    try:
        for path in itertools.islice(queue, 2 * jobs):
            in_flight.append((path, pool.submit(read_file, path, settings)))
        while in_flight:
            path, future = in_flight.popleft()
            try:
                reading = future.result()
            except BrokenProcessPool:
                # A worker died (killed, out of memory, a crash in a decoder). Read the files that were
                # in flight again one by one, each in a fresh process, to find the one that kills it.
                log.warning(
                    "a worker process died while reading %s or one of the %d other files in flight; "
                    "reading them again one at a time", path, len(in_flight),
                )
                _kill_pool(pool)
                for retry in [path, *(p for p, _ in in_flight)]:
                    yield _read_in_own_process(retry, settings)
                in_flight.clear()
                pool = _worker_pool(jobs)
                for next_path in itertools.islice(queue, 2 * jobs):
                    in_flight.append((next_path, pool.submit(read_file, next_path, settings)))
                continue
            next_path = next(queue, None)
            if next_path is not None:
                in_flight.append((next_path, pool.submit(read_file, next_path, settings)))
            yield reading
    finally:
        pool.shutdown(cancel_futures=True)


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Shut down a broken pool without waiting: Python 3.11 would wait forever for its idle workers."""
    if hasattr(pool, "kill_workers"):  # Python 3.14+
        pool.kill_workers()
    else:  # before 3.14 there is no public way to reach the workers
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def start_worker_server() -> None:
    """Start the process that forks the reading workers now, so that its imports overlap the caller's work.

    Optional: the first pool starts it otherwise. It imports this module (OpenCV, NumPy) once, and every
    worker forked from it starts with them loaded; it ignores SIGTERM and dies with this process.
    """
    _worker_context()
    multiprocessing.forkserver.ensure_running()


def _worker_context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    # Takes effect when the forkserver starts (the first pool, or start_worker_server).
    context.set_forkserver_preload(["__main__", "hwr_batch._forkserver", __name__])
    return context


def _worker_pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=jobs, mp_context=_worker_context(), initializer=_init_worker, initargs=(os.getpid(),))


def _read_in_own_process(path: Path, settings: ReadSettings) -> FileReading:
    """Read one file in a process of its own; if that process dies, report the file instead of the run failing."""
    pool = _worker_pool(1)
    try:
        return pool.submit(read_file, path, settings).result()
    except BrokenProcessPool:
        return FileReading(
            Path(path), error=("read", f"{path}: the process reading it died (killed, out of memory, or a crash in a decoder)")
        )
    finally:
        _kill_pool(pool)


def _init_worker(main_pid: int) -> None:
    """Each worker is single-threaded (the parallelism is across files), leaves signals to the main process,
    and ends when the main process ends, however it ends (a SIGKILL too).

    Ctrl-C and systemd's SIGTERM reach every process of the group; the main process decides to
    stop after the files in hand, and shuts the pool down itself.
    """
    import signal

    from ._lifeline import exit_when_gone

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_when_gone(main_pid)
    cv2.setNumThreads(1)
