"""The run lock: a second run fails at once, and a SIGKILLed holder never leaves a blocking lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hwr_batch.errors import ExitCode, LockHeldError
from hwr_batch.runlock import LOCK_NAME, acquire_lock

# A second process that tries the lock once and reports the outcome on stdout.
TRY_LOCK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from hwr_batch.errors import LockHeldError
    from hwr_batch.runlock import acquire_lock
    try:
        with acquire_lock(Path(sys.argv[1])):
            print("ACQUIRED", flush=True)
    except LockHeldError as e:
        print("HELD", e, flush=True)
        sys.exit(int(e.exit_code))
    """
)

# A holder that takes the lock, says so, and sleeps until killed.
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hwr_batch.runlock import acquire_lock
    lock = acquire_lock(Path(sys.argv[1]))
    print("LOCKED", flush=True)
    time.sleep(60)
    """
)


def try_lock(state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def start_holder(state_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(state_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "LOCKED"
    return holder


def test_second_process_fails_at_once_naming_the_holder(tmp_path):
    state_dir = tmp_path / "state"
    with acquire_lock(state_dir, argv=["hwr-batch", "process", "scans/"]) as lock:
        assert lock.held and lock.path == state_dir / LOCK_NAME
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["argv"] == ["hwr-batch", "process", "scans/"]
        assert info["hostname"] and info["started"]
        result = try_lock(state_dir)
        assert result.returncode == ExitCode.lock_held, result.stderr
        message = result.stdout
        assert message.startswith("HELD")
        assert f"pid {os.getpid()}" in message
        assert lock.holder.started in message
        assert str(lock.path) in message
        assert "hwr-batch process scans/" in message
    assert not lock.held
    assert lock.path.exists() and lock.path.read_text() == ""  # kept, emptied
    assert try_lock(state_dir).stdout.strip() == "ACQUIRED"


def test_same_process_cannot_take_it_twice(tmp_path):
    with acquire_lock(tmp_path), pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
        acquire_lock(tmp_path)
    with acquire_lock(tmp_path):  # released: free again
        pass


def test_lock_of_a_sigkilled_holder_never_blocks(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(LockHeldError, match=f"pid {holder.pid}") as e:
            acquire_lock(tmp_path)
        assert e.value.exit_code == ExitCode.lock_held
        assert str(tmp_path / LOCK_NAME) in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert holder.returncode == -signal.SIGKILL
    # The dead holder's details are still in the file, but the kernel released its flock.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with acquire_lock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert try_lock(tmp_path).stdout.strip() == "ACQUIRED"


def test_garbage_in_the_lock_file_is_harmless(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"\x00\xff not json")
    with acquire_lock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()  # overwritten, no leftovers
        with pytest.raises(LockHeldError):
            acquire_lock(tmp_path)
