"""`process --template`: a forms table of one row per page, kept with the same guarantees as the other tables."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import fixture_idx
from PIL import Image

from hwr_batch import template as T
from hwr_batch.mnist import load_idx_pair
from hwr_batch.synth import make_form_copies


@pytest.fixture(scope="module")
def forms_folder(tmp_path_factory):
    """Two filled copies of layout A, one of layout B (in one folder), and templates made from other copies."""
    digits = load_idx_pair(*fixture_idx("test"))
    a, b = make_form_copies(3, digits, layout_seed=5, seed=2), make_form_copies(2, digits, layout_seed=9, seed=3)
    root = tmp_path_factory.mktemp("forms")
    scans = root / "scans"
    scans.mkdir()
    for name, (img, _) in [("a1.png", a[1]), ("a2.png", a[2]), ("b1.png", b[1])]:
        Image.fromarray(img).save(scans / name, dpi=(300, 300))
    for name, (img, _) in [("a.toml", a[0]), ("b.toml", b[0])]:
        (root / name).write_text(T.dumps(T.create_template(img, dpi=300, name=name.removesuffix(".toml"))))
    return root, a


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def reference(forms_folder, tmp_path_factory):
    """A run with template a over the three pages, in two worker processes: its output folder."""
    root, _ = forms_folder
    out = tmp_path_factory.mktemp("reference") / "out"
    command = [sys.executable, "-m", "hwr_batch", "process", root / "scans", "--out", out, "--template", root / "a.toml"]
    run = subprocess.run([*command, "-j", "2"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # a page fits no template: reported, as a failed file is, and the run goes on
    return out


def test_process_template_writes_forms_like_template_read(forms_folder, reference, tmp_path, cli):
    root, a = forms_folder
    forms = _read(reference / "forms.csv")
    names = [f.name for f in T.load(root / "a.toml").fields]
    assert list(forms.columns) == ["file", "page", *names, *(f"{n}_flag" for n in names), "status"]
    assert [p.rsplit("/", 1)[1] for p in forms["file"]] == ["a1.png", "a2.png", "b1.png"]
    assert list(forms["page"]) == ["1", "1", "1"]
    assert list(forms["status"]) == ["read", "read", "unregistered"]
    assert list(forms.iloc[0][names]) == [f["text"] for f in a[1][1]["fields"]][: len(names)]
    errors = _read(reference / "errors.csv")
    assert list(errors["stage"]) == ["register"] and errors["file"][0].endswith("b1.png") and errors["page"][0] == "1"
    assert len(_read(reference / "pages.csv")) == 3  # the other tables as without templates

    read = cli("template", "read", root / "scans", "--template", root / "a.toml", "-o", tmp_path / "read")
    assert read.returncode == 1, read.stderr
    assert _read(tmp_path / "read" / "forms.csv").equals(forms)  # the same values and flags as `template read`


def test_a_rerun_keeps_forms_and_a_renamed_field_reads_again(forms_folder, reference, tmp_path, cli):
    root, _ = forms_folder
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = (out / "forms.csv").read_bytes()
    again = cli("process", root / "scans", "--out", out, "--template", root / "a.toml", "-j", "1")
    assert again.returncode == 0, again.stderr  # nothing to do: the unregistered page was reported by the run that read it
    assert (out / "forms.csv").read_bytes() == before
    assert "0 to process" in again.stderr

    names = [f.name for f in T.load(root / "a.toml").fields]
    renamed = tmp_path / "a.toml"
    renamed.write_text((root / "a.toml").read_text().replace(f'name = "{names[0]}"', 'name = "member_no"', 1))
    redone = cli("process", root / "scans", "--out", out, "--template", renamed, "-j", "1")
    assert redone.returncode == 1, redone.stderr  # read again: b1 is unregistered again
    assert "3 to process" in redone.stderr
    forms = _read(out / "forms.csv")
    assert list(forms.columns[:3]) == ["file", "page", "member_no"] and names[0] not in forms.columns
    assert list(forms["member_no"]) == list(_read(reference / "forms.csv")[names[0]])


def test_a_killed_run_then_a_rerun_write_the_forms_of_one_run(forms_folder, reference, tmp_path):
    root, _ = forms_folder
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hwr_batch", "process", root / "scans", "--out", out, "--template", root / "a.toml",
               "-j", "1", "--batch-digits", "8"]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "forms.csv").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed after its first write, before its last
    written = _read(out / "forms.csv")
    assert 1 <= len(written) < 3 and written.equals(_read(reference / "forms.csv").iloc[: len(written)])
    rerun = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr
    assert (out / "forms.csv").read_bytes() == (reference / "forms.csv").read_bytes()


def test_a_dask_run_writes_the_same_forms_sheet(forms_folder, reference, tmp_path, cli):
    root, _ = forms_folder
    out = tmp_path / "out"
    run = cli("process", root / "scans", "--out", out, "--template", root / "a.toml", "--dask", "local:1",
              "--format", "xlsx")
    assert run.returncode == 1, run.stderr
    sheet = pd.read_excel(out / "results.xlsx", sheet_name="forms", dtype=str, keep_default_na=False)
    assert sheet.equals(_read(reference / "forms.csv"))


def test_two_templates_xlsx_and_without_templates_nothing_changes(forms_folder, tmp_path, cli):
    root, _ = forms_folder
    scans, out = tmp_path / "scans", tmp_path / "out"
    shutil.copytree(root / "scans", scans)
    command = ["process", scans, "--out", out, "--format", "xlsx", "-j", "1", "-t", root / "a.toml", "-t", root / "b.toml"]
    run = cli(*command)
    assert run.returncode == 0, run.stderr  # every page fits one of them
    sheets = pd.read_excel(out / "results.xlsx", sheet_name=None, dtype=str, keep_default_na=False)
    assert {"forms-a", "forms-b"} <= set(sheets) and "forms" not in sheets
    assert [p.rsplit("/", 1)[1] for p in sheets["forms-a"]["file"]] == ["a1.png", "a2.png"]
    assert [p.rsplit("/", 1)[1] for p in sheets["forms-b"]["file"]] == ["b1.png"]
    assert set(sheets["forms-a"]["status"]) == set(sheets["forms-b"]["status"]) == {"read"}
    assert len(sheets["errors"]) == 0

    (scans / "b1.png").unlink()
    pruned = cli(*command, "--prune")
    assert pruned.returncode == 0, pruned.stderr
    after = pd.read_excel(out / "results.xlsx", sheet_name=None, dtype=str, keep_default_na=False)
    assert len(after["forms-b"]) == 0 and after["forms-a"].equals(sheets["forms-a"])

    plain = cli("process", root / "scans", "--out", tmp_path / "plain", "-j", "1", "--include", "a1.png")
    assert plain.returncode == 0, plain.stderr
    assert sorted(p.name for p in (tmp_path / "plain").glob("*.csv")) == ["digits.csv", "errors.csv", "fields.csv", "pages.csv"]


def test_templates_that_cannot_name_their_tables_are_refused(forms_folder, tmp_path):
    root, _ = forms_folder
    text = (root / "a.toml").read_text()
    same = tmp_path / "same.toml"
    same.write_text(text)  # also named "a"
    with pytest.raises(ValueError, match="also that of"):
        T.load_templates([root / "a.toml", same])
    column = tmp_path / "column.toml"
    column.write_text(text.replace('name = "field_01"', 'name = "status"', 1))
    with pytest.raises(ValueError, match="column.toml"):
        T.load_templates([column])
    formula = tmp_path / "formula.toml"
    formula.write_text(text.replace('name = "field_01"', 'name = "=total"', 1))
    with pytest.raises(ValueError, match=r"formula.toml: the field name '=total' cannot head a column"):
        T.load_templates([formula])
