"""The repository's configured ruff rules ([tool.ruff] in pyproject.toml) hold everywhere, as CI checks."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "hwr_batch", "tests", "scripts", "benchmarks"],
        check=False, cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
