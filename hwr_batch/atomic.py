"""Outputs that survive crashes, and file names shown safely in tables and logs.

Every output is written to a temporary file in the target's folder (so the final rename never
crosses file systems), flushed, ``fsync``-ed, renamed onto the target with :func:`os.replace`
(atomic on POSIX), and the folder is ``fsync``-ed so the rename itself is durable. Readers
therefore see either the old file or the complete new one, never a partial file, whatever
happens to the writer (exception, Ctrl-C, SIGKILL, power cut).

Temporary files are named ``.<name>.tmp-<pid>-<8 hex><suffix>``, e.g.
``.digits.csv.tmp-4242-1a2b3c4d.csv``: hidden, recognisable, and keeping the target's suffix
for libraries that choose the format by extension. A writer killed by SIGKILL leaves its
temporary file behind; :func:`remove_stale_temp_files` removes those of dead processes.

The target gets the permissions of the file it replaces, or ``0o666 & ~umask`` if new.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_TEMP_RE = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})(?P<suffix>.*)", re.DOTALL)
_MAX_NAME_BYTES = 200  # leaves room for the temp decoration within NAME_MAX (255 bytes)


def temp_path_for(path: Path) -> Path:
    """A fresh temporary file name for ``path``, in the same folder (the file is not created)."""
    path = Path(path)
    name = path.name
    suffix = path.suffix if len(os.fsencode(path.suffix)) <= 20 else ""
    raw = os.fsencode(name)
    if len(raw) > _MAX_NAME_BYTES:  # keep the suffix; a cut UTF-8 sequence survives as surrogates
        name = os.fsdecode(raw[: _MAX_NAME_BYTES - len(os.fsencode(suffix))]) + suffix
    return path.with_name(f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_temp_file(name: str) -> bool:
    """Whether a file name is one of our temporary files (see :func:`temp_path_for`)."""
    m = _TEMP_RE.fullmatch(name)
    return bool(m) and m.group("suffix") in ("", Path(m.group("name")).suffix)


def _new_file_mode(target: Path) -> int | None:
    """Permission bits to give the new file: the old target's, or None to use ``0o666 & ~umask``."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        return None


def fsync_dir(directory: Path) -> None:
    """``fsync`` a folder so that renames and deletions in it are durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _commit(tmp: Path, target: Path, mode: int | None) -> None:
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _discard(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_output(
    path: Path,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` atomically when the block ends without error.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was. Example::

        with atomic_output(out / "digits.csv", newline="") as f:
            df.to_csv(f, index=False)
        with atomic_output(out / "digits.xlsx", "wb") as f, pd.ExcelWriter(f, engine="openpyxl") as xw:
            df.to_excel(xw, index=False)

    Args:
        path: the target file; its folder must exist.
        mode: ``"w"`` (text) or ``"wb"`` (binary); ``"w+"`` / ``"w+b"`` also allowed.
        encoding: text encoding (ignored in binary mode).
        newline: as for :func:`open`; pass ``""`` for CSV writers.

    Yields:
        The open temporary file.

    Raises:
        OSError: if the temporary file cannot be created, written or renamed.
    """
    if mode not in ("w", "wb", "w+", "w+b", "wt", "w+t"):
        raise ValueError(f"atomic_output: mode must be a write mode like 'w' or 'wb', not {mode!r}")
    target = Path(path)
    tmp = temp_path_for(target)
    perms = _new_file_mode(target)
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    fd = os.open(tmp, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    binary = "b" in mode
    try:
        f = os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else newline)
    except BaseException:
        os.close(fd)
        _discard(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, target, perms)
    except BaseException:
        _discard(tmp)
        raise


def atomic_write(
    path: Path, write_fn: Callable[[IO[Any]], object], *, mode: str = "w", **kwargs: Any
) -> None:
    """Call ``write_fn(file)`` on a temporary file, then atomically replace ``path`` with it.

    Example: ``atomic_write(p, lambda f: df.to_csv(f, index=False), newline="")``.

    Args:
        path: the target file.
        write_fn: writes the content to the open file.
        mode: ``"w"`` or ``"wb"``.
        **kwargs: ``encoding`` / ``newline``, passed to :func:`atomic_output`.
    """
    with atomic_output(path, mode, **kwargs) as f:
        write_fn(f)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write by name (``cv2.imwrite``, ``savefig``, ``ExcelWriter(path)``).

    When the block ends without error, the file is ``fsync``-ed and atomically renamed onto
    ``path``; on an exception it is removed. The temporary name keeps ``path``'s suffix.
    Raises ``FileNotFoundError`` if the block created no file.
    """
    target = Path(path)
    tmp = temp_path_for(target)
    perms = _new_file_mode(target)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, target, perms)
    except BaseException:
        _discard(tmp)
        raise


def check_writable(directory: Path) -> None:
    """Create ``directory`` if need be and write a page-sized temporary file in it (then remove it),
    so that a folder the outputs cannot go to fails now, with the system's reason (read-only file
    system, permission denied, no space left), rather than after the work.

    Raises:
        OSError: the folder cannot be created or written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = temp_path_for(directory / ".write-check")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if os.write(fd, bytes(4096)) < 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        os.fsync(fd)
    finally:
        os.close(fd)
        _discard(probe)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files that writers in dead processes left in ``directory`` (not recursive).

    Only names matching our pattern (see :func:`temp_path_for`) are considered, and only those
    whose pid is not a running process on this host; files of live writers are kept. Run it
    while holding the run lock (then no other hwr-batch writes there); pids are per host, so
    do not share an output folder between hosts.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_RE.fullmatch(entry.name)
        if not m or not is_temp_file(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    if removed:
        fsync_dir(Path(directory))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


# What display_text escapes: a backslash (the escape character itself), C0 controls and DEL, C1
# controls, the Unicode line and paragraph separators (str.splitlines() breaks lines at all of
# these), and lone surrogates (the undecodable bytes of a file name, from os.fsdecode).
_UNSAFE_CHARACTERS = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode: shown as that byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:  # an ASCII control character: one byte, shown as that byte
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def display_text(value: str) -> str:
    """Text (a file name, a reason naming one) as every table cell, log line and message shows it.

    Undecodable bytes of a file name become ``\\xNN`` (the byte), control characters (tab, CR,
    LF, the other C0 and C1 controls, DEL, U+2028/U+2029) ``\\xNN`` or ``\\uNNNN``, and a
    backslash ``\\\\``, as ``ls --quoting-style=escape`` shows names. The result is valid UTF-8,
    holds no line break a reader could split at, and never shows two different names alike (a byte
    0xE9 is ``\\xe9``, a name spelled with a backslash ``\\\\xe9``), so the tables can key rows on it.
    """
    return _UNSAFE_CHARACTERS.sub(_escape, value)


def display_path(path: os.PathLike[str] | str | bytes) -> str:
    """A path as :func:`display_text` shows it (``bytes`` are taken as the file system's raw name)."""
    return display_text(os.fsdecode(path))


def reason_without_file(file: os.PathLike[str] | str, reason: str) -> str:
    """``reason`` without the file name a logged message starts with (as given, or as
    :func:`display_text` shows it), for places that name the file already."""
    for name in (os.fspath(file), display_text(os.fspath(file))):
        reason = reason.removeprefix(f"{name}: ")
    return reason


_DISPLAY_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|(\\))")


def parse_display_text(text: str) -> str:
    """The text :func:`display_text` showed as ``text`` (a file name from a table cell, as
    ``os.fsdecode`` would give it: undecodable bytes as lone surrogates). A backslash that starts
    no escape (a cell edited by hand) is kept as it is."""

    def unescape(match: re.Match[str]) -> str:
        byte, char, _ = match.groups()
        if byte is not None:
            code = int(byte, 16)
            return chr(code) if code < 0x80 else chr(0xDC00 + code)  # a control character, or a raw byte
        if char is not None:
            return chr(int(char, 16))
        return "\\"

    return _DISPLAY_ESCAPE.sub(unescape, text)
