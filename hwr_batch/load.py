"""Find input files and decode their pages to grayscale (the only module that reads scans)."""

from __future__ import annotations

import fnmatch
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".webp", ".pbm", ".pgm", ".ppm", ".gif"}
)
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | PDF_SUFFIXES
DEFAULT_PDF_DPI = 300
DEFAULT_MAX_MEGAPIXELS = 200.0  # an A0 page at 300 dpi is 140 MP; past this we suspect a decompression bomb
# A file that marks a folder hwr-batch writes images into (annotated pages): walks never read such a
# folder as scans, even in a later run that does not name it (as CACHEDIR.TAG marks caches for backups).
OWN_FOLDER_MARKER = ".hwr-batch-output"


@dataclass(frozen=True)
class Page:
    """One decoded page.

    Attributes:
        source: the file it came from.
        index: 0-based page number within the file.
        gray: (H, W) uint8 grayscale, dark ink on light paper as scanned.
        dpi: resolution if the file says (or the PDF render dpi), else None.
        rendered: True for a PDF page rendered at ``dpi`` (exact), False for a scan's own tag (to be checked).
    """

    source: Path
    index: int
    gray: np.ndarray
    dpi: float | None = None
    rendered: bool = False


def find_inputs(
    paths: Iterable[Path],
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    skip_dirs: Iterable[Path] = (),
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders (recursively) into the scans to process, in a stable order.

    Args:
        paths: files or folders.
        include: glob patterns on the file name or relative path; if given, only matching files
            are taken (e.g. ``"*.tif"``). Files named explicitly are always taken.
        exclude: glob patterns of files or folders to skip (e.g. ``"rejected/*"``).
            Both match regardless of case: ``"*.tif"`` takes ``SCAN.TIF`` too.
        skip_dirs: folders never to walk into (the run's own output and state folders). Folders
            below a named one that hold :data:`OWN_FOLDER_MARKER` (annotations of earlier runs)
            are not walked either.

    Returns:
        (files, problems): the supported files found, sorted within each folder, and
        (path, reason) for named paths that do not exist or cannot be listed.
        Symlinked folders are not followed, so a symlink loop cannot trap the walk; hidden files
        and folders (names starting with ".") are skipped.
    """
    include, exclude = tuple(p.lower() for p in include), tuple(p.lower() for p in exclude)
    skipped = {os.path.realpath(d) for d in skip_dirs}
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    other_types = 0  # files in the folders that are not scans of a supported type
    examples: list[str] = []

    def matches(patterns: tuple[str, ...], relative: str) -> bool:
        # Case-insensitive, as on Windows: scanners write "SCAN_0001.TIF" as often as "scan_0001.tif".
        relative = relative.lower()
        name = relative.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)

    def add(path: Path) -> None:
        key = path.absolute()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for root in map(Path, paths):
        if root.is_dir():
            def on_error(error: OSError, root: Path = root) -> None:
                problems.append((Path(error.filename or root), f"cannot list folder: {error.strerror}"))

            for folder, dirnames, filenames in os.walk(root, onerror=on_error):
                relative_folder = os.path.relpath(folder, root)
                if OWN_FOLDER_MARKER in filenames and relative_folder != ".":
                    log.info("%s: not read: it holds annotated pages an earlier run wrote (%s marks it)", folder, OWN_FOLDER_MARKER)
                    dirnames[:] = []
                    continue
                dirnames[:] = sorted(
                    d for d in dirnames
                    if not d.startswith(".")
                    and os.path.realpath(os.path.join(folder, d)) not in skipped
                    and not matches(exclude, os.path.normpath(os.path.join(relative_folder, d)))
                )
                for name in sorted(filenames):
                    relative = os.path.normpath(os.path.join(relative_folder, name))
                    if name.startswith("."):
                        continue
                    if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
                        other_types += 1
                        if len(examples) < 3:
                            examples.append(os.path.join(folder, name))
                        continue
                    if matches(exclude, relative) or (include and not matches(include, relative)):
                        continue
                    add(Path(folder) / name)
        elif os.path.lexists(root):
            add(root)  # named explicitly: taken whatever it is; a broken link or a FIFO fails at load, named
        else:
            problems.append((root, "no such file or folder"))
    if other_types:  # a scanner that writes "scan001" with no suffix would otherwise be ignored for ever
        log.info(
            "left alone %d files in the input folders whose names do not end as an image's or a PDF's "
            "(see --help), e.g. %s", other_types, ", ".join(examples),
        )
    return files, problems


def iter_pages(
    path: Path, *, pdf_dpi: int = DEFAULT_PDF_DPI, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
) -> Iterator[Page]:
    """Decode every page of an image or PDF file, one at a time.

    Raises:
        InputFileError: the file is missing, unreadable, not an image/PDF, corrupt, encrypted,
            or larger than ``max_megapixels``; the message names the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        reason = "broken symbolic link" if path.is_symlink() else "file not found"
        raise InputFileError(f"{path}: {reason}")
    if not path.is_file():
        raise InputFileError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(PDF_HEADER_WINDOW)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise InputFileError(f"{path}: empty file (0 bytes)")
    if is_pdf(head):
        yield from _iter_pdf_pages(path, dpi=pdf_dpi, max_megapixels=max_megapixels)
    else:
        yield from _iter_image_pages(path, max_megapixels=max_megapixels)


PDF_HEADER_WINDOW = 1024  # PDFium (like Acrobat) finds "%PDF-" anywhere in a file's first 1,024 bytes
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF")


def is_pdf(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a PDF, as PDFium decides: "%PDF-" within the first
    1,024 bytes (after a byte-order mark or a blank line, say), unless it starts as an image does."""
    return b"%PDF-" in head[:PDF_HEADER_WINDOW] and not head.startswith(_IMAGE_SIGNATURES)


def count_pages(path: Path) -> int:
    """Number of pages in an image or PDF file, without decoding them (0 if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PDF_HEADER_WINDOW)
        if is_pdf(head):
            document = _open_pdf(path)
            try:
                return len(document)
            finally:
                document.close()
        from PIL import Image

        with Image.open(path) as image:
            return getattr(image, "n_frames", 1)
    except Exception:  # noqa: BLE001 - any failure means: cannot tell
        return 0


def _iter_image_pages(path: Path, *, max_megapixels: float) -> Iterator[Page]:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we apply our own, configurable limit below, before decoding
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise InputFileError(f"{path}: not an image or PDF file hwr-batch can read") from None
    except OSError as e:
        raise InputFileError(f"{path}: cannot open image ({e})") from None
    with image:
        for index, frame in enumerate(_frames(image, path)):
            width, height = frame.size
            if width * height > max_megapixels * 1e6:
                raise InputFileError(
                    f"{path}: page {index + 1} is {width}x{height} pixels ({width * height / 1e6:.0f} MP), over the "
                    f"{max_megapixels:g} MP limit (a decompression bomb?); raise --max-megapixels if it is genuine"
                )
            try:
                gray = _decode_plain_png(frame, path)
                if gray is None:
                    gray = _to_gray(frame)
            except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data surfaces at decode
                raise InputFileError(f"{path}: page {index + 1} is truncated or corrupt ({e})") from None
            _check_size(gray, path, index)
            dpi = frame.info.get("dpi")
            yield Page(path, index, gray, float(dpi[0]) if dpi and dpi[0] else None)


_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # the empty IEND chunk, with its CRC, that ends every whole PNG file
# Colour-management chunks that libpng checks against the image and warns about (to stderr, naming no file)
# where Pillow does not: such files keep to Pillow.
_LIBPNG_WARNS_ON = ("icc_profile", "srgb", "chromaticity")
_LIBPNG_MAX_SIDE = 1 << 20  # OpenCV's libpng refuses wider or taller images ("Invalid IHDR data")


def _decode_plain_png(image, path: Path) -> np.ndarray | None:
    """An 8-bit grey single-image PNG (the usual scan saved as PNG) decoded by OpenCV's libpng, whose
    unfiltering is vectorised: 70 ms against Pillow's 82 ms for a 300 dpi page here. None for anything
    else, or for a file OpenCV cannot decode: Pillow then decodes it and says what is wrong.

    libpng prints its own complaints to stderr, naming no file, so files it would complain about keep to
    Pillow: a file cut short (no IEND chunk at its end: still being copied, the usual damage) and files
    with colour-management chunks. A whole file whose image data is damaged still gets one such line
    from libpng before the product's own message."""
    import cv2

    if image.format != "PNG" or image.mode != "L" or image.n_frames != 1 or max(image.size) > _LIBPNG_MAX_SIDE:
        return None
    if "transparency" in image.info or any(key in image.info for key in _LIBPNG_WARNS_ON):
        return None
    try:
        image.fp.seek(0)  # the file Pillow opened: the same bytes its header and dpi came from
        data = np.frombuffer(image.fp.read(), dtype=np.uint8)
    except (OSError, ValueError, AttributeError):
        return None
    if data[-len(_PNG_END) :].tobytes() != _PNG_END:
        return None
    try:
        gray = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if gray is None or gray.dtype != np.uint8 or gray.shape != (image.height, image.width):
        return None
    return gray


def _frames(image, path: Path):
    """The pages of a Pillow image, one by one; a page that cannot be reached is an InputFileError
    (a multi-page TIFF whose next-page pointer is broken made Pillow raise "TypeError: Missing dimensions")."""
    index = 0
    while True:
        try:
            image.seek(index)
        except EOFError:
            return
        except (TypeError, ValueError, OSError, SyntaxError, struct.error) as e:
            raise InputFileError(
                f"{path}: page {index + 1} cannot be read: the file's pointer to it is broken or leads to a "
                f"damaged page ({e})"
            ) from None
        yield image
        index += 1


MIN_PAGE_PIXELS = 8  # rows and columns: a digit needs more; OpenCV's resizing fails on a 1-pixel side


def _check_size(gray: np.ndarray, path: Path, index: int) -> None:
    height, width = gray.shape[:2]
    if min(height, width) < MIN_PAGE_PIXELS:
        raise InputFileError(
            f"{path}: page {index + 1} is {width}x{height} pixels, too small to hold a digit "
            f"(at least {MIN_PAGE_PIXELS}x{MIN_PAGE_PIXELS} needed)"
        )


def _to_gray(frame) -> np.ndarray:
    """Any Pillow image mode -> (H, W) uint8 grayscale; transparency is laid on white paper."""
    from PIL import Image

    mode = frame.mode
    if mode == "L" and "transparency" not in frame.info:  # most scans: convert() would copy the page once more (1.5 ms of a 300 dpi page)
        return np.array(frame, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(frame, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        return np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
    if mode in ("P", "L") and "transparency" in frame.info:  # a colour (or grey level) marked transparent
        frame = frame.convert("RGBA")
    elif mode == "P":
        frame = frame.convert("RGB")
    if frame.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        paper = Image.new("RGBA", frame.size, (255, 255, 255, 255))
        frame = Image.alpha_composite(paper, frame.convert("RGBA"))
    return np.asarray(frame.convert("L"), dtype=np.uint8).copy()


def _open_pdf(path: Path):
    """Open a PDF through a Python file object: given a path, pypdfium2 encodes it as UTF-8, which
    fails for a name that is not valid UTF-8.

    Raises:
        OSError: the file cannot be opened.
        pypdfium2.PdfiumError: PDFium cannot load it.
    """
    import pypdfium2 as pdfium

    stream = open(path, "rb")  # noqa: SIM115 - the document owns it (autoclose), or it is closed below
    try:
        return pdfium.PdfDocument(stream, autoclose=True)
    except BaseException:
        stream.close()
        raise


def _iter_pdf_pages(path: Path, *, dpi: int, max_megapixels: float) -> Iterator[Page]:
    import pypdfium2 as pdfium

    try:
        document = _open_pdf(path)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror or e})") from None
    except pdfium.PdfiumError as e:
        reason = "encrypted (password protected)" if "password" in str(e).lower() else f"broken PDF ({e})"
        raise InputFileError(f"{path}: {reason}") from None
    try:
        for index in range(len(document)):
            page = document[index]
            width, height = page.get_size()  # points: 1/72 inch
            pixels = width * height * (dpi / 72) ** 2
            if pixels > max_megapixels * 1e6:
                raise InputFileError(
                    f"{path}: page {index + 1} would render at {pixels / 1e6:.0f} MP at {dpi} dpi, over the "
                    f"{max_megapixels:g} MP limit; lower --pdf-dpi or raise --max-megapixels"
                )
            try:
                bitmap = page.render(scale=dpi / 72, grayscale=True)
                gray = np.asarray(bitmap.to_numpy(), dtype=np.uint8)
            except pdfium.PdfiumError as e:
                raise InputFileError(f"{path}: page {index + 1} cannot be rendered ({e})") from None
            if gray.ndim == 3:
                gray = gray[..., 0]
            damaged = _damaged_images(page)
            if damaged:
                raise InputFileError(
                    f"{path}: page {index + 1} has damaged image data ({'; '.join(damaged)}); PDFium draws what it "
                    "can of such an image, so the page would be read partly"
                )
            _check_size(gray, path, index)
            yield Page(path, index, gray.copy(), float(dpi), rendered=True)
    finally:
        document.close()


# Filters PDFium decodes in FPDFImageObj_GetImageDataDecoded; the others (DCT, JPX, JBIG2, CCITT) it leaves encoded.
_SIMPLE_FILTERS = frozenset({"FlateDecode", "Fl", "LZWDecode", "LZW", "ASCIIHexDecode", "AHx", "ASCII85Decode", "A85",
                             "RunLengthDecode", "RL"})


def _damaged_images(page) -> list[str]:
    """What is wrong with the images of a PDF page, one text per damaged image (empty: nothing found).

    PDFium renders a damaged image stream without a word (a cut Flate stream, as far as it goes; a
    broken JPEG, with grey where the data fails). So each image's data is decoded again here: an
    uncompressed or Flate/LZW image must decode to its full size, a JPEG must decode without error.
    JPEG 2000, JBIG2 and CCITT images are not checked, nor damage that still decodes (bytes changed
    inside a JPEG's entropy-coded data).
    """
    import io

    import pypdfium2 as pdfium
    from PIL import Image

    problems = []
    for number, image in enumerate(page.get_objects(filter=(pdfium.raw.FPDF_PAGEOBJ_IMAGE,)), start=1):
        try:
            filters = image.get_filters()
            data = image.get_data(decode_simple=True)
        except pdfium.PdfiumError as e:
            problems.append(f"image {number}: {e}")
            continue
        encoded = [f for f in filters if f not in _SIMPLE_FILTERS]
        if not encoded:
            meta = image.get_metadata()
            expected = meta.height * ((meta.width * meta.bits_per_pixel + 7) // 8)
            if len(data) < expected:
                problems.append(f"image {number} decodes to {len(data)} of its {expected} bytes")
        elif encoded in (["DCTDecode"], ["DCT"]):
            try:
                with Image.open(io.BytesIO(bytes(data))) as jpeg:
                    jpeg.load()
            except (OSError, SyntaxError, ValueError) as e:
                problems.append(f"image {number} (JPEG): {e}")
    return problems
