"""The state database: decisions, odd file names, corrupt files, WAL and concurrent readers."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hwr_batch.errors import ExitCode, StateDbError
from hwr_batch.state import (
    SCHEMA_VERSION,
    CorrectionRecord,
    begin_run,
    failed_files,
    fingerprint,
    finish_run,
    forget,
    get_record,
    hash_file,
    mark_done,
    mark_failed,
    open_state,
    plan,
    read_corrections,
    save_corrections,
    stale_files,
    summary,
)

MODEL_A = "a" * 64
MODEL_B = "b" * 64


@pytest.fixture
def db(tmp_path):
    with open_state(tmp_path / "state" / "state.sqlite") as db:
        yield db


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def kinds(decisions) -> dict[str, tuple[str, bool]]:
    return {d.path.name: (d.kind, d.process) for d in decisions}


def process_all(db, decisions, run_id, *, model_sha=MODEL_A, fail=()):
    """What the pipeline does: mark every file the plan says to process."""
    for d in decisions:
        if not d.process:
            continue
        if d.path.name in fail:
            mark_failed(db, d.path, d.fingerprint, stage="read", reason="cannot decode page 1", run_id=run_id)
        else:
            mark_done(db, d.path, d.fingerprint, model_sha=model_sha, pages=1, digits=12, run_id=run_id)


def test_open_creates_schema_in_wal_mode(tmp_path):
    path = tmp_path / "deep" / "er" / "state.sqlite"
    with open_state(path) as db:
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    # WAL is a property of the file: a plain connection sees it too, and reopening works.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    open_state(path).close()


def test_new_then_done_then_skipped(db, tmp_path):
    a = write(tmp_path / "in" / "a.pdf", "page a")
    b = write(tmp_path / "in" / "b.png", "page b")
    run = begin_run(db, model_sha=MODEL_A, command=["hwr-batch", "process", "in"])
    first = plan(db, [a, b], model_sha=MODEL_A)
    assert kinds(first) == {"a.pdf": ("new", True), "b.png": ("new", True)}
    assert all(d.fingerprint.sha256 == hash_file(d.path) for d in first)
    process_all(db, first, run)
    rec = get_record(db, a)
    assert rec.status == "done" and rec.model_sha == MODEL_A and rec.pages == 1 and rec.digits == 12
    assert rec.run_id == run and rec.sha256 == hash_file(a) and rec.error is None
    finished = finish_run(db, run, exit_status=ExitCode.ok, planned=2, skipped=0)
    assert (finished.done, finished.failed, finished.stale, finished.exit_status) == (2, 0, 0, 0)
    assert finished.finished is not None

    again = plan(db, [a, b], model_sha=MODEL_A)
    assert kinds(again) == {"a.pdf": ("done", False), "b.png": ("done", False)}
    forced = plan(db, [a, b], model_sha=MODEL_A, force=True)
    assert kinds(forced) == {"a.pdf": ("done", True), "b.png": ("done", True)}


def test_unchanged_size_and_mtime_are_trusted_without_hashing_but_force_rehashes(db, tmp_path):
    a = write(tmp_path / "a.pdf", "AAAA")
    process_all(db, plan(db, [a], model_sha=MODEL_A), None)
    st = a.stat()
    write(a, "BBBB")  # same size; put the old mtime back: only a hash could tell
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert kinds(plan(db, [a], model_sha=MODEL_A)) == {"a.pdf": ("done", False)}  # proof: not hashed
    (d,) = plan(db, [a], model_sha=MODEL_A, force=True)
    assert (d.kind, d.process, d.fingerprint.sha256) == ("changed", True, hash_file(a))


def test_changed_content_is_reprocessed_and_replaces_the_record(db, tmp_path):
    a = write(tmp_path / "a.pdf", "version 1")
    process_all(db, plan(db, [a], model_sha=MODEL_A), None)
    old = get_record(db, a)
    write(a, "version 2!")
    (d,) = plan(db, [a], model_sha=MODEL_A)
    assert (d.kind, d.process) == ("changed", True)
    assert d.previous == old and d.fingerprint.sha256 == hash_file(a) != old.sha256
    mark_done(db, a, d.fingerprint, model_sha=MODEL_A, pages=2, digits=30, run_id=None)
    new = get_record(db, a)
    assert new.sha256 == d.fingerprint.sha256 and new.pages == 2 and new.first_seen == old.first_seen
    assert summary(db).files == 1


def test_same_size_changed_content_with_new_mtime_is_changed(db, tmp_path):
    a = write(tmp_path / "a.pdf", "AAAA")
    process_all(db, plan(db, [a], model_sha=MODEL_A), None)
    write(a, "BBBB")
    bump_mtime(a)
    assert kinds(plan(db, [a], model_sha=MODEL_A)) == {"a.pdf": ("changed", True)}


def test_touched_file_with_same_content_is_not_reprocessed_and_mtime_is_updated(db, tmp_path):
    a = write(tmp_path / "a.pdf", "same")
    process_all(db, plan(db, [a], model_sha=MODEL_A), None)
    bump_mtime(a)
    new_mtime = a.stat().st_mtime_ns
    assert get_record(db, a).mtime_ns != new_mtime
    assert kinds(plan(db, [a], model_sha=MODEL_A, dry_run=True)) == {"a.pdf": ("done", False)}
    assert get_record(db, a).mtime_ns != new_mtime  # dry run writes nothing
    assert kinds(plan(db, [a], model_sha=MODEL_A)) == {"a.pdf": ("done", False)}
    assert get_record(db, a).mtime_ns == new_mtime


def test_failed_is_skipped_unless_retry_or_force_and_changed_failed_file_is_retried(db, tmp_path):
    a = write(tmp_path / "bad.pdf", "broken")
    run = begin_run(db, model_sha=MODEL_A)
    process_all(db, plan(db, [a], model_sha=MODEL_A), run, fail={"bad.pdf"})
    rec = get_record(db, a)
    assert (rec.status, rec.error_stage, rec.error, rec.digits) == (
        "failed",
        "read",
        "cannot decode page 1",
        None,
    )
    assert finish_run(db, run, exit_status=ExitCode.partial_failure).failed == 1
    assert [r.path for r in failed_files(db)] == [a]

    assert kinds(plan(db, [a], model_sha=MODEL_A)) == {"bad.pdf": ("failed", False)}
    assert kinds(plan(db, [a], model_sha=MODEL_A, retry_failed=True)) == {"bad.pdf": ("failed", True)}
    assert kinds(plan(db, [a], model_sha=MODEL_A, force=True)) == {"bad.pdf": ("failed", True)}
    bump_mtime(a)  # touched only: still failed
    assert kinds(plan(db, [a], model_sha=MODEL_A)) == {"bad.pdf": ("failed", False)}
    write(a, "fixed by the user")
    (d,) = plan(db, [a], model_sha=MODEL_A)
    assert (d.kind, d.process) == ("changed", True)
    mark_done(db, a, d.fingerprint, model_sha=MODEL_A, pages=1, digits=3, run_id=None)
    rec = get_record(db, a)
    assert (rec.status, rec.error, rec.error_stage) == ("done", None, None)


def test_stale_model_is_counted_and_listed_but_reprocessed_only_on_request(db, tmp_path):
    a = write(tmp_path / "a.pdf", "a")
    b = write(tmp_path / "b.pdf", "b")
    process_all(db, plan(db, [a, b], model_sha=MODEL_A), None, model_sha=MODEL_A)
    decisions = plan(db, [a, b], model_sha=MODEL_B)
    assert kinds(decisions) == {"a.pdf": ("stale-model", False), "b.pdf": ("stale-model", False)}
    assert summary(db, model_sha=MODEL_B).stale == 2
    assert summary(db, model_sha=MODEL_A).stale == 0
    assert summary(db).stale == 0  # no current model given: nothing is stale
    assert {r.path for r in stale_files(db, MODEL_B)} == {a, b}
    assert kinds(plan(db, [a], model_sha=MODEL_B, reprocess_stale=True)) == {"a.pdf": ("stale-model", True)}
    assert kinds(plan(db, [a], model_sha=MODEL_B, force=True)) == {"a.pdf": ("stale-model", True)}

    run = begin_run(db, model_sha=MODEL_B)
    (d,) = plan(db, [a], model_sha=MODEL_B, reprocess_stale=True)
    mark_done(db, a, d.fingerprint, model_sha=MODEL_B, pages=1, digits=1, run_id=run)
    finished = finish_run(db, run, exit_status=0, planned=1, skipped=0)
    assert (finished.done, finished.stale) == (1, 1)
    assert [r.path for r in stale_files(db, MODEL_B)] == [b]
    s = summary(db, model_sha=MODEL_B)
    assert (s.files, s.done, s.failed, s.stale, s.last_run.id) == (2, 2, 0, 1, run)


SETTINGS_A = "1" * 64
SETTINGS_B = "2" * 64


def test_other_settings_are_stale_like_another_model(db, tmp_path):
    a = write(tmp_path / "a.pdf", "a")
    b = write(tmp_path / "b.pdf", "b")
    old = write(tmp_path / "old.pdf", "old")
    for path in (a, b):
        (d,) = plan(db, [path], model_sha=MODEL_A, settings_sha=SETTINGS_A)
        mark_done(db, path, d.fingerprint, model_sha=MODEL_A, pages=1, digits=3, run_id=None, settings_sha=SETTINGS_A)
    (d,) = plan(db, [old], model_sha=MODEL_A)
    mark_done(db, old, d.fingerprint, model_sha=MODEL_A, pages=1, digits=3, run_id=None)  # no settings recorded
    assert get_record(db, a).settings_sha == SETTINGS_A and get_record(db, old).settings_sha is None
    assert kinds(plan(db, [a, b, old], model_sha=MODEL_A, settings_sha=SETTINGS_A)) == {
        "a.pdf": ("done", False), "b.pdf": ("done", False), "old.pdf": ("done", False),
    }
    assert kinds(plan(db, [a, b, old], model_sha=MODEL_A, settings_sha=SETTINGS_B)) == {
        "a.pdf": ("stale-settings", False), "b.pdf": ("stale-settings", False), "old.pdf": ("done", False),
    }
    assert kinds(plan(db, [a], model_sha=MODEL_A, settings_sha=SETTINGS_B, reprocess_stale=True)) == {
        "a.pdf": ("stale-settings", True)
    }
    assert {r.path for r in stale_files(db, MODEL_A, SETTINGS_B)} == {a, b}
    assert stale_files(db, MODEL_A, SETTINGS_A) == [] and stale_files(db, MODEL_A) == []
    assert summary(db, model_sha=MODEL_A, settings_sha=SETTINGS_B).stale == 2

    run = begin_run(db, model_sha=MODEL_A, settings_sha=SETTINGS_B)
    (d,) = plan(db, [a], model_sha=MODEL_A, settings_sha=SETTINGS_B, reprocess_stale=True)
    mark_done(db, a, d.fingerprint, model_sha=MODEL_A, pages=1, digits=3, run_id=run, settings_sha=SETTINGS_B)
    finished = finish_run(db, run, exit_status=0)
    assert (finished.done, finished.stale, finished.settings_sha) == (1, 1, SETTINGS_B)  # b is still stale


def test_a_schema_1_database_is_upgraded_in_place(tmp_path):
    """A state database written before settings were recorded keeps its records, with no settings."""
    path = tmp_path / "state.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, finished TEXT,
            model_sha TEXT NOT NULL, hostname TEXT NOT NULL, pid INTEGER NOT NULL, command TEXT NOT NULL,
            planned INTEGER, done INTEGER, failed INTEGER, skipped INTEGER, stale INTEGER, exit_status INTEGER);
        CREATE TABLE files (path_key BLOB PRIMARY KEY, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
            sha256 TEXT, pages INTEGER, digits INTEGER, model_sha TEXT,
            status TEXT NOT NULL CHECK (status IN ('done', 'failed')), error TEXT, error_stage TEXT,
            first_seen TEXT NOT NULL, processed TEXT NOT NULL, run_id INTEGER REFERENCES runs(id));
        INSERT INTO runs (started, finished, model_sha, hostname, pid, command) VALUES ('t0', 't1', 'm', 'h', 1, 'c');
        INSERT INTO files VALUES (CAST('/scans/a.png' AS BLOB), '/scans/a.png', 1, 2, 's', 1, 3, 'm', 'done',
            NULL, NULL, 't0', 't1', 1);
        PRAGMA application_id = 1213682242;
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    with open_state(path) as db:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert read_corrections(db) == []  # schema 3's table, empty
        record = get_record(db, Path("/scans/a.png"))
        assert (record.status, record.digits, record.settings_sha) == ("done", 3, None)
        assert summary(db, model_sha="m", settings_sha=SETTINGS_A).stale == 0
        run = begin_run(db, model_sha="m", settings_sha=SETTINGS_A)
        assert finish_run(db, run, exit_status=0).settings_sha == SETTINGS_A


ODD_NAMES = [
    "with space.pdf",
    "comma,separated.pdf",
    'double"quote.pdf',
    "single'quote.pdf",
    "new\nline.pdf",
    "tab\there.pdf",
    "Ünïcødé ✓ 数字.pdf",
    "semicolon;--drop table files.pdf",
    "=HYPERLINK(x).pdf",
]


def test_odd_file_names_round_trip(db, tmp_path):
    paths = [write(tmp_path / "in" / name, name) for name in ODD_NAMES]
    decisions = plan(db, paths, model_sha=MODEL_A)
    assert [d.kind for d in decisions] == ["new"] * len(paths)
    process_all(db, decisions, None)
    for p in paths:
        rec = get_record(db, p)
        assert rec is not None and rec.path == p and rec.status == "done"
    assert kinds(plan(db, paths, model_sha=MODEL_A)) == {p.name: ("done", False) for p in paths}
    texts = {row[0] for row in db.conn.execute("SELECT path FROM files")}
    assert texts == {str(p) for p in paths}  # the text column is the exact path


def test_undecodable_file_name(db, tmp_path):
    raw = os.fsencode(tmp_path) + b"/latin1-\xe9t\xe9.pdf"  # not valid UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    path = Path(os.fsdecode(raw))
    process_all(db, plan(db, [path], model_sha=MODEL_A), None)
    mark_failed(db, path, fingerprint(path), stage="read", reason=f"cannot open {path}", run_id=None)
    rec = get_record(db, path)
    assert rec.path == path and os.fsencode(rec.path) == raw
    assert "\\xe9" in rec.error
    text = db.conn.execute("SELECT path FROM files").fetchone()[0]
    assert text.endswith("latin1-\\xe9t\\xe9.pdf")


def test_relative_paths_and_duplicates(db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.pdf", "a")
    decisions = plan(db, [Path("a.pdf"), tmp_path / "a.pdf", Path("./a.pdf")], model_sha=MODEL_A)
    assert [d.path for d in decisions] == [tmp_path / "a.pdf"]


def test_missing_file_is_unreadable_and_can_be_marked_failed(db, tmp_path):
    gone = tmp_path / "gone.pdf"
    (d,) = plan(db, [gone], model_sha=MODEL_A)
    assert (d.kind, d.process, d.fingerprint) == ("unreadable", False, None)
    assert "No such file" in d.error
    mark_failed(db, gone, d.fingerprint, stage="read", reason=d.error, run_id=None)
    write(gone, "arrived later")
    assert kinds(plan(db, [gone], model_sha=MODEL_A)) == {"gone.pdf": ("changed", True)}


def test_forget(db, tmp_path):
    a = write(tmp_path / "a.pdf", "a")
    process_all(db, plan(db, [a], model_sha=MODEL_A), None)
    assert forget(db, [a, tmp_path / "never.pdf"]) == 1
    assert get_record(db, a) is None


def test_unfinished_run_is_visible(db):
    run = begin_run(db, model_sha=MODEL_A)
    last = summary(db).last_run
    assert last.id == run and last.finished is None and last.exit_status is None
    with pytest.raises(StateDbError, match="no run with id 999"):
        finish_run(db, 999, exit_status=0)


def test_corrupt_file_raises_state_db_error_naming_the_file(tmp_path):
    path = tmp_path / "state.sqlite"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StateDbError, match="corrupt or not an SQLite database") as e:
        open_state(path)
    assert str(path) in str(e.value)
    assert e.value.exit_code == ExitCode.state_db


def test_text_file_is_not_a_database(tmp_path):
    path = tmp_path / "state.sqlite"
    path.write_text("hello, this is a CSV file,\n" * 50)
    with pytest.raises(StateDbError, match=str(path)):
        open_state(path)


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE files (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StateDbError, match="not an hwr-batch state database"):
        open_state(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "state.sqlite"
    open_state(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StateDbError, match="newer than this hwr-batch supports") as e:
        open_state(path)
    assert str(path) in str(e.value)


def test_truncated_database_is_reported(tmp_path):
    path = tmp_path / "state.sqlite"
    with open_state(path) as db:
        for i in range(200):
            mark_failed(db, tmp_path / f"f{i}.pdf", None, stage="read", reason="x" * 500, run_id=None)
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[:100] + os.urandom(len(data) - 100))  # header intact, pages garbage
    with pytest.raises(StateDbError, match=str(path)), open_state(path) as db:
        summary(db)


def test_reader_sees_committed_snapshot_while_writer_commits(db, tmp_path):
    a = write(tmp_path / "a.pdf", "a")
    b = write(tmp_path / "b.pdf", "b")
    process_all(db, plan(db, [a], model_sha=MODEL_A), None)
    reader = sqlite3.connect(db.path, isolation_level=None, timeout=0)  # fail fast if anything blocks
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM files").fetchone()[0] == 1
        # The writer commits while the reader's transaction is open: WAL lets both proceed.
        process_all(db, plan(db, [b], model_sha=MODEL_A), None)
        assert reader.execute("SELECT count(*) FROM files").fetchone()[0] == 1  # its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM files").fetchone()[0] == 2
    finally:
        reader.close()


READER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN")
print(c.execute("SELECT count(*) FROM files").fetchone()[0], flush=True)
sys.stdin.readline()
print(c.execute("SELECT count(*) FROM files").fetchone()[0], flush=True)
c.execute("COMMIT")
print(c.execute("SELECT count(*) FROM files").fetchone()[0], flush=True)
"""


def test_reader_in_another_process_does_not_block_the_writer(db, tmp_path):
    """A separate process holds a read transaction open; the writer's marks still commit at once."""
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            READER,
            str(db.path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "0"
        paths = [write(tmp_path / f"{i}.pdf", str(i)) for i in range(20)]
        db.conn.execute("PRAGMA busy_timeout = 0")  # any blocking would raise instead of waiting
        process_all(db, plan(db, paths, model_sha=MODEL_A), None)
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "0"  # still its snapshot
        assert reader.stdout.readline().strip() == "20"
        assert reader.wait(timeout=10) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def test_fifo_and_folder_are_unreadable_without_hanging_and_then_known_failures(db, tmp_path):
    fifo = tmp_path / "pipe.pdf"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.pdf"
    folder.mkdir()
    decisions = plan(db, [fifo, folder], model_sha=MODEL_A)
    assert kinds(decisions) == {"pipe.pdf": ("unreadable", False), "folder.pdf": ("unreadable", False)}
    assert all("not a regular file" in d.error or "directory" in d.error.lower() for d in decisions)
    assert all(str(d.path) not in d.error for d in decisions)  # the errors table's file column names it
    for d in decisions:
        assert d.fingerprint.size is not None and d.fingerprint.sha256 is None
        mark_failed(db, d.path, d.fingerprint, stage="read", reason=d.error, run_id=None)
    # Unchanged since it failed: a known failure, skipped quietly like any other.
    assert kinds(plan(db, [fifo, folder], model_sha=MODEL_A)) == {
        "pipe.pdf": ("failed", False),
        "folder.pdf": ("failed", False),
    }
    retried = plan(db, [fifo, folder], model_sha=MODEL_A, retry_failed=True)
    assert [d.kind for d in retried] == ["unreadable", "unreadable"]


def test_a_broken_symbolic_link_is_named_fails_once_and_is_read_when_its_target_appears(db, tmp_path):
    link = tmp_path / "scan.pdf"
    link.symlink_to(tmp_path / "not yet there.pdf")
    (first,) = plan(db, [link], model_sha=MODEL_A)
    assert (first.kind, first.process) == ("unreadable", False)
    assert first.error.startswith(f"broken symbolic link (to {tmp_path / 'not yet there.pdf'}: No such file")
    mark_failed(db, first.path, first.fingerprint, stage="read", reason=first.error, run_id=None)
    # Still broken: a known failure, skipped quietly (it failed every night before), unless retried.
    assert kinds(plan(db, [link], model_sha=MODEL_A)) == {"scan.pdf": ("failed", False)}
    assert kinds(plan(db, [link], model_sha=MODEL_A, retry_failed=True)) == {"scan.pdf": ("unreadable", False)}
    write(tmp_path / "not yet there.pdf", "now it is")
    assert kinds(plan(db, [link], model_sha=MODEL_A)) == {"scan.pdf": ("changed", True)}


def test_mark_done_needs_the_hash_from_plan(db, tmp_path):
    a = write(tmp_path / "a.pdf", "a")
    with pytest.raises(ValueError, match="sha256"):
        mark_done(db, a, fingerprint(a), model_sha=MODEL_A, pages=1, digits=1, run_id=None)


def correction(path: Path, sha: str = "s" * 64, *, field: int = 2, box=(10, 20, 300, 60), digits: str = "0421",
               status: str = "corrected", at: str = "2026-12-03T12:00:00+00:00") -> CorrectionRecord:
    return CorrectionRecord(path, sha, 1, field, box, "0427", digits, status, at)


def test_a_schema_2_database_gains_the_corrections_table_and_keeps_its_records(tmp_path):
    path = tmp_path / "state.sqlite"
    with open_state(path) as db:  # today's schema less its corrections table is exactly schema 2
        mark_done(db, write(tmp_path / "a.png", "a"), fingerprint(tmp_path / "a.png").__class__(1, 2, "h"),
                  model_sha=MODEL_A, pages=1, digits=3, run_id=None, settings_sha="x")
        db.conn.execute("DROP TABLE corrections")
        db.conn.execute("PRAGMA user_version = 2")
    with open_state(path) as db:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert get_record(db, tmp_path / "a.png").settings_sha == "x"
        saved = save_corrections(db, [correction(tmp_path / "a.png")])
        assert saved == read_corrections(db) == [correction(tmp_path / "a.png")]


def test_a_correction_is_replaced_per_content_and_box_and_kept_for_other_content(db, tmp_path):
    scan = tmp_path / "scan.png"
    save_corrections(db, [correction(scan, digits="1")])
    save_corrections(db, [correction(scan, digits="2", at="2026-12-03T12:01:00+00:00")])  # same field again
    save_corrections(db, [correction(scan, "t" * 64, digits="3")])  # the file changed: a field of other content
    save_corrections(db, [correction(scan, box=(10, 200, 300, 60), field=3, status="unreadable", digits="")])
    saved = read_corrections(db)
    assert sorted((c.sha256[0], c.field, c.digits, c.status) for c in saved) == [
        ("s", 2, "2", "corrected"), ("s", 3, "", "unreadable"), ("t", 2, "3", "corrected")]
    with pytest.raises(StateDbError):  # the table refuses a status it does not know
        save_corrections(db, [correction(scan, status="maybe")])
    assert len(read_corrections(db)) == 3


WRITER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")  # what a running `process` does for each mark
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
"""


def test_a_review_saved_while_process_holds_the_write_lock_waits_for_it_and_is_kept(db, tmp_path):
    """The review server and a run share the database: a save waits out the run's short transaction."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        import threading

        saved: list = []

        def save() -> None:  # as the review server does: its own connection
            with open_state(db.path) as own:
                saved.append(save_corrections(own, [correction(tmp_path / "a.png")]))

        saver = threading.Thread(target=save)
        saver.start()
        saver.join(0.5)
        assert saver.is_alive() and not saved  # waiting for the lock, not failing
        writer.stdin.write("\n")
        writer.stdin.flush()
        saver.join(30)
        assert len(saved) == 1 and len(saved[0]) == 1
        assert writer.wait(timeout=10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
