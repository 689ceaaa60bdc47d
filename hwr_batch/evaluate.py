"""Score a model on labelled digits: accuracy, per-class metrics, confusion matrix, worst mistakes.

Scores the ONNX file through :mod:`hwr_batch.classify`, so what ships is what is measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .classify import Classifier, predict_proba, top_two
from .errors import DatasetError
from .mnist import LabelledImages
from .normalise import IMAGE_SIZE, to_mnist

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm"}


@dataclass(frozen=True)
class Evaluation:
    """A model's results on a labelled set.

    Attributes:
        accuracy: fraction of images whose best guess is the label.
        per_class: scikit-learn ``classification_report`` as a dict (precision, recall, f1, support).
        confusion: (C, C) int counts, rows = true class, columns = predicted class.
        predicted: (N,) predicted class index per image.
        confidence: (N,) probability of the predicted class.
        true_probability: (N,) probability the model gave the true class (low = bad mistake).
        labels: class labels, in model output order.
    """

    accuracy: float
    per_class: dict
    confusion: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    true_probability: np.ndarray
    labels: str

    def to_json(self) -> dict:
        """The metrics, without the per-image arrays."""
        return {
            "accuracy": self.accuracy,
            "errors": int(self.confusion.sum() - np.trace(self.confusion)),
            "images": int(self.confusion.sum()),
            "labels": self.labels,
            "per_class": self.per_class,
            "confusion_matrix": self.confusion.tolist(),
        }


def evaluate(classifier: Classifier, data: LabelledImages) -> Evaluation:
    """Classify every image in ``data`` (one batched pass) and compare with its label."""
    from sklearn.metrics import classification_report, confusion_matrix

    if len(data) == 0:
        raise DatasetError(f"{data.source}: no images to evaluate")
    classes = len(classifier.labels)
    if int(data.labels.max()) >= classes:
        raise DatasetError(f"{data.source}: label {int(data.labels.max())} but the model has only {classes} classes")
    probabilities = predict_proba(classifier, data.images)
    top = top_two(probabilities)
    indices = list(range(classes))
    names = list(classifier.labels)
    report = classification_report(
        data.labels, top.label, labels=indices, target_names=names, output_dict=True, zero_division=0
    )
    return Evaluation(
        accuracy=float((top.label == data.labels).mean()),
        per_class=report,
        confusion=confusion_matrix(data.labels, top.label, labels=indices),
        predicted=top.label,
        confidence=top.confidence,
        true_probability=probabilities[np.arange(len(data)), data.labels],
        labels=classifier.labels,
    )


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two strings.

    Digit accuracy over fields is ``1 - sum(edit_distance(read, truth)) / sum(len(truth))``: a spurious or
    missing digit costs one, not the rest of the field.
    """
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _read_gray(path: Path) -> np.ndarray | None:
    """An image file as (H, W) uint8 grayscale, or None if it cannot be read or decoded. Read by
    Python and decoded in memory: ``cv2.imread`` cannot open a path that is not valid UTF-8."""
    try:
        data = np.frombuffer(path.read_bytes(), np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None


def load_labelled_folder(folder: Path, labels: str) -> LabelledImages:
    """Read digit images sorted into one sub-folder per class (``folder/7/scan_001.png``).

    Each image is one digit, dark ink on light paper or white on black (detected per image),
    any size: it is normalised to MNIST format with :func:`hwr_batch.normalise.to_mnist`.
    Images already 28x28 and white on black are used as they are.

    Args:
        folder: the root folder; sub-folder names must be class labels of the model.
        labels: the model's class labels (``classifier.labels``).

    Raises:
        DatasetError: no class sub-folders, an unknown class name, or no readable images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    images, targets, unreadable = [], [], []
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise DatasetError(f"{folder}: no class sub-folders (expected e.g. {folder}/0, {folder}/1, ...)")
    for class_dir in class_dirs:
        if class_dir.name not in labels:
            raise DatasetError(f"{class_dir}: folder name is not one of the model's classes {labels!r}")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            gray = _read_gray(path)
            if gray is None:
                unreadable.append(path)
                continue
            images.append(_digit_image_to_mnist(gray))
            targets.append(labels.index(class_dir.name))
    for path in unreadable:
        log.warning("%s: not a readable image, skipped", path)
    if not images:
        raise DatasetError(f"{folder}: no readable images in the class sub-folders")
    stacked = (np.stack(images) * 255).round().astype(np.uint8)  # (N, 28, 28) uint8, white on black
    return LabelledImages(stacked, np.array(targets, np.int64), source=str(folder))


def _digit_image_to_mnist(gray: np.ndarray) -> np.ndarray:
    """One digit image -> (28, 28) float32 white on black."""
    # Ink is whichever side the border is not: most of a digit image's border is background.
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = gray if np.median(border) < 128 else 255 - gray
    if ink.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return ink.astype(np.float32) / 255.0
    # Keep the ink, drop the paper's grain: Otsu on the ink image, soft values kept above it.
    level, _ = cv2.threshold(ink, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    cleaned = np.where(ink > level, ink, 0).astype(np.uint8)
    return to_mnist(cleaned)


def write_reports(evaluation: Evaluation, data: LabelledImages, out_dir: Path, *, worst: int = 36) -> dict[str, Path]:
    """Write ``metrics.json``, ``confusion_matrix.png`` and ``worst_mistakes.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps({"source": data.source, **evaluation.to_json()}, indent=2) + "\n")
    return {
        "metrics": metrics_path,
        "confusion_matrix": plot_confusion(evaluation, out_dir / "confusion_matrix.png"),
        "worst_mistakes": plot_worst_mistakes(evaluation, data, out_dir / "worst_mistakes.png", count=worst),
    }


def plot_confusion(evaluation: Evaluation, path: Path) -> Path:
    """Confusion matrix as a PNG, counts in the cells."""
    plt = _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(6, len(evaluation.labels) * 0.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(evaluation.confusion, display_labels=list(evaluation.labels)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(f"accuracy {evaluation.accuracy:.2%} on {int(evaluation.confusion.sum())} images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_worst_mistakes(evaluation: Evaluation, data: LabelledImages, path: Path, *, count: int = 36) -> Path:
    """Grid of the mistakes the model was most sure of, each titled 'true -> predicted (confidence)'."""
    plt = _pyplot()
    wrong = np.flatnonzero(evaluation.predicted != data.labels)
    wrong = wrong[np.argsort(evaluation.true_probability[wrong])][:count]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    labels = evaluation.labels
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(data.images[i], cmap="gray")
        ax.set_title(
            f"{labels[data.labels[i]]}->{labels[evaluation.predicted[i]]} ({evaluation.confidence[i]:.2f})\n#{i}",
            fontsize=8,
        )
    if len(wrong) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(f"worst {len(wrong)} of {int((evaluation.predicted != data.labels).sum())} mistakes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
