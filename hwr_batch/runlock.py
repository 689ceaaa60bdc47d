"""One run at a time per state directory: an ``flock`` on ``<state dir>/hwr-batch.lock``.

The kernel releases an ``flock`` when the last file descriptor on it closes, including when
the holder dies (even by SIGKILL or the OOM killer), so a lock file left behind by a dead run
never blocks the next one: there is no pid-file staleness guessing. The file itself is never
deleted (deleting a lock file that another process may be about to lock is a classic race);
its content (pid, hostname, start time, command line of the holder, as one JSON line) is
informative only, for the message a second run prints and for people running ``cat``.

The descriptor is opened ``O_CLOEXEC``, so programs the run ``exec``-s do not inherit the
lock; worker processes ``fork``-ed without ``exec`` do, and keep it held while they live.
``flock`` works on local file systems; on NFS, Linux emulates it with POSIX locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import LockHeldError, StateDbError

LOCK_NAME = "hwr-batch.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) the lock, as written in the lock file; fields None if unknown.

    Attributes:
        pid: process id of the holder.
        hostname: the holder's host (the pid means nothing on another host).
        started: ISO 8601 local time, with UTC offset, when it took the lock.
        argv: its command line.
    """

    pid: int | None
    hostname: str | None
    started: str | None
    argv: list[str] | None

    def describe(self) -> str:
        """E.g. ``pid 1234 on host1, started 2024-05-01T02:00:00+02:00: hwr-batch process in/``."""
        parts = [f"pid {self.pid if self.pid is not None else '?'}"]
        if self.hostname:
            parts[0] += f" on {self.hostname}"
        parts.append(f"started {self.started or '(unknown time)'}")
        text = ", ".join(parts)
        if self.argv:
            text += ": " + " ".join(self.argv)
        return text


class RunLock:
    """A held run lock; a context manager that releases it on exit.

    Attributes:
        path: the lock file.
        holder: what this process wrote into it.
    """

    def __init__(self, path: Path, fd: int, holder: LockHolder) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Empty the lock file and release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # while still locked: nobody reads a half-cleared file
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def lock_path(state_dir: Path) -> Path:
    """The lock file of a state directory."""
    return Path(state_dir) / LOCK_NAME


def acquire_lock(state_dir: Path, *, argv: list[str] | None = None) -> RunLock:
    """Take the run lock of ``state_dir`` (created if missing), or fail at once.

    Args:
        state_dir: the state directory.
        argv: the command line to record (default ``sys.argv``).

    Returns:
        The held lock; use ``with acquire_lock(d):`` or call ``release()``.

    Raises:
        LockHeldError: if another process (or another ``acquire_lock`` in this process) holds
            it; the message names the lock file and the holder's pid, host and start time.
        StateDbError: if the state directory or lock file cannot be created or opened.
    """
    path = Path(os.path.abspath(lock_path(state_dir)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StateDbError(f"cannot create the lock file {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LockHeldError(
            f"another hwr-batch run holds the lock {path} ({holder.describe()}); "
            "it is released when that process exits; this run did nothing"
        ) from None
    except OSError as e:
        os.close(fd)
        raise StateDbError(f"cannot lock {path}: {e.strerror}") from e
    holder = LockHolder(
        pid=os.getpid(),
        hostname=socket.gethostname(),
        started=datetime.now().astimezone().isoformat(timespec="seconds"),
        argv=list(sys.argv if argv is None else argv),
    )
    data = (json.dumps(holder.__dict__, ensure_ascii=True) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # the information is a courtesy; the flock is what counts
    return RunLock(path, fd, holder)


def _read_holder(fd: int) -> LockHolder:
    """Parse the lock file; tolerant of an empty or half-written file (the holder may be mid-write)."""
    try:
        raw = os.pread(fd, 65536, 0)
        data = json.loads(raw.decode("utf-8", "replace"))
        argv = data.get("argv")
        return LockHolder(
            pid=int(data["pid"]) if data.get("pid") is not None else None,
            hostname=str(data.get("hostname")) if data.get("hostname") else None,
            started=str(data.get("started")) if data.get("started") else None,
            argv=[str(a) for a in argv] if isinstance(argv, list) else None,
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return LockHolder(None, None, None, None)
