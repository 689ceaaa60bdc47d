"""Finding the scans to read (load stage): folders, globs, hidden files, missing paths."""

from __future__ import annotations

from pathlib import Path

from hwr_batch.load import OWN_FOLDER_MARKER, find_inputs


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def names(files: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in files]


def test_folders_are_walked_for_supported_files_in_a_stable_order(tmp_path):
    touch(tmp_path, "b.png", "a.JPG", "notes.txt", ".hidden.png", "sub/c.tif", ".cache/d.png", "sub/e.PDF")
    files, problems = find_inputs([tmp_path, tmp_path / "missing"])
    assert names(files, tmp_path) == ["a.JPG", "b.png", "sub/c.tif", "sub/e.PDF"]
    assert problems == [(tmp_path / "missing", "no such file or folder")]


def test_files_of_other_types_are_left_alone_and_counted_in_the_log(tmp_path, caplog):
    touch(tmp_path, "scan001", "b.jfif", "notes.txt", "a.png")
    with caplog.at_level("INFO", logger="hwr_batch.load"):
        files, _ = find_inputs([tmp_path])
    assert names(files, tmp_path) == ["a.png", "b.jfif"]
    assert "left alone 2 files" in caplog.text and "notes.txt" in caplog.text and "scan001" in caplog.text


def test_include_and_exclude_globs_ignore_case(tmp_path):
    touch(tmp_path, "SCAN_0001.TIF", "scan_0002.tif", "cover.png", "Rejected/SCAN_0003.TIF", "rejected/x.tif")
    included, _ = find_inputs([tmp_path], include=["*.tif"])
    assert names(included, tmp_path) == ["SCAN_0001.TIF", "scan_0002.tif", "Rejected/SCAN_0003.TIF", "rejected/x.tif"]
    kept, _ = find_inputs([tmp_path], include=["scan_*"], exclude=["REJECTED"])
    assert names(kept, tmp_path) == ["SCAN_0001.TIF", "scan_0002.tif"]


def flate_pdf(pixels, *, cut: int = 0) -> bytes:
    """A one-page PDF holding ``pixels`` ((H, W) uint8) as a Flate image at 300 dpi; ``cut``: bytes of the
    compressed stream lost at its end (a damaged image stream, as a bad transfer leaves it)."""
    import zlib

    height, width = pixels.shape
    stream = zlib.compress(pixels.tobytes())
    stream = stream[: len(stream) - cut]
    w, h = width * 72 / 300, height * 72 / 300
    content = f"q {w:.2f} 0 0 {h:.2f} 0 0 cm /Im0 Do Q".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w:.2f} {h:.2f}] /Resources << /XObject << /Im0 4 0 R >> >> "
        "/Contents 5 0 R >>".encode(),
        f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} /ColorSpace /DeviceGray "
        f"/BitsPerComponent 8 /Filter /FlateDecode /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream",
        f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_hostile_files_get_clear_reasons_and_good_ones_are_read(tmp_path, mnist_test_small, confident_digits, cli):
    import io
    import struct

    import numpy as np
    from conftest import digit_strip
    from PIL import Image

    from hwr_batch.errors import ExitCode
    from hwr_batch.export import read_tables

    strip = digit_strip(mnist_test_small, [confident_digits[d][0] for d in (2, 6)])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pdf = flate_pdf(strip)
    (inbox / "bom.pdf").write_bytes(b"\xef\xbb\xbf" + pdf)  # PDFium opens both: they must be read
    (inbox / "crlf.pdf").write_bytes(b"\r\n" + pdf)
    (inbox / "cut-stream.pdf").write_bytes(flate_pdf(strip, cut=200))
    jpeg = io.BytesIO()
    Image.fromarray(strip).save(jpeg, "PDF", resolution=300)  # a DCT (JPEG) image stream
    data = bytearray(jpeg.getvalue())
    start, end = data.index(b"stream\n") + 7, data.index(b"endstream")
    data[(start + end) // 2 : end] = b"\xff" * (end - (start + end) // 2)  # its second half, end marker too, lost
    (inbox / "bad-jpeg.pdf").write_bytes(bytes(data))
    tiff = io.BytesIO()
    Image.fromarray(strip).save(tiff, "TIFF", save_all=True, append_images=[Image.fromarray(strip)])
    data = bytearray(tiff.getvalue())
    first = struct.unpack("<I", data[4:8])[0]
    pointer = first + 2 + 12 * struct.unpack("<H", data[first : first + 2])[0]
    data[pointer : pointer + 4] = struct.pack("<I", 20)  # page 2 "starts" inside page 1's pixels
    (inbox / "broken-pointer.tif").write_bytes(bytes(data))
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(inbox / "dot.png")
    Image.fromarray(np.full((1, 300), 200, np.uint8)).save(inbox / "line.png")

    out = tmp_path / "out"
    result = cli("process", inbox, "--out", out, "-j", "1")
    assert result.returncode == ExitCode.partial_failure, result.stderr
    tables = read_tables(out)
    reasons = {Path(f).name: r for f, r in zip(tables["errors"]["file"], tables["errors"]["reason"])}
    assert set(reasons) == {"cut-stream.pdf", "bad-jpeg.pdf", "broken-pointer.tif", "dot.png", "line.png"}, reasons
    assert "page 1 has damaged image data (image 1 decodes to" in reasons["cut-stream.pdf"]
    assert "page 1 has damaged image data (image 1 (JPEG):" in reasons["bad-jpeg.pdf"]
    assert "page 2 cannot be read: the file's pointer to it is broken" in reasons["broken-pointer.tif"]
    assert "page 1 is 1x1 pixels, too small to hold a digit" in reasons["dot.png"]
    assert "page 1 is 300x1 pixels, too small to hold a digit" in reasons["line.png"]
    assert not any("OpenCV" in r or "TypeError" in r for r in reasons.values())
    read = {Path(f).name: d for f, d in zip(tables["fields"]["file"], tables["fields"]["digits"])}
    assert read == {"bom.pdf": "26", "crlf.pdf": "26"}


def test_folders_marked_as_hwr_batch_output_are_not_walked_below_a_named_folder(tmp_path):
    touch(tmp_path, "a.png", "annotated/a-p1-1234abcd.jpg", f"annotated/{OWN_FOLDER_MARKER}", "sub/b.png")
    files, _ = find_inputs([tmp_path])
    assert names(files, tmp_path) == ["a.png", "sub/b.png"]
    named, _ = find_inputs([tmp_path / "annotated"])  # named itself: the user asked for it
    assert names(named, tmp_path) == ["annotated/a-p1-1234abcd.jpg"]
