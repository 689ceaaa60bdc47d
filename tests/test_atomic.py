"""Atomic outputs (SIGKILL mid-write, exceptions, stale temp files) and formula neutralisation."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest

from hwr_batch.atomic import (
    atomic_output,
    atomic_path,
    atomic_write,
    is_temp_file,
    reason_without_file,
    remove_stale_temp_files,
    temp_path_for,
)
from hwr_batch.export import neutralise_formulas

# Writes half of a large file through atomic_output, says so, then sleeps until killed.
WRITE_HALF_THEN_SLEEP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hwr_batch.atomic import atomic_output
    with atomic_output(Path(sys.argv[1]), "wb") as f:
        f.write(b"N" * (4 << 20))
        f.flush()
        print("HALF", flush=True)
        time.sleep(60)
        f.write(b"N" * (4 << 20))
    """
)

OLD = b"old content\n" * 1000


def others(directory: Path, *keep: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p not in keep)


def kill_mid_write(target: Path) -> int:
    """Run a writer, SIGKILL it after it wrote 4 MiB of 8 MiB; returns its pid."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_HALF_THEN_SLEEP, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "HALF"
        temps = [p for p in target.parent.iterdir() if is_temp_file(p.name)]
        assert len(temps) == 1 and temps[0].stat().st_size == 4 << 20  # the half really is on disk
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL
    return writer.pid


def test_sigkill_mid_write_leaves_old_content(tmp_path):
    target = tmp_path / "digits.csv"
    target.write_bytes(OLD)
    pid = kill_mid_write(target)
    assert target.read_bytes() == OLD
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]
    assert leftover.name.startswith(".digits.csv.tmp-") and f"-{pid}-" in leftover.name
    assert remove_stale_temp_files(tmp_path) == [leftover]
    assert others(tmp_path, target) == []


def test_sigkill_mid_write_leaves_no_target(tmp_path):
    target = tmp_path / "new.xlsx"
    kill_mid_write(target)
    assert not target.exists()
    assert len(remove_stale_temp_files(tmp_path)) == 1
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_leaves_old_content_and_no_temp(tmp_path):
    target = tmp_path / "out.csv"
    target.write_bytes(OLD)
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target) as f:
        f.write("partial new content")
        raise RuntimeError("boom")
    assert target.read_bytes() == OLD
    assert others(tmp_path, target) == []


def test_keyboard_interrupt_inside_leaves_no_target(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(KeyboardInterrupt), atomic_output(target, "wb") as f:
        f.write(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_csv_via_pandas_replaces_target_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "digits.csv"
    target.write_bytes(OLD)
    target.chmod(0o640)
    df = pd.DataFrame({"file": ["a, b.pdf", 'q"uote.pdf', "new\nline.pdf"], "digit": [1, -2, 3]})
    with atomic_output(target, newline="") as f:
        df.to_csv(f, index=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    pd.testing.assert_frame_equal(pd.read_csv(target), df)
    assert others(tmp_path, target) == []


def test_atomic_write_text_and_binary(tmp_path):
    atomic_write(tmp_path / "a.txt", lambda f: f.write("héllo\n"))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write(tmp_path / "b.bin", lambda f: f.write(bytes(range(256))), mode="wb")
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256))
    with pytest.raises(ValueError, match="write mode"):
        atomic_write(tmp_path / "c", lambda f: None, mode="a")


def test_xlsx_via_excel_writer_on_binary_file(tmp_path):
    target = tmp_path / "digits.xlsx"
    df = pd.DataFrame({"file": ["=1+1", "ok"], "digit": [-1, 2]})
    with atomic_output(target, "wb") as f, pd.ExcelWriter(f, engine="openpyxl") as xw:
        neutralise_formulas(df).to_excel(xw, index=False)
    sheet = openpyxl.load_workbook(target).active
    assert sheet["A2"].value == "'=1+1" and sheet["A2"].data_type == "s"  # text, not a formula
    assert sheet["B2"].value == -1 and sheet["B2"].data_type == "n"
    assert others(tmp_path, target) == []


def test_atomic_path_for_libraries_that_want_a_file_name(tmp_path):
    target = tmp_path / "digits.xlsx"
    target.write_bytes(OLD)
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".xlsx" and is_temp_file(tmp.name)
        pd.DataFrame({"a": [1]}).to_excel(tmp, index=False)
    assert pd.read_excel(target)["a"].tolist() == [1]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert pd.read_excel(target)["a"].tolist() == [1]
    assert others(tmp_path, target) == []


def test_temp_names_for_odd_and_long_names(tmp_path):
    for name in [
        "a.csv",
        "new\nline.csv",
        "ünï ✓.xlsx",
        "no_suffix",
        ".hidden",
        "x" * 250 + ".csv",
        "é" * 120,
    ]:
        tmp = temp_path_for(tmp_path / name)
        assert tmp.parent == tmp_path
        assert is_temp_file(tmp.name), name
        assert len(os.fsencode(tmp.name)) <= 255
        with atomic_output(tmp_path / name) as f:
            f.write(name)
        assert (tmp_path / name).read_text() == name
    assert not any(is_temp_file(p.name) for p in tmp_path.iterdir())


def test_remove_stale_temp_files_touches_only_ours_of_dead_processes(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)  # exited and reaped: no longer running
    stale = [
        tmp_path / f".digits.csv.tmp-{dead_pid}-0123abcd.csv",
        tmp_path / f".no suffix.tmp-{dead_pid}-deadbeef",
        tmp_path / f".new\nline.csv.tmp-{dead_pid}-00000000.csv",
    ]
    live = [
        tmp_path / f".digits.csv.tmp-{os.getpid()}-0123abcd.csv",  # ours, still running
        tmp_path / ".digits.csv.tmp-1-0123abcd.csv",  # pid 1 is alive
    ]
    not_ours = [
        tmp_path / "digits.csv",
        tmp_path / f"digits.csv.tmp-{dead_pid}-0123abcd.csv",  # no leading dot
        tmp_path / f".digits.csv.tmp-{dead_pid}-0123ABCD.csv",  # upper-case hex
        tmp_path / f".digits.csv.tmp-{dead_pid}-0123abcd.txt",  # suffix differs from the name's
        tmp_path / ".digits.csv.swp",
    ]
    for p in stale + live + not_ours:
        p.write_text("x")
    (tmp_path / f".dir.tmp-{dead_pid}-0123abcd").mkdir()  # directories are never removed
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in live + not_ours)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_neutralise_formulas():
    df = pd.DataFrame(
        {
            "file": [
                '=HYPERLINK("http://evil","click")',
                "+1",
                "-1+2",
                "@SUM(A1)",
                "\tx",
                "\rx",
                "plain",
                None,
            ],
            "digits": ["-1", "1-2", "a=b", "", "'=x", "=1", "x", "y"],
            "value": [-1, -2, 3, -4, 5, 6, 7, 8],
            "conf": [-0.5, 0.1, np.nan, 1.0, 0.2, 0.3, 0.4, 0.5],
            "mixed": [-1, "-1", 2.5, "=x", None, True, "ok", "@"],
        }
    )
    df.index = [f"r{i}" for i in range(8)]
    out = neutralise_formulas(df)
    assert out["file"].tolist()[:7] == [
        '\'=HYPERLINK("http://evil","click")',
        "'+1",
        "'-1+2",
        "'@SUM(A1)",
        "'\tx",
        "'\rx",
        "plain",
    ]
    assert pd.isna(out["file"].iloc[7])
    assert out["digits"].tolist() == ["'-1", "1-2", "a=b", "", "'=x", "'=1", "x", "y"]
    assert out["value"].tolist() == df["value"].tolist() and out["value"].dtype == df["value"].dtype
    pd.testing.assert_series_equal(out["conf"], df["conf"])
    assert out["mixed"].tolist()[:4] == [-1, "'-1", 2.5, "'=x"] and out["mixed"].tolist()[5:] == [
        True,
        "ok",
        "'@",
    ]
    assert df["file"].iloc[0].startswith("=")  # the input is not modified


def test_neutralise_formulas_labels_and_dtypes():
    df = pd.DataFrame({"=cmd": ["-x", "y"], "n": [1, 2]})
    df["cat"] = pd.Categorical(["=a", "b"])
    df["s"] = pd.array(["+x", None], dtype="string")
    df["when"] = pd.to_datetime(["2024-01-01", "2024-01-02"])
    df.index = pd.Index(["-row", "row"])
    out = neutralise_formulas(df)
    assert list(out.columns) == ["'=cmd", "n", "cat", "s", "when"]
    assert list(out.index) == ["'-row", "row"]
    assert out["'=cmd"].tolist() == ["'-x", "y"]
    assert out["cat"].tolist() == ["'=a", "b"] and isinstance(out["cat"].dtype, pd.CategoricalDtype)
    assert out["s"].tolist()[0] == "'+x" and pd.isna(out["s"].tolist()[1]) and out["s"].dtype == df["s"].dtype
    assert out["when"].tolist() == df["when"].tolist() and out["when"].dtype == df["when"].dtype
    assert out["n"].tolist() == [1, 2]


def test_a_reason_loses_its_file_name_as_given_or_as_shown():
    odd = os.fsdecode(b"/in/lat\xe9\n.png")  # not UTF-8, and a line break
    assert reason_without_file(odd, f"{odd}: not an image") == "not an image"
    assert reason_without_file(odd, "/in/lat\\xe9\\x0a.png: not an image") == "not an image"  # as display_text shows it
    assert reason_without_file("/in/a.png", "/in/b.png: gone") == "/in/b.png: gone"  # another file's name stays
