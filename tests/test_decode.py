"""Decoding scans (load stage): the fast PNG path gives exactly Pillow's pixels and hands bad files back."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hwr_batch.errors import InputFileError
from hwr_batch.load import iter_pages


def _pillow_gray(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("L"))


@pytest.fixture
def opencv_decodes(monkeypatch) -> list[int]:
    """Counts the pages OpenCV's decoder gives back (the fast path taken)."""
    import cv2

    decoded: list[int] = []
    real = cv2.imdecode

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        if out is not None:
            decoded.append(1)
        return out

    monkeypatch.setattr(cv2, "imdecode", counting)
    return decoded


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_grey_png_pages_match_pillow_to_the_pixel(tmp_path, bits, opencv_decodes):
    rng = np.random.default_rng(bits)
    page = rng.integers(0, 256, (301, 203), dtype=np.uint8)
    page[40:60, 10:190] = 0
    path = tmp_path / "scan.png"
    Image.fromarray(page).save(path, bits=bits, dpi=(300, 300))
    (read,) = iter_pages(path)
    assert opencv_decodes == [1]  # the fast path, not Pillow
    assert read.gray.dtype == np.uint8 and read.gray.flags.writeable
    np.testing.assert_array_equal(read.gray, _pillow_gray(path))
    assert read.dpi == pytest.approx(300, abs=0.1)


def test_png_with_transparency_is_laid_on_white_paper(tmp_path, opencv_decodes):
    page = np.full((50, 80), 30, np.uint8)
    page[10:20, 10:30] = 90  # opaque ink
    path = tmp_path / "clear.png"
    Image.fromarray(page).save(path, transparency=30)  # the background level is transparent
    (read,) = iter_pages(path)
    assert opencv_decodes == []  # libpng would not lay it on paper: Pillow decodes it
    assert (read.gray[10:20, 10:30] == 90).all()
    read.gray[10:20, 10:30] = 255
    assert (read.gray == 255).all()


def test_png_with_a_colour_profile_keeps_to_pillow_and_prints_nothing(tmp_path):
    """libpng warns on stderr, naming no file, about an RGB colour profile in a grey PNG (common in
    scanner output); such a file is decoded by Pillow. Run in a fresh process to see the decoders' stderr."""
    from PIL import ImageCms

    path = tmp_path / "profiled scan.png"
    page = np.random.default_rng(1).integers(0, 256, (120, 90), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(page).save(path, icc_profile=srgb)
    code = (
        "import numpy as np\nfrom hwr_batch.load import iter_pages\n"
        f"(p,) = iter_pages({str(path)!r})\nprint(int(p.gray.astype(np.int64).sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout) == int(page.astype(np.int64).sum())
    assert done.stderr == ""


def _damaged_png(tmp_path, damage: str):
    path = tmp_path / "damaged scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 300), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    if damage == "cut short":
        data = data[: len(data) * 9 // 10]  # (at half, libpng happens to fail without a word)
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = b"x" * 64
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", ["cut short", "bytes overwritten"])
def test_damaged_png_is_reported_with_its_name(tmp_path, damage):
    path = _damaged_png(tmp_path, damage)
    with pytest.raises(InputFileError, match=r"damaged scan\.png: page 1 is truncated or corrupt"):
        list(iter_pages(path))


def test_png_cut_short_does_not_reach_libpng(tmp_path):
    """A file still being copied is the usual damage; libpng would print an unnamed complaint to stderr
    before the product's own message. Run in a fresh process, so that stderr is the decoders' own."""
    path = _damaged_png(tmp_path, "cut short")
    code = f"from hwr_batch.load import iter_pages\ntry:\n    list(iter_pages({str(path)!r}))\nexcept Exception as e:\n    print(e)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "truncated or corrupt" in done.stdout
    assert done.stderr == ""
