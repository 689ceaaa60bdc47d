"""The synthetic form generator: geometry of the truth, determinism, file formats, command line."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from hwr_batch.load import iter_pages
from hwr_batch.synth import CLEAN_SCAN, FormSpec, main, make_form, write_forms


def test_page_size_and_truth(mnist_test_small):
    img, truth = make_form(np.random.default_rng(1), mnist_test_small, dpi=300)
    assert img.shape == (3508, 2480) and img.dtype == np.uint8
    assert (truth["width"], truth["height"], truth["dpi"]) == (2480, 3508, 300)
    assert abs(truth["skew_deg"]) <= 3.0
    assert len(truth["fields"]) >= 5
    for f in truth["fields"]:
        assert f["kind"] in ("box", "comb")
        assert 1 <= len(f["text"]) <= 10 and len(f["digits"]) == len(f["text"])
        assert f["text"] == "".join(str(d["label"]) for d in f["digits"])
        x, y, w, h = f["bbox"]
        for d in f["digits"]:
            dx, dy, dw, dh = d["bbox"]
            assert x <= dx + dw / 2 <= x + w and y <= dy + dh / 2 <= y + h  # written inside its box
            assert 0.6 * 5 / 25.4 * 300 <= dh <= 1.3 * 8 / 25.4 * 300  # about 5-8 mm tall
            assert mnist_test_small.labels[d["mnist_index"]] == d["label"]
    printed = " ".join(p["text"] for p in truth["printed"])
    assert "Form " in printed and "Page " in printed  # printed digits are on the page


def test_deterministic_for_a_seed(mnist_test_small):
    a, ta = make_form(np.random.default_rng([5, 1]), mnist_test_small, dpi=200)
    b, tb = make_form(np.random.default_rng([5, 1]), mnist_test_small, dpi=200)
    c, _ = make_form(np.random.default_rng([5, 2]), mnist_test_small, dpi=200)
    assert np.array_equal(a, b) and ta == tb
    assert a.shape == c.shape and not np.array_equal(a, c)


def test_truth_boxes_follow_the_skew(mnist_test_small):
    """The transformed corners of each box lie on the skewed page's box lines."""
    img, truth = make_form(np.random.default_rng(3), mnist_test_small, dpi=200, scan=CLEAN_SCAN, skew_deg=2.5)
    assert truth["skew_deg"] == 2.5
    hits = total = 0
    for f in truth["fields"]:
        c = np.array(f["corners"])
        for a, b in ((0, 1), (2, 3)):  # top and bottom edges: sample along them
            for t in np.linspace(0.1, 0.9, 9):
                x, y = (c[a] * (1 - t) + c[b] * t).round().astype(int)
                total += 1
                hits += img[y - 1 : y + 2, x - 1 : x + 2].min() < 100
    assert hits / total > 0.97


def test_line_style(mnist_test_small):
    _img, truth = make_form(np.random.default_rng(4), mnist_test_small, dpi=200, spec=FormSpec(style="lines"))
    assert truth["style"] == "lines" and {f["kind"] for f in truth["fields"]} == {"line"}


def test_fast(mnist_test_small):
    make_form(np.random.default_rng(0), mnist_test_small)
    t = time.perf_counter()
    for k in range(3):
        make_form(np.random.default_rng(k), mnist_test_small, dpi=300)
    assert (time.perf_counter() - t) / 3 < 1.0  # ~0.2 s on an idle core; lenient for a busy CI box


def test_write_forms_formats(tmp_path, mnist_test_small):
    files = write_forms(tmp_path, 2, seed=3, digits=mnist_test_small, dpi=200,
                        formats=("png", "jpg", "tif-g4", "tif-multi", "pdf"))
    names = sorted(p.name for p in files)
    assert names == sorted(["page_0001.png", "page_0002.png", "page_0001.jpg", "page_0002.jpg",
                            "page_0001_g4.tif", "page_0002_g4.tif", "pages.tif", "pages.pdf"])
    truth = json.loads((tmp_path / "page_0002.json").read_text())
    assert {"path": "pages.tif", "frame": 1} in truth["files"]
    assert {"path": "pages.pdf", "frame": 1} in truth["files"]
    with Image.open(tmp_path / "page_0001_g4.tif") as im:
        assert im.mode == "1" and im.info.get("compression") == "group4"
    assert len(list(iter_pages(tmp_path / "pages.tif"))) == 2
    pdf_pages = list(iter_pages(tmp_path / "pages.pdf", pdf_dpi=200))
    assert len(pdf_pages) == 2
    assert np.abs(np.subtract(pdf_pages[0].gray.shape, (truth["height"], truth["width"]))).max() <= 1  # render rounding
    png = next(iter_pages(tmp_path / "page_0001.png")).gray
    again, _ = make_form(np.random.default_rng([3, 1]), mnist_test_small, dpi=200)
    assert np.array_equal(png, again)  # page k of seed s is default_rng([s, k])


def test_command_line(tmp_path, mnist_dir):
    args = [str(tmp_path), "--pages", "1", "--seed", "2", "--dpi", "200", "--format", "jpg", "--data-dir", str(mnist_dir)]
    assert main(args) == 0
    assert (tmp_path / "page_0001.jpg").is_file() and (tmp_path / "page_0001.json").is_file()


def test_unknown_format(tmp_path, mnist_test_small):
    with pytest.raises(ValueError, match="unknown format"):
        write_forms(tmp_path, 1, digits=mnist_test_small, formats=("bmp",))
