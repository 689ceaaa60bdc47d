"""`hwr-batch learn`: fine-tune on corrected fields, measured before and after, never over the shipped model."""

from __future__ import annotations

import csv
import hashlib
import json

import cv2
import numpy as np
import pytest
from conftest import SHIPPED_ONNX, digit_strip

pytest.importorskip("tensorflow")


def _write_fields(folder, data, count: int, rng) -> list[dict[str, str]]:
    """``count`` field crops of 1-3 fixture digits as PNG files, and their correction rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        picks = [int(i) for i in rng.choice(len(data), rng.integers(1, 4), replace=False)]
        name = f"field_{k:03d}.png"
        cv2.imwrite(str(folder / name), digit_strip(data, picks))
        rows.append({"file": name, "page": "1", "field": "1", "digits": "".join(str(int(data.labels[i])) for i in picks)})
    return rows


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "page", "field", "digits"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.slow
def test_learn_writes_a_measured_model_with_its_lineage_and_process_uses_it(cli, tmp_path, mnist_test_small):
    rows = _write_fields(tmp_path / "scans", mnist_test_small, 40, np.random.default_rng(3))
    rows.append({"file": "field_000.png", "page": "1", "field": "1", "digits": ""})  # "cannot read": left out
    corrections = tmp_path / "scans" / "corrections.csv"
    _write_csv(corrections, rows)
    out = tmp_path / "adapted"
    result = cli("learn", corrections, "--out", out, "--epochs", "2", "--holdout", "0.25")
    assert result.returncode == 0, result.stderr
    assert "held-back fields read exactly" in result.stdout
    record = json.loads((out / "learn.json").read_text())
    assert record["base_model_sha256"] == hashlib.sha256(SHIPPED_ONNX.read_bytes()).hexdigest()
    assert record["corrections_rows"] == 40 and record["fields_read"] == 40
    assert record["fields_used"] == 30 and record["fields_held_out"] == 10
    assert record["alignment"]["aligned"] > 0 and record["alignment"]["digits"] > 0
    assert 0.0 <= record["held_out_exact_before"] <= 1.0 and 0.0 <= record["held_out_exact_after"] <= 1.0
    assert record["better"] == (record["held_out_exact_after"] > record["held_out_exact_before"])
    assert record["model_sha256"] == hashlib.sha256((out / "hwr-digits.onnx").read_bytes()).hexdigest()
    assert (out / "hwr-digits.keras").is_file() and (out / "hwr-digits.json").is_file()
    # 10 held-back fields are too few to refit the calibration: the base model's record is carried over,
    # marked as such and bound to the new model.
    assert record["calibration"].startswith("copied from the base model's record")
    calibration = json.loads((out / "hwr-digits.calibration.json").read_text())
    shipped_calibration = json.loads(SHIPPED_ONNX.with_suffix(".calibration.json").read_text())
    assert calibration["model_sha256"] == record["model_sha256"]
    assert calibration["coef"] == shipped_calibration["coef"] and "note" in calibration["fitted_on"]
    assert "no calibration record" not in result.stderr
    # The shipped model is untouched, and process reads with the new one.
    assert record["model_sha256"] != record["base_model_sha256"]
    results = tmp_path / "results"
    run = cli("process", tmp_path / "scans" / "field_001.png", "--out", results, "--model", out / "hwr-digits.onnx")
    assert run.returncode == 0, run.stderr
    assert "no calibration record" not in run.stderr
    with open(results / "fields.csv", newline="") as f:
        fields = list(csv.DictReader(f))
    assert len(fields) == 1 and fields[0]["digits"].isdigit()


def test_learn_never_writes_over_the_shipped_model(cli, tmp_path, mnist_test_small):
    rows = _write_fields(tmp_path, mnist_test_small, 3, np.random.default_rng(1))
    _write_csv(tmp_path / "corrections.csv", rows)
    before = SHIPPED_ONNX.read_bytes()
    result = cli("learn", tmp_path / "corrections.csv", "--out", SHIPPED_ONNX.parent)
    assert result.returncode == 2
    assert "shipped model" in result.stderr
    assert SHIPPED_ONNX.read_bytes() == before


def test_learn_names_the_file_and_the_missing_column(cli, tmp_path):
    bad = tmp_path / "corrections.csv"
    bad.write_text("file,digits\nscan.png,12\n")
    result = cli("learn", bad, "--out", tmp_path / "model")
    assert result.returncode == 3
    assert str(bad) in result.stderr and "page" in result.stderr
