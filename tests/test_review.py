"""`hwr-batch review`: the real CLI serving a real run folder over HTTP on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from hwr_batch.synth import write_forms


@pytest.fixture
def run_folder(tmp_path, mnist_test_small):
    """A `process` run over two generated pages (with flagged fields), one per test: saves must not leak."""
    root = tmp_path / "run"
    write_forms(root / "in", 2, seed=11, digits=mnist_test_small, formats=("png",))
    done = subprocess.run([sys.executable, "-m", "hwr_batch", "process", str(root / "in"), "-o", str(root / "out")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return root / "out"


@contextmanager
def review_server(run_folder, *args: str):
    """The review server as a subprocess; yields its URL (with token); always terminated."""
    proc = subprocess.Popen([sys.executable, "-m", "hwr_batch", "review", str(run_folder), "--no-browser", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def server(run_folder):
    with review_server(run_folder) as url:
        yield url


def process(run_folder) -> None:
    done = subprocess.run([sys.executable, "-m", "hwr_batch", "process", str(run_folder.parent / "in"), "-o",
                           str(run_folder)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def list_fields(url: str) -> list[dict]:
    base, token = url.split("/?token=")
    status, body = fetch(f"{base}/api/fields?offset=0&limit=200&token={token}")
    assert status == 200
    return json.loads(body)["fields"]


def save(url: str, field: dict, digits: str, status: str) -> int:
    base, token = url.split("/?token=")
    return fetch(f"{base}/api/review?token={token}", {"index": field["index"], "digits": digits, "status": status})[0]


def truth_digits(field: dict) -> str | None:
    """The true digits of a field of a generated page (None: it is no field of the page's truth)."""
    from hwr_batch.layout import box_iou

    truth = json.loads(Path(field["file"]).with_suffix(".json").read_text())["fields"]
    iou, text = max(((box_iou(t["bbox"], field["box"]), t["text"]) for t in truth), default=(0.0, None))
    return text if iou >= 0.5 else None


def fetch(url: str, data: dict | None = None) -> tuple[int, bytes]:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_requests_without_the_token_are_refused(server):
    base, token = server.split("/?token=")
    assert fetch(f"{base}/api/fields")[0] == 403
    assert fetch(f"{base}/?token=wrong{token}")[0] == 403
    assert fetch(server)[0] == 200


def test_fields_page_crop_and_save_reach_corrections_csv(server, run_folder):
    base, token = server.split("/?token=")
    status, body = fetch(f"{base}/api/fields?offset=0&limit=1&token={token}")
    listing = json.loads(body)
    assert status == 200 and len(listing["fields"]) == 1 and listing["total"] >= 1
    field = listing["fields"][0]
    assert field["flagged"] and field["flag_reason"]

    status, png = fetch(f"{base}/api/crop/{field['index']}?token={token}")
    assert status == 200 and png.startswith(b"\x89PNG")
    with open(run_folder / "fields.csv", newline="") as f:
        table_rows = sum(1 for _ in csv.DictReader(f))
    assert fetch(f"{base}/api/crop/{table_rows}?token={token}")[0] == 404  # outside the table
    assert fetch(f"{base}/api/crop/..%2F..%2Fetc%2Fpasswd?token={token}")[0] == 404  # never a path

    correction = {"index": field["index"], "digits": "12345", "status": "corrected"}
    assert fetch(f"{base}/api/review?token={token}", correction)[0] == 200
    assert fetch(f"{base}/api/review?token={token}", {**correction, "status": "maybe"})[0] == 400
    with open(run_folder / "corrections.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["page"], r["field"], r["digits"], r["status"]) for r in rows] == [
        (field["file"], str(field["page"]), str(field["field"]), "12345", "corrected")
    ]
    assert rows[0]["reviewed_at"]

    from hwr_batch.learn import read_corrections

    (learned,) = read_corrections(run_folder / "corrections.csv")
    assert (learned.page, learned.field, learned.digits) == (field["page"], field["field"], "12345")


def test_keyboard_review_in_a_real_browser_saves_and_survives_reload(server, run_folder, tmp_path):
    """Headless Debian Chromium: two typed corrections and one accepted reading, then a reload."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian chromium and chromium-driver (`.ci/run` installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 30)
        box = driver.find_element(By.ID, "digits")
        pos = driver.find_element(By.ID, "pos")
        wait.until(lambda d: pos.text.startswith("field 1 of"))
        view = driver.find_element(By.ID, "view")
        wait.until(lambda d: view.get_attribute("data-shown"))
        read_first = driver.execute_script("return current().digits")
        # Each digit read is drawn under its box, with its confidence: as many marks as digits, in order,
        # each starting where its digit's box starts on the crop.
        read = driver.execute_script("return current().digits_read")
        marks = driver.find_elements(By.CSS_SELECTOR, "#marks .read")
        assert [m.text.split() for m in marks] == [[d["digit"], f"{float(d['confidence']):.2f}"] for d in read]
        assert "".join(d["digit"] for d in read) == read_first
        crop = driver.find_element(By.ID, "crop")
        scale = driver.execute_script("return arguments[0].clientWidth / arguments[0].naturalWidth", crop)
        for mark, digit in zip(marks, read, strict=True):
            assert abs(mark.rect["x"] - crop.rect["x"] - digit["x"] * scale) < 2
            assert mark.rect["y"] > crop.rect["y"] + crop.rect["height"] - 1  # under the crop, not over the page
        for number, typed in ((2, "111"), (3, "222")):
            if number == 2:
                box.send_keys(Keys.ENTER)  # accept the first reading
            wait.until(lambda d, n=number: pos.text.startswith(f"field {n} of"))
            box.send_keys(typed, Keys.ENTER)
        wait.until(lambda d: pos.text.startswith("field 4 of") or "All fields" in d.page_source)
        driver.refresh()
        wait.until(lambda d: d.find_element(By.ID, "pos").text.startswith("field 1 of"))
        assert "saved: accepted" in driver.find_element(By.ID, "info").text
    finally:
        driver.quit()
    with open(run_folder / "corrections.csv", newline="") as f:
        saved = sorted((r["digits"], r["status"]) for r in csv.DictReader(f))
    assert saved == sorted([(read_first, "accepted"), ("111", "corrected"), ("222", "corrected")])


def test_a_rerun_shows_reviews_in_the_tables_until_the_scan_changes(run_folder):
    """Two reviews saved through the server (while it runs, process reruns); a changed scan drops its review."""
    from hwr_batch.state import open_state, read_corrections

    with review_server(run_folder, "--all") as url:
        fields = list_fields(url)
        first = next(f for f in fields if f["file"].endswith("page_0001.png"))
        second = next(f for f in fields if f["file"].endswith("page_0002.png"))
        assert save(url, first, "12345", "corrected") == 200
        assert save(url, second, "", "unreadable") == 200
        saved = {(f["index"], f["review_status"], f["reviewed_digits"]) for f in list_fields(url)} - {
            (f["index"], "", "") for f in fields}
        assert saved == {(first["index"], "corrected", "12345"), (second["index"], "unreadable", "")}  # no rerun
        process(run_folder)  # nothing changed: the tables are written again, with the reviews
        rows = read_csv(run_folder / "fields.csv")
        reviewed = {(r["file"], r["page"], r["field"], r["reviewed_digits"], r["review_status"]) for r in rows
                    if r["review_status"]}
        assert reviewed == {
            (first["file"], str(first["page"]), str(first["field"]), "12345", "corrected"),
            (second["file"], str(second["page"]), str(second["field"]), "", "unreadable"),
        }

        import cv2

        scan = Path(first["file"])
        image = cv2.imread(str(scan), cv2.IMREAD_GRAYSCALE)
        image[0, 0] = 255 - image[0, 0]  # other content, the same fields
        cv2.imwrite(str(scan), image)
        other = next(f for f in fields if f["file"] == first["file"] and f["index"] != first["index"])
        assert save(url, other, "1", "corrected") == 409  # the scan is no longer what the table was read from
    process(run_folder)
    rows = read_csv(run_folder / "fields.csv")
    assert {(r["file"], r["review_status"]) for r in rows if r["review_status"]} == {(second["file"], "unreadable")}
    assert any(r["file"] == first["file"] and r["field"] == str(first["field"]) for r in rows)  # read again
    assert [(r["file"], r["status"]) for r in read_csv(run_folder / "corrections.csv")] == [(second["file"], "unreadable")]
    with open_state(run_folder / ".hwr-batch" / "state.sqlite3") as db:  # kept, not shown
        assert sorted(c.status for c in read_corrections(db)) == ["corrected", "unreadable"]


def test_learn_reads_the_corrections_the_review_server_wrote(server, run_folder, cli, tmp_path):
    pytest.importorskip("tensorflow")
    reviewed = 0
    for field in list_fields(server):
        truth = truth_digits(field)
        if truth is not None:
            assert save(server, field, truth, "accepted" if truth == field["digits"] else "corrected") == 200
            reviewed += 1
    assert reviewed >= 3
    result = cli("learn", run_folder, "--out", tmp_path / "model", "--epochs", "1", "--holdout", "0.3")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "model" / "learn.json").read_text())
    assert record["corrections_rows"] == reviewed == record["fields_read"]
