"""`process --dask`: the same run on a real Dask cluster on 127.0.0.1 writes the same tables as a local run.

Clusters here are real: a LocalCluster of worker processes, and once the `dask scheduler` and `dask worker`
commands as subprocesses. Workers are killed for real (SIGKILL by pid) while they hold tasks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest
from conftest import REPO
from distributed import Client, LocalCluster

from hwr_batch.cluster import TRIM_SETTING, check_workers
from hwr_batch.config import Options
from hwr_batch.errors import ExitCode, InputFileError, ModelError
from hwr_batch.pipeline import BatchReport, Progress, run_batch
from hwr_batch.synth import write_forms

DASK = Path(sys.executable).parent / "dask"  # the command the dask package installs


@pytest.fixture(scope="module")
def scans(tmp_path_factory, mnist_test_small) -> Path:
    """Generated pages in several formats (a two-page PDF among them) and a file that is no image."""
    folder = tmp_path_factory.mktemp("scans")
    write_forms(folder, 6, seed=14, digits=mnist_test_small, formats=("png", "jpg", "tif-g4"), dpi=(200, 300))
    write_forms(folder / "pdf", 2, seed=15, digits=mnist_test_small, formats=("pdf",))
    (folder / "not an image.png").write_bytes(b"this is not a PNG")
    return folder


@pytest.fixture(scope="module")
def local_run(scans, tmp_path_factory) -> BatchReport:
    """A local run with two worker processes; its tables are in ``local_run.outputs``."""
    report = run_batch(Options(inputs=(scans,), out_dir=tmp_path_factory.mktemp("local"), jobs=2))
    assert report.exit_code == ExitCode.partial_failure and report.failed == 1 and report.processed >= 10
    return report


@pytest.fixture(scope="module")
def local_tables(local_run) -> dict[str, bytes]:
    """The tables of the local run, byte for byte."""
    return table_bytes(local_run.outputs[0].parent)


TABLES = ("digits", "fields", "errors", "pages")


def table_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / f"{name}.csv").read_bytes() for name in TABLES}


def local_cluster(**scheduler_kwargs) -> LocalCluster:
    # As hwr_batch.cluster.connect does; a nanny also sets the threshold in its own process's environment,
    # which every later command run by the tests would inherit.
    with dask.config.set({TRIM_SETTING: None}):
        return LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": None, **scheduler_kwargs},
        )


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as running:
        yield running


def test_a_run_on_a_local_cluster_writes_the_tables_of_a_local_run(scans, local_run, local_tables, cluster, tmp_path):
    out = tmp_path / "out"
    report = run_batch(Options(inputs=(scans,), out_dir=out, dask=cluster.scheduler_address))
    assert report.exit_code == ExitCode.partial_failure and report.failed == 1  # the file that is no image
    assert (report.processed, report.pages, report.digits) == (local_run.processed, local_run.pages, local_run.digits)
    assert report.stage_seconds["classify"] > 0
    dask_tables = table_bytes(out)
    assert dask_tables == local_tables  # same rows, values and confidences, byte for byte
    assert dask_tables["digits"].count(b"\n") > 500
    assert b"not an image.png" in dask_tables["errors"]

    again = run_batch(Options(inputs=(scans,), out_dir=out, dask=cluster.scheduler_address))
    assert again.processed == 0 and again.skipped == local_run.files_found  # the state database works as in a local run
    assert table_bytes(out) == local_tables


class KillAWorkerOnFirstFile(Progress):
    """Kills (SIGKILL) the worker process holding the most tasks when the first file comes back."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.tasks_on_killed: list[str] = []

    def start(self, total: int) -> None:
        self.total = total

    def advance(self, path: Path, outcome: str) -> None:
        if self.tasks_on_killed:
            return
        pids = self.client.run(os.getpid)
        processing = {w: list(keys) for w, keys in self.client.processing().items()}
        worker = max(processing, key=lambda w: len(processing[w]))
        os.kill(pids[worker], signal.SIGKILL)
        self.tasks_on_killed = processing[worker]


def test_a_worker_killed_mid_run_has_its_files_read_elsewhere(scans, local_run, local_tables, tmp_path):
    with local_cluster() as running, Client(running) as observer:
        killer = KillAWorkerOnFirstFile(observer)
        report = run_batch(Options(inputs=(scans,), out_dir=tmp_path / "out", dask=running.scheduler_address), progress=killer)
        assert killer.tasks_on_killed  # the worker killed held files in flight
        assert report.processed == local_run.processed and report.failed == 1
        assert table_bytes(tmp_path / "out") == local_tables


def test_a_file_that_kills_its_workers_goes_to_errors_and_the_run_goes_on(scans, local_run, local_tables, tmp_path):
    """With `allowed-failures` 0, one worker death fails its tasks, as repeated deaths do by default (3)."""
    out = tmp_path / "out"
    with local_cluster(allowed_failures=0) as running, Client(running) as observer:
        killer = KillAWorkerOnFirstFile(observer)
        report = run_batch(Options(inputs=(scans,), out_dir=out, dask=running.scheduler_address), progress=killer)
        errors = (out / "errors.csv").read_text()
        # (a task of the killed worker's may have finished between the look at its tasks and the kill)
        lost = errors.count("1 Dask workers died while reading it (killed, out of memory, or a crash in a decoder)")
        assert 1 <= lost <= len(killer.tasks_on_killed)
        assert report.exit_code == ExitCode.partial_failure
        assert report.failed == 1 + lost and report.processed == local_run.processed - lost

        retried = run_batch(Options(inputs=(scans,), out_dir=out, dask=running.scheduler_address, retry_failed=True))
        assert retried.processed == lost
    assert table_bytes(out) == local_tables


def test_the_workers_are_checked_for_the_model_and_the_inputs(cluster, scans, shipped_model, tmp_path):
    with Client(cluster) as client:
        missing = tmp_path / "unmounted share"
        with pytest.raises(ModelError) as error:  # before the inputs: the model is needed for every file
            check_workers(client, model=shipped_model, model_sha="0" * 64, inputs=[scans, missing])
        assert f"{shipped_model}: another file than the client's model" in str(error.value)

        from hwr_batch.classify import load_classifier

        sha = load_classifier(shipped_model).sha256
        with pytest.raises(InputFileError) as error:
            check_workers(client, model=shipped_model, model_sha=sha, inputs=[scans, missing])
        message = str(error.value)
        assert f"{missing}: cannot read it (No such file or directory)" in message
        assert message.count("worker tcp://127.0.0.1:") == 2 and str(scans) + ":" not in message
        assert "under the same paths (shared storage)" in message
        check_workers(client, model=shipped_model, model_sha=sha, inputs=[scans])  # no error


def test_the_dask_scheduler_and_worker_commands_serve_the_cli(scans, local_tables, tmp_path, cli):
    scheduler_file = tmp_path / "scheduler.json"
    # Both stop by themselves too: the scheduler when idle for two minutes, a worker without its scheduler.
    # Workers with Dask's default trim threshold set explicitly, so that the run must warn of it.
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "trim.yaml").write_text("distributed:\n  nanny:\n    pre-spawn-environ:\n      MALLOC_TRIM_THRESHOLD_: 65536\n")
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__IDLE_TIMEOUT": "120s", "DASK_CONFIG": str(config)}
    common = ["--no-dashboard", "--scheduler-file", str(scheduler_file)]
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", *common], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        for _ in range(600):
            if scheduler_file.is_file() and scheduler_file.stat().st_size:
                break
            assert scheduler.poll() is None, "dask scheduler ended"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        worker = subprocess.Popen(
            [DASK, "worker", "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1", "--death-timeout", "60", *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        from distributed import Client

        with Client(address, timeout=60) as client:  # process starts once one worker is in; the test wants both
            client.wait_for_workers(2, timeout=60)
        result = cli("process", scans, "--out", tmp_path / "out", "--dask", address)
        assert result.returncode == 1, result.stderr  # 1: the file that is no image
        assert "Dask cluster: 2 workers, 2 threads" in result.stderr
        assert "run with MALLOC_TRIM_THRESHOLD_=65536" in result.stderr
        assert table_bytes(tmp_path / "out") == local_tables
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
        for process in (worker, scheduler):
            if process is not None:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_dask_local_from_the_command_line(scans, local_tables, tmp_path, cli):
    result = cli("process", scans, "--out", tmp_path / "out", "--dask", "local:2")
    assert result.returncode == 1, result.stderr
    assert table_bytes(tmp_path / "out") == local_tables
    assert "MALLOC_TRIM_THRESHOLD_" not in result.stderr  # local workers keep glibc's sliding threshold


def test_a_scheduler_that_cannot_be_reached_is_exit_code_3(scans, tmp_path, cli):
    import socket

    with socket.socket() as unused:  # a port nothing listens on: bound, never listening
        unused.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{unused.getsockname()[1]}"
        result = cli("process", scans, "--out", tmp_path / "out", "--dask", address,
                     env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert result.returncode == 3, result.stderr
    assert f"{address}: cannot reach the Dask scheduler" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "digits.csv").exists()


@pytest.mark.parametrize("value", ["127.0.0.1:8786", "local:0", "local"])
def test_a_bad_dask_address_is_a_usage_error(scans, tmp_path, cli, value):
    result = cli("process", scans, "--out", tmp_path / "out", "--dask", value)
    assert result.returncode == 2, result.stderr
    assert "--dask must be a scheduler's address (tcp://HOST:PORT" in result.stderr and repr(value) in result.stderr


def test_without_the_dask_extra_the_option_says_how_to_install_it(tmp_path):
    """An environment of every installed package but Dask (as a plain `pip install hwr-batch` gives)."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if entry.name.lower().startswith(("dask", "distributed")) or entry.suffix == ".pth":
            continue
        (farm / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": os.pathsep.join([str(REPO), str(farm)])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", *args], check=False, env=env, capture_output=True, text=True, cwd=tmp_path)

    assert run("-c", "import distributed").returncode != 0  # the environment really has no Dask
    result = run("-m", "hwr_batch", "process", str(REPO / "samples" / "page_0001.png"), "-o", str(tmp_path / "out"),
                 "--dask", "local:2")
    assert result.returncode == 4, result.stderr
    assert "--dask needs Dask's distributed scheduler, which is not installed: pip install 'hwr-batch[dask]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "digits.csv").exists()
