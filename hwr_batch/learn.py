"""Adapt the model to a user's own forms: fine-tune on fields whose true digits a person confirmed.

Input: a CSV with columns ``file, page, field, digits`` (rows of ``fields.csv`` that were corrected or
confirmed; ``digits`` is the true string). The recipe:

1. re-read those fields from the scans exactly as ``process`` does (:func:`read_corrected_fields`);
2. hold back a seeded share of them to measure on;
3. align each remaining field's digits to the segmenter's candidate cuts with the current model
   (:mod:`hwr_batch.align`), giving labelled digits and "not a digit" examples;
4. fine-tune from the current model (its Keras twin), mixing in MNIST digits where MNIST is at hand so that
   the model does not forget what it knew;
5. read the held-back fields with the old and the new model and say plainly whether the new one is better;
6. write the new model (ONNX + Keras + training record) and ``learn.json`` (lineage: base model hash,
   data, figures) to a folder of the user's choosing. The shipped model is never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .align import SegmentedField, examples_from_fields, judge_segmented, read_segmented, segment_labelled
from .atomic import parse_display_text
from .classify import SHIPPED_MODEL, Classifier, load_classifier
from .confidence import calibration_path, expected_calibration_error, fit_calibration
from .errors import BadArgsError, DatasetError, HwrError, ModelError, OutputError
from .mnist import LabelledImages, default_data_dir, load_mnist

log = logging.getLogger(__name__)

# A calibration record is refitted on the held-back fields only when there are this many, with at least
# MIN_EACH_TO_RECALIBRATE read right and as many read wrong (fewer give a noisy fit: the base record is kept).
MIN_FIELDS_TO_RECALIBRATE = 200
MIN_EACH_TO_RECALIBRATE = 10

CORRECTION_COLUMNS = ("file", "page", "field", "digits")


@dataclass(frozen=True)
class Correction:
    """One field whose true digits a person gave."""

    file: Path
    page: int
    field: int
    digits: str


@dataclass(frozen=True)
class LearnConfig:
    """What decides a learn run (saved in ``learn.json``)."""

    holdout: float = 0.2  # share of the fields held back to measure on
    epochs: int = 10
    learning_rate: float = 3e-4
    replay: int = 10_000  # MNIST training digits mixed in, where MNIST is at hand
    repeat: int = 4  # each aligned example appears this many times per epoch (few fields against replay)
    seed: int = 20261202


@dataclass(frozen=True)
class LearnResult:
    """What a learn run wrote and measured."""

    model_path: Path
    record_path: Path
    fields_used: int
    fields_held_out: int
    exact_before: float
    exact_after: float

    @property
    def better(self) -> bool:
        return self.exact_after > self.exact_before

    def summary(self) -> str:
        verdict = (
            "better: use it with `process --model`" if self.better
            else "NOT better than the model it started from: keep using the old one"
        )
        return (
            f"held-back fields read exactly: {self.exact_before:.1%} before, {self.exact_after:.1%} after "
            f"({self.fields_held_out} fields held back, {self.fields_used} learnt from); the new model is {verdict}"
        )


def read_corrections(path: Path) -> list[Correction]:
    """The rows of a corrections CSV (``file, page, field, digits``) whose digits are digits only.

    Relative file names are taken relative to the CSV's folder. Rows with an empty or non-digit
    ``digits`` (a field marked "not a field" or "cannot read") are left out.

    Raises:
        DatasetError: the file cannot be read or lacks a column.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the corrections ({e})") from None
    missing = [c for c in CORRECTION_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise DatasetError(f"{path}: needs the columns {', '.join(CORRECTION_COLUMNS)}; missing {', '.join(missing)}")
    corrections = []
    for number, row in enumerate(rows, start=2):
        digits = (row["digits"] or "").strip().lstrip("'")  # a leading apostrophe is the export's formula guard
        if not digits.isdigit():
            continue
        try:
            page, field = int(row["page"]), int(row["field"])
        except ValueError:
            raise DatasetError(f"{path}, line {number}: page and field must be whole numbers") from None
        file = Path(parse_display_text(row["file"]))  # fields.csv shows odd names escaped
        corrections.append(Correction(file if file.is_absolute() else path.parent / file, page, field, digits))
    return corrections


def read_corrected_fields(corrections: list[Correction], settings=None) -> list[SegmentedField]:
    """Re-read each corrected field from its scan as ``process`` reads it, and segment it.

    A file that cannot be read, or a field number the file does not have, is logged and left out.
    """
    from .read import ReadSettings, iter_field_images

    settings = settings or ReadSettings()
    by_file: dict[Path, list[Correction]] = {}
    for c in corrections:
        by_file.setdefault(c.file, []).append(c)
    fields = []
    for file, wanted in by_file.items():
        try:
            images = {(page, number): image for page, number, image in iter_field_images(file, settings)}
        except HwrError as e:
            log.warning("%s: left out (%s)", file, e)
            continue
        for c in wanted:
            image = images.get((c.page, c.field))
            if image is None:
                log.warning("%s: page %d has no field %d; left out", file, c.page, c.field)
                continue
            fields.append(segment_labelled(image, c.digits, key=f"{file}#{c.page}#{c.field}"))
    return fields


def exact_rate(fields: list[SegmentedField], classifier: Classifier) -> float:
    """Share of fields that the model, with the segmenter's cuts, reads exactly as labelled."""
    if not fields:
        return 0.0
    strings = read_segmented(fields, classifier)
    return sum(s == f.digits for s, f in zip(strings, fields)) / len(fields)


def learn(
    corrections_csv: Path,
    out_dir: Path,
    *,
    base_model: Path | None = None,
    mnist_dir: Path | None = None,
    config: LearnConfig = LearnConfig(),
    settings=None,
) -> LearnResult:
    """Fine-tune a model on corrected fields and write it to ``out_dir`` (see the module docstring).

    Args:
        corrections_csv: CSV with columns file, page, field, digits.
        out_dir: folder for the new model; must not be the shipped model's folder.
        base_model: the ``.onnx`` model to start from (its ``.keras`` twin must lie beside it);
            default the shipped model.
        mnist_dir: folder with MNIST for replay (default :func:`hwr_batch.mnist.default_data_dir`);
            without it, the model is fine-tuned on the user's fields alone (logged).

    Raises:
        BadArgsError: ``out_dir`` is the shipped model's folder.
        DatasetError: no usable corrected field.
        ModelError: the base model or its Keras twin is missing.
    """
    from .train import TrainConfig, train  # TensorFlow: imported only here

    started = time.time()
    out_dir = Path(out_dir)
    if out_dir.resolve() == SHIPPED_MODEL.parent.resolve():
        raise BadArgsError(f"{out_dir}: that is the shipped model's folder; learn writes a new model elsewhere")
    base_model = Path(base_model) if base_model else SHIPPED_MODEL
    base_keras = base_model.with_suffix(".keras")
    if not base_keras.is_file():
        raise ModelError(f"{base_keras}: learn fine-tunes the Keras twin of {base_model.name}, and it is missing")
    base = load_classifier(base_model)
    corrections = read_corrections(corrections_csv)
    fields = read_corrected_fields(corrections, settings)
    if len(fields) < 2:
        raise DatasetError(f"{corrections_csv}: {len(fields)} usable corrected fields; learn needs at least 2")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(fields))
    held = max(1, round(config.holdout * len(fields)))
    held_out = [fields[i] for i in sorted(order[:held])]
    used = [fields[i] for i in sorted(order[held:])]
    examples, report = examples_from_fields(used, base, source=str(corrections_csv), repeat=config.repeat, seed=config.seed)
    if not len(examples):
        raise DatasetError(f"{corrections_csv}: none of the {len(used)} fields could be aligned to its digits")
    replay, mnist_note = _replay_digits(mnist_dir, config)
    data = replay if replay is not None else LabelledImages(examples.images[:0], examples.labels[:0], "none")
    exact_before = exact_rate(held_out, base)
    log.info(
        "learning from %d fields (%d digits, %d 'not a digit' examples, each x%d) and %s; %d fields held back",
        report.aligned, report.digits, report.rejects, config.repeat, mnist_note, len(held_out),
    )
    train_config = TrainConfig(
        epochs=config.epochs, learning_rate=config.learning_rate, early_stop_patience=3, seed=config.seed,
        validation_size=max(50, len(examples) // 10),
    )
    result = train(
        out_dir, data=data, config=train_config, extra=examples, init_from=base_keras, progress=False,
        sources=[{"set": str(corrections_csv), **report.as_dict(), "repeat": config.repeat}, {"set": mnist_note}],
    )
    new = load_classifier(result.onnx_path, calibrated=False)  # its record is written below
    exact_after = exact_rate(held_out, new)
    calibration_note = write_calibration(new, base, held_out)
    learn_result = LearnResult(result.onnx_path, out_dir / "learn.json", len(used), len(held_out), exact_before, exact_after)
    record = {
        "base_model": str(base_model),
        "base_model_sha256": base.sha256,
        "model": result.onnx_path.name,
        "model_sha256": new.sha256,
        "corrections": str(corrections_csv),
        "corrections_sha256": hashlib.sha256(Path(corrections_csv).read_bytes()).hexdigest(),
        "corrections_rows": len(corrections),
        "fields_read": len(fields),
        "fields_used": len(used),
        "fields_held_out": len(held_out),
        "alignment": report.as_dict(),
        "replay": mnist_note,
        "config": asdict(config),
        "held_out_exact_before": round(exact_before, 4),
        "held_out_exact_after": round(exact_after, 4),
        "better": learn_result.better,
        "calibration": calibration_note,
        "seconds": round(time.time() - started, 1),
    }
    try:
        learn_result.record_path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise OutputError(f"{learn_result.record_path}: cannot write ({e.strerror or e})") from None
    return learn_result


def write_calibration(new: Classifier, base: Classifier, held_out: list[SegmentedField]) -> str:
    """Write the new model's calibration record beside it; returns what was done, for learn.json.

    Refitted on the held-back fields when they are enough to fit it (:data:`MIN_FIELDS_TO_RECALIBRATE`,
    with at least :data:`MIN_EACH_TO_RECALIBRATE` read right and as many read wrong); else the base
    model's record is copied, so that the new model's confidences are still those of a fitted record.
    """
    judged = judge_segmented(held_out, new)
    evidence = np.stack([e for _, e in judged])
    right = np.array([s == f.digits for (s, _), f in zip(judged, held_out)])
    wrong = int((~right).sum())
    fitted_on = {"held-back corrections": len(held_out), "read wrong": wrong}
    if len(held_out) >= MIN_FIELDS_TO_RECALIBRATE and min(wrong, int(right.sum())) >= MIN_EACH_TO_RECALIBRATE:
        record = fit_calibration(evidence, right, model_sha256=new.sha256, fitted_on=fitted_on)
        note = f"refitted on {len(held_out)} held-back fields ({wrong} read wrong)"
    elif base.calibration is not None:
        note = (f"copied from the base model's record: {len(held_out)} held-back fields ({wrong} read wrong) "
                f"are too few to refit it (needs {MIN_FIELDS_TO_RECALIBRATE}, at least "
                f"{MIN_EACH_TO_RECALIBRATE} right and as many wrong)")
        record = replace(base.calibration, model_sha256=new.sha256,
                         fitted_on={**base.calibration.fitted_on, "note": note})
    else:
        log.warning("%s: no calibration record written (too few held-back fields, none for the base model)", new.path)
        return "none: too few held-back fields to fit one, and the base model has none"
    ece = expected_calibration_error(record.confidence(evidence), right)
    record = replace(record, figures={"held-back corrections": {"fields": len(held_out), "ece": round(ece, 4)}})
    try:
        record.save(calibration_path(new.path))
    except OSError as e:
        raise OutputError(f"{calibration_path(new.path)}: cannot write ({e.strerror or e})") from None
    log.info("%s: %s (expected calibration error on them %.3f)", calibration_path(new.path), note, ece)
    return note


def _replay_digits(mnist_dir: Path | None, config: LearnConfig) -> tuple[LabelledImages | None, str]:
    """A seeded sample of MNIST training digits, and a note of what was used."""
    folder = Path(mnist_dir) if mnist_dir else default_data_dir()
    try:
        mnist = load_mnist("train", folder)
    except HwrError:
        log.warning("MNIST not found at %s: fine-tuning on your fields alone (give --mnist-dir for replay)", folder)
        return None, "no MNIST replay"
    pick = np.random.default_rng(config.seed).choice(len(mnist), min(config.replay, len(mnist)), replace=False)
    return LabelledImages(mnist.images[pick], mnist.labels[pick], f"MNIST train x{len(pick)}"), f"{len(pick)} MNIST training digits"
