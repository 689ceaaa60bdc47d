"""Form templates: a template made from one generated copy registers and reads the others; another layout does not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import fixture_idx

from hwr_batch import template as T
from hwr_batch.classify import load_classifier
from hwr_batch.layout import box_iou
from hwr_batch.mnist import load_idx_pair
from hwr_batch.read import FileReading, ReadSettings, read_page
from hwr_batch.rows import classify_readings
from hwr_batch.synth import make_form_copies


@pytest.fixture(scope="module")
def copies():
    digits = load_idx_pair(*fixture_idx("test"))
    return make_form_copies(12, digits, layout_seed=5, seed=2), make_form_copies(4, digits, layout_seed=9, seed=3)


@pytest.fixture(scope="module")
def form(copies, tmp_path_factory) -> T.Template:
    path = tmp_path_factory.mktemp("t") / "form.toml"
    path.write_text(T.dumps(T.create_template(copies[0][0][0], dpi=300)))
    return T.load(path)


def _true_reads(img: np.ndarray, truth: dict, classifier) -> list[str]:
    """What the model reads in the layout's own frame, put there with the generator's true transform."""
    m = cv2.invertAffineTransform(np.array(truth["transform"]))
    W, H = 2480, 3508
    upright = cv2.warpAffine(img, m, (W, H), borderValue=255)
    page, images = read_page(upright, dpi=300, settings=ReadSettings(field_mode="boxes"))
    _, rows, _ = classify_readings([FileReading("p", [page], images)], classifier)
    out = []
    for box in truth["layout_fields"]:
        best = max(rows, key=lambda r: box_iou(box, (r["x"], r["y"], r["width"], r["height"])))
        out.append(best["digits"])
    return out


def test_template_lists_every_box_and_survives_toml(copies, form):
    truth = copies[0][0][1]
    assert len(form.fields) == len(truth["fields"])
    assert [f.cells for f in form.fields] == [f["cells"] for f in truth["fields"]]
    assert len(form.keypoints) == len(form.descriptors) > 100


def test_every_copy_registers_and_reads_as_with_true_boxes(copies, form):
    classifier = load_classifier()
    rotations = []
    for img, truth in copies[0][1:]:
        reading = T.read_form(img, [form], classifier, dpi=300)
        assert reading.status == "read", truth["rotation_deg"]
        rotations.append(truth["rotation_deg"])
        assert list(reading.values.values()) == _true_reads(img, truth, classifier)
    assert any(r > 90 for r in rotations) and any(r < 90 for r in rotations)  # upside down and upright both met


def test_another_layout_is_unregistered(copies, form):
    for img, _ in copies[1]:
        assert T.best_registration(img, [form], dpi=300) is None


def test_rules_flag_by_name():
    f = T.TemplateField("amount", (0, 0, 10, 10), 6, digits=6, min=100, max=500000, pattern="[1-9][0-9]*")
    assert f.broken_rules("012345") == ["pattern"]
    assert f.broken_rules("99") == ["digits", "min"]
    assert f.broken_rules("") == ["required"]
    assert T.TemplateField("x", (0, 0, 1, 1), optional=True).broken_rules("") == []


def test_bad_template_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n")
    with pytest.raises(ValueError, match="bad.toml"):
        T.load(bad)


def test_cli_create_show_read(copies, tmp_path, cli):
    from PIL import Image

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(copies[0][0][0]).save(tmp_path / "sample.png", dpi=(300, 300))
    for i, (img, _) in enumerate([*copies[0][1:3], copies[1][0]]):
        Image.fromarray(img).save(scans / f"p{i}.png", dpi=(300, 300))
    made = cli("template", "create", tmp_path / "sample.png", "-o", tmp_path / "form.toml")
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "form.toml").read_text().replace('name = "field_01"', 'name = "member_no"\ndigits = 99', 1)
    (tmp_path / "form.toml").write_text(text)
    shown = cli("template", "show", tmp_path / "form.toml", scans / "p0.png", "-o", tmp_path / "preview.png")
    assert shown.returncode == 0, shown.stderr
    assert cv2.imread(str(tmp_path / "preview.png")).shape[:2] == copies[0][1][0].shape[:2]
    read = cli("template", "read", scans, "--template", tmp_path / "form.toml", "-o", tmp_path / "out")
    assert read.returncode == 1, read.stderr  # one page of another form
    import pandas as pd

    forms = pd.read_csv(tmp_path / "out" / "forms.csv", dtype=str, keep_default_na=False)
    assert list(forms.columns[:3]) == ["file", "page", "member_no"] and forms.columns[-1] == "status"
    assert list(forms["status"]) == ["read", "read", "unregistered"]
    assert list(forms["member_no"][:2]) == [copies[0][1][1]["fields"][0]["text"]] * 2
    assert all("digits" in flag for flag in forms["member_no_flag"][:2])  # the rule's name
    errors = pd.read_csv(tmp_path / "out" / "forms-errors.csv")
    assert list(errors["stage"]) == ["register"] and errors["file"][0].endswith("p2.png")
