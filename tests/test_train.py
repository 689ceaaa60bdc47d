"""The CNN's architecture, the augmentation, and a short real training run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hwr_batch.classify import load_classifier, predict_proba
from hwr_batch.train import TrainConfig, augment_batch, build_model, train

keras = pytest.importorskip("keras")


def test_digit_model_matches_the_original_design():
    model = build_model(10)
    assert model.count_params() == 424_810
    shapes = [tuple(layer.output.shape[1:]) for layer in model.layers]
    assert shapes == [(26, 26, 32), (13, 13, 32), (11, 11, 32), (5, 5, 32), (800,), (512,), (10,)]
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense",
    ]


def test_letter_model_has_the_original_designs_433018_parameters():
    model = build_model(26)
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    assert model.count_params() == 433_018
    assert "433,018" in "\n".join(lines)


def test_augmentation_without_distortion_is_the_identity(mnist_train_small):
    images = mnist_train_small.images[:64, :, :, None].astype(np.float32) / 255
    still = replace(
        TrainConfig(), max_rotation_deg=0.0, max_shear=0.0, scale_range=(1.0, 1.0), max_shift_px=0.0, stroke_change_prob=0.0
    )
    np.testing.assert_allclose(np.asarray(augment_batch(images, still)), images, atol=1e-5)


def test_augmentation_distorts_but_keeps_shape_range_and_most_ink(mnist_train_small):
    keras.utils.set_random_seed(0)  # the draws are random; fix them so the test is repeatable
    images = mnist_train_small.images[:64, :, :, None].astype(np.float32) / 255
    out = np.asarray(augment_batch(images, TrainConfig()))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    changed = np.abs(out - images).reshape(64, -1).max(axis=1) > 0.1
    assert changed.mean() > 0.9  # (nearly) every image is distorted ...
    ink_ratio = out.reshape(64, -1).sum(1) / images.reshape(64, -1).sum(1)
    assert np.all((ink_ratio > 0.1) & (ink_ratio < 3))  # thinned or thickened, never erased or smeared


@pytest.mark.slow
def test_short_training_run_learns_and_writes_its_outputs(tmp_path, mnist_train_small, mnist_test_small):
    config = TrainConfig(epochs=4, batch_size=32, validation_size=100, early_stop_patience=10, fragments=0.3)
    result = train(tmp_path, data=mnist_train_small, config=config, name="tiny", progress=False)

    assert result.history["loss"][-1] < 0.7 * result.history["loss"][0]
    for path in (result.keras_path, result.onnx_path, result.record_path, result.curves_path):
        assert path.is_file() and path.stat().st_size > 0
    assert result.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(result.record_path.read_text())
    assert record["parameters"] == 424_810
    assert record["data"]["train_images"] == 500 and record["data"]["validation_images"] == 100
    assert record["data"]["train_fragments"] == round(config.fragments * 500)
    assert 0.0 < record["fragment_confidence"]["mean_top_probability"] <= 1.0
    assert record["config"]["seed"] == config.seed and record["epochs_run"] == 4
    assert len(record["history"]["val_accuracy"]) == 4

    # The exported ONNX model computes what the Keras model computes.
    model = keras.models.load_model(result.keras_path)
    images = mnist_test_small.images[..., None].astype(np.float32) / 255
    expected = model.predict(images, verbose=0)
    onnx_probabilities = predict_proba(load_classifier(result.onnx_path), images)
    np.testing.assert_allclose(onnx_probabilities, expected, atol=1e-5)


@pytest.mark.slow
def test_train_on_real_fields_gives_a_model_with_a_reject_class(cli, tmp_path, mnist_dir, mnist_test_small):
    """`train --real`: labelled field crops are aligned, and the model learns 'not a digit' from the refused cuts."""
    import csv

    import cv2
    from conftest import digit_strip

    folder = tmp_path / "fields"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(5)
    with open(folder / "truth.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "digits"])
        for k in range(30):
            picks = [int(i) for i in rng.choice(len(mnist_test_small), 2, replace=False)]
            cv2.imwrite(str(folder / "images" / f"{k}.png"), digit_strip(mnist_test_small, picks, gap=0))
            writer.writerow([f"images/{k}.png", "".join(str(int(mnist_test_small.labels[i])) for i in picks)])
    out = tmp_path / "model"
    result = cli("train", "--out", out, "--data-dir", mnist_dir, "--real", f"{folder}[:25]*2", "--rounds", "1",
                 "--epochs", "1", "--limit", "2000", "--schedule", "cosine")
    assert result.returncode == 0, result.stderr
    classifier = load_classifier(out / "hwr-digits.onnx")
    assert classifier.rejects and classifier.labels == "0123456789"
    record = json.loads((out / "hwr-digits.json").read_text())
    real = record["data"]["sources"][0]
    assert real["set"] == f"{folder}[:25]*2" and real["fields"] == 25 and real["repeat"] == 2
    assert real["aligned"] > 0 and real["digits"] > 0 and real["rejects"] > 0
    assert record["data"]["extra_images"] == 2 * (real["digits"] + real["rejects"])
    assert record["data"]["base_images"] == 2000 and record["parameters"] == 425_323
