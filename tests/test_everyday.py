"""Everyday use of `hwr-batch process`: log lines per file, options anywhere, help, progress, pruning,
the page of an error, reprocessing one file, and a second run that finds the lock taken.

Every test but the progress one runs the real command line in a subprocess over real files.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from test_unattended import fields_by_file, process_command, write_scans

from hwr_batch.errors import ExitCode
from hwr_batch.export import read_tables


@pytest.fixture
def three_scans(tmp_path, mnist_test_small, confident_digits) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "scans"
    return folder, write_scans(folder, mnist_test_small, confident_digits, 3, seed=21)


def test_verbose_logs_one_line_per_file_and_global_options_work_after_the_command(three_scans, tmp_path, cli):
    folder, truth = three_scans
    quiet_default = cli("process", folder, "--out", tmp_path / "a", "--jobs", "1")
    assert quiet_default.returncode == 0 and ": done (" not in quiet_default.stderr
    log_file = tmp_path / "run.log"
    verbose = cli("process", folder, "--out", tmp_path / "b", "--jobs", "1", "-v", "--log-file", log_file, "--json-logs")
    assert verbose.returncode == 0, verbose.stderr
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    per_file = [entry["message"] for entry in lines if ": done (" in entry["message"]]
    assert len(per_file) == 3 and all(path in " ".join(per_file) for path in truth)
    assert "1 pages, 1 fields" in per_file[0]
    after = cli("process", folder, "--out", tmp_path / "c", "--jobs", "1", "-q")
    assert after.returncode == 0 and after.stderr == ""  # -q after the command: warnings only


def test_quiet_with_a_log_file_keeps_stderr_for_trouble_and_the_file_for_the_record(three_scans, tmp_path, cli):
    """The cron setup of the README: stderr (what cron mails) is empty on a good night, the log file still
    gets each run's summary; a file that fails is on both."""
    folder, _ = three_scans
    log_file = tmp_path / "nightly.log"
    good = cli("-q", "--log-file", log_file, "process", folder, "--out", tmp_path / "out", "--jobs", "1", "-v")
    assert good.returncode == 0 and good.stderr == "", good.stderr
    logged = log_file.read_text()
    assert " INFO " in logged and "3 files found: 3 to process" in logged and logged.count(": done (") == 3
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    bad = cli("-q", "--log-file", log_file, "process", folder, "--out", tmp_path / "out", "--jobs", "1")
    assert bad.returncode == ExitCode.partial_failure
    assert "cut.png" in bad.stderr and " INFO " not in bad.stderr
    assert "cut.png" in log_file.read_text()[len(logged):] and log_file.read_text().count(" INFO ") > logged.count(" INFO ")


def test_a_failure_is_reported_by_the_run_that_meets_it_and_then_counted_not_repeated(three_scans, tmp_path, cli):
    """A nightly job mails each failure once: the next run skips the unchanged failures (a broken symbolic
    link too), says so in its summary, exits 0 and keeps their rows; the link is read once its target appears."""
    folder, truth = three_scans
    (folder / "link.png").symlink_to(tmp_path / "elsewhere.png")
    (folder / "notes.png").write_text("not a scan\n")
    out = tmp_path / "out"
    first = cli("process", folder, "--out", out, "--jobs", "1")
    assert first.returncode == ExitCode.partial_failure, first.stderr
    assert f"link.png: broken symbolic link (to {tmp_path / 'elsewhere.png'}" in first.stderr
    second = cli("process", folder, "--out", out, "--jobs", "1")
    assert second.returncode == ExitCode.ok, second.stderr
    assert "5 skipped (2 failed in an earlier run and have not changed" in second.stderr
    assert "link.png" not in second.stderr and "notes.png" not in second.stderr
    errors = read_tables(out)["errors"]
    assert sorted(Path(f).name for f in errors["file"]) == ["link.png", "notes.png"]
    (out / "errors.csv").unlink()  # the table lost: its failures are reported again, as they were
    again = cli("process", folder, "--out", out, "--jobs", "1")
    assert again.returncode == ExitCode.partial_failure, again.stderr
    errors = read_tables(out)["errors"].set_index(read_tables(out)["errors"]["file"].map(lambda f: Path(f).name))
    assert errors.loc["link.png", "reason"].startswith(f"broken symbolic link (to {tmp_path / 'elsewhere.png'}")
    assert sorted(errors.index) == ["link.png", "notes.png"]
    (tmp_path / "elsewhere.png").write_bytes((folder / Path(next(iter(truth))).name).read_bytes())
    third = cli("process", folder, "--out", out, "--jobs", "1")
    assert third.returncode == ExitCode.ok, third.stderr
    assert sorted(Path(f).name for f in read_tables(out)["errors"]["file"]) == ["notes.png"]
    assert "link.png" in {Path(f).name for f in read_tables(out)["fields"]["file"]}


def test_help_shows_the_allowed_values(cli):
    from hwr_batch import cli as cli_module
    from hwr_batch.export import FORMATS
    from hwr_batch.layout import MODES

    assert typing.get_args(cli_module.FormatChoice) == FORMATS
    assert typing.get_args(cli_module.FieldChoice) == MODES
    text = cli("process", "--help", env={"COLUMNS": "200"}).stdout
    assert "--format <csv|xlsx>" in text and "--fields <auto|boxes|whole|lines>" in text
    assert "<str>" not in text and "<list[str]>" not in text
    wrong = cli("process", ".", "--format", "xls")
    assert wrong.returncode == ExitCode.bad_args and "'xls' is not one of 'csv', 'xlsx'" in wrong.stderr


def test_progress_advances_as_each_file_is_read(three_scans, tmp_path):
    """The bar stayed at 0 until a 4,096-digit batch was written: it must move per file read."""
    from hwr_batch.config import Options
    from hwr_batch.pipeline import run_batch

    folder, _ = three_scans
    out = tmp_path / "out"
    seen: list[tuple[str, str, bool]] = []

    class Recorder:
        def start(self, total: int) -> None:
            seen.append(("start", str(total), False))

        def advance(self, path: Path, outcome: str) -> None:
            seen.append((path.name, outcome, (out / "fields.csv").exists()))

    report = run_batch(Options(inputs=(folder,), out_dir=out, jobs=1), progress=Recorder())
    assert report.exit_code == 0
    assert seen[0] == ("start", "3", False)
    # All three advanced before the first write (the three files make one batch).
    assert seen[1:] == [(f"scan_{n:03d}.png", "read", False) for n in range(3)]


def test_prune_drops_the_rows_and_records_of_deleted_files(tmp_path, mnist_test_small, confident_digits, cli):
    kept = tmp_path / "kept"
    truth = write_scans(kept, mnist_test_small, confident_digits, 3, seed=22)
    share = tmp_path / "share"
    on_share = write_scans(share, mnist_test_small, confident_digits, 1, seed=23)
    out = tmp_path / "out"
    assert cli("process", kept, share, "--out", out, "--jobs", "1").returncode == 0
    deleted = kept / "scan_001.png"
    deleted.unlink()
    without = cli("process", kept, share, "--out", out, "--jobs", "1")
    assert str(deleted) in fields_by_file(out) and without.returncode == 0  # without --prune: kept

    share.rename(tmp_path / "unmounted")  # an unmounted share leaves its empty mount point
    share.mkdir()
    pruned = cli("process", kept, share, "--out", out, "--jobs", "1", "--prune")
    assert "pruning 1 files deleted" in pruned.stderr, pruned.stderr
    assert "none of the 1 files recorded under it is left (an unmounted share?); not pruned" in pruned.stderr
    tables = read_tables(out)
    expected = {p: d for p, d in {**truth, **on_share}.items() if p != str(deleted)}
    assert fields_by_file(out) == expected
    for name in ("digits", "pages"):
        assert str(deleted) not in set(tables[name]["file"])
    connection = sqlite3.connect(out / ".hwr-batch" / "state.sqlite3")
    recorded = {row[0] for row in connection.execute("SELECT path FROM files")}
    connection.close()
    assert str(deleted) not in recorded and set(on_share) <= recorded


def test_errors_name_the_page_that_failed(tmp_path, cli):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    first = Image.fromarray(np.full((300, 400), 200, np.uint8))
    second = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400), dtype=np.uint8))
    first.save(folder / "two pages.tif", save_all=True, append_images=[second])
    data = (folder / "two pages.tif").read_bytes()
    (folder / "two pages.tif").write_bytes(data[: len(data) * 3 // 4])  # page 2 cut short
    (folder / "empty.png").write_bytes(b"")
    result = cli("process", folder, "--out", tmp_path / "out")
    assert result.returncode == ExitCode.partial_failure
    errors = read_tables(tmp_path / "out")["errors"]
    pages = {Path(f).name: p for f, p in zip(errors["file"], errors["page"])}
    assert pages["two pages.tif"] == 2
    assert pd_isna(pages["empty.png"])  # the file as a whole


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_force_on_one_file_rereads_it_and_keeps_the_other_rows(three_scans, tmp_path, cli):
    """What the README tells to do to reprocess one file (touching it is not enough: its content is unchanged)."""
    folder, truth = three_scans
    out = tmp_path / "out"
    assert cli("process", folder, "--out", out, "--jobs", "1").returncode == 0
    one = folder / "scan_001.png"
    one.touch()
    touched = cli("process", folder, "--out", out, "--jobs", "1")
    assert "0 to process" in touched.stderr
    forced = cli("process", one, "--out", out, "--jobs", "1", "--force")
    assert forced.returncode == 0 and "1 to process" in forced.stderr
    assert fields_by_file(out) == truth


def test_a_second_run_takes_the_lock_before_loading_the_model(three_scans, tmp_path):
    folder, _ = three_scans
    out = tmp_path / "out"
    lock_file = out / ".hwr-batch" / "hwr-batch.lock"
    first = subprocess.Popen(process_command(folder, out), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (lock_file.exists() and lock_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        # A model that does not exist: a run that loads the model before the lock exits 4, not 7.
        second = subprocess.run(
            process_command(folder, out, "--model", str(tmp_path / "missing.onnx")),
            check=False, capture_output=True, text=True, timeout=120,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=300)
    assert second.returncode == ExitCode.lock_held, second.stderr
    assert first.returncode == 0


def runs_recorded(out: Path) -> int:
    connection = sqlite3.connect(out / ".hwr-batch" / "state.sqlite3")
    try:
        return connection.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        connection.close()


def test_status_says_what_is_done_failed_stale_and_pending(three_scans, tmp_path, mnist_test_small, confident_digits, cli):
    folder, _ = three_scans
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert cli("process", folder, "--out", out, "--jobs", "1").returncode == ExitCode.partial_failure
    status = cli("status", out)
    assert status.returncode == 0, status.stderr
    assert "4 recorded: 3 done, 1 failed, 0 stale" in status.stdout
    assert "last run  #1" in status.stdout and "exit 1, 3 done, 1 failed" in status.stdout
    assert f"failed    {folder / 'broken.png'} (load): not an image or PDF file" in status.stdout

    write_scans(tmp_path / "more", mnist_test_small, confident_digits, 1, seed=24)
    (tmp_path / "more" / "scan_000.png").rename(folder / "late.png")
    pending = cli("status", out, folder)
    assert "pending   1 to process (1 new) of 5 found" in pending.stdout, pending.stdout
    # A run with other settings reads nothing old: its files are stale from then on.
    assert cli("process", folder, "--out", out, "--jobs", "1", "--min-confidence", "0.9").returncode == 0
    assert "5 recorded: 4 done, 1 failed, 3 stale" in cli("status", out).stdout
    missing = cli("status", tmp_path / "nowhere")
    assert missing.returncode == ExitCode.input_file and "no state database" in missing.stderr


def test_dry_run_lists_the_work_and_writes_nothing(three_scans, tmp_path, mnist_test_small, confident_digits, cli):
    folder, _ = three_scans
    out = tmp_path / "out"
    first_plan = cli("process", folder, "--out", out, "--dry-run")
    assert first_plan.returncode == 0 and not out.exists()
    assert first_plan.stdout.splitlines() == [f"new\t{folder / f'scan_{n:03d}.png'}" for n in range(3)]
    assert cli("process", folder, "--out", out, "--jobs", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.csv")}
    write_scans(tmp_path / "more", mnist_test_small, confident_digits, 1, seed=25)
    (tmp_path / "more" / "scan_000.png").rename(folder / "late.png")
    dry = cli("process", folder, "--out", out, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"new\t{folder / 'late.png'}"]
    assert "dry run: 4 files found: 1 to process (1 new), 3 not (3 done); nothing was written" in dry.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.csv")} == before and runs_recorded(out) == 1
