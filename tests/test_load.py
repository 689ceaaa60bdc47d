"""Finding the scans to read (load stage): folders, globs, hidden files, missing paths."""

from __future__ import annotations

from pathlib import Path

from hwr_batch.load import find_inputs


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def names(files: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in files]


def test_folders_are_walked_for_supported_files_in_a_stable_order(tmp_path):
    touch(tmp_path, "b.png", "a.JPG", "notes.txt", ".hidden.png", "sub/c.tif", ".cache/d.png", "sub/e.PDF")
    files, problems = find_inputs([tmp_path, tmp_path / "missing"])
    assert names(files, tmp_path) == ["a.JPG", "b.png", "sub/c.tif", "sub/e.PDF"]
    assert problems == [(tmp_path / "missing", "no such file or folder")]


def test_include_and_exclude_globs_ignore_case(tmp_path):
    touch(tmp_path, "SCAN_0001.TIF", "scan_0002.tif", "cover.png", "Rejected/SCAN_0003.TIF", "rejected/x.tif")
    included, _ = find_inputs([tmp_path], include=["*.tif"])
    assert names(included, tmp_path) == ["SCAN_0001.TIF", "scan_0002.tif", "Rejected/SCAN_0003.TIF", "rejected/x.tif"]
    kept, _ = find_inputs([tmp_path], include=["scan_*"], exclude=["REJECTED"])
    assert names(kept, tmp_path) == ["SCAN_0001.TIF", "scan_0002.tif"]
