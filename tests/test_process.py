"""`hwr-batch process` end to end: generated forms in every input format, read by the real CLI,
checked against the generator's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hwr_batch.errors import ExitCode
from hwr_batch.export import read_tables
from hwr_batch.layout import box_iou
from hwr_batch.load import OWN_FOLDER_MARKER
from hwr_batch.synth import write_forms

FORMATS = ("png", "jpg", "tif-multi", "pdf", "tif-g4")


def page_truths(folder: Path) -> dict[tuple[str, int], dict]:
    """{(absolute image path, 1-based page): truth} for every page the generator wrote."""
    truths = {}
    for json_path in sorted(folder.glob("page_*.json")):
        truth = json.loads(json_path.read_text())
        for where in truth["files"]:
            truths[(str((folder / where["path"]).absolute()), where["frame"] + 1)] = truth
    return truths


def score(fields: pd.DataFrame, truths: dict[tuple[str, int], dict]) -> dict[str, float]:
    """Digit accuracy (position-aligned), field exact-match, and fields read outside every truth box."""
    digits_right = digits_total = fields_right = fields_total = stray = 0
    for (file, page), truth in truths.items():
        read = fields[(fields["file"] == file) & (fields["page"] == page)]
        boxes = [tuple(int(v) for v in row) for row in read[["x", "y", "width", "height"]].itertuples(index=False)]
        strings = list(read["digits"].fillna(""))
        matched = set()
        for field in truth["fields"]:
            want = "".join(str(d["label"]) for d in field["digits"])
            overlaps = [(box_iou(box, field["bbox"]), i) for i, box in enumerate(boxes)]
            best, index = max(overlaps, default=(0.0, -1))
            got = strings[index] if best > 0.5 else ""
            matched.add(index)
            fields_total += 1
            fields_right += got == want
            digits_total += len(want)
            digits_right += sum(a == b for a, b in zip(got, want))
        stray += sum(1 for i, box in enumerate(boxes) if max((box_iou(box, f["bbox"]) for f in truth["fields"]), default=0) < 0.2)
    return {
        "digit_accuracy": digits_right / digits_total,
        "field_exact": fields_right / fields_total,
        "stray_fields": stray,
        "pages": len(truths),
        "fields": fields_total,
    }


@pytest.fixture(scope="module")
def forms(tmp_path_factory, mnist_test_small):
    folder = tmp_path_factory.mktemp("forms")
    for start, fmt in enumerate(FORMATS):  # one format each, two pages for the multi-page ones
        pages = 2 if fmt in ("tif-multi", "pdf") else 1
        # PDF pages are rendered at --pdf-dpi (300): made at 300 dpi, their truth boxes hold as they are.
        dpi = 300 if fmt == "pdf" else (200, 300)
        write_forms(folder / fmt, pages, seed=11, digits=mnist_test_small, formats=(fmt,), dpi=dpi, start=10 * start + 1)
    return folder


@pytest.mark.slow
def test_process_reads_forms_in_every_format(forms, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("process", forms, "--out", out, "--format", "xlsx", "--annotate", tmp_path / "pages")
    assert result.returncode == 0, result.stderr
    tables = read_tables(out, "xlsx")
    truths = {}
    for fmt in FORMATS:
        truths.update(page_truths(forms / fmt))
    assert set(zip(tables["fields"]["file"], tables["fields"]["page"])) == set(truths)  # every page of every file
    figures = score(tables["fields"], truths)
    assert figures["stray_fields"] == 0  # no printed label or number read as a field
    # Regression floors, a little under what this fixed page set scores (89% / 85% when written);
    # the product's figures on 200 pages come from scripts/score_forms.py.
    assert figures["digit_accuracy"] >= 0.87, figures
    assert figures["field_exact"] >= 0.8, figures
    assert tables["errors"].empty
    # One row per digit, consistent with the fields table.
    digits = tables["digits"]
    assert len(digits) == tables["fields"]["digit_count"].sum()
    assert set(digits.columns) >= {"confidence", "second_choice", "second_confidence", "flagged"}
    assert (digits["confidence"] >= digits["second_confidence"]).all()
    assert len(list((tmp_path / "pages").glob("*.jpg"))) == len(truths)


def test_whole_mode_reads_a_single_field_crop(tmp_path, mnist_test_small, confident_digits, cli):
    import cv2
    from conftest import digit_strip

    indices = [confident_digits[d][1] for d in (3, 1, 4, 1, 5)]
    cv2.imwrite(str(tmp_path / "amount.jpg"), digit_strip(mnist_test_small, indices))
    result = cli("process", tmp_path / "amount.jpg", "--out", tmp_path / "out", "--fields", "whole")
    assert result.returncode == 0, result.stderr
    fields = pd.read_csv(tmp_path / "out" / "fields.csv", dtype={"digits": str})
    assert fields["digits"].tolist() == ["31415"]
    digits = pd.read_csv(tmp_path / "out" / "digits.csv", dtype={"digit": str})
    assert digits["digit"].tolist() == list("31415") and digits["position"].tolist() == [1, 2, 3, 4, 5]
    assert (digits["x"].diff().dropna() > 0).all()  # left to right


def test_every_page_read_has_a_row_in_the_pages_table(tmp_path, cli):
    """A page with no field, an all-black page and a blank scan used to leave no trace in any table."""
    import cv2
    from conftest import REPO

    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "white.png"), np.full((3508, 2480), 245, np.uint8))
    cv2.imwrite(str(folder / "black.png"), np.full((3508, 2480), 8, np.uint8))
    text_only = np.full((3508, 2480), 240, np.uint8)
    cv2.putText(text_only, "PRINTED TITLE", (300, 300), cv2.FONT_HERSHEY_SIMPLEX, 3, 20, 6)
    cv2.imwrite(str(folder / "text only.png"), text_only)
    form = REPO / "samples" / "page_0001.png"
    (folder / "form.png").write_bytes(form.read_bytes())
    for fmt in ("csv", "xlsx"):
        out = tmp_path / fmt
        result = cli("process", folder, "--out", out, "--format", fmt, "--jobs", "1")
        assert result.returncode == 0, result.stderr
        tables = read_tables(out, fmt)
        pages = tables["pages"].set_index("file")
        status = {Path(f).name: s for f, s in pages["status"].items()}
        assert status == {"white.png": "blank", "black.png": "all black", "text only.png": "no fields", "form.png": "read"}
        row = pages.loc[str((folder / "form.png").absolute())]
        fields = tables["fields"]
        assert row["fields"] == len(fields) and row["digit_count"] == fields["digit_count"].sum()
        assert row["flagged_fields"] == fields["flagged"].sum() and row["page"] == 1
        assert 190 < row["dpi"] < 210  # the sample is a 200 dpi A4 page
    assert (tmp_path / "csv" / "pages.csv").is_file()


def test_a_wrong_resolution_tag_is_ignored_and_logged_and_dpi_overrides_it(tmp_path, mnist_test_small, cli):
    """The same pixels tagged 600 dpi lost 8 of 10 fields, tagged 72 dpi read 12 empty ones, untagged TIFF lost all."""
    from PIL import Image

    from hwr_batch.synth import write_forms

    (page,) = write_forms(tmp_path / "gen", 1, seed=3, digits=mnist_test_small, formats=("png",), dpi=300)
    image = Image.open(page)
    folder = tmp_path / "in"
    folder.mkdir()
    image.save(folder / "right.png", dpi=(300, 300))
    image.save(folder / "tagged 600.png", dpi=(600, 600))
    image.save(folder / "tagged 72.png", dpi=(72, 72))
    image.save(folder / "untagged.tif")  # Pillow reads (1, 1): no resolution unit
    result = cli("process", folder, "--out", tmp_path / "out", "--jobs", "1")
    assert result.returncode == 0, result.stderr
    tables = read_tables(tmp_path / "out")
    read = tables["fields"].groupby("file")["digits"].apply(list).to_dict()
    right = read.pop(str((folder / "right.png").absolute()))
    assert len(right) >= 10 and all(fields == right for fields in read.values()), read
    assert set(tables["pages"]["dpi"]) == {300.0}
    for name, tag in (("tagged 600.png", 600), ("tagged 72.png", 72), ("untagged.tif", 1)):
        assert f"{name}: page 1: its {tag} dpi tag" in result.stderr
    assert "right.png: page" not in result.stderr

    forced = cli("process", folder / "right.png", "--out", tmp_path / "forced", "--jobs", "1", "--dpi", "600")
    assert forced.returncode == 0 and "dpi tag" not in forced.stderr
    assert read_tables(tmp_path / "forced")["pages"]["dpi"].tolist() == [600.0]


def covered_ink(page: np.ndarray, annotated: np.ndarray, fields: pd.DataFrame, margin: int) -> int:
    """Pixels on or within 3 px of ink on the page (outside every field box) that the annotation painted in colour."""
    import cv2

    colour = annotated.max(axis=2).astype(int) - annotated.min(axis=2).astype(int) > 80
    near_ink = cv2.dilate((page < 100).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    outside = np.ones(page.shape, bool)
    for x, y, w, h in fields[["x", "y", "width", "height"]].itertuples(index=False):
        outside[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin] = False
    return int(np.count_nonzero(colour & near_ink & outside))


def test_annotations_label_fields_without_covering_print_and_are_jpeg(tmp_path, mnist_test_small, cli):
    import cv2
    from conftest import REPO, digit_strip

    from hwr_batch.load import iter_pages

    form = REPO / "samples" / "page_0001.png"  # its labels used to cover the printed word "Pin"
    result = cli("process", form, "--out", tmp_path / "out", "--annotate", tmp_path / "pages")
    assert result.returncode == 0, result.stderr
    (picture,) = (tmp_path / "pages").glob("*.jpg")
    assert picture.suffix == ".jpg" and picture.read_bytes()[:2] == b"\xff\xd8"
    page = next(iter_pages(form)).gray
    annotated = cv2.imread(str(picture))
    assert annotated.shape[:2] == page.shape  # every label found room on the page
    fields = read_tables(tmp_path / "out")["fields"]
    assert covered_ink(page, annotated, fields, margin=6) < 10  # 0 when measured; labels over "Pin" made 57+

    # A 300 dpi A4 page (13 MB as PNG before) and a small crop, flagged: its label goes in a margin.
    big = REPO / "samples" / "page_0002.jpg"
    crop = tmp_path / "crop.png"
    cv2.imwrite(str(crop), digit_strip(mnist_test_small, [0, 1, 2]))
    result = cli("process", big, crop, "--out", tmp_path / "out2", "--annotate", tmp_path / "pages2", "--min-confidence", "1")
    assert result.returncode == 0, result.stderr
    pictures = {p.name.split("-p1-")[0]: p for p in (tmp_path / "pages2").glob("*.jpg")}
    assert pictures["page_0002"].stat().st_size < 3_000_000
    crop_picture = cv2.imread(str(pictures["crop"]))
    height, width = cv2.imread(str(crop), cv2.IMREAD_GRAYSCALE).shape
    assert crop_picture.shape[0] > height and crop_picture.shape[1] >= width  # a margin holds the label


def test_annotations_inside_an_input_folder_are_never_read_as_scans(tmp_path, cli):
    """Annotated pages written into the scans' folder by one run are not read as scans by the next,
    even when that run does not name the annotation folder (its marker file says what it is)."""
    import shutil

    from conftest import REPO

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(REPO / "samples" / "page_0001.png", inbox)
    result = cli("process", inbox, "--out", tmp_path / "out", "--annotate", inbox / "annotated")
    assert result.returncode == 0, result.stderr
    assert len(list((inbox / "annotated").glob("*.jpg"))) == 1
    before = read_tables(tmp_path / "out")["fields"]
    result = cli("process", inbox, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    after = read_tables(tmp_path / "out")["fields"]
    assert set(after["file"]) == set(before["file"]) and len(after) == len(before)
    assert "holds annotated pages an earlier run wrote" in result.stderr
    for source, folder in ((inbox, inbox), (inbox, tmp_path), (inbox / "page_0001.png", inbox)):
        # the input folder itself, a folder holding it, a file's own folder: refused before any work
        refused = cli("process", source, "--out", tmp_path / "out2", "--annotate", folder)
        assert refused.returncode == ExitCode.bad_args and "its pictures would be read as scans" in refused.stderr
        assert not (folder / OWN_FOLDER_MARKER).exists() and not (tmp_path / "out2").exists()


def test_a_run_says_when_files_done_before_lack_their_annotations(tmp_path, cli):
    """Removed annotations are not redrawn by reading the files again each night (annotation folders
    get cleared to save space), but the run says so, and --force redraws them."""
    from conftest import REPO

    form, out, pages = REPO / "samples" / "page_0001.png", tmp_path / "out", tmp_path / "pages"
    assert cli("process", form, "--out", out, "--annotate", pages).returncode == 0
    (picture,) = pages.glob("*.jpg")
    picture.unlink()
    result = cli("process", form, "--out", out, "--annotate", pages)
    assert result.returncode == 0, result.stderr
    assert "1 file done before has no annotated page" in result.stderr and "--force redraws them" in result.stderr
    assert not picture.exists()
    result = cli("process", form, "--out", out, "--annotate", pages, "--force")
    assert result.returncode == 0, result.stderr
    assert picture.exists() and "no annotated page" not in result.stderr


def test_field_label_names_the_field_and_why_it_is_flagged():
    from hwr_batch.annotate import field_label

    assert field_label({"field": 3, "digits": "0421", "flagged": False, "flag_reason": ""}) == "#3: 0421"
    flagged = {"field": 7, "digits": "", "flagged": True, "flag_reason": "no digits found"}
    assert field_label(flagged) == "#7: ? (no digits found)"
