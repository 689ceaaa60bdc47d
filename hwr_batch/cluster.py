"""Reading files on a Dask cluster (``process --dask``): the per-file work of a run on Dask's distributed workers.

Each task reads one file (decode, layout, segmentation, normalisation) and classifies its candidate digits
with the model, loaded once per worker process (:func:`worker_classifier`). What comes back is a
:class:`~hwr_batch.read.FileReading` carrying the model's scores instead of the images (44 bytes per
candidate instead of 3,136). Everything else stays with the client, exactly as in a local run: the state
database, the locks, the tables and their write schedule, so a run on a cluster is as crash-safe as a local
one, has the same exit codes and writes the same rows.

The workers must see the scans and the model under the same paths as the client (shared storage):
:func:`check_workers` names the worker and the path it cannot read before any file is submitted.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

import numpy as np

from . import __version__
from .classify import Classifier, load_classifier, predict_scores
from .errors import ClusterError, InputFileError, MissingDependencyError, ModelError
from .normalise import IMAGE_SIZE
from .read import FileReading, ReadSettings, read_file

if TYPE_CHECKING:
    from distributed import Client, Future

log = logging.getLogger("hwr_batch.pipeline")  # the run's logger

DASK_EXTRA = "pip install 'hwr-batch[dask]'"
WORKER_WAIT_SECONDS = 60.0  # for a first worker to join the scheduler
# A task that raises is run again this many times (bad input never raises: read_file reports it). A task
# whose worker dies is rescheduled by the scheduler itself, up to its `distributed.scheduler.allowed-failures`
# (default 3) deaths; then it fails with KilledWorker and the file goes to errors.csv.
TASK_RETRIES = 2
# The Dask setting by which a nanny sets glibc's trim threshold in its workers (None: leave it unset).
TRIM_SETTING = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
IN_FLIGHT_PER_THREAD = 3  # tasks in flight per worker thread: enough to keep every thread busy, and no more


def require_dask() -> None:
    """Raise :class:`MissingDependencyError` saying how to install the ``dask`` extra, unless it is installed."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"--dask needs Dask's distributed scheduler, which is not installed: {DASK_EXTRA} "
            "(from a clone: pip install -e '.[dask]')"
        ) from None


@contextmanager
def connect(address: str) -> Iterator[Client]:
    """A Dask client of the scheduler at ``address`` (``tcp://HOST:PORT``), or of a cluster of N worker
    processes on this machine (``local:N``, one thread each, on 127.0.0.1), with at least one worker.

    Dask's own configuration applies (``~/.config/dask/*.yaml``, ``DASK_*`` variables): how long to try to
    reach the scheduler (``distributed.comm.timeouts.connect``), TLS, how often a task may kill a worker.

    Raises:
        MissingDependencyError: the ``dask`` extra is not installed.
        ClusterError: the scheduler cannot be reached, or no worker joins it in time.
    """
    require_dask()
    from distributed import Client, LocalCluster

    cluster = None
    if address.startswith("local:"):
        import dask

        # One single-threaded worker process per core asked for, as `-j N` has: the work holds the GIL.
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's sliding mmap
        # threshold: every page-sized array is then mmapped and its pages faulted in anew. Here that cost
        # 15-20% of the throughput (layout 50% slower), so local workers keep glibc's default.
        with dask.config.set({TRIM_SETTING: None}):
            cluster = LocalCluster(
                n_workers=int(address.removeprefix("local:")), threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None,
            )
        address = cluster.scheduler_address
    try:
        try:
            client = Client(address)  # tries for Dask's distributed.comm.timeouts.connect (30 s)
        except (OSError, TimeoutError) as e:
            raise ClusterError(
                f"{address}: cannot reach the Dask scheduler ({e}); is `dask scheduler` running there, on that port?"
            ) from None
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except TimeoutError:
            client.close()
            raise ClusterError(
                f"{address}: no Dask worker joined the scheduler within {WORKER_WAIT_SECONDS:g} s; "
                f"start workers with `dask worker {address}`"
            ) from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def check_workers(client: Client, *, model: Path, model_sha: str, inputs: Iterable[Path]) -> None:
    """Check on every worker that it runs this version of hwr-batch and can read the model (the same file)
    and every input under the paths the client uses.

    Raises:
        ModelError: a worker cannot read the model, or reads another file there (exit code 4).
        InputFileError: a worker cannot read an input file or folder (exit code 3).
        ClusterError: the workers cannot run hwr-batch, or run another version of it.
    """
    paths = [os.path.abspath(p) for p in inputs]
    try:
        answers = client.run(worker_problems, os.path.abspath(model), model_sha, paths, __version__)
    except Exception as e:  # noqa: BLE001 - e.g. hwr_batch is not installed on a worker (ModuleNotFoundError)
        raise ClusterError(
            f"the Dask workers cannot run hwr-batch ({type(e).__name__}: {e}); install hwr-batch {__version__} "
            "with its dask extra on every worker"
        ) from None
    problems = [(worker, *problem) for worker, found in sorted(answers.items()) for problem in found]
    if not problems:
        log.info("Dask cluster: %d workers, %d threads; each can read the model and the inputs",
                 len(answers), sum(client.nthreads().values()))
        warn_of_trimmed_workers(client)
        return
    lines = "; ".join(f"worker {worker}: {path + ': ' if path else ''}{reason}" for worker, _, path, reason in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    kinds = {kind for _, kind, _, _ in problems}
    shared = "scans and model must be reachable from every worker under the same paths (shared storage)"
    if "version" in kinds:
        raise ClusterError(f"{lines}{more}; install hwr-batch {__version__} on every worker")
    if "model" in kinds:
        raise ModelError(f"{lines}{more}: the {shared}; nothing was read")
    raise InputFileError(f"{lines}{more}: the {shared}; nothing was read")


def warn_of_trimmed_workers(client: Client) -> None:
    """Log a warning naming the workers that run with glibc's trim threshold set (Dask's nanny sets it by
    default), which makes them read pages 15-20% slower here; the README says how to unset it."""
    trimmed = {w: v for w, v in client.run(trim_threshold).items() if v is not None}
    if trimmed:
        log.warning(
            "Dask workers %s run with MALLOC_TRIM_THRESHOLD_=%s (Dask's nanny sets it), which makes them read "
            "pages 15-20%% slower; unset it in their Dask configuration (README, 'Scale out with Dask')",
            ", ".join(sorted(trimmed)), next(iter(trimmed.values())),
        )


def trim_threshold() -> str | None:
    """Run on each worker: its MALLOC_TRIM_THRESHOLD_, if set (a function of this module, so that it reads
    the worker's environment, not a pickled copy of the client's)."""
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def worker_problems(model: str, model_sha: str, inputs: list[str], version: str) -> list[tuple[str, str, str]]:
    """Run on each worker by :func:`check_workers`: what it cannot do, as (kind, path, reason), kind being
    ``version``, ``model`` or ``input``; empty when it can read the model and every input."""
    if version != __version__:
        return [("version", "", f"runs hwr-batch {__version__}, the client {version}")]
    problems = []
    try:
        with open(model, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != model_sha:
                problems.append(("model", model, "another file than the client's model (its sha256 differs)"))
    except OSError as e:
        problems.append(("model", model, f"cannot read the model ({e.strerror or e})"))
    for path in inputs:
        try:
            if os.path.isdir(path):
                with os.scandir(path) as entries:
                    next(entries, None)
            else:
                with open(path, "rb") as f:
                    f.read(1)
        except OSError as e:
            problems.append(("input", path, f"cannot read it ({e.strerror or e})"))
    return problems


_classifiers: dict[tuple[str, str], Classifier] = {}
_classifiers_lock = threading.Lock()


def worker_classifier(model: str, model_sha: str) -> Classifier:
    """The model, loaded once per worker process (the first task loads it; the others reuse it).

    ONNX Runtime and OpenCV get one thread each: a worker runs as many tasks at once as it has threads.

    Raises:
        ModelError: the file cannot be loaded, or is no longer the client's model (changed during the run).
    """
    key = (model, model_sha)
    with _classifiers_lock:
        if key not in _classifiers:
            import cv2

            cv2.setNumThreads(1)
            classifier = load_classifier(Path(model), threads=1)
            if classifier.sha256 != model_sha:
                raise ModelError(f"{model}: the model on this worker is not the client's (replaced during the run?)")
            _classifiers[key] = classifier
        return _classifiers[key]


def read_and_classify(path: Path, settings: ReadSettings, model: str, model_sha: str) -> FileReading:
    """The task of one file, run on a worker: :func:`~hwr_batch.read.read_file`, then the model's scores of
    its candidates (``scores``, the images dropped), as the client would compute them (the same numbers)."""
    classifier = worker_classifier(model, model_sha)  # first: it also gives OpenCV one thread, for read_file too
    reading = read_file(path, settings)
    if reading.error is None:
        started = time.perf_counter()
        reading.scores = predict_scores(classifier, reading.images)
        if reading.forms is not None:  # the pages registered to templates (process --template)
            reading.forms.reading.scores = predict_scores(classifier, reading.forms.reading.images)
            reading.forms.reading.images = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        reading.seconds["classify"] = time.perf_counter() - started
    reading.images = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    return reading


def iter_cluster_readings(
    client: Client, paths: Iterable[Path], settings: ReadSettings, *, model: Path, model_sha: str
) -> Iterator[FileReading]:
    """Read and classify files on the cluster's workers, as they finish (in no particular order).

    ``paths`` is consumed lazily and at most :data:`IN_FLIGHT_PER_THREAD` tasks per worker thread are in
    flight, so the client's memory stays flat however many files there are, and a stop request between files
    takes effect at once. A file whose workers kept dying comes back as a failed reading (errors.csv).

    Raises:
        ClusterError: the connection to the scheduler was lost.
    """
    from distributed import as_completed

    queue = iter(paths)
    model_path = os.path.abspath(model)
    in_flight = as_completed()
    path_of: dict[str, Path] = {}

    def submit(path: Path) -> None:
        future = client.submit(
            read_and_classify, path, settings, model_path, model_sha,
            key=f"hwr-batch-read-{uuid4().hex}", pure=False, retries=TASK_RETRIES,
        )
        path_of[future.key] = path
        in_flight.add(future)

    window = _in_flight_limit(client)
    for path in itertools.islice(queue, window):
        submit(path)
    for done, future in enumerate(in_flight, start=1):
        path = path_of.pop(future.key)
        reading = _reading_of(future, path, client)
        del future  # the scheduler forgets the result once no client holds it
        if done % window == 0:  # workers may have joined or left
            window = _in_flight_limit(client)
        for next_path in itertools.islice(queue, max(0, window - len(path_of))):
            submit(next_path)
        yield reading


def _in_flight_limit(client: Client) -> int:
    return max(2, IN_FLIGHT_PER_THREAD * sum(client.nthreads().values()))


def _reading_of(future: Future, path: Path, client: Client) -> FileReading:
    """The reading a finished task returned; a failed reading if its workers died or it raised."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker as e:
        return FileReading(path, error=("read", (
            f"{path}: {e.allowed_failures + 1} Dask workers died while reading it (killed, out of memory, "
            "or a crash in a decoder)"
        )))
    except CancelledError:
        raise ClusterError(
            f"{client.scheduler.address}: lost the Dask scheduler during the run; the files read so far are "
            "written, a re-run does the rest"
        ) from None
    except Exception as e:  # noqa: BLE001 - a task that raised on every attempt: report the file, go on
        return FileReading(path, error=("read", (
            f"{path}: {type(e).__name__}: {e} (on a Dask worker, {TASK_RETRIES + 1} attempts)"
        )))
