"""File names a nightly job meets on a share: bytes that are not UTF-8, control characters, names that
print alike. Real files with such names on disk, read by the real CLI in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest
from conftest import digit_strip

from hwr_batch.atomic import display_path, display_text, parse_display_text
from hwr_batch.errors import ExitCode
from hwr_batch.export import read_tables


def write_strip(folder: Path, name: bytes, data, confident, digits: str) -> str:
    """A PNG field crop of ``digits`` under the raw file name ``name``; returns its name as the tables show it."""
    ok, png = cv2.imencode(".png", digit_strip(data, [confident[int(d)][0] for d in digits]))
    assert ok
    path = os.fsencode(folder.absolute()) + b"/" + name
    with open(path, "wb") as f:
        f.write(png.tobytes())
    return display_path(path)


def write_junk(folder: Path, name: bytes) -> str:
    path = os.fsencode(folder.absolute()) + b"/" + name
    with open(path, "wb") as f:
        f.write(b"not an image at all\n")
    return display_path(path)


def test_display_text_never_shows_two_names_alike():
    names = [b"a\x01.png", b"a\x02.png", b"a\xe9.png", b"a\\xe9.png", "a\u00e9.png".encode(), b"a\x85.png",
             "a\u0085.png".encode(), b"a\\\\xe9.png", b"cr\r.png", b"cr\\x0d.png", b"tab\t.png"]
    shown = [display_path(n) for n in names]
    assert len(set(shown)) == len(names), shown
    for text in shown:
        assert text.isprintable() and text.encode("utf-8")  # one line, valid UTF-8
    assert display_text("a\u00e9 b.png") == "a\u00e9 b.png"  # printable text is left as it is
    assert [os.fsencode(parse_display_text(text)) for text in shown] == names  # and it can be undone exactly


def test_names_that_are_not_utf8_are_safe_in_tables_logs_and_annotations(
    tmp_path, mnist_test_small, confident_digits, cli
):
    from PIL import Image

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = write_strip(inbox, b"caf\xe9.png", mnist_test_small, confident_digits, "427")
    bad = write_junk(inbox, b"broken\xff\xfe.png")  # fails: its reason names the raw path
    strip = digit_strip(mnist_test_small, [confident_digits[d][0] for d in (8, 1)])
    pdf = os.fsencode(inbox.absolute()) + b"/scan\xe9.pdf"  # PDFs are opened by pypdfium2
    Image.fromarray(strip).save(os.fsdecode(pdf), resolution=300, title="scan")
    log_file = tmp_path / "nightly.log"
    out, pages = tmp_path / "out", tmp_path / "pages"
    for extra, code in (((), ExitCode.partial_failure), ((), ExitCode.ok), (("--retry-failed",), ExitCode.partial_failure)):
        # a failed file once crashed every later run (writing errors.csv)
        result = cli("--log-file", log_file, "process", inbox, "--out", out, "--annotate", pages, "-j", "1", *extra)
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr
    tables = read_tables(out)
    assert dict(zip(tables["fields"]["file"], tables["fields"]["digits"])) == {good: "427", display_path(pdf): "81"}
    assert tables["errors"]["file"].tolist() == [bad]
    assert tables["errors"]["reason"].iloc[0].startswith("not an image")  # the file is named in its own column
    (out / "errors.csv").read_bytes().decode("utf-8")  # valid UTF-8
    log = log_file.read_bytes().decode("utf-8")
    assert "Logging error" not in log and "Traceback" not in log
    assert f"ERROR {bad}: not an image" in log
    assert len(list(pages.glob("*.jpg"))) == 2  # the PNG scan and the PDF page: written, no crash in OpenCV

    xlsx = cli("--json-logs", "process", inbox, "--out", tmp_path / "xlsx", "--format", "xlsx", "-j", "1")
    assert xlsx.returncode == ExitCode.partial_failure, xlsx.stderr
    messages = [json.loads(line)["message"] for line in xlsx.stderr.splitlines()]
    assert f"{bad}: not an image or PDF file hwr-batch can read" in messages
    sheet = openpyxl.load_workbook(tmp_path / "xlsx" / "results.xlsx", read_only=True)["errors"]
    assert [row[0] for row in sheet.iter_rows(min_row=2, values_only=True)] == [bad]


def test_control_characters_in_names_cannot_split_rows_or_inject_formulas(
    tmp_path, mnist_test_small, confident_digits, cli
):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    truth = {
        write_strip(inbox, b"cr\r=cmd|'+C calc'!A0.png", mnist_test_small, confident_digits, "31"): "31",
        write_strip(inbox, b"lf\n=1+1.png", mnist_test_small, confident_digits, "42"): "42",
        write_strip(inbox, b"tab\t-x.png", mnist_test_small, confident_digits, "56"): "56",
        write_strip(inbox, b"bell\x07.png", mnist_test_small, confident_digits, "70"): "70",
    }
    bad = write_junk(inbox, b"junk\r@SUM(1).png")
    out = tmp_path / "out"
    for extra in (b"more.png", b"again\r.png"):  # each run rewrites the cumulative tables it read back
        result = cli("process", inbox, "--out", out, "-j", "1", "--retry-failed")
        assert result.returncode == ExitCode.partial_failure, result.stderr
        truth[write_strip(inbox, extra, mnist_test_small, confident_digits, "9")] = "9"
    result = cli("process", inbox, "--out", out, "-j", "1", "--retry-failed")
    assert result.returncode == ExitCode.partial_failure, result.stderr

    for name in ("digits", "fields", "errors"):
        data = (out / f"{name}.csv").read_bytes()
        lines = re.split(rb"\r\n|\r|\n", data.rstrip(b"\n"))  # a reader that splits at a bare CR or LF
        rows = len(pd.read_csv(out / f"{name}.csv"))
        assert len(lines) == rows + 1, name
        for line in lines:
            (cells,) = csv.reader([line.decode("utf-8")])
            assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells), line
    fields = read_tables(out)["fields"]
    assert dict(zip(fields["file"], fields["digits"])) == truth
    assert read_tables(out)["errors"]["file"].tolist() == [bad]
    with open(out / "fields.csv", newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    for column in ("page", "field", "x", "y", "width", "height", "digit_count"):  # still whole numbers
        assert all(re.fullmatch(r"\d+", r[column]) for r in records), column


def test_names_that_print_alike_keep_their_own_rows(tmp_path, mnist_test_small, confident_digits, cli):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = {b"a\x01.png": "12", b"a\x02.png": "34", b"b\xe9.png": "56", b"b\\xe9.png": "78"}
    truth = {write_strip(inbox, n, mnist_test_small, confident_digits, d): d for n, d in names.items()}
    assert len(truth) == 4
    out = tmp_path / "out"
    first = cli("process", inbox, "--out", out, "-j", "1")
    assert first.returncode == 0, first.stderr
    assert dict(zip(read_tables(out)["fields"]["file"], read_tables(out)["fields"]["digits"])) == truth
    changed = write_strip(inbox, b"a\x02.png", mnist_test_small, confident_digits, "90")
    truth[changed] = "90"
    second = cli("process", inbox, "--out", out, "-j", "1")
    assert second.returncode == 0 and "1 to process" in second.stderr, second.stderr
    third = cli("process", inbox, "--out", out, "-j", "1")
    assert "0 to process, 4 already done" in third.stderr, third.stderr
    tables = read_tables(out)
    assert dict(zip(tables["fields"]["file"], tables["fields"]["digits"])) == truth
    assert tables["digits"].groupby("file").size().to_dict() == {f: len(d) for f, d in truth.items()}


@pytest.mark.parametrize("name", [b"page\xe9.png", b"page\r\n.png"])
def test_annotations_are_drawn_for_odd_names(tmp_path, mnist_test_small, confident_digits, cli, name):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_strip(inbox, name, mnist_test_small, confident_digits, "5")
    result = cli("process", inbox, "--out", tmp_path / "out", "--annotate", tmp_path / "pages", "-j", "1")
    assert result.returncode == 0, result.stderr
    (page,) = tmp_path.joinpath("pages").glob("*.jpg")
    drawn = cv2.imdecode(np.fromfile(page, np.uint8), cv2.IMREAD_COLOR)
    assert (drawn[..., 1] > drawn[..., 2] + 60).any()  # the green box of the field read was drawn


def test_corrections_copied_from_fields_csv_name_the_exact_files(tmp_path, mnist_test_small, confident_digits, cli):
    """`hwr-batch learn` reads a copy of fields.csv: its escaped names must lead back to the scans."""
    from hwr_batch.learn import read_corrections

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in (b"back\\slash.png", b"caf\xe9.png", b"tab\t.png"):
        write_strip(inbox, name, mnist_test_small, confident_digits, "38")
    assert cli("process", inbox, "--out", tmp_path / "out", "-j", "1").returncode == 0
    corrections = read_corrections(tmp_path / "out" / "fields.csv")
    assert sorted(os.fsencode(c.file) for c in corrections) == sorted(
        os.fsencode(inbox.absolute()) + b"/" + n for n in (b"back\\slash.png", b"caf\xe9.png", b"tab\t.png")
    )
    assert all(c.file.is_file() for c in corrections)
