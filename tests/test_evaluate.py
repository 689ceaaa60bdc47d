"""Scoring the shipped model: MNIST test digits, IDX pairs, folders of labelled images."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from hwr_batch.classify import load_classifier, predict_proba, predict_scores, top_two
from hwr_batch.errors import DatasetError, ModelError
from hwr_batch.evaluate import edit_distance, evaluate, load_labelled_folder, write_reports
from hwr_batch.mnist import load_mnist


def test_shipped_model_on_the_test_fixture(shipped_model, mnist_test_small):
    result = evaluate(load_classifier(shipped_model), mnist_test_small)
    assert result.accuracy >= 0.99
    assert result.confusion.sum() == 300 and result.confusion.shape == (10, 10)
    assert set(result.per_class) >= set("0123456789")


def test_shipped_model_reaches_99_4_percent_on_the_full_test_set(shipped_model, mnist_dir):
    result = evaluate(load_classifier(shipped_model), load_mnist("test", mnist_dir))
    assert result.accuracy >= 0.994


def test_top_two_orders_the_guesses(shipped_model, mnist_test_small):
    classifier = load_classifier(shipped_model)
    probabilities = predict_proba(classifier, mnist_test_small.images)
    assert probabilities.shape == (300, 10)
    # The digits and "not a digit" share the probability; MNIST digits are digits.
    digits, rejects = predict_scores(classifier, mnist_test_small.images)
    np.testing.assert_array_equal(digits, probabilities)
    np.testing.assert_allclose(digits.sum(axis=1) + rejects, 1, atol=1e-4)
    assert classifier.rejects and float(np.median(rejects)) < 0.01
    top = top_two(probabilities)
    assert np.all(top.confidence >= top.second_confidence) and np.all(top.label != top.second)


def test_reports_are_written(tmp_path, shipped_model, mnist_test_small):
    result = evaluate(load_classifier(shipped_model), mnist_test_small)
    paths = write_reports(result, mnist_test_small, tmp_path)
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["images"] == 300 and metrics["accuracy"] == pytest.approx(result.accuracy)
    assert len(metrics["confusion_matrix"]) == 10
    for key in ("confusion_matrix", "worst_mistakes"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cv2.imread(str(paths[key])) is not None


def test_labelled_folder_of_scanned_looking_digits(tmp_path, shipped_model, mnist_test_small):
    # Dark ink on light paper, larger than MNIST and off-centre, saved as PNG and JPEG.
    for i, (image, label) in enumerate(zip(mnist_test_small.images[:100], mnist_test_small.labels[:100])):
        page = np.full((90, 70), 235, np.uint8)
        digit = cv2.resize(image, (56, 56), interpolation=cv2.INTER_CUBIC)
        page[20:76, 4:60] = np.minimum(page[20:76, 4:60], 255 - digit)
        (tmp_path / str(label)).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / str(label) / f"scan_{i}.{'png' if i % 2 else 'jpg'}"), page)
    data = load_labelled_folder(tmp_path, "0123456789")
    assert data.images.shape == (100, 28, 28)
    assert evaluate(load_classifier(shipped_model), data).accuracy >= 0.97


def test_labelled_folder_rejects_unknown_classes(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="folder name is not one of the model's classes"):
        load_labelled_folder(tmp_path, "0123456789")


def test_labelled_folder_without_class_folders(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_labelled_folder(tmp_path, "0123456789")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="model.onnx: not a usable ONNX model"):
        load_classifier(bad)


@pytest.mark.parametrize(
    ("read", "truth", "distance"),
    [("", "", 0), ("123", "123", 0), ("9964841", "994841", 1), ("", "12", 2), ("12", "", 2),
     ("kitten", "sitting", 3), ("4643", "9643", 1), ("10", "0", 1)],
)
def test_edit_distance_counts_insertions_deletions_and_substitutions(read, truth, distance):
    assert edit_distance(read, truth) == distance
    assert edit_distance(truth, read) == distance
