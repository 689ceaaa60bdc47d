"""Page layout on generated forms: boxes found where the truth says, deskew, no printed text, modes."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from hwr_batch.layout import Field, analyse_page, deskew, estimate_skew, find_fields
from hwr_batch.synth import CLEAN_SCAN, FormSpec, make_form


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


@pytest.fixture(scope="module")
def pages(mnist_test_small):
    """Three scanned boxed forms at 300, 250 and 200 dpi with skews of +2.6, -1.4 and -2.9 degrees."""
    out = []
    for k, (dpi, skew) in enumerate(((300, 2.6), (250, -1.4), (200, -2.9))):
        img, truth = make_form(np.random.default_rng([11, k]), mnist_test_small, dpi=dpi, skew_deg=skew)
        out.append((img, truth, analyse_page(img)))
    return out


def test_boxes_match_truth(pages):
    for img, truth, layout in pages:
        assert layout.mode == "boxes"
        assert len(layout.fields) == len(truth["fields"])
        for f, t in zip(layout.fields, truth["fields"]):  # same reading order as the truth
            assert f.kind == "box"
            assert iou(f.bbox, t["bbox"]) > 0.8, (f.bbox, t["bbox"])


def test_deskew_angle(pages):
    for img, truth, layout in pages:
        assert abs(layout.angle - truth["skew_deg"]) < 0.5
        assert abs(estimate_skew(img) - truth["skew_deg"]) < 0.5


def test_printed_labels_are_not_fields(pages):
    for img, truth, layout in pages:
        for mode in ("auto", "boxes"):
            fields = layout.fields if mode == "auto" else find_fields(img, mode=mode)
            for f in fields:
                assert any(iou(f.bbox, t["bbox"]) > 0.5 for t in truth["fields"])
            for p in truth["printed"]:
                assert not any(iou(f.bbox, p["bbox"]) > 0.3 for f in fields), p["text"]


def test_field_images_have_no_box_lines(mnist_test_small):
    img, truth = make_form(np.random.default_rng(21), mnist_test_small, dpi=300, scan=CLEAN_SCAN)
    layout = analyse_page(img)
    assert layout.angle == 0.0
    for f, t in zip(layout.fields, truth["fields"]):
        x, y, w, h = f.inner
        dark = f.image < 128
        # The printed rectangle's rows/columns are gone: only handwriting crossing them can stay dark.
        for band in (dark[max(0, y - 4) : y + 4], dark[y + h - 4 : y + h + 4]):
            assert band.any(axis=0).mean() < 0.35, t["text"]
        if t["kind"] == "comb":
            assert len(f.cells) == t["cells"]
        # Handwriting survives: about as much ink as the truth digits cover.
        assert dark[y : y + h, x : x + w].sum() > 0.1 * sum(d["bbox"][2] * d["bbox"][3] for d in t["digits"])


def test_whole_mode_on_a_crop(pages):
    img, truth, layout = pages[0]
    t = truth["fields"][0]
    f = layout.fields[0]
    # A crop of one field, cut from the deskewed page inside its box: too small for a page, no box: whole.
    page = deskew(img, layout.angle)
    m = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), -layout.angle, 1.0)
    cx, cy = m @ np.array([t["bbox"][0] + t["bbox"][2] / 2, t["bbox"][1] + t["bbox"][3] / 2, 1.0])
    _, _, iw, ih = f.inner
    crop = page[int(cy - ih / 2 + 8) : int(cy + ih / 2 - 8), int(cx - iw / 2 + 8) : int(cx + iw / 2 - 8)]
    whole = analyse_page(crop)
    assert whole.mode == "whole" and len(whole.fields) == 1
    assert whole.fields[0].kind == "whole" and whole.fields[0].bbox == (0, 0, crop.shape[1], crop.shape[0])
    assert find_fields(crop, mode="whole")[0].image is crop
    # With its box around it, the crop is read as a box.
    boxed = page[int(cy - ih) : int(cy + ih), int(cx - iw / 2 - 40) : int(cx + iw / 2 + 40)]
    fields = find_fields(boxed)
    assert len(fields) == 1 and fields[0].kind == "box"


def test_blank_pages(mnist_test_small):
    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(235, 4, (3508, 2480)), 0, 255).astype(np.uint8)
    assert find_fields(blank) == []
    assert find_fields(blank, mode="boxes") == []
    layout = analyse_page(np.full((300, 500), 255, np.uint8))
    assert layout.mode == "whole" and len(layout.fields) == 1  # a small crop is one field, even if empty


def test_lines_mode_on_an_unboxed_page(mnist_test_small):
    img, truth = make_form(np.random.default_rng(31), mnist_test_small, dpi=200, spec=FormSpec(style="lines"))
    layout = analyse_page(img)
    assert layout.mode == "lines"
    inks = []
    for t in truth["fields"]:
        b = np.array([d["bbox"] for d in t["digits"]])
        inks.append((*b[:, :2].min(axis=0), *(b[:, :2] + b[:, 2:]).max(axis=0) - b[:, :2].min(axis=0)))
    found = sum(any(iou(f.bbox, ink) > 0.5 for f in layout.fields) for ink in inks)
    assert found >= 0.8 * len(inks)
    for f in layout.fields:
        assert f.kind == "line"
        assert any(iou(f.bbox, ink) > 0.2 for ink in inks)  # no printed title or label is a field


def test_field_is_frozen(pages):
    f = pages[0][2].fields[0]
    assert isinstance(f, Field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.kind = "line"  # type: ignore[misc]
    with pytest.raises(ValueError):
        analyse_page(pages[0][0], mode="columns")


def test_choose_dpi_trusts_plausible_tags_and_estimates_the_rest_from_the_page_size():
    from hwr_batch.layout import choose_dpi

    a4_at_300 = (3508, 2480)
    assert choose_dpi(300.0, a4_at_300) == (300.0, "")
    assert choose_dpi(None, a4_at_300)[0] == pytest.approx(300, abs=0.5)  # untagged: from the size, silently
    for wrong in (72.0, 1.0, 600.0, 150.0):  # each would make it a page no form is printed on
        dpi, why = choose_dpi(wrong, a4_at_300)
        assert dpi == pytest.approx(300, abs=0.5) and f"its {wrong:.0f} dpi tag" in why
    assert choose_dpi(600.0, (4960, 3496)) == (600.0, "")  # an A5 page at 600 dpi is one: its tag holds
    assert choose_dpi(200.0, (2200, 1700)) == (200.0, "")  # Letter at 200 dpi
    assert choose_dpi(600.0, (120, 700)) == (600.0, "")  # a crop: nothing to check the tag against
    assert choose_dpi(72.0, (120, 700)) == (
        300.0, "its 72 dpi tag is implausible; read at 300 dpi, the default for an image that is not a full page"
    )


def comb_page(n: int = 6, x0: int = 200, y0: int = 300, cell: int = 60, height: int = 80) -> np.ndarray:
    """A 300 dpi page with one comb of ``n`` cells, a zero in each."""
    page = np.full((700, 1000), 235, np.uint8)
    cv2.rectangle(page, (x0, y0), (x0 + n * cell, y0 + height), 20, 3)
    for k in range(1, n):
        cv2.line(page, (x0 + k * cell, y0), (x0 + k * cell, y0 + height), 20, 3)
    for k in range(n):
        cv2.circle(page, (x0 + k * cell + cell // 2, y0 + height // 2), 18, 40, 5)
    return page


def separators_on_page(field: Field) -> list[float]:
    """The page x of each edge between two cells of a comb field."""
    y = field.inner[1] + field.inner[3] / 2
    return [float((field.to_page @ np.array([b, y, 1.0]))[0])
            for (_, b), _next in zip(field.cells, field.cells[1:])]


@pytest.mark.parametrize("n", [2, 6])
@pytest.mark.parametrize("end", ["first", "last"])
def test_a_comb_keeps_an_end_cell_whose_thick_digit_breaks_its_outline(end, n):
    # The end cell holds a thick stroke that runs into the comb's side and into the separator, so the
    # line grid sees no clean hole there. The cell (and its digit) must still belong to the field, with
    # every separator where it is printed.
    x0, y0, cell, height = 200, 300, 60, 80
    page = comb_page(n, x0, y0, cell, height)
    c0 = x0 if end == "first" else x0 + (n - 1) * cell
    cv2.line(page, (c0 - 6, y0 + 25), (c0 + cell + 6, y0 + 25), 30, 14)  # a thick bar across the cell
    cv2.line(page, (c0 + cell - 10, y0 - 4), (c0 + 8, y0 + height + 4), 30, 14)  # and a thick stroke
    fields = find_fields(page, mode="boxes", dpi=300)
    assert len(fields) == 1, [f.bbox for f in fields]
    (field,) = fields
    assert iou(field.bbox, (x0, y0, n * cell, height)) > 0.9, field.bbox
    assert len(field.cells) == n, field.cells
    assert np.allclose(separators_on_page(field), [x0 + k * cell for k in range(1, n)], atol=4), separators_on_page(field)


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("tick", [False, True])
def test_a_rule_joined_to_a_comb_adds_no_cell(n, tick):
    # A printed rule running from a comb's (or a plain box's) corner makes its outline reach past the
    # first cell, with a tick where a cell's side would stand: no cell is printed there, none is added.
    x0, y0, cell, height = 300, 300, 60, 80
    page = comb_page(n, x0, y0, cell, height)
    cv2.line(page, (x0 - 80, y0 + height), (x0, y0 + height), 20, 3)
    if tick:
        cv2.line(page, (x0 - cell, y0), (x0 - cell, y0 + height), 20, 3)
    (field,) = find_fields(page, mode="boxes", dpi=300)
    assert iou(field.bbox, (x0, y0, n * cell, height)) > 0.9, field.bbox
    assert len(field.cells) == (n if n > 1 else 0), field.cells


@pytest.mark.parametrize("name", ["page_0001.png", "page_0002.jpg"])
def test_a_comb_whose_tick_a_digit_hides_keeps_all_its_cells(name):
    # On page_0001 a digit's stroke covers the second tick of a seven-cell comb: the comb was read as six
    # cells, one twice as wide, and a template made from the page expected six digits where seven stand.
    import json

    from conftest import REPO

    truth = json.loads((REPO / "samples" / name).with_suffix(".json").read_text())
    page = cv2.imread(str(REPO / "samples" / name), cv2.IMREAD_GRAYSCALE)
    fields = find_fields(page, mode="boxes", dpi=truth["dpi"])
    combs = [f for f in truth["fields"] if f["kind"] == "comb" and f["cells"] > 1]
    assert combs
    for comb in combs:
        found = max(fields, key=lambda f: iou(f.bbox, comb["bbox"]))
        assert iou(found.bbox, comb["bbox"]) > 0.8
        assert len(found.cells) == comb["cells"], (comb["text"], found.cells)
