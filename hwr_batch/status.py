"""What a run would do, and what the state database says was done: ``process --dry-run`` and ``status``.

Both only read: no lock is taken (the state database is WAL, so a nightly run in progress is
neither blocked nor disturbed) and nothing is written.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .classify import load_classifier
from .config import Options
from .errors import InputFileError
from .load import find_inputs
from .state import (
    STATE_DB_NAME,
    Decision,
    FileRecord,
    RunRecord,
    StateSummary,
    failed_files,
    open_state,
    plan,
    summary,
)


@dataclass(frozen=True)
class RunPlan:
    """What ``process`` would do with these options now.

    Attributes:
        decisions: one per file found (see :class:`hwr_batch.state.Decision`).
        problems: (path, reason) for named inputs that are missing or cannot be listed.
    """

    decisions: list[Decision]
    problems: list[tuple[Path, str]]

    @property
    def to_process(self) -> list[Decision]:
        return [d for d in self.decisions if d.process]

    def counts(self) -> Counter[str]:
        """Files per decision kind (``new``, ``changed``, ``stale-model`` ...)."""
        return Counter(d.kind for d in self.decisions)


def plan_run(options: Options, *, model_sha: str | None = None, settings_sha: str | None = None) -> RunPlan:
    """Find the inputs and decide, from the state database, what a run with ``options`` would process.

    Writes nothing (``plan(dry_run=True)``); a missing state database means every file is new.

    Args:
        model_sha: the model's SHA-256; default: that of ``options.model`` (the model is loaded to check it).
        settings_sha: the settings hash to compare with; default: that of ``options``.
    """
    options = options.validated()
    if model_sha is None:
        model_sha = load_classifier(options.model).sha256
    own = [d for d in (options.out_dir, options.state_dir, options.annotate_dir) if d is not None]
    files, problems = find_inputs(options.inputs, include=options.include, exclude=options.exclude, skip_dirs=own)
    database = options.state_dir / STATE_DB_NAME
    if not database.exists():
        decisions = [Decision(Path(os.path.abspath(p)), "new", True, None) for p in dict.fromkeys(files)]
        return RunPlan(decisions, problems)
    with open_state(database) as db:
        decisions = plan(
            db, files, model_sha=model_sha, force=options.force, retry_failed=options.retry_failed,
            reprocess_stale=options.reprocess_stale, dry_run=True, settings_sha=settings_sha or options.settings_sha(),
        )
    return RunPlan(decisions, problems)


@dataclass(frozen=True)
class StateReport:
    """What ``hwr-batch status`` shows.

    Attributes:
        database: the state database read.
        summary: counts of done, failed and stale files (stale: against the last run's model and settings).
        failed: the files whose last processing failed, oldest first.
        pending: with inputs given, what a run with the last run's model and settings would do with them.
    """

    database: Path
    summary: StateSummary
    failed: list[FileRecord]
    pending: RunPlan | None

    @property
    def last_run(self) -> RunRecord | None:
        return self.summary.last_run


def read_status(out_dir: Path, *, state_dir: Path | None = None, inputs: tuple[Path, ...] = ()) -> StateReport:
    """Read the state database of the outputs in ``out_dir`` (or in ``state_dir``).

    Raises:
        InputFileError: there is no state database there (no run has written to it).
        StateDbError: it is unusable.
    """
    state_dir = Path(state_dir) if state_dir else Path(out_dir) / ".hwr-batch"
    database = state_dir / STATE_DB_NAME
    if not database.is_file():
        raise InputFileError(
            f"{database}: no state database (has `hwr-batch process --out {out_dir}` run yet? "
            "Give --state-dir if the run used one)"
        )
    with open_state(database) as db:
        last = summary(db).last_run
        counts = summary(db, model_sha=last.model_sha if last else None, settings_sha=last.settings_sha if last else None)
        failed = failed_files(db)
    pending = None
    if inputs:
        options = Options(inputs=tuple(inputs), out_dir=Path(out_dir), state_dir=state_dir)
        # Judged as the next run with the last run's model and settings would judge them.
        pending = plan_run(options, model_sha=last.model_sha if last else "", settings_sha=last.settings_sha if last else None)
    return StateReport(database, counts, failed, pending)
