"""`hwr-batch review`: the real CLI serving a real run folder over HTTP on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

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


@pytest.fixture
def server(run_folder):
    """The review server as a subprocess; yields its URL (with token); always terminated."""
    proc = subprocess.Popen([sys.executable, "-m", "hwr_batch", "review", str(run_folder), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
        read_first = driver.execute_script("return current().digits")
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
