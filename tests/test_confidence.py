"""Tests of the field confidence and the review decision: the reading margin, the hard rules, the
calibration record, and ``--target-error`` through the real command line."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from hwr_batch.confidence import (
    FEATURES,
    MONOTONE,
    Calibration,
    accept_curve,
    accept_threshold,
    calibration_path,
    expected_calibration_error,
    field_evidence,
    fit_calibration,
    hard_flags,
    load_calibration,
    review_reasons,
)
from hwr_batch.segment import DigitCrop, FieldCandidates, Reading, Unit, read_field, reading_margin


def two_or_one() -> FieldCandidates:
    """One unit of ink that reads as two digits (pieces 0 and 1) or as one wide digit (piece 2)."""
    blank = np.zeros((0, 0), np.float32)
    pieces = (DigitCrop((2, 0, 15, 30), blank), DigitCrop((22, 0, 15, 30), blank), DigitCrop((2, 0, 35, 30), blank))
    unit = Unit(n_cuts=3, spans=((0, 1, 0), (1, 2, 1), (0, 2, 2)), default=(0, 1))
    return FieldCandidates(pieces=pieces, units=(unit,), digit_height=30.0, joins=())


def probs(*rows: dict[int, float]) -> np.ndarray:
    """Rows of digit probabilities, the rest of each row's mass spread over the other labels."""
    out = np.zeros((len(rows), 10))
    for r, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (10 - len(row))
        out[r] = rest
        for label, p in row.items():
            out[r, label] = p
    return out


def test_margin_is_small_when_a_digit_is_in_doubt_and_large_when_it_is_not():
    cands = two_or_one()
    sure = probs({1: 0.99}, {2: 0.99}, {4: 0.01})
    doubt = probs({1: 0.52, 7: 0.46}, {2: 0.99}, {4: 0.01})
    assert read_field(cands, sure).digits == [0, 1] == read_field(cands, doubt).digits
    sure_margin, doubt_margin = reading_margin(cands, sure), reading_margin(cands, doubt)
    assert 0 <= doubt_margin < 0.2
    assert sure_margin > 1.5
    assert doubt_margin == pytest.approx(np.log(0.52 / 0.46), abs=1e-6)  # "72" is the runner-up


def test_margin_sees_the_other_cut():
    """When the joined piece reads almost as well as the two digits, the margin says so."""
    cands = two_or_one()
    close = probs({1: 0.9}, {2: 0.9}, {4: 0.999})
    far = probs({1: 0.9}, {2: 0.9}, {4: 0.001})
    assert reading_margin(cands, close) < reading_margin(cands, far)


def test_a_digit_read_from_a_rejected_piece_is_flagged():
    cands = two_or_one()
    p = probs({1: 0.3}, {2: 0.99}, {4: 0.3})
    rejects = np.array([0.6, 0.01, 0.2])
    assert "rejected_piece" in hard_flags(cands, p, rejects, Reading(digits=[0, 1], rejected=[]))
    assert hard_flags(cands, p, np.array([0.1, 0.01, 0.2]), Reading(digits=[0, 1], rejected=[])) == []
    assert hard_flags(cands, p, rejects, Reading(digits=[], rejected=[0])) == ["no_digits"]


def test_comb_reading_must_fill_its_inked_cells_one_digit_each():
    cands = two_or_one()
    p = probs({1: 0.99}, {2: 0.99}, {4: 0.99})
    cells = ((0, 20), (20, 40), (40, 60))
    assert hard_flags(cands, p, None, Reading(digits=[0, 1], rejected=[]), cells) == []
    # one wide digit over two inked cells: one cell inked but empty
    assert hard_flags(cands, p, None, Reading(digits=[2], rejected=[]), cells) == ["count_mismatch"]
    # not a comb: no count to check
    assert hard_flags(cands, p, None, Reading(digits=[2], rejected=[]), ()) == []


def test_evidence_has_every_feature_and_is_finite():
    cands = two_or_one()
    p = probs({1: 0.99}, {2: 0.99}, {4: 0.3})
    e = field_evidence(cands, p, np.array([0.01, 0.02, 0.5]), Reading([0, 1], []))
    assert e.shape == (len(FEATURES),) and np.isfinite(e).all()
    named = dict(zip(FEATURES, e))
    assert named["digits"] == 2 and named["log_p_sum"] == pytest.approx(2 * np.log(0.99))
    assert named["reject_max"] == pytest.approx(0.02) and named["widest"] == pytest.approx(0.5)


def test_review_reasons():
    assert review_reasons(0.999, 0.99, []) == []
    assert review_reasons(0.95, 0.99, []) == ["low_confidence"]
    assert review_reasons(0.999, 0.99, ["count_mismatch"]) == ["count_mismatch"]
    assert review_reasons(0.0, 0.99, ["no_digits"]) == ["no_digits"]


def synthetic_fields(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fields whose chance of being right is a known logistic function of their evidence."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] + 1.0 * x[:, 3] - 1.0 * x[:, 4] + 1.5)))
    return x, rng.random(n) < p


def test_fitted_calibration_is_calibrated_on_new_fields(tmp_path):
    x, right = synthetic_fields(6000, seed=1)
    record = fit_calibration(x, right, model_sha256="ab" * 32, fitted_on={"synthetic": len(x)})
    x2, right2 = synthetic_fields(6000, seed=2)
    confidence = record.confidence(x2)
    assert expected_calibration_error(confidence, right2) < 0.03
    assert expected_calibration_error(np.full(len(right2), 0.99), right2) > 0.1  # a flat 0.99 is not
    path = tmp_path / "m.calibration.json"
    record.save(path)
    again = Calibration.load(path)
    assert again == record and np.allclose(again.confidence(x2), confidence)


def test_the_threshold_for_a_target_error_holds_that_error_among_accepted_new_fields():
    x, right = synthetic_fields(6000, seed=1)
    record = fit_calibration(x, right)
    x2, right2 = synthetic_fields(20000, seed=2)
    confidence = record.confidence(x2)
    for target in (0.02, 0.05, 0.1):
        threshold = record.threshold(target)
        accepted = confidence >= threshold
        assert (~right2[accepted]).mean() == pytest.approx(target, rel=0.3), target
        # a per-field bound (accept at 1 - E) would accept fewer, at an error well under E
        assert accepted.mean() > (confidence >= 1 - target).mean()
    assert accept_threshold(record, 0.05) == record.threshold(0.05)
    assert accept_threshold(record, 0.05, min_confidence=0.7) == 0.7
    assert accept_threshold(None, 0.05) == pytest.approx(0.95)


def test_accept_curve_counts_tied_confidences_together():
    curve = accept_curve(np.array([0.7, 0.9, 0.8, 0.8]), np.array([True, True, False, True]))
    assert curve == ((0.9, 0.0, 0.25), (0.8, pytest.approx(1 / 3, abs=1e-6), 0.75), (0.7, 0.25, 1.0))
    record = Calibration(features=FEATURES, accept_curve=curve)
    assert record.threshold(0.3) == 0.7 and record.threshold(0.2) == 0.9 and record.threshold(0.0) == 0.9
    assert Calibration(features=FEATURES, accept_curve=((0.9, 0.1, 0.5),)).threshold(0.01) == 1.0  # never reached
    assert Calibration(features=FEATURES).threshold(0.01) == pytest.approx(0.99)  # no curve: per field


def test_the_fitted_confidence_is_monotone_where_the_direction_is_known():
    x, right = synthetic_fields(3000, seed=4)
    record = fit_calibration(x, right, folds=0)
    probe = np.random.default_rng(5).normal(size=(200, len(FEATURES)))
    for name, direction in MONOTONE.items():
        if direction:
            k = FEATURES.index(name)
            surer = probe.copy()
            surer[:, k] += 0.5
            assert (direction * (record.confidence(surer) - record.confidence(probe)) >= -1e-12).all(), name


def test_a_logistic_record_of_the_first_release_still_loads(tmp_path):
    # fitted before "left_out" was computed: it reads its own columns of today's evidence
    path = tmp_path / "m.calibration.json"
    earlier = [name for name in FEATURES if name != "left_out"]
    n = len(earlier)
    path.write_text(json.dumps({
        "features": earlier, "mean": [0.0] * n, "scale": [1.0] * n, "coef": [0.0] * (n - 1) + [1.0],
        "intercept": 0.0, "model_sha256": "", "fitted_on": {}, "figures": {},
    }))
    record = Calibration.load(path)
    assert not record.trees_onnx
    evidence = np.zeros(len(FEATURES))
    evidence[FEATURES.index("left_out")] = 5.0  # not one of its features: no effect
    assert record.confidence(evidence) == pytest.approx(0.5)
    evidence[FEATURES.index(earlier[-1])] = 2.0
    assert record.confidence(evidence[None]) == pytest.approx([1 / (1 + np.exp(-2))])


def test_a_record_for_other_features_or_a_broken_one_is_not_used(tmp_path, caplog):
    model = tmp_path / "m.onnx"
    record = fit_calibration(*synthetic_fields(500, seed=3), folds=0)
    data = json.loads(json.dumps(record.__dict__, default=list))
    data["features"] = ["something", "else"]
    calibration_path(model).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="features"):
        Calibration.load(calibration_path(model))
    assert load_calibration(model) is None and "not used" in caplog.text
    data["features"] = list(FEATURES)
    data["trees_onnx"] = "bm90IGFuIE9OTlggbW9kZWw="  # base64 of "not an ONNX model"
    calibration_path(model).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="trees do not load"):
        Calibration.load(calibration_path(model))
    calibration_path(model).write_text("{not json")
    assert load_calibration(model) is None
    calibration_path(model).unlink()
    assert load_calibration(model) is None and "no calibration record" in caplog.text


def test_shipped_record_belongs_to_the_shipped_model(shipped_model):
    from hwr_batch.classify import load_classifier

    classifier = load_classifier(shipped_model)
    assert classifier.calibration is not None, "models/ ships a calibration record beside the model"
    assert classifier.calibration.model_sha256 == classifier.sha256
    assert classifier.calibration.figures, "the record carries the figures it was measured at"
    curve = np.array(classifier.calibration.accept_curve)
    assert len(curve) > 100 and (np.diff(curve[:, 0]) < 0).all() and (np.diff(curve[:, 2]) > 0).all()
    assert 0.9 < classifier.calibration.threshold(0.01) <= 1.0


def test_target_error_sets_how_much_is_accepted(cli, tmp_path, mnist_test_small, shipped_model):
    from hwr_batch.synth import write_forms

    write_forms(tmp_path / "in", 2, seed=5, digits=mnist_test_small, formats=("png",), dpi=250)
    runs = {}
    for target in ("0.5", "0.001"):
        out = tmp_path / f"out-{target}"
        r = cli("--json-logs", "process", tmp_path / "in", "-o", out, "--target-error", target)
        assert r.returncode == 0, r.stderr
        runs[target] = pd.read_csv(out / "fields.csv", dtype={"digits": str}, keep_default_na=False)
        (report,) = [e["report"] for e in map(json.loads, r.stderr.splitlines()) if "report" in e]
        assert report["fields"] == len(runs[target])
        assert report["flagged_fields"] == runs[target]["flagged"].sum()
        assert report["accepted_fields"] == (~runs[target]["flagged"]).sum()
        assert report["pages"] == 2 and report["pages_per_second"] > 0 and report["classify_seconds"] > 0
    loose, strict = runs["0.5"], runs["0.001"]
    record = Calibration.load(calibration_path(shipped_model))
    thresholds = {0.5: record.threshold(0.5), 0.001: record.threshold(0.001)}
    assert thresholds[0.5] < thresholds[0.001]
    assert (loose["confidence"] == strict["confidence"]).all()  # the confidence does not depend on the target
    assert loose["confidence"].between(0, 1).all()
    assert (~loose["flagged"]).sum() > (~strict["flagged"]).sum()
    for table, target in ((loose, 0.5), (strict, 0.001)):
        accepted = table[~table["flagged"]]
        assert (accepted["confidence"] >= thresholds[target] - 1e-4).all() and (accepted["flag_reason"] == "").all()
        flagged = table[table["flagged"]]
        assert (flagged["flag_reason"] != "").all()
        low = flagged["flag_reason"].str.contains("low_confidence")
        assert (flagged.loc[low, "confidence"] < thresholds[target] + 1e-4).all()
    for hard in ("rejected_piece", "count_mismatch", "no_digits"):
        assert not loose.loc[~loose["flagged"], "flag_reason"].str.contains(hard).any()


@pytest.mark.parametrize("bad", ["0", "1", "-0.1", "nan"])
def test_target_error_out_of_range_is_refused(cli, tmp_path, bad):
    (tmp_path / "in").mkdir()
    r = cli("process", tmp_path / "in", "-o", tmp_path / "out", "--target-error", bad)
    assert r.returncode == 2 and "--target-error" in r.stderr


def test_ink_stepped_over_as_not_a_digit_is_flagged():
    cands = two_or_one()  # digit height 30
    p = probs({1: 0.99}, {2: 0.99}, {4: 0.99})
    assert hard_flags(cands, p, None, Reading(digits=[1], rejected=[0])) == ["dropped_ink"]  # 15 px of 30
    speck = FieldCandidates(
        pieces=cands.pieces[:2] + (DigitCrop((40, 25, 4, 4), np.zeros((0, 0), np.float32)),),
        units=cands.units, digit_height=30.0, joins=(),
    )
    assert hard_flags(speck, p, None, Reading(digits=[0, 1], rejected=[2])) == []  # a comma-sized speck


def test_checked_labels_name_dev_cells_of_the_training_set_only(real_data_dir, monkeypatch):
    """The labels put right by eye for the calibration fit are of danish_row_numbers_train's dev rows
    (17,000 on), never of the measuring set, and each still names the label truth.csv gives it."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    calibrate = importlib.import_module("calibrate")
    folder = real_data_dir / "danish_row_numbers_train"
    dev = calibrate.real_rows(folder, calibrate.DANISH_DEV_FROM)
    checked = pd.read_csv(calibrate.CHECKED_LABELS, dtype=str, keep_default_na=False)
    assert set(checked["image"]) <= {r["image"] for r in dev}
    fixed = calibrate.checked_rows(dev)  # raises if a "given" label no longer matches truth.csv
    assert len(fixed) == len(dev) - int((checked["checked"] == "").sum())
    changed = {r["image"]: r["digits"] for r in fixed}
    for row in checked[checked["checked"] != ""].itertuples():
        assert changed[row.image] == row.checked and row.checked.isdigit()
