"""IDX parsing, checksum verification and the verified download."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from conftest import fixture_idx

from hwr_batch.errors import DatasetError
from hwr_batch.mnist import MNIST_FILES, download_mnist, load_idx_pair, load_mnist, read_idx, verify_mnist


def test_read_idx_fixture_images_and_labels():
    images_path, labels_path = fixture_idx("test")
    images, labels = read_idx(images_path), read_idx(labels_path)
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (300,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's first ten test labels


def test_read_idx_uncompressed_file(tmp_path):
    images_path, _ = fixture_idx("test")
    raw = tmp_path / "images.idx3-ubyte"
    raw.write_bytes(gzip.decompress(images_path.read_bytes()))
    assert np.array_equal(read_idx(raw), read_idx(images_path))


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    images_path, _ = fixture_idx("test")
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(images_path.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="cut-images-idx3-ubyte.gz.*truncated or corrupt"):
        read_idx(cut)


def test_read_idx_truncated_payload(tmp_path):
    images_path, _ = fixture_idx("test")
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(gzip.decompress(images_path.read_bytes())[:-100]))
    with pytest.raises(DatasetError, match=r"short.gz: IDX data is 235116 bytes, header \(300, 28, 28\) says 235216"):
        read_idx(short)


def test_read_idx_wrong_magic(tmp_path):
    bad = tmp_path / "notidx.gz"
    bad.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(100)))
    with pytest.raises(DatasetError, match="notidx.gz: not an IDX file"):
        read_idx(bad)


def test_read_idx_not_gzip(tmp_path):
    bad = tmp_path / "plain-text.gz"
    bad.write_text("hello, this is not gzip")
    with pytest.raises(DatasetError, match="plain-text.gz"):
        read_idx(bad)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nothere.gz: file not found"):
        read_idx(tmp_path / "nothere.gz")


def test_load_idx_pair_count_mismatch():
    test_images, _ = fixture_idx("test")
    _, train_labels = fixture_idx("train")
    with pytest.raises(DatasetError, match="300 images but .* has 600 labels"):
        load_idx_pair(test_images, train_labels)


def test_verify_mnist_reports_missing_and_wrong_files(tmp_path):
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: MNIST file not found"):
        verify_mnist(tmp_path)
    images_path, _ = fixture_idx("train")
    shutil.copy(images_path, tmp_path / "train-images-idx3-ubyte.gz")  # right name, wrong bytes
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: checksum mismatch"):
        verify_mnist(tmp_path, ("train-images-idx3-ubyte.gz",))


def test_load_full_mnist(mnist_dir):
    train, test = load_mnist("train", mnist_dir), load_mnist("test", mnist_dir)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_download_verifies_and_skips_bad_mirrors(mnist_dir, tmp_path):
    # A real download through urllib, from file:// mirrors: the first serves a corrupt copy of
    # each file, the second the originals. Only verified files may land in the destination.
    corrupt = tmp_path / "corrupt-mirror"
    corrupt.mkdir()
    for name in MNIST_FILES:
        (corrupt / name).write_bytes(b"not the file you want")
    dest = tmp_path / "cache"
    download_mnist(dest, mirrors=(corrupt.as_uri() + "/", mnist_dir.as_uri() + "/"))
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES)
    assert verify_mnist(dest) == MNIST_FILES


def test_download_fails_clearly_when_no_mirror_has_the_file(tmp_path):
    with pytest.raises(DatasetError, match="could not download a verified copy"):
        download_mnist(tmp_path / "cache", mirrors=((tmp_path / "empty").as_uri() + "/",))
    assert list((tmp_path / "cache").iterdir()) == []  # no partial or temporary files left
