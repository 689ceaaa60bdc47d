"""The state database: which input files were processed, with which model, and how it went.

One SQLite file (stdlib :mod:`sqlite3`, WAL journal) with three tables:

``files``
    One row per input file, keyed by its absolute path. Records the file's size, mtime and
    SHA-256 when it was last processed, the model that processed it, the outcome
    (``'done'`` or ``'failed'``), the error text and stage of a failure, pages and digits
    found, the settings that change results (a hash, see ``settings_sha``), first-seen/processed
    times and the run that processed it.
``runs``
    One row per ``hwr-batch process`` run: start/finish time, model, counts, exit status.
    A run with no ``finished`` time crashed or was killed.
``corrections``
    One row per field a person reviewed (``hwr-batch review``), keyed by the file, the SHA-256 of
    its content when reviewed, the page and the field's box: what was read, the true digits and the
    status. A correction applies while the file's content is unchanged; one of a file whose content
    changed is kept (a later change back revives it) but no longer shown (see
    :mod:`hwr_batch.corrections`). The review server writes here while a run may be going on: each
    save is one short ``BEGIN IMMEDIATE`` transaction, waiting up to ``BUSY_TIMEOUT_MS``.

Re-runs are cheap: :func:`plan` stats every candidate and hashes only files whose size or
mtime differ from the record (or that have no record), so an unchanged folder costs one
``stat`` per file. A file whose mtime changed but whose content did not is not reprocessed;
its recorded mtime is just brought up to date.

Durability: ``journal_mode=WAL`` so that readers (``hwr-batch status``, the ``sqlite3``
shell) never block the nightly writer and a crash never leaves a half-applied transaction;
``synchronous=FULL`` so that a mark returned by :func:`mark_done` is on disk. With WAL,
``NORMAL`` would also keep the database consistent, but a power cut could roll back the last
few commits, so files whose outputs were already written (and fsynced, see
:mod:`hwr_batch.atomic`) would be processed again. One commit per input file costs one
fsync of the WAL, negligible beside reading and classifying a scanned page.

Paths are stored twice: ``path_key`` (a BLOB of the raw file-system bytes, the primary key,
exact for any name, even one that is not valid UTF-8) and ``path`` (text for people and SQL
queries; undecodable bytes appear as ``\\xNN``). Names with spaces, commas, quotes, newlines
or non-ASCII characters need no special handling. WAL needs a local file system (not NFS).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import sqlite3
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from .errors import StateDbError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # PRAGMA user_version; bump and add a migration (_MIGRATIONS) when the schema changes
APPLICATION_ID = 0x48575242  # PRAGMA application_id: "HWRB", marks the file as ours
STATE_DB_NAME = "state.sqlite3"  # the database's name in the state folder (OUT/.hwr-batch by default)
BUSY_TIMEOUT_MS = 30_000  # wait this long for another connection's write or checkpoint
HASH_CHUNK = 1 << 20

Status = Literal["done", "failed"]
DecisionKind = Literal["new", "changed", "stale-model", "stale-settings", "failed", "done", "unreadable", "unstable"]

_SCHEMA = f"""
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    started     TEXT NOT NULL,              -- ISO 8601 UTC
    finished    TEXT,                       -- NULL: still running, crashed or killed
    model_sha   TEXT NOT NULL,
    settings_sha TEXT,                      -- the run's settings that change results (schema 2)
    hostname    TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    command     TEXT NOT NULL,
    planned     INTEGER,                    -- candidates seen by plan()
    done        INTEGER,                    -- files this run marked done
    failed      INTEGER,                    -- files this run marked failed
    skipped     INTEGER,                    -- candidates not processed
    stale       INTEGER,                    -- files done with another model at the end of the run
    exit_status INTEGER
);
CREATE TABLE files (
    path_key    BLOB PRIMARY KEY,           -- os.fsencode(absolute path): exact for any name
    path        TEXT NOT NULL,              -- the same path as text, for people and queries
    size        INTEGER,
    mtime_ns    INTEGER,
    sha256      TEXT,                       -- of the content when last processed
    pages       INTEGER,
    digits      INTEGER,
    model_sha   TEXT,                       -- sha256 of the model file that processed it
    status      TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error       TEXT,
    error_stage TEXT,
    first_seen  TEXT NOT NULL,              -- ISO 8601 UTC of the first mark
    processed   TEXT NOT NULL,              -- ISO 8601 UTC of the latest mark
    run_id      INTEGER REFERENCES runs(id),
    settings_sha TEXT                       -- hash of the settings it was read with (NULL: before schema 2)
);
CREATE INDEX files_status_model ON files (status, model_sha);
CREATE INDEX files_run ON files (run_id);
{{corrections}};
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

_CORRECTIONS_TABLE = """CREATE TABLE corrections (
    path_key    BLOB NOT NULL,              -- os.fsencode(absolute path), as in files
    path        TEXT NOT NULL,
    sha256      TEXT NOT NULL,              -- of the file's content when the field was reviewed
    page        INTEGER NOT NULL,
    field       INTEGER NOT NULL,           -- its number in fields.csv when reviewed (it may shift, the box does not)
    x           INTEGER NOT NULL,
    y           INTEGER NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    read_digits TEXT,                       -- what process read
    digits      TEXT NOT NULL,              -- the true digits ('' for not_a_field / unreadable)
    status      TEXT NOT NULL CHECK (status IN ('accepted', 'corrected', 'not_a_field', 'unreadable')),
    reviewed_at TEXT NOT NULL,              -- ISO 8601 UTC
    PRIMARY KEY (path_key, sha256, page, x, y, width, height)
)"""
_SCHEMA = _SCHEMA.replace("{corrections}", _CORRECTIONS_TABLE)

_FILE_COLUMNS = (
    "path_key, size, mtime_ns, sha256, pages, digits, model_sha, status, error, error_stage,"
    " first_seen, processed, run_id, settings_sha"
)
_RUN_COLUMNS = (
    "id, started, finished, model_sha, hostname, pid, command, planned, done, failed, skipped, stale,"
    " exit_status, settings_sha"
)

# Schema upgrades, applied in order to an older database: {version it upgrades to: statements}.
_MIGRATIONS = {
    2: ("ALTER TABLE files ADD COLUMN settings_sha TEXT", "ALTER TABLE runs ADD COLUMN settings_sha TEXT"),
    3: (_CORRECTIONS_TABLE,),
}


@dataclass(frozen=True)
class FileFingerprint:
    """What identifies a file's content: size and mtime from ``stat``, SHA-256 once computed.

    Attributes:
        size: size in bytes, or None if the file could not be ``stat``-ed.
        mtime_ns: modification time in nanoseconds, or None likewise.
        sha256: hex digest of the content, or None until computed (see :func:`with_sha256`).
    """

    size: int | None
    mtime_ns: int | None
    sha256: str | None = None


@dataclass(frozen=True)
class FileRecord:
    """One row of the ``files`` table.

    Attributes:
        path: absolute path of the input file.
        size, mtime_ns, sha256: its fingerprint when last marked.
        pages: pages read (None for a failure).
        digits: digits found (None for a failure).
        model_sha: the model that processed it (None for a failure).
        status: ``'done'`` or ``'failed'``.
        error: the failure's message (None when done).
        error_stage: where it failed, e.g. ``'read'``, ``'layout'``, ``'classify'``, ``'export'``.
        first_seen: ISO 8601 UTC time of the file's first mark.
        processed: ISO 8601 UTC time of its latest mark.
        run_id: the run that made the latest mark.
        settings_sha: hash of the settings that change results it was read with (None: not recorded).
    """

    path: Path
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    pages: int | None
    digits: int | None
    model_sha: str | None
    status: Status
    error: str | None
    error_stage: str | None
    first_seen: str
    processed: str
    run_id: int | None
    settings_sha: str | None = None

    @property
    def fingerprint(self) -> FileFingerprint:
        """The recorded fingerprint."""
        return FileFingerprint(self.size, self.mtime_ns, self.sha256)


@dataclass(frozen=True)
class Decision:
    """What :func:`plan` decided for one candidate file.

    Attributes:
        path: the candidate, made absolute.
        kind: why: ``'new'`` (no record), ``'changed'`` (content differs from the record; the
            old results must be replaced), ``'stale-model'`` (done with another model),
            ``'stale-settings'`` (done with this model but other settings that change results),
            ``'failed'`` (failed before, content unchanged), ``'done'`` (done with this model,
            unchanged), ``'unreadable'`` (could not be ``stat``-ed or read now: see ``error``)
            or ``'unstable'`` (changed while being hashed: still being written; next run).
        process: whether to process it in this run.
        fingerprint: its current fingerprint, with ``sha256`` set whenever ``process`` is true;
            pass it to :func:`mark_done` / :func:`mark_failed`. None only if ``stat`` failed.
        previous: the record before this run, or None for a new file.
        error: why it is unreadable or unstable, else None.
    """

    path: Path
    kind: DecisionKind
    process: bool
    fingerprint: FileFingerprint | None
    previous: FileRecord | None = None
    error: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """One row of the ``runs`` table (see the module docstring); ``finished`` None: did not finish."""

    id: int
    started: str
    finished: str | None
    model_sha: str
    hostname: str
    pid: int
    command: str
    planned: int | None
    done: int | None
    failed: int | None
    skipped: int | None
    stale: int | None
    exit_status: int | None
    settings_sha: str | None = None


@dataclass(frozen=True)
class StateSummary:
    """Counts over the whole ``files`` table.

    Attributes:
        files: files recorded.
        done: files whose last processing succeeded.
        failed: files whose last processing failed.
        stale: done files processed with a model other than ``model_sha`` (0 if not given), or with
            settings other than ``settings_sha`` (when given, and recorded for the file).
        last_run: the latest run, or None if there has been none.
    """

    files: int
    done: int
    failed: int
    stale: int
    last_run: RunRecord | None


class StateDB:
    """An open state database; use as a context manager or call :meth:`close`.

    Attributes:
        path: the database file.
        conn: the :class:`sqlite3.Connection` (autocommit mode; writes use explicit transactions).
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.conn.close()

    def __enter__(self) -> StateDB:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateDB({str(self.path)!r})"


def open_state(path: Path) -> StateDB:
    """Open the state database, creating it (and its folder) if it does not exist.

    Args:
        path: the database file, e.g. ``<state dir>/state.sqlite``.

    Returns:
        The open database, in WAL mode, at the current schema version.

    Raises:
        StateDbError: naming the file, if it cannot be created or opened, is not an SQLite
            database or is corrupt, belongs to another application, or was written by a newer
            hwr-batch.
    """
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StateDbError(f"cannot create the folder of the state database {path}: {e.strerror}") from e
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except sqlite3.Error as e:
        raise StateDbError(f"cannot open the state database {path}: {e}") from e
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Reading the schema is the first thing that touches the file: junk fails here.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        _check_and_create_schema(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning(
                "state database %s: journal_mode is %s, not WAL (file system without "
                "shared memory?); readers may briefly block the run",
                path,
                mode,
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as e:
        conn.close()
        raise StateDbError(_describe(path, e)) from e
    except StateDbError:
        conn.close()
        raise
    return StateDB(path, conn)


def _check_and_create_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if version == 0 and app_id == 0 and tables == 0:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Check again under the write lock: another process may have just created it.
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return
    if app_id != APPLICATION_ID:
        raise StateDbError(
            f"{path} is an SQLite database but not an hwr-batch state database; "
            "choose another --state-dir or move the file away"
        )
    if version > SCHEMA_VERSION:
        raise StateDbError(
            f"the state database {path} has schema version {version}, newer than this hwr-batch "
            f"supports ({SCHEMA_VERSION}); upgrade hwr-batch"
        )
    if version < SCHEMA_VERSION:
        _migrate(conn, path, version)


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Upgrade an older database in place, in one transaction (a crash leaves it at its old version)."""
    if version < 1:
        raise StateDbError(f"the state database {path} has an unknown old schema version {version}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]  # again, under the write lock
        for target in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log.info("state database %s upgraded from schema %d to %d", path, version, SCHEMA_VERSION)


def _describe(path: Path, e: sqlite3.Error) -> str:
    text = str(e)
    if any(w in text for w in ("not a database", "malformed", "corrupt")):
        return (
            f"the state database {path} is corrupt or not an SQLite database ({text}); "
            "move it away to start afresh (every file will then be processed again)"
        )
    if "readonly" in text or "unable to open" in text:
        return f"cannot write the state database {path} ({text}); check its permissions and free space"
    if "full" in text or "disk I/O error" in text:
        return f"cannot write the state database {path} ({text}); check the free space on its disk"
    if "locked" in text or "busy" in text:
        return f"the state database {path} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s"
    return f"state database {path}: {text}"


@contextmanager
def _errors(db: StateDB) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise StateDbError(_describe(db.path, e)) from e


@contextmanager
def _transaction(db: StateDB) -> Iterator[sqlite3.Connection]:
    """A short write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front."""
    with _errors(db):
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db.conn
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _abs(path: Path | str) -> Path:
    return Path(os.path.abspath(path))


def _key(path: Path) -> bytes:
    return os.fsencode(path)


def _text(s: str) -> str:
    """``s`` made storable as SQLite text: lone surrogates (undecodable bytes) become ``\\xNN``."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(s).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def fingerprint(path: Path) -> FileFingerprint:
    """Size and mtime of a file, from one ``stat``; ``sha256`` is left None (see :func:`with_sha256`).

    Raises:
        OSError: if the file cannot be ``stat``-ed.
    """
    st = os.stat(path)
    return FileFingerprint(st.st_size, st.st_mtime_ns)


def hash_file(path: Path) -> str:
    """SHA-256 hex digest of a file's content, read in 1 MiB chunks.

    Raises:
        OSError: if the file cannot be read or is not a regular file (a folder, FIFO, device).
    """
    # O_NONBLOCK: opening a FIFO must not hang the run; anything but a regular file is refused.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        h = hashlib.sha256()
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def with_sha256(path: Path, fp: FileFingerprint | None = None) -> FileFingerprint:
    """The fingerprint of ``path`` with its SHA-256, taken consistently.

    Stats, hashes, and stats again; if size or mtime moved while hashing, the file is still
    being written and the hash is not trustworthy.

    Raises:
        OSError: if the file cannot be ``stat``-ed or read.
        UnstableFileError: if the file changed while being hashed.
    """
    before = fp if fp is not None and fp.size is not None else fingerprint(path)
    digest = hash_file(path)
    after = fingerprint(path)
    if (after.size, after.mtime_ns) != (before.size, before.mtime_ns):
        raise UnstableFileError(f"changed while being read (still being written?): {path}")
    return FileFingerprint(after.size, after.mtime_ns, digest)


class UnstableFileError(Exception):
    """A file's size or mtime changed while it was being hashed."""


# ---------------------------------------------------------------------------------------------
# Reading records


def _record(row: sqlite3.Row | tuple) -> FileRecord:
    (key, size, mtime_ns, sha, pages, digits, model, status, error, stage, first, processed, run, settings) = row
    return FileRecord(
        Path(os.fsdecode(bytes(key))),
        size,
        mtime_ns,
        sha,
        pages,
        digits,
        model,
        status,
        error,
        stage,
        first,
        processed,
        run,
        settings,
    )


def get_record(db: StateDB, path: Path) -> FileRecord | None:
    """The record of one file (path made absolute), or None if it has none."""
    with _errors(db):
        row = db.conn.execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE path_key = ?", (_key(_abs(path)),)
        ).fetchone()
    return _record(row) if row else None


def _records(db: StateDB, paths: Sequence[Path]) -> dict[bytes, FileRecord]:
    out: dict[bytes, FileRecord] = {}
    step = 500  # stay well under SQLite's limit on bound parameters
    with _errors(db):
        for i in range(0, len(paths), step):
            keys = [_key(p) for p in paths[i : i + step]]
            marks = ",".join("?" * len(keys))
            for row in db.conn.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE path_key IN ({marks})", keys
            ):
                out[bytes(row[0])] = _record(row)
    return out


# Done with another model, or (settings given, and recorded for the file) with other settings.
_STALE = (
    "status = 'done' AND (model_sha IS NOT :model"
    " OR (:settings IS NOT NULL AND settings_sha IS NOT NULL AND settings_sha IS NOT :settings))"
)


def stale_files(db: StateDB, model_sha: str, settings_sha: str | None = None) -> list[FileRecord]:
    """Files done with a model other than ``model_sha``, or with settings other than ``settings_sha``
    (when given; files recorded before settings were, have none and are not counted), oldest first."""
    with _errors(db):
        rows = db.conn.execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE {_STALE} ORDER BY processed, path",
            {"model": model_sha, "settings": settings_sha},
        ).fetchall()
    return [_record(r) for r in rows]


def recorded_files(db: StateDB) -> list[FileRecord]:
    """Every file the database has a record of, by path."""
    with _errors(db):
        rows = db.conn.execute(f"SELECT {_FILE_COLUMNS} FROM files ORDER BY path").fetchall()
    return [_record(r) for r in rows]


def failed_files(db: StateDB) -> list[FileRecord]:
    """Files whose last processing failed, oldest first."""
    with _errors(db):
        rows = db.conn.execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE status = 'failed' ORDER BY processed, path"
        ).fetchall()
    return [_record(r) for r in rows]


def get_run(db: StateDB, run_id: int) -> RunRecord | None:
    """One run, or None if there is no such run."""
    with _errors(db):
        row = db.conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return RunRecord(*row) if row else None


def summary(db: StateDB, *, model_sha: str | None = None, settings_sha: str | None = None) -> StateSummary:
    """Counts of recorded, done, failed and (given the current model) stale files, and the last run."""
    with _errors(db):
        files, done, failed, stale = db.conn.execute(
            "SELECT count(*), coalesce(sum(status = 'done'), 0), coalesce(sum(status = 'failed'), 0),"
            f" coalesce(sum(:model IS NOT NULL AND {_STALE}), 0) FROM files",
            {"model": model_sha, "settings": settings_sha},
        ).fetchone()
        row = db.conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    return StateSummary(files, done, failed, stale, RunRecord(*row) if row else None)


# ---------------------------------------------------------------------------------------------
# Planning


def plan(
    db: StateDB,
    candidates: Iterable[Path],
    *,
    model_sha: str,
    force: bool = False,
    retry_failed: bool = False,
    reprocess_stale: bool = False,
    dry_run: bool = False,
    settings_sha: str | None = None,
) -> list[Decision]:
    """Decide, for each candidate file, whether this run processes it.

    Stats every candidate; hashes only those with no record, a size or mtime different from
    the record, or (with ``force``) all that will be processed. Policy:

    * ``new`` (no record) and ``changed`` (content hash differs): processed.
    * ``stale-model`` (done, content unchanged, other model): processed only with
      ``reprocess_stale`` or ``force``; otherwise skipped but counted (see :func:`summary`).
    * ``stale-settings`` (done with this model, but the recorded ``settings_sha`` differs from
      the one given): treated like ``stale-model``. A file with no recorded settings is ``done``.
    * ``failed`` (failed, content unchanged): processed only with ``retry_failed`` or ``force``.
      A failed file whose content changed is ``changed``, so fixing a file retries it.
    * ``done`` (done with this model, content unchanged): processed only with ``force``.
    * ``unreadable`` (cannot be ``stat``-ed or read, or not a regular file) / ``unstable``
      (changed while being hashed: still being written): never processed. The caller should
      mark ``unreadable`` files failed with stage ``'read'``; once so marked, an unchanged
      one is ``failed`` on later runs. ``unstable`` is left for the next run.

    A file whose mtime changed but whose content hash is the same keeps its status; unless
    ``dry_run``, its recorded size/mtime are updated (in one transaction at the end), so the
    next run does not hash it again. Nothing else is written.

    Args:
        db: the state database.
        candidates: input files; made absolute, duplicates dropped, order kept.
        model_sha: SHA-256 of the model this run uses.
        settings_sha: hash of this run's settings that change results (None: not compared).
        force: process every readable candidate.
        retry_failed: process files that failed before.
        reprocess_stale: process files done with another model.
        dry_run: write nothing.

    Returns:
        One decision per distinct candidate, in candidate order.
    """
    paths = list(dict.fromkeys(_abs(p) for p in candidates))
    previous = _records(db, paths)
    decisions: list[Decision] = []
    touched: list[tuple[int, int, bytes]] = []
    for path in paths:
        prev = previous.get(_key(path))
        try:
            fp = fingerprint(path)
        except OSError as e:
            if prev is not None and prev.status == "failed" and prev.size is None and not (force or retry_failed):
                # It could not even be stat-ed last time (a broken symbolic link, say), and still cannot: a
                # known failure, skipped quietly like one that can. It is tried again once it can be stat-ed.
                decisions.append(Decision(path, "failed", False, None, prev))
                continue
            decisions.append(Decision(path, "unreadable", False, None, prev, _unstattable_reason(path, e)))
            continue
        same_stat = prev is not None and (prev.size, prev.mtime_ns) == (fp.size, fp.mtime_ns)
        if same_stat and prev.sha256 is None and prev.status == "failed" and not (force or retry_failed):
            # It could not even be read last time, and has not changed since: a known failure.
            decisions.append(Decision(path, "failed", False, fp, prev))
            continue
        if same_stat and prev.sha256 is not None and not force:
            fp = replace(fp, sha256=prev.sha256)
        else:
            try:
                fp = with_sha256(path, fp)
            except OSError as e:
                decisions.append(Decision(path, "unreadable", False, fp, prev, _os_error(e, path)))
                continue
            except UnstableFileError as e:
                decisions.append(Decision(path, "unstable", False, fp, prev, str(e)))
                continue
        if prev is None:
            decisions.append(Decision(path, "new", True, fp, None))
            continue
        if prev.sha256 != fp.sha256:
            decisions.append(Decision(path, "changed", True, fp, prev))
            continue
        if (prev.size, prev.mtime_ns) != (fp.size, fp.mtime_ns):
            touched.append((fp.size, fp.mtime_ns, _key(path)))  # type: ignore[arg-type]
        if prev.status == "failed":
            decisions.append(Decision(path, "failed", force or retry_failed, fp, prev))
        elif prev.model_sha != model_sha:
            decisions.append(Decision(path, "stale-model", force or reprocess_stale, fp, prev))
        elif settings_sha is not None and prev.settings_sha is not None and prev.settings_sha != settings_sha:
            decisions.append(Decision(path, "stale-settings", force or reprocess_stale, fp, prev))
        else:
            decisions.append(Decision(path, "done", force, fp, prev))
    if touched and not dry_run:
        with _transaction(db) as conn:
            conn.executemany("UPDATE files SET size = ?, mtime_ns = ? WHERE path_key = ?", touched)
    return decisions


def _os_error(e: OSError, path: Path) -> str:
    """The system's reason, with the file it names when that is not ``path`` itself (whose row says it)
    nor a file descriptor."""
    other = isinstance(e.filename, str | bytes | os.PathLike) and os.fsdecode(e.filename) != os.fspath(path)
    return f"{e.strerror or e}" + (f": {e.filename}" if other else "")


def _unstattable_reason(path: Path, e: OSError) -> str:
    """Why ``path`` cannot be stat-ed: a symbolic link is named as one, with where it points (a broken one
    when its target is missing or loops)."""
    try:
        if os.path.islink(path):
            broken = "broken " if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) else ""
            return f"{broken}symbolic link (to {os.readlink(path)}: {e.strerror or e})"
    except OSError:
        pass
    return _os_error(e, path)


# ---------------------------------------------------------------------------------------------
# Marking


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_UPSERT = """
INSERT INTO files (path_key, path, size, mtime_ns, sha256, pages, digits, model_sha, status,
                   error, error_stage, first_seen, processed, run_id, settings_sha)
VALUES (:key, :path, :size, :mtime_ns, :sha256, :pages, :digits, :model_sha, :status,
        :error, :stage, :now, :now, :run_id, :settings_sha)
ON CONFLICT (path_key) DO UPDATE SET
    path = excluded.path, size = excluded.size, mtime_ns = excluded.mtime_ns,
    sha256 = excluded.sha256, pages = excluded.pages, digits = excluded.digits,
    model_sha = excluded.model_sha, status = excluded.status, error = excluded.error,
    error_stage = excluded.error_stage, processed = excluded.processed, run_id = excluded.run_id,
    settings_sha = excluded.settings_sha
"""


def _mark(db: StateDB, file: Path, fp: FileFingerprint | None, **values: object) -> None:
    path = _abs(file)
    fp = fp or FileFingerprint(None, None)
    params = {
        "key": _key(path),
        "path": _text(str(path)),
        "size": fp.size,
        "mtime_ns": fp.mtime_ns,
        "sha256": fp.sha256,
        "now": _now(),
        **values,
    }
    with _transaction(db) as conn:
        conn.execute(_UPSERT, params)


def mark_done(
    db: StateDB,
    file: Path,
    fingerprint: FileFingerprint,
    *,
    model_sha: str,
    pages: int,
    digits: int,
    run_id: int | None,
    settings_sha: str | None = None,
) -> None:
    """Record that ``file`` was processed and its outputs written, in one short transaction.

    Call it after the outputs are safely on disk. Pass the fingerprint from the file's
    :class:`Decision` (taken before processing; it has ``sha256`` whenever ``process`` is
    true): if the file changes during processing, the next run sees a different fingerprint
    and processes it again.

    Raises:
        ValueError: if ``fingerprint`` has no ``sha256``.
        StateDbError: if the database cannot be written.
    """
    if fingerprint.sha256 is None:
        raise ValueError(f"mark_done needs a fingerprint with sha256 (from plan()) for {file}")
    _mark(
        db,
        file,
        fingerprint,
        status="done",
        pages=pages,
        digits=digits,
        model_sha=model_sha,
        error=None,
        stage=None,
        run_id=run_id,
        settings_sha=settings_sha,
    )


def mark_failed(
    db: StateDB,
    file: Path,
    fingerprint: FileFingerprint | None,
    *,
    stage: str,
    reason: str,
    run_id: int | None,
) -> None:
    """Record that processing ``file`` failed at ``stage`` (e.g. ``'read'``), in one short transaction.

    ``fingerprint`` may be None (the file could not be ``stat``-ed) or lack ``sha256`` (it could
    not be read); the next run then treats the file as changed once it is readable. Earlier
    results (pages, digits, model) of the file are cleared.

    Raises:
        StateDbError: if the database cannot be written.
    """
    _mark(
        db,
        file,
        fingerprint,
        status="failed",
        pages=None,
        digits=None,
        model_sha=None,
        error=_text(reason),
        stage=_text(stage),
        run_id=run_id,
        settings_sha=None,
    )


def forget(db: StateDB, files: Iterable[Path]) -> int:
    """Delete the records of ``files`` (e.g. inputs that were removed); returns how many existed."""
    keys = [(_key(_abs(p)),) for p in files]
    with _transaction(db) as conn:
        before = conn.total_changes
        conn.executemany("DELETE FROM files WHERE path_key = ?", keys)
        return conn.total_changes - before


# ---------------------------------------------------------------------------------------------
# Runs


def begin_run(
    db: StateDB, *, model_sha: str, command: Sequence[str] | str | None = None, settings_sha: str | None = None
) -> int:
    """Record the start of a run; returns its id, to pass to the marks and :func:`finish_run`.

    Args:
        model_sha: SHA-256 of the model this run uses.
        settings_sha: hash of the run's settings that change results.
        command: the command line (default ``sys.argv``).
    """
    if command is None:
        command = sys.argv
    text = command if isinstance(command, str) else " ".join(command)
    with _transaction(db) as conn:
        cur = conn.execute(
            "INSERT INTO runs (started, model_sha, settings_sha, hostname, pid, command) VALUES (?, ?, ?, ?, ?, ?)",
            (_now(), model_sha, settings_sha, _text(socket.gethostname()), os.getpid(), _text(text)),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]


def finish_run(
    db: StateDB,
    run_id: int,
    *,
    exit_status: int,
    planned: int | None = None,
    skipped: int | None = None,
) -> RunRecord:
    """Record the end of a run; ``done``/``failed``/``stale`` counts are taken from the ``files`` table.

    Args:
        run_id: from :func:`begin_run`.
        exit_status: the process exit code (an :class:`~hwr_batch.errors.ExitCode`).
        planned: candidates considered.
        skipped: candidates not processed.

    Returns:
        The finished run's record.
    """
    with _transaction(db) as conn:
        model = conn.execute("SELECT model_sha, settings_sha FROM runs WHERE id = ?", (run_id,)).fetchone()
        if model is None:
            raise StateDbError(f"state database {db.path}: no run with id {run_id}")
        done, failed = conn.execute(
            "SELECT coalesce(sum(status = 'done'), 0), coalesce(sum(status = 'failed'), 0)"
            " FROM files WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        stale = conn.execute(
            f"SELECT count(*) FROM files WHERE {_STALE}", {"model": model[0], "settings": model[1]}
        ).fetchone()[0]
        conn.execute(
            "UPDATE runs SET finished = ?, planned = ?, done = ?, failed = ?, skipped = ?, stale = ?,"
            " exit_status = ? WHERE id = ?",
            (_now(), planned, done, failed, skipped, stale, int(exit_status), run_id),
        )
    record = get_run(db, run_id)
    assert record is not None
    return record


# ---------------------------------------------------------------------------------------------
# Corrections (written by the review server)


@dataclass(frozen=True)
class CorrectionRecord:
    """One row of the ``corrections`` table: a field a person reviewed.

    Attributes:
        path: absolute path of the scan.
        sha256: of the scan's content when reviewed; the correction applies while it is unchanged.
        page: 1-based page; field: its number in ``fields.csv`` when reviewed.
        box: (x, y, width, height) of the field on the page, in pixels: what identifies it across readings.
        read_digits: what ``process`` read; digits: the true digits ('' for not_a_field / unreadable).
        status: ``'accepted'``, ``'corrected'``, ``'not_a_field'`` or ``'unreadable'``.
        reviewed_at: ISO 8601 UTC.
    """

    path: Path
    sha256: str
    page: int
    field: int
    box: tuple[int, int, int, int]
    read_digits: str | None
    digits: str
    status: str
    reviewed_at: str


_CORRECTION_COLUMNS = "path_key, path, sha256, page, field, x, y, width, height, read_digits, digits, status, reviewed_at"


def path_key(path: Path | str) -> bytes:
    """The key a file's rows have in the database: its absolute path's raw bytes."""
    return _key(_abs(path))


def save_corrections(
    db: StateDB,
    records: Iterable[CorrectionRecord] = (),
    *,
    then: Callable[[list[CorrectionRecord]], None] | None = None,
) -> list[CorrectionRecord]:
    """Insert (or replace: same file content, page and box) ``records``, and call ``then`` with every
    correction inside the same write transaction: a file mirroring the table (``corrections.csv``) written
    there can never be overtaken by another writer's older view. Returns every correction.

    Raises:
        StateDbError: if the database cannot be written (or stays locked for BUSY_TIMEOUT_MS).
    """
    rows = [
        (path_key(r.path), _text(str(_abs(r.path))), r.sha256, r.page, r.field, *r.box, r.read_digits, r.digits,
         r.status, r.reviewed_at)
        for r in records
    ]
    with _transaction(db) as conn:
        conn.executemany(f"INSERT OR REPLACE INTO corrections ({_CORRECTION_COLUMNS}) VALUES ({','.join('?' * 13)})", rows)
        everything = _corrections(conn)
        if then is not None:
            then(everything)
    return everything


def read_corrections(db: StateDB) -> list[CorrectionRecord]:
    """Every correction, by file, page and field."""
    with _errors(db):
        return _corrections(db.conn)


def _corrections(conn: sqlite3.Connection) -> list[CorrectionRecord]:
    rows = conn.execute(f"SELECT {_CORRECTION_COLUMNS} FROM corrections ORDER BY path, page, field, reviewed_at")
    return [
        CorrectionRecord(Path(os.fsdecode(bytes(key))), sha, page, field, (x, y, w, h), read, digits, status, at)
        for key, _path, sha, page, field, x, y, w, h, read, digits, status, at in rows
    ]


def content_hashes(db: StateDB, paths: Sequence[Path]) -> dict[bytes, str | None]:
    """The recorded SHA-256 of the content of each of ``paths`` (absolute) that has a record, by :func:`path_key`."""
    return {key: record.sha256 for key, record in _records(db, list(dict.fromkeys(paths))).items()}
