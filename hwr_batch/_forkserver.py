"""Imported only in the multiprocessing forkserver of the worker pool (its ``preload``), to set two things there.

* ``SIGTERM`` and ``SIGINT`` are ignored: systemd (and ``kill -- -PGID``) sends SIGTERM, and Ctrl-C sends
  SIGINT, to the whole process group, perhaps while this process still imports its preload; the main
  process then finishes the files in hand and shuts the pool down itself. Killed by it, the forkserver
  could not start the retry process, and the main process saw the pool break and logged a worker death.
* ``PR_SET_PDEATHSIG``: the kernel kills the forkserver when the process that started it (the main
  process) dies, even by ``SIGKILL``. Workers watch the main process themselves (``read._init_worker``).
"""

from __future__ import annotations

import signal

from ._lifeline import die_with_parent

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
die_with_parent()
