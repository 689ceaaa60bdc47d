"""Classify normalised digits with the exported ONNX model (ONNX Runtime; no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .confidence import Calibration, load_calibration
from .errors import ModelError
from .normalise import IMAGE_SIZE

# Class labels, one character per output of a model, in output order. A model names its own in its metadata
# ("labels"); one without is a digit model.
DIGIT_LABELS = "0123456789"
LETTER_LABELS = "abcdefghijklmnopqrstuvwxyz"

MODEL_ENV = "HWR_BATCH_MODEL"
# The model that ships: hwr_batch/models/ in an installed wheel, models/ beside the package in a clone
# or an editable install (pyproject.toml installs models/ as hwr_batch/models).
_PACKAGE = Path(__file__).resolve().parent
_INSTALLED_MODEL = _PACKAGE / "models" / "hwr-digits.onnx"
SHIPPED_MODEL = _INSTALLED_MODEL if _INSTALLED_MODEL.is_file() else _PACKAGE.parent / "models" / "hwr-digits.onnx"
BATCH_SIZE = 64  # digits per ONNX Runtime call: 14% faster than 256 on 2 AVX2 cores (43,800 vs 38,400 digits/s), and the first conv layer's output stays small (benchmarks/README.md)


@dataclass(frozen=True)
class Classifier:
    """A loaded model: an ONNX Runtime session and what it predicts.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        labels: one character per class, in output order (``"0123456789"`` for digits).
        rejects: the model has one more output after ``labels``: "not a digit" (a wrong cut, a
            separator, a stray mark, printed text). It is never read as a character.
        path: the model file.
        sha256: hex digest of the model file: its identity in run records and the state database.
        calibration: the record that turns a field's evidence into the probability that it reads right
            (``<model>.calibration.json`` beside the model; None if there is none).
    """

    session: object
    labels: str
    rejects: bool
    path: Path
    sha256: str
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Predictions:
    """Top-two classes per digit.

    Attributes:
        label: (N,) int class index of the best guess.
        confidence: (N,) float32 softmax probability of ``label``.
        second: (N,) int class index of the runner-up.
        second_confidence: (N,) float32 its probability.
    """

    label: np.ndarray
    confidence: np.ndarray
    second: np.ndarray
    second_confidence: np.ndarray


def default_model_path() -> Path:
    """``$HWR_BATCH_MODEL`` if set, else the model that ships in ``models/``."""
    return Path(os.environ.get(MODEL_ENV) or SHIPPED_MODEL)


def load_classifier(path: Path | None = None, *, threads: int = 0, calibrated: bool = True) -> Classifier:
    """Open an ONNX model for inference.

    Args:
        path: ``.onnx`` file; default :func:`default_model_path`.
        threads: intra-op threads for ONNX Runtime; 0 lets it use every core.
        calibrated: load the calibration record beside the model (False: none, and no warning; for a
            model whose record is still to be written).

    Raises:
        ModelError: the file is missing or is not a usable ONNX model.
    """
    import onnxruntime as ort

    path = Path(path) if path else default_model_path()
    if path.suffix == ".keras":
        path = path.with_suffix(".onnx")  # train writes both; inference runs the ONNX twin
    try:
        model_bytes = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read model ({e.strerror or e}). Give --model an .onnx file made by `hwr-batch train`.") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Batches come between long stretches of reading pages; spinning threads waiting for the next one
    # would take CPU from the reader processes (about 2% of a `process -j 2` run's wall time here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path}: not a usable ONNX model ({e})") from None
    shape = session.get_inputs()[0].shape
    if list(shape[1:]) != [IMAGE_SIZE, IMAGE_SIZE, 1]:
        raise ModelError(f"{path}: model input is {shape}, expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1)")
    metadata = session.get_modelmeta().custom_metadata_map
    labels = metadata.get("labels", DIGIT_LABELS)
    rejects = metadata.get("reject_class") == "last"
    classes = session.get_outputs()[0].shape[-1]
    if isinstance(classes, int) and classes != len(labels) + rejects:
        raise ModelError(
            f"{path}: model has {classes} outputs but {len(labels)} labels"
            f"{' and a reject class' if rejects else ''} in its metadata"
        )
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    calibration = load_calibration(path, sha256) if calibrated else None
    return Classifier(session, labels, rejects, path, sha256, calibration)


def predict_proba(classifier: Classifier, images: np.ndarray, *, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Probabilities of the labelled classes (digits) for a stack of normalised digits.

    For a model with a reject class its probability is left out (see :func:`predict_scores`), so a row
    sums to 1 minus the chance that the image is not a digit at all.

    Args:
        images: (N, 28, 28) or (N, 28, 28, 1); float in [0, 1] or uint8 in [0, 255]; white on black.

    Returns:
        (N, len(classifier.labels)) float32 softmax probabilities.
    """
    return predict_scores(classifier, images, batch_size=batch_size)[0]


def predict_scores(
    classifier: Classifier, images: np.ndarray, *, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Label probabilities and "not a digit" probabilities for a stack of normalised digits, in one pass.

    Returns:
        (N, len(classifier.labels)) float32 label probabilities, and (N,) float32 probability that each
        image is not a digit (zeros for a model without a reject class).
    """
    probabilities = _run(classifier, images, batch_size)
    labels = len(classifier.labels)
    if classifier.rejects:
        return probabilities[:, :labels], probabilities[:, labels]
    return probabilities, np.zeros(len(probabilities), np.float32)


def _run(classifier: Classifier, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Every output of the model for a stack of images: (N, outputs) float32."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"images must have shape (N, 28, 28[, 1]), got {images.shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    session = classifier.session
    name = session.get_inputs()[0].name
    if len(x) == 0:
        return np.zeros((0, len(classifier.labels) + classifier.rejects), np.float32)
    chunks = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def top_two(probabilities: np.ndarray) -> Predictions:
    """Best and second-best class and their probabilities, per row of ``probabilities`` (N, classes)."""
    order = np.argsort(probabilities, axis=1)
    best, second = order[:, -1], order[:, -2]
    rows = np.arange(len(probabilities))
    return Predictions(best, probabilities[rows, best], second, probabilities[rows, second])
