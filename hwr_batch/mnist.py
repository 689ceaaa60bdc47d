"""MNIST and other IDX data sets: find, verify, download and read them."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError

# The four original files, byte-exact (LeCun, Cortes & Burges), and their sha256.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Public mirrors of the original files (the same bytes, so the same checksums).
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DATA_DIR_ENV = "HWR_BATCH_MNIST_DIR"

# IDX type codes (third byte of the magic number) -> numpy dtype, big-endian.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class LabelledImages:
    """Images and their labels, ready for training or scoring.

    Attributes:
        images: (N, 28, 28) uint8, white ink on black, as in MNIST.
        labels: (N,) int64 class indices.
        source: where they came from, for reports.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def default_data_dir() -> Path:
    """Where MNIST is looked for: ``$HWR_BATCH_MNIST_DIR``, else the user's cache folder."""
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hwr-batch" / "mnist"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_mnist(data_dir: Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Check that the MNIST files are present and byte-exact.

    Returns:
        file name -> sha256, for the run record.

    Raises:
        DatasetError: naming the first file that is missing or fails its checksum.
    """
    checked = {}
    for name in names or tuple(MNIST_FILES):
        path = Path(data_dir) / name
        if not path.is_file():
            raise DatasetError(
                f"{path}: MNIST file not found. Point --data-dir (or ${DATA_DIR_ENV}) at the folder "
                "holding the four IDX .gz files, or run `hwr-batch download-mnist`."
            )
        actual = sha256_of(path)
        if actual != MNIST_FILES[name]:
            raise DatasetError(
                f"{path}: checksum mismatch (sha256 {actual}, expected {MNIST_FILES[name]}); "
                "the file is truncated or not the original. Delete it and download it again."
            )
        checked[name] = actual
    return checked


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its declared type and shape.

    Raises:
        DatasetError: the file is missing, not gzip/IDX, has a wrong magic number, or is truncated.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise DatasetError(f"{path}: cannot read ({e}); the file is truncated or corrupt") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_len:
        raise DatasetError(f"{path}: IDX header is cut short ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header_len + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{path}: IDX data is {len(data)} bytes, header {shape} says {expected}; the file is truncated or padded"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)


def load_idx_pair(images_path: Path, labels_path: Path) -> LabelledImages:
    """Read an IDX images file and its labels file; check they agree."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(
            f"{images_path}, {labels_path}: expected (N, rows, cols) images and (N,) labels, "
            f"got {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise DatasetError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    return LabelledImages(images.astype(np.uint8), labels.astype(np.int64), source=str(images_path))


def load_mnist(split: str, data_dir: Path | None = None, *, verify: bool = True) -> LabelledImages:
    """Load the MNIST ``'train'`` (60,000) or ``'test'`` (10,000) split.

    Args:
        split: ``'train'`` or ``'test'``.
        data_dir: folder with the four IDX .gz files; default :func:`default_data_dir`.
        verify: check the sha256 of both files first.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    names = SPLIT_FILES[split]
    if verify:
        verify_mnist(data_dir, names)
    return load_idx_pair(data_dir / names[0], data_dir / names[1])


def download_mnist(data_dir: Path | None = None, *, mirrors: tuple[str, ...] = MNIST_MIRRORS) -> Path:
    """Download the four MNIST files into ``data_dir``, keeping only files whose sha256 matches.

    Files already present and correct are not fetched again. Each file is written to a temporary
    name and renamed once verified, so an interrupted download never leaves a bad file behind.

    Raises:
        DatasetError: no mirror gave a file with the right checksum.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, expected in MNIST_FILES.items():
        target = data_dir / name
        if target.is_file() and sha256_of(target) == expected:
            continue
        failures = []
        for mirror in mirrors:
            fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(mirror + name, timeout=60) as response:
                    shutil.copyfileobj(response, out)
                if (actual := sha256_of(Path(tmp))) != expected:
                    failures.append(f"{mirror}: sha256 {actual}")
                    continue
                os.replace(tmp, target)
                break
            except OSError as e:
                failures.append(f"{mirror}: {e}")
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            raise DatasetError(f"{target}: could not download a verified copy ({'; '.join(failures)})")
    return data_dir
