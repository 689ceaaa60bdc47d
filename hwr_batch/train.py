"""Train the CNN on MNIST: prepare_data -> build_model -> train -> save (Keras, ONNX, record, curves).

The only module that imports TensorFlow/Keras, and only inside functions, so that the rest of
the package (and ``hwr-batch --help``) starts fast.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .classify import DIGIT_LABELS, LETTER_LABELS
from .mnist import SPLIT_FILES, LabelledImages, default_data_dir, load_mnist, verify_mnist
from .normalise import INPUT_SHAPE

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

MODEL_NAME = "hwr-digits"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Saved in the run record."""

    epochs: int = 40  # upper bound; early stopping usually ends the run sooner
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam; halved when validation loss stalls
    lr_patience: int = 2
    min_learning_rate: float = 1e-5
    early_stop_patience: int = 6
    validation_size: int = 5000  # held out (stratified) from the 60,000 training images
    seed: int = 20261123
    augment: bool = True
    # Augmentation, drawn independently per image each epoch (see augment_batch).
    max_rotation_deg: float = 12.0
    max_shear: float = 0.25  # x-shear factor, as slanted handwriting
    scale_range: tuple[float, float] = (0.8, 1.1)
    max_shift_px: float = 2.5
    stroke_change_prob: float = 0.3  # chance each of thinning and of thickening the strokes
    # Non-digits (wrong cuts: parts of a digit, two digits as one) per training digit, trained towards the
    # uniform distribution so that the model's confidence tells a good cut from a bad one (fragments.py).
    # Off by default: it helps on generated forms but costs a lot on real scans (models/MODEL_CARD.md).
    fragments: float = 0.0
    architecture: str = "original"  # see build_model
    # "plateau": halve the learning rate when the validation loss stalls, stop early, keep the best epoch;
    # "cosine": a fixed cosine decay over all epochs, keep the last (train_on_real's choice).
    schedule: str = "plateau"
    limit: int | None = None  # train on the first `limit` images only (tests, quick looks)


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote and how it went."""

    keras_path: Path
    onnx_path: Path
    record_path: Path
    curves_path: Path
    history: dict[str, list[float]]
    best_val_accuracy: float


REJECT_CLASS = len(DIGIT_LABELS)  # a digit model's 11th output: "not a digit"


def labels_for(num_classes: int) -> str:
    """Class labels for a model with ``num_classes`` outputs: digits (10, or 11 with "not a digit") or letters (26)."""
    if num_classes in (len(DIGIT_LABELS), len(DIGIT_LABELS) + 1):
        return DIGIT_LABELS
    if num_classes == len(LETTER_LABELS):
        return LETTER_LABELS
    return "".join(chr(ord("A") + i) for i in range(num_classes))


def split_train_validation(
    data: LabelledImages, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded split into training and validation arrays, scaled to [0, 1], shape (N, 28, 28, 1)."""
    from sklearn.model_selection import train_test_split

    images, labels = data.images, data.labels
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    validation_size = min(config.validation_size, len(labels) // 5)
    x_train, x_val, y_train, y_val = train_test_split(
        images, labels, test_size=validation_size, stratify=labels, random_state=config.seed
    )
    # Scale to [0, 1] and add the channel axis: (N, 28, 28) uint8 -> (N, 28, 28, 1) float32.
    def scale(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0)[..., None]

    return scale(x_train), y_train, scale(x_val), y_val


ARCHITECTURES = ("original", "wide")


def build_model(num_classes: int = len(DIGIT_LABELS), architecture: str = "original") -> keras.Model:
    """The CNN; the one place the architectures are defined.

    ``original`` is the original design: Conv2D(32, 3x3, relu) -> MaxPool(2) -> Conv2D(32, 3x3, relu)
    -> MaxPool(2) -> Flatten (800) -> Dense(512, relu) -> Dense(num_classes, softmax): 424,810 parameters
    for 10 classes, 433,018 for 26. ``wide`` doubles the second convolution (64 filters, Flatten 1,600)
    and adds dropout before the dense layers: about twice the multiply-adds, for real handwriting.
    """
    import keras
    from keras import layers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {architecture!r}")
    second = 64 if architecture == "wide" else 32
    dropout = [layers.Dropout(0.3)] if architecture == "wide" else []
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),  # (28, 28, 1) float32 in [0, 1]
            layers.Conv2D(32, 3, activation="relu"),  # -> (26, 26, 32)
            layers.MaxPooling2D(2),  # -> (13, 13, 32)
            layers.Conv2D(second, 3, activation="relu"),  # -> (11, 11, second)
            layers.MaxPooling2D(2),  # -> (5, 5, second)
            layers.Flatten(),  # -> (25 * second,)
            *dropout,
            layers.Dense(512, activation="relu"),
            layers.Dense(num_classes, activation="softmax"),
        ],
        name="hwr_cnn",
    )


def augment_batch(images: tf.Tensor, config: TrainConfig) -> tf.Tensor:
    """Distort a batch the way scanned handwriting varies: slant, rotation, size, position, pen width.

    Args:
        images: (B, 28, 28, 1) float32 in [0, 1].

    Returns:
        The same shape and range, each image with its own random affine warp and stroke change.
    """
    import tensorflow as tf
    from keras import ops

    batch = tf.shape(images)[0]

    def uniform(low: float, high: float) -> tf.Tensor:
        return tf.random.uniform([batch], low, high)

    # Pen width: thicken (grey dilation) or thin (grey erosion) some images by a 2x2 neighbourhood.
    thick = tf.nn.max_pool2d(images, 2, 1, "SAME")
    thin = -tf.nn.max_pool2d(-images, 2, 1, "SAME")
    choice = uniform(0.0, 1.0)[:, None, None, None]
    p = config.stroke_change_prob
    images = tf.where(choice < p, thick, tf.where(choice < 2 * p, thin, images))

    # One affine map per image: forward = rotation . shear . scale, about the image centre.
    angle = uniform(-config.max_rotation_deg, config.max_rotation_deg) * (math.pi / 180)
    shear = uniform(-config.max_shear, config.max_shear)
    scale = uniform(*config.scale_range)
    shift_x = uniform(-config.max_shift_px, config.max_shift_px)
    shift_y = uniform(-config.max_shift_px, config.max_shift_px)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # forward [[a, b], [c, d]] = R(angle) @ [[1, shear], [0, 1]] @ scale
    a, b = cos * scale, (cos * shear - sin) * scale
    c, d = sin * scale, (sin * shear + cos) * scale
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det  # inverse: output pixel -> input pixel
    centre = (INPUT_SHAPE[0] - 1) / 2
    ox, oy = centre + shift_x, centre + shift_y
    transform = tf.stack(
        [ia, ib, centre - ia * ox - ib * oy, ic, id_, centre - ic * ox - id_ * oy, tf.zeros([batch]), tf.zeros([batch])],
        axis=1,
    )
    warped = ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="constant")
    return tf.clip_by_value(warped, 0.0, 1.0)


def with_fragments(
    x: np.ndarray, y: np.ndarray, num_classes: int, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Training images and soft targets: one-hot for the digits, uniform for added fragments (non-digits).

    Args:
        x: (N, 28, 28, 1) float32 training digits in [0, 1]; y: (N,) their labels.

    Returns:
        (N + F, 28, 28, 1) images and (N + F, num_classes) float32 targets, F = round(fragments * N).
    """
    from .fragments import make_fragments

    targets = np.eye(num_classes, dtype=np.float32)[y]
    count = round(config.fragments * len(x))
    if count == 0:
        return x, targets
    rng = np.random.default_rng([config.seed, 1])
    frags = make_fragments(np.round(x[..., 0] * 255).astype(np.uint8), count, rng)[..., None]
    uniform = np.full((count, num_classes), 1.0 / num_classes, np.float32)
    return np.concatenate([x, frags]), np.concatenate([targets, uniform])


def fragment_confidence(model: keras.Model, x_val: np.ndarray, config: TrainConfig, count: int = 3000) -> dict[str, float]:
    """How confident the model is on fragments made from the validation digits (lower is better)."""
    from .fragments import make_fragments

    rng = np.random.default_rng([config.seed, 2])
    frags = make_fragments(np.round(x_val[..., 0] * 255).astype(np.uint8), count, rng)[..., None]
    top = model.predict(frags, batch_size=1024, verbose=0).max(axis=1)
    return {"fragments": count, "mean_top_probability": float(top.mean()), "share_above_0.9": float((top > 0.9).mean())}


def make_dataset(
    x: np.ndarray, y: np.ndarray, config: TrainConfig, *, training: bool
) -> tf.data.Dataset:
    """A tf.data pipeline: shuffled and augmented for training, plain for validation."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.batch(config.batch_size)
    if training and config.augment:
        ds = ds.map(lambda images, labels: (augment_batch(images, config), labels), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class _EpochLog:
    """Keras callback factory: one log line per epoch (stderr), for runs nobody watches."""

    @staticmethod
    def make() -> keras.callbacks.Callback:
        import keras

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                self.started = time.monotonic()

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                logs = logs or {}
                shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
                log.info("epoch %d: %s (%.1f s)", epoch + 1, shown, time.monotonic() - self.started)

        return EpochLog()


def train(
    out_dir: Path,
    *,
    data: LabelledImages | None = None,
    data_dir: Path | None = None,
    config: TrainConfig = TrainConfig(),
    name: str = MODEL_NAME,
    progress: bool | None = None,
    extra: LabelledImages | None = None,
    init_from: Path | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train the CNN (on MNIST by default) and write ``<name>.keras``, ``<name>.onnx``, ``<name>.json`` and a curves PNG.

    Args:
        out_dir: folder for the outputs (created if needed).
        data: training images to use instead of MNIST's (e.g. another IDX set); not checksummed.
        data_dir: folder with the MNIST IDX files (default :func:`hwr_batch.mnist.default_data_dir`),
            used when ``data`` is not given; the files' checksums are verified.
        config: hyper-parameters and augmentation.
        name: base name of the output files.
        progress: show Keras' per-batch progress bar; default only when stderr is a terminal.
        extra: more training images added to ``data`` (real digits aligned from labelled fields, and
            "not a digit" examples labelled REJECT_CLASS, which gives the model its reject output).
        init_from: a ``.keras`` model to start from (fine-tuning); a 10-class digit model can start an
            11-class one (its reject output starts untrained).
        sources: descriptions of every data source (name, size, terms) for the run record.
    """
    import keras

    started = time.time()
    checksums: dict[str, str] = {}
    if data is None:
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        checksums = verify_mnist(data_dir, SPLIT_FILES["train"])
        data = load_mnist("train", data_dir, verify=False)
    keras.utils.set_random_seed(config.seed)
    requested = config  # as given, for the record
    if config.limit:  # the first `limit` base images; extra images all come on top
        data = LabelledImages(data.images[: config.limit], data.labels[: config.limit], data.source)
        config = replace(config, limit=None)
    mnist_images = len(data)
    if extra is not None and len(extra):
        data = LabelledImages(
            np.concatenate([data.images, extra.images]), np.concatenate([data.labels, extra.labels]),
            f"{data.source} + {extra.source}",
        )
    x_train, y_train, x_val, y_val = split_train_validation(data, config)
    num_classes = int(data.labels.max()) + 1
    x_fit, t_fit = with_fragments(x_train, y_train, num_classes, config)
    model = build_model(num_classes, config.architecture)
    if init_from is not None:
        start_from(model, Path(init_from))
    if config.schedule == "cosine":
        # A fixed schedule: the learning rate falls from its start to min_learning_rate over all epochs,
        # and the last epoch's weights are kept. With "not a digit" examples in the validation split, its
        # loss is too noisy to pick an epoch by.
        steps = config.epochs * math.ceil(len(x_fit) / config.batch_size)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, steps, alpha=config.min_learning_rate / config.learning_rate
        )
        callbacks = [_EpochLog.make()]
    else:
        learning_rate = config.learning_rate
        callbacks = [
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=config.lr_patience, min_lr=config.min_learning_rate
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.early_stop_patience, restore_best_weights=True
            ),
            _EpochLog.make(),
        ]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        # On digits only: validation has no fragments. (With --fragments, training accuracy also scores
        # each fragment's uniform target as class 0, so only val_accuracy is a digit accuracy.)
        metrics=["accuracy"],
    )
    show_bar = sys.stderr.isatty() if progress is None else progress
    fit = model.fit(
        make_dataset(x_fit, t_fit, config, training=True),
        validation_data=make_dataset(x_val, np.eye(num_classes, dtype=np.float32)[y_val], config, training=False),
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=1 if show_bar else 0,
    )
    history = {k: [float(v) for v in values] for k, values in fit.history.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_path = save_for_inference(model, out_dir / f"{name}.keras")
    labels = labels_for(num_classes)
    onnx_path = export_onnx(model, out_dir / f"{name}.onnx", labels=labels)
    # The epoch whose weights were kept: the last one on a fixed schedule, the best one with early stopping.
    best = len(history["loss"]) - 1 if config.schedule == "cosine" else int(np.argmin(history["val_loss"]))
    record = {
        "model": name,
        "architecture": _architecture(model),
        "parameters": int(model.count_params()),
        "labels": labels,
        "data": {
            "source": data.source,
            "sha256": checksums,
            "sources": sources or [],
            "base_images": mnist_images,
            "extra_images": len(extra) if extra is not None else 0,
            "extra_rejects": int((extra.labels == REJECT_CLASS).sum()) if extra is not None and num_classes == 11 else 0,
            "init_from": str(init_from) if init_from else None,
            "train_images": len(y_train),
            "train_fragments": len(x_fit) - len(y_train),
            "validation_images": len(y_val),
        },
        "config": asdict(requested),
        "epochs_run": len(history["loss"]),
        "best_epoch": best + 1,
        "best_val_accuracy": history["val_accuracy"][best],
        "fragment_confidence": fragment_confidence(model, x_val, config),
        "history": history,
        "seconds": round(time.time() - started, 1),
        "environment": _environment(),
        "outputs": {"keras": keras_path.name, "onnx": onnx_path.name},
    }
    record_path = out_dir / f"{name}.json"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    curves_path = plot_history(history, out_dir / f"{name}-curves.png")
    log.info("wrote %s, %s, %s, %s", keras_path, onnx_path, record_path, curves_path)
    return TrainResult(keras_path, onnx_path, record_path, curves_path, history, history["val_accuracy"][best])


def start_from(model: keras.Model, path: Path) -> None:
    """Copy a saved model's weights into ``model``; an output layer with fewer classes fills the first ones."""
    import keras

    from .errors import ModelError

    try:
        base = keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for unreadable files
        raise ModelError(f"{path}: cannot load the model to start from ({e})") from None

    shapes = [[w.shape for w in layer.get_weights()] for layer in model.layers]
    old_shapes = [[w.shape for w in layer.get_weights()] for layer in base.layers]
    if len(shapes) != len(old_shapes) or shapes[:-1] != old_shapes[:-1]:
        raise ModelError(f"{path}: its architecture differs from the one being trained; cannot start from it")
    for layer, old in zip(model.layers[:-1], base.layers[:-1]):
        layer.set_weights(old.get_weights())
    layer, old = model.layers[-1], base.layers[-1]
    (kernel, bias), (old_kernel, old_bias) = layer.get_weights(), old.get_weights()
    if old_kernel.shape == kernel.shape:
        layer.set_weights([old_kernel, old_bias])
    elif old_kernel.shape[0] == kernel.shape[0] and old_kernel.shape[1] < kernel.shape[1]:
        # The output layer of a 10-class model in an 11-class one: keep the digits, start "not a digit" small.
        kernel[:, : old_kernel.shape[1]] = old_kernel
        bias[: old_bias.shape[0]] = old_bias
        kernel[:, old_kernel.shape[1] :] *= 0.1
        bias[old_bias.shape[0] :] = old_bias.min()
        layer.set_weights([kernel, bias])
    else:
        raise ModelError(f"{path}: its {old_kernel.shape[1]} outputs do not fit a model of {kernel.shape[1]}")


def save_for_inference(model: keras.Model, path: Path) -> Path:
    """Save the weights in a fresh, uncompiled copy of the architecture: no optimizer state (1.7 MB, not 5)."""
    import keras

    clean = keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    clean.save(path)
    return Path(path)


def export_onnx(model: keras.Model | Path, onnx_path: Path, *, labels: str | None = None) -> Path:
    """Convert a Keras model (or a saved ``.keras`` file) to ONNX for inference without TensorFlow.

    tf2onnx's ``from_keras`` does not handle Keras 3 models, so the model is wrapped in a
    ``tf.function`` and converted with ``from_function``. The class labels go in the ONNX
    metadata (``labels``) so the file is self-describing.
    """
    import keras
    import tensorflow as tf
    import tf2onnx

    if not isinstance(model, keras.Model):
        model = keras.models.load_model(model)
    classes = int(model.output_shape[-1])
    if labels is None:
        labels = labels_for(classes)
    signature = [tf.TensorSpec((None, *INPUT_SHAPE), tf.float32, name="image")]
    function = tf.function(lambda image: model(image, training=False), input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=17)
    metadata = {"labels": labels, "producer": "hwr_batch.train.export_onnx"}
    if classes == len(labels) + 1:
        metadata["reject_class"] = "last"  # the extra output is "not a digit" (hwr_batch.classify)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_path = Path(onnx_path)
    onnx_path.write_bytes(proto.SerializeToString())
    return onnx_path


def plot_history(history: dict[str, list[float]], path: Path) -> Path:
    """Save training and validation loss and accuracy per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, history[metric], label=f"training {metric}")
        ax.plot(epochs, history[f"val_{metric}"], label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _architecture(model: keras.Model) -> list[dict[str, Any]]:
    return [
        {"layer": layer.__class__.__name__, "output_shape": list(layer.output.shape[1:]), "parameters": layer.count_params()}
        for layer in model.layers
    ]


def _environment() -> dict[str, str]:
    import os

    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
    }


@dataclass(frozen=True)
class RealFieldSet:
    """Labelled real fields to train on: a truth folder (see :mod:`hwr_batch.labelled`), some of its rows.

    Attributes:
        folder: the folder holding ``truth.csv``.
        start, stop: the rows of its digits-only fields used (Python slice bounds; None = open).
        repeat: how many times each aligned example appears per epoch (to weigh a small set up).
    """

    folder: Path
    start: int | None = None
    stop: int | None = None
    repeat: int = 1

    @classmethod
    def parse(cls, spec: str) -> RealFieldSet:
        """``DIR``, ``DIR[a:b]`` (rows a to b-1 of its digits-only fields), optionally ``*N`` (repeat)."""
        import re

        match = re.fullmatch(r"(.+?)(?:\[(\d*):(\d*)\])?(?:\*(\d+))?", spec.strip())
        if not match:
            raise ValueError(f"{spec!r}: expected DIR, DIR[a:b] or either with *N")
        folder, a, b, repeat = match.groups()
        return cls(Path(folder), int(a) if a else None, int(b) if b else None, int(repeat) if repeat else 1)

    def __str__(self) -> str:
        rows = f"[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"
        return f"{self.folder}{rows if (self.start, self.stop) != (None, None) else ''}{f'*{self.repeat}' if self.repeat > 1 else ''}"


def train_on_real(
    out_dir: Path,
    real: list[RealFieldSet],
    *,
    rounds: int = 2,
    start_model: Path | None = None,
    data_dir: Path | None = None,
    config: TrainConfig = TrainConfig(),
    name: str = MODEL_NAME,
    jobs: int = 1,
    forms: int = 0,
) -> TrainResult:
    """Train on MNIST plus real fields labelled with their digit strings only, in rounds.

    Each round aligns every labelled field's digits to the segmenter's candidate cuts with the current
    model (:mod:`hwr_batch.align`), adds the aligned digits and the refused cuts ("not a digit") to MNIST's
    training digits, and trains the CNN with a reject output, starting from the current model's weights.
    Round k writes to ``out_dir/round-k``; the last round writes to ``out_dir``.

    Args:
        real: the labelled field sets.
        rounds: alignment-and-training rounds.
        start_model: the ``.onnx`` model of the first alignment, whose ``.keras`` twin the first round
            starts from (default: the shipped model) when ``config.architecture`` is the original design.
        jobs: processes for segmenting the fields.
        forms: also this many generated form pages (:mod:`hwr_batch.synth`) of MNIST *training* digits,
            whose fields are aligned like the real ones: the wrong cuts of MNIST-style digits.
    """
    from .align import examples_from_fields
    from .classify import SHIPPED_MODEL, load_classifier
    from .labelled import cached_form_fields, cached_segmentation, read_truth_folder

    out_dir = Path(out_dir)
    current = Path(start_model) if start_model else SHIPPED_MODEL
    sets = []  # (name, segmented fields, repeat)
    for index, field_set in enumerate(real):
        crops = read_truth_folder(field_set.folder)[field_set.start : field_set.stop]
        cache = out_dir / "segmented" / f"{index}-{field_set.folder.name}.pkl"
        fields = [f for f in cached_segmentation(crops, cache, jobs=jobs) if f is not None]
        log.info("%s: %d labelled fields segmented", field_set, len(fields))
        sets.append((str(field_set), fields, field_set.repeat))
    if forms:
        digits = load_mnist("train", Path(data_dir) if data_dir else default_data_dir())
        cache = out_dir / "segmented" / f"generated-forms-{forms}-{config.seed}.pkl"
        fields = cached_form_fields(digits, forms, cache, seed=config.seed)
        log.info("generated forms: %d pages, %d labelled fields", forms, len(fields))
        sets.append((f"generated forms x{forms} (MNIST training digits)", fields, 1))
    result: TrainResult | None = None
    for round_number in range(1, rounds + 1):
        classifier = load_classifier(current)
        parts, sources = [], []
        for set_name, fields, repeat in sets:
            examples, report = examples_from_fields(
                fields, classifier, source=set_name, repeat=repeat, seed=config.seed + round_number
            )
            log.info("round %d, %s: %s", round_number, set_name, report.as_dict())
            parts.append(examples)
            sources.append({"set": set_name, **report.as_dict(), "repeat": repeat})
        extra = LabelledImages(
            np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
            " + ".join(name for name, _, _ in sets),
        )
        target = out_dir if round_number == rounds else out_dir / f"round-{round_number}"
        sources.append({"aligned_with": str(current), "round": round_number, "of": rounds})
        # Each round starts from the last one; the first from the start model, if it is of the same design.
        same_design = round_number > 1 or config.architecture == "original"
        result = train(
            target, data_dir=data_dir, config=config, name=name, extra=extra,
            init_from=current.with_suffix(".keras") if same_design else None, sources=sources,
        )
        current = result.onnx_path
    assert result is not None
    return result

