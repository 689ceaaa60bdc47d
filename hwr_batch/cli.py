"""The ``hwr-batch`` command line: a thin layer over the Python API.

Heavy libraries (TensorFlow, OpenCV, ONNX Runtime, pandas) are imported inside the commands
that need them, so ``hwr-batch --help`` starts fast. Exceptions become exit codes in one place,
:func:`main`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import ExitCode, HwrError

log = logging.getLogger("hwr_batch")

app = typer.Typer(
    name="hwr-batch",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"hwr-batch {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail (-vv for debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Read handwritten digits off scanned forms, in batches, into CSV and spreadsheets.

    Exit codes: 0 ok, 1 some input files failed, 2 bad arguments, 3 input missing or unreadable,
    4 model missing or unusable, 5 output not writable, 6 state database unusable,
    7 another run holds the lock, 15 other error, 130 interrupted.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    configure_logging(level)


def configure_logging(level: int) -> None:
    """Log to stderr (stdout is for data), under the ``hwr_batch`` logger only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


DataDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Folder holding the four MNIST IDX .gz files. Default: $HWR_BATCH_MNIST_DIR, else ~/.cache/hwr-batch/mnist.",
        file_okay=False,
    ),
]
ModelOption = Annotated[
    Optional[Path],
    typer.Option("--model", "-m", help="ONNX model (.onnx; a .keras path uses its .onnx twin). Default: $HWR_BATCH_MODEL, else the shipped model."),
]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model, its run record and curves.")] = Path(
        "trained-model"
    ),
    data_dir: DataDirOption = None,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs; early stopping on the validation loss may end sooner.")] = 40,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    validation_size: Annotated[int, typer.Option(min=1, help="Training images held out for validation.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed for the split, the weights and the augmentation.")] = 20261123,
    augment: Annotated[bool, typer.Option(help="Distort training digits (rotation, slant, size, shift, pen width).")] = True,
    limit: Annotated[Optional[int], typer.Option(min=100, help="Train on the first N training images only (quick trials).")] = None,
    name: Annotated[str, typer.Option(help="Base name of the output files.")] = "hwr-digits",
    images: Annotated[
        Optional[Path], typer.Option(help="Train on this IDX images file instead of MNIST (needs --labels; e.g. EMNIST letters).")
    ] = None,
    labels: Annotated[Optional[Path], typer.Option(help="IDX labels file that goes with --images (classes 0..C-1).")] = None,
) -> None:
    """Train the CNN (MNIST digits by default); write NAME.keras, NAME.onnx, NAME.json (run record), NAME-curves.png."""
    from .errors import BadArgsError
    from .mnist import load_idx_pair
    from .train import TrainConfig, train as run_training

    if (images is None) != (labels is None):
        raise BadArgsError("--images and --labels go together")
    data = load_idx_pair(images, labels) if images is not None else None

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        validation_size=validation_size,
        seed=seed,
        augment=augment,
        limit=limit,
    )
    result = run_training(out, data=data, data_dir=data_dir, config=config, name=name)
    typer.echo(f"best validation accuracy {result.best_val_accuracy:.4f}; model {result.onnx_path}")


@app.command()
def evaluate(
    model: ModelOption = None,
    data_dir: DataDirOption = None,
    images: Annotated[Optional[Path], typer.Option(help="IDX images file to score instead of MNIST's test set (needs --labels).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="IDX labels file that goes with --images.")] = None,
    folder: Annotated[
        Optional[Path],
        typer.Option(help="Folder of your own labelled digit images, one sub-folder per class (FOLDER/7/x.png).", file_okay=False),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N images.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json and the PNG reports.")] = Path("evaluation"),
) -> None:
    """Score a model: accuracy, per-class precision/recall/F1, confusion matrix and worst mistakes.

    By default on the 10,000 MNIST test images; or on an IDX pair (--images/--labels), or on a
    folder of labelled digit images (--folder).
    """
    from .classify import load_classifier
    from .errors import BadArgsError
    from .evaluate import evaluate as run_evaluation, load_labelled_folder, write_reports
    from .mnist import LabelledImages, load_idx_pair, load_mnist

    if (images is None) != (labels is None):
        raise BadArgsError("--images and --labels go together")
    if folder is not None and images is not None:
        raise BadArgsError("give either --folder or --images/--labels, not both")
    classifier = load_classifier(model)
    if folder is not None:
        data = load_labelled_folder(folder, classifier.labels)
    elif images is not None:
        data = load_idx_pair(images, labels)
    else:
        data = load_mnist("test", data_dir)
    if limit:
        data = LabelledImages(data.images[:limit], data.labels[:limit], data.source)
    result = run_evaluation(classifier, data)
    paths = write_reports(result, data, out)
    per_class = "  ".join(
        f"{label}:{result.per_class[label]['f1-score']:.3f}" for label in classifier.labels if label in result.per_class
    )
    typer.echo(f"model      {classifier.path}")
    typer.echo(f"data       {data.source} ({len(data)} images)")
    typer.echo(f"accuracy   {result.accuracy:.4f} ({int(result.confusion.sum() - result.confusion.trace())} errors)")
    typer.echo(f"F1         {per_class}")
    typer.echo(f"reports    {', '.join(str(p) for p in paths.values())}")


@app.command("export-onnx")
def export_onnx(
    keras_model: Annotated[Path, typer.Argument(help="A .keras model saved by `hwr-batch train`.", exists=True, dir_okay=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The .onnx file. Default: beside the .keras file.")] = None,
) -> None:
    """Convert a trained .keras model to ONNX, which `process` and `evaluate` run without TensorFlow."""
    from .train import export_onnx as run_export

    path = run_export(keras_model, out or keras_model.with_suffix(".onnx"))
    typer.echo(str(path))


@app.command("download-mnist")
def download_mnist(data_dir: DataDirOption = None) -> None:
    """Download the four MNIST files (checksum-verified) into the data folder. Needs internet."""
    from .mnist import download_mnist as run_download

    typer.echo(str(run_download(data_dir)))


def main() -> None:
    """Console entry point: run the app and turn every outcome into a documented exit code."""
    try:
        # Not standalone: typer.Exit and Ctrl-C come back as the exit code (130 for Ctrl-C),
        # usage errors and our own errors are raised, so they all meet here.
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else ExitCode.ok
    except typer.TyperException as e:  # usage errors: print the usage hint and the reason
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("hwr-batch: interrupted", file=sys.stderr)
        code = ExitCode.ctrl_c
    except HwrError as e:
        print(f"hwr-batch: error: {e}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        code = e.exit_code
    except Exception:
        log.exception("hwr-batch: unexpected error (please report it with this traceback)")
        code = ExitCode.other_error
    sys.exit(int(code))
