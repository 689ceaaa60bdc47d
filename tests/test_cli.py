"""The command line, run as a real subprocess: help, version, exit codes, train and evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fixture_idx

from hwr_batch.errors import ExitCode


def test_help_lists_the_commands_and_exit_codes(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("process", "status", "train", "evaluate", "export-onnx", "download-mnist"):
        assert command in result.stdout
    text = " ".join(result.stdout.split())  # help text is wrapped to the terminal width
    assert "7 another run holds the lock" in text and "130 interrupted" in text


def test_min_confidence_given_with_target_error_says_which_one_is_used(cli, tmp_path):
    from conftest import REPO

    page = REPO / "samples" / "page_0001.png"
    both = cli("process", page, "-o", tmp_path / "a", "--min-confidence", "0.9", "--target-error", "0.02")
    assert both.returncode == 0, both.stderr
    assert "--min-confidence 0.9 is used and --target-error 0.02 is not" in both.stderr
    alone = cli("process", page, "-o", tmp_path / "b", "--min-confidence", "0.9")
    assert alone.returncode == 0 and "is not:" not in alone.stderr
    config = tmp_path / "nightly.toml"  # the nightly job's way: one of them in its config file
    config.write_text("[process]\ntarget-error = 0.02\n")
    mixed = cli("process", page, "-o", tmp_path / "c", "--config", config, "--min-confidence", "0.9", "--dry-run")
    assert mixed.returncode == 0 and "--min-confidence 0.9 is used and --target-error 0.02 is not" in mixed.stderr


def test_version(cli):
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("hwr-batch 0.")


def test_help_does_not_import_the_heavy_libraries():
    code = "import sys; import hwr_batch.cli; print(sorted(m for m in ('tensorflow', 'cv2', 'onnxruntime', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_option_is_a_usage_error(cli):
    result = cli("evaluate", "--no-such-option")
    assert result.returncode == ExitCode.bad_args
    assert "No such option" in result.stderr


def test_images_without_labels_is_a_usage_error(cli):
    images, _ = fixture_idx("test")
    result = cli("evaluate", "--images", images)
    assert result.returncode == ExitCode.bad_args
    assert "--images and --labels go together" in result.stderr


def test_missing_model_exit_code_and_message(cli, tmp_path):
    images, labels = fixture_idx("test")
    result = cli("evaluate", "--model", tmp_path / "missing.onnx", "--images", images, "--labels", labels)
    assert result.returncode == ExitCode.model
    assert "missing.onnx: cannot read model" in result.stderr


def test_missing_mnist_names_the_file(cli, tmp_path, shipped_model):
    result = cli("evaluate", "--data-dir", tmp_path)
    assert result.returncode == ExitCode.input_file
    assert "t10k-images-idx3-ubyte.gz: MNIST file not found" in result.stderr


def test_evaluate_an_idx_pair(cli, tmp_path, shipped_model):
    images, labels = fixture_idx("test")
    result = cli("evaluate", "--images", images, "--labels", labels, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["images"] == 300 and metrics["accuracy"] >= 0.99
    assert f"accuracy   {metrics['accuracy']:.4f}" in result.stdout
    assert (tmp_path / "report" / "confusion_matrix.png").is_file()
    assert (tmp_path / "report" / "worst_mistakes.png").is_file()


def test_evaluate_mnist_test_set(cli, tmp_path, shipped_model, mnist_dir):
    result = cli("evaluate", "--data-dir", mnist_dir, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] >= 0.994


@pytest.mark.slow
def test_train_from_the_command_line(cli, tmp_path):
    images, labels = fixture_idx("train")
    result = cli(
        "train", "--images", images, "--labels", labels, "--epochs", "2", "--validation-size", "100",
        "--batch-size", "64", "--out", tmp_path, "--name", "cli-model",
    )
    assert result.returncode == 0, result.stderr
    assert "best validation accuracy" in result.stdout
    for suffix in (".keras", ".onnx", ".json", "-curves.png"):
        assert (tmp_path / f"cli-model{suffix}").is_file()
    record = json.loads((tmp_path / "cli-model.json").read_text())
    assert record["epochs_run"] == 2 and record["data"]["train_images"] == 500
    assert "epoch 2:" in result.stderr  # one log line per epoch goes to stderr


def test_process_option_defaults_are_the_python_api_defaults():
    """The CLI takes Options' defaults from config (a leaf module): they must stay equal."""
    import inspect

    from hwr_batch.cli import process
    from hwr_batch.config import Options

    cli_defaults = {name: p.default for name, p in inspect.signature(process).parameters.items()}
    api = Options(inputs=())
    pairs = {
        "out": "out_dir", "fmt": "fmt", "per_run": "per_run", "fields": "field_mode",
        "min_confidence": "min_confidence", "pdf_dpi": "pdf_dpi", "dpi": "dpi", "max_megapixels": "max_megapixels",
        "jobs": "jobs", "force": "force", "retry_failed": "retry_failed", "reprocess_stale": "reprocess_stale", "prune": "prune",
        "batch_digits": "batch_digits",
    }
    for cli_name, api_name in pairs.items():
        assert cli_defaults[cli_name] == getattr(api, api_name), (cli_name, api_name)


def test_every_option_is_a_process_parameter_and_a_config_setting_with_the_same_default():
    """Each field of Options is a `process` parameter and a config key by its command-line name, and the
    command line's defaults, turned into Options as `process` does, are Options' own defaults."""
    import inspect
    from dataclasses import fields

    from hwr_batch.cli import process
    from hwr_batch.config import CONFIG_TYPES, Options, cli_name, options_from

    parameters = inspect.signature(process).parameters
    names = [cli_name(f.name) for f in fields(Options)]
    assert set(names) <= set(parameters) and set(names) == set(CONFIG_TYPES)
    assert set(parameters) - set(names) == {"ctx", "config", "dry_run"}  # the only ones that are not options
    cli_defaults = {name: p.default for name, p in parameters.items()} | {"inputs": ["scans"]}
    assert options_from(cli_defaults) == Options(inputs=(Path("scans"),))


def test_fatal_errors_reach_the_log_file_and_json_logs(cli, tmp_path):
    import os

    from hwr_batch.runlock import acquire_lock

    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.png").write_bytes(b"")
    log_file = tmp_path / "nightly.log"
    missing = cli("--json-logs", "--log-file", log_file, "process", scans, "--model", tmp_path / "gone.onnx",
                  "--out", tmp_path / "out")
    assert missing.returncode == ExitCode.model, missing.stderr
    entries = [json.loads(line) for line in missing.stderr.splitlines()]  # every line is JSON
    assert [e["level"] for e in entries] == ["ERROR"] and "gone.onnx: cannot read model" in entries[0]["message"]
    assert json.loads(log_file.read_text().splitlines()[-1]) == entries[0]
    os.remove(log_file)
    with acquire_lock(tmp_path / "out" / ".hwr-batch"):  # another run holds the lock
        held = cli("--log-file", log_file, "process", scans, "--out", tmp_path / "out")
    assert held.returncode == ExitCode.lock_held, held.stderr
    assert "ERROR hwr-batch: error: another hwr-batch run holds the lock" in log_file.read_text()


@pytest.mark.parametrize("setting", ["max-megapixels = nan", "max-megapixels = inf", "min-confidence = -inf"])
def test_a_config_setting_that_is_not_a_finite_number_is_refused(cli, tmp_path, setting):
    (tmp_path / "scans").mkdir()
    config = tmp_path / "nightly.toml"
    config.write_text(f'[process]\ninputs = ["scans"]\n{setting}\n')
    result = cli("process", "--config", config, "--out", tmp_path / "out")
    assert result.returncode == ExitCode.bad_args, result.stderr
    name = setting.split(" = ")[0]
    assert f"nightly.toml: setting '{name}' must be a finite number" in result.stderr
    assert not (tmp_path / "out").exists()


def test_options_that_are_not_finite_numbers_are_refused_by_the_api():
    """The command line refuses nan itself (typer's range check); the Python API must too."""
    from hwr_batch.config import Options
    from hwr_batch.errors import BadArgsError

    for name in ("max_megapixels", "min_confidence"):
        with pytest.raises(BadArgsError, match=f"--{name.replace('_', '-')} must be a finite number, got nan"):
            Options(inputs=("scans",), **{name: float("nan")}).validated()


def test_quiet_quiets_stderr_and_its_progress_bar_not_the_log_file(tmp_path):
    import logging

    from hwr_batch.cli import _stderr_level, configure_logging, log

    handlers, level = list(log.handlers), log.level
    try:
        configure_logging(logging.WARNING, log_file=tmp_path / "run.log", file_level=logging.INFO)
        assert _stderr_level() == logging.WARNING  # no progress bar under -q, a log file or not
        log.info("kept for the record")
        log.warning("worth a mail")
        configure_logging(logging.INFO)
        assert _stderr_level() == logging.INFO
    finally:
        for handler in set(log.handlers) - set(handlers):
            handler.close()
        log.handlers[:], log.level = handlers, level
    written = (tmp_path / "run.log").read_text()
    assert "INFO kept for the record" in written and "WARNING worth a mail" in written

