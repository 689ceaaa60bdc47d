"""A wheel built from the repository carries the shipped model, so `process` works after a plain install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

# pip needs the build backend (setuptools) from the package index, or from its cache.
_OFFLINE_SIGNS = ("Could not find a version that satisfies", "NewConnectionError", "Failed to establish", "Temporary failure in name resolution")


@pytest.mark.slow
def test_wheel_carries_the_model_and_process_runs_from_it(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "benchmarks", "tests"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "wheel"), str(source)],
        check=False, capture_output=True, text=True,
    )
    if built.returncode != 0 and any(sign in built.stdout + built.stderr for sign in _OFFLINE_SIGNS):
        pytest.skip("cannot build a wheel: pip could not reach the package index for setuptools")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("hwr_batch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hwr_batch/models/hwr-digits.onnx" in names and "hwr_batch/cli.py" in names
    assert "hwr_batch/models/hwr-digits.calibration.json" in names
    assert not any(name.startswith(("tests/", "samples/", "benchmarks/")) for name in names)

    # Install the wheel on its own (dependencies come from this environment) and run it from outside the repo.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "HWR_BATCH_MODEL"} | {"PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import hwr_batch.classify as c; print(c.__file__); print(c.default_model_path())"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(target) and Path(where[1]) == target / "hwr_batch" / "models" / "hwr-digits.onnx"

    run = subprocess.run(
        [sys.executable, "-m", "hwr_batch", "-q", "process", str(REPO / "samples" / "page_0001.png"), "-o", str(tmp_path / "out")],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    fields = pd.read_csv(tmp_path / "out" / "fields.csv", dtype={"digits": str})
    assert len(fields) > 0 and fields["digits"].notna().any()


TRAINING_DISTRIBUTIONS = ("tensorflow", "tf2onnx", "keras", "tensorboard", "tf_keras")


def env_without(tmp_path_factory, distributions: tuple[str, ...]) -> dict[str, str]:
    """An environment holding every installed package but ``distributions`` (as a plain `pip install`
    gives): a folder of links to this environment's site-packages less those, run with `python -S`
    so that the real site-packages is not on the path."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path_factory.mktemp("site-without")
    for entry in site.iterdir():
        if entry.name.lower().startswith(distributions) or entry.suffix == ".pth":
            continue
        (farm / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"PYTHONPATH": os.pathsep.join([str(REPO), str(farm)])}


@pytest.fixture(scope="module")
def env_without_tensorflow(tmp_path_factory) -> dict[str, str]:
    """No TensorFlow, tf2onnx or Keras: the training stack."""
    return env_without(tmp_path_factory, TRAINING_DISTRIBUTIONS)


def run_with(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-S", "-m", "hwr_batch", *args]
    return subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True)


def test_process_runs_without_tensorflow(env_without_tensorflow, tmp_path):
    blocked = subprocess.run(
        [sys.executable, "-S", "-c", "import tensorflow"], check=False, env=env_without_tensorflow, capture_output=True
    )
    assert blocked.returncode != 0  # the environment really has no TensorFlow
    run = run_with(
        env_without_tensorflow, "-q", "process", str(REPO / "samples" / "page_0001.png"), "-o", str(tmp_path / "out"), cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert pd.read_csv(tmp_path / "out" / "fields.csv", dtype={"digits": str})["digits"].notna().any()


@pytest.mark.parametrize("command", ["train", "export-onnx"])
def test_training_commands_say_how_to_install_the_training_extra(env_without_tensorflow, tmp_path, command):
    args = [command] if command == "train" else [command, str(REPO / "models" / "hwr-digits.keras")]
    run = run_with(env_without_tensorflow, *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 4, run.stderr
    assert f"`hwr-batch {command}` needs tensorflow, tf2onnx" in run.stderr
    assert "pip install 'hwr-batch[train]'" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_review_says_how_to_install_the_review_extra(tmp_path_factory, tmp_path):
    env = env_without(tmp_path_factory, ("flask", "werkzeug"))
    (tmp_path / "out").mkdir()
    run = run_with(env, "review", str(tmp_path / "out"), "--no-browser", cwd=tmp_path)
    assert run.returncode == 4, run.stderr
    assert "`hwr-batch review` needs flask, werkzeug" in run.stderr
    assert "pip install 'hwr-batch[review]'" in run.stderr and "Traceback" not in run.stderr
