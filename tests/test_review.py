"""The review page end to end: a real run on the fixture tiles with injected noise, the real server,
a real headless Chromium driven by Selenium, then ``train.py --corrections`` on what was decided.

``HISTO_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_review.py`` also writes the
screenshots the docs show (``docs/img/review.png``, ``docs/img/review_changes.png``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import requests

from service.local_server import free_port
from training import review, train
from training.corrections import UNUSABLE

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "kather"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=1280,860"
).split()
KEYS = ["a", "k", "1", "u", "a", "2", "a", "k", "8", "a"]  # ten suspects, one key each
# small and fast; no temperature fit (the cross-slide one is most of a run's time on 81 tiles)
QUICK = ["--no-export", "--knn-k", "5", "--epochs", "5", "--calibration", "none", "--holdout-slides", "CRC-Prim-HE-07"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("review")


@pytest.fixture(scope="module")
def run_dir(workdir) -> Path:
    """A real train.py run on the fixture tiles, 40 % of the labels flipped."""
    out = workdir / "noisy"
    train.main(
        ["--data", str(FIXTURES), "--out", str(out), "--inject-noise", "uniform:0.4", "--cache-dir", str(workdir / "c")]
        + QUICK
    )
    return out


def _suspects(run: Path) -> list[dict]:
    with open(run / "suspects.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _corrections(run: Path) -> list[dict]:
    with open(run / "corrections.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _serve(run: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.review", str(run), "--port", str(port), "--who", "alice", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"review server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if requests.get(f"{url}/api/state", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    _stop(proc)
    raise RuntimeError("review server not ready after 60 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(run_dir) -> Iterator[str]:
    proc, url = _serve(run_dir)
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `bash setup.sh --dev` (it installs chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="histo-review-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, what: str, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=what)


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), f"{url} loads")


def _set_reviewer(driver, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, "who")
    field.clear()
    field.send_keys(name, Keys.ENTER)  # Enter hands the keyboard back to the page


def _press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def _screenshot(driver, name: str, tmp: Path) -> Path:
    """Into docs/img when asked to update them, else beside the test's files; a real PNG either way."""
    folder = ROOT / "docs" / "img" if os.environ.get("HISTO_UPDATE_SCREENSHOTS") == "1" else tmp
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


@pytest.fixture(scope="module")
def reviewed(run_dir, server, browser, workdir) -> dict:
    """Alice reviews ten suspects by keyboard, reloads the page, Bob revises one and accepts one by click."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    seen: dict = {}
    _open(browser, server)
    seen["first_rank"] = _text(browser, "rank")
    _set_reviewer(browser, "alice")
    started = time.monotonic()
    _press(browser, *KEYS)
    _wait(browser, lambda d: _text(d, "progress").startswith("reviewed 10 /"), "ten decisions saved")
    seen["keyboard_seconds"] = time.monotonic() - started
    seen["after_keys"] = _corrections(run_dir)

    browser.refresh()
    _open(browser, server)
    seen["resumed_rank"], seen["resumed_progress"] = _text(browser, "rank"), _text(browser, "progress")
    _screenshot(browser, "review.png", workdir)

    _set_reviewer(browser, "bob")
    _press(browser, Keys.ARROW_LEFT)  # back to the tenth tile
    _wait(browser, lambda d: _text(d, "rank") == "10", "moved back to rank 10")
    _press(browser, "k")
    _wait(browser, lambda d: _text(d, "rank") == "11", "moved on to the first undecided tile")
    browser.find_element(By.CSS_SELECTOR, "button[data-action=accept]").click()
    _wait(browser, lambda d: _text(d, "progress").startswith("reviewed 11 /"), "the click saved")

    given = _suspects(run_dir)[11]["given_label"]
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "filter-given")).select_by_value(given)
    _wait(browser, lambda d: "this filter" in _text(d, "progress"), "filter applied")
    seen["filtered_given"], seen["filter_label"] = _text(browser, "given"), given
    position, _, of = _text(browser, "position").partition(" of ")
    if int(position) < int(of.split()[0]):  # the keys work again straight after a filter is picked
        _press(browser, Keys.ARROW_RIGHT)
        _wait(browser, lambda d: _text(d, "position").startswith(f"{int(position) + 1} of"), "moved on in the filter")
    seen["final"] = _corrections(run_dir)
    return seen


def test_keyboard_review_is_saved_at_once_and_resumes(run_dir, reviewed):
    suspects = _suspects(run_dir)
    classes = json.loads((run_dir / "report.json").read_text())["classes"]
    assert reviewed["first_rank"] == "1"  # most suspicious first
    rows = reviewed["after_keys"]
    assert [r["path"] for r in rows] == [s["path"] for s in suspects[:10]]
    for key, row, suspect in zip(KEYS, rows, suspects, strict=False):
        expected = {
            "a": suspect["suggested_label"],
            "k": suspect["given_label"],
            "u": UNUSABLE,
        }.get(key) or classes[int(key) - 1]
        assert row["decided"] == expected, (key, row)
        assert row["given"] == suspect["given_label"] and row["suggested"] == suspect["suggested_label"]
        assert row["who"] == "alice"
        assert datetime.fromisoformat(row["when"]).tzinfo is not None
    assert reviewed["resumed_rank"] == "11"  # the first undecided tile
    assert reviewed["resumed_progress"].startswith(f"reviewed 10 / {len(suspects)}")
    assert reviewed["keyboard_seconds"] < 30


def test_reviewers_in_turn_and_by_click(run_dir, reviewed):
    suspects = _suspects(run_dir)
    final = {r["path"]: r for r in reviewed["final"]}
    assert len(final) == 11
    revised = final[suspects[9]["path"]]
    assert revised["who"] == "bob" and revised["decided"] == suspects[9]["given_label"]
    clicked = final[suspects[10]["path"]]
    assert clicked["who"] == "bob" and clicked["decided"] == suspects[10]["suggested_label"]
    assert sum(r["who"] == "alice" for r in final.values()) == 9
    assert reviewed["filtered_given"] == reviewed["filter_label"]


def test_retraining_uses_the_corrections_and_the_changes_page_shows_them(run_dir, reviewed, browser, workdir):
    corrections = run_dir / "corrections.csv"
    decided = {r["path"]: r for r in _corrections(run_dir)}
    out = workdir / "corrected"
    report = train.main(
        ["--data", str(FIXTURES), "--out", str(out), "--inject-noise", "uniform:0.4", "--cache-dir", str(workdir / "c")]
        + QUICK
        + ["--corrections", str(corrections)]
    )
    applied = report["corrections"]
    relabelled = sum(r["decided"] not in (r["given"], UNUSABLE) for r in decided.values())
    unusable = sum(r["decided"] == UNUSABLE for r in decided.values())
    assert applied["relabelled"] == relabelled and applied["unusable_dropped"] == unusable == 1
    assert applied["confirmed"] == len(decided) - relabelled - unusable
    assert applied["files"] == [
        {"file": str(corrections), "sha256": hashlib.sha256(corrections.read_bytes()).hexdigest(), "rows": 11}
    ]
    after = {r["path"]: r for r in _suspects(out)}
    assert len(after) == len(_suspects(run_dir)) - 1 == report["data"]["n"]
    for path, row in decided.items():
        if row["decided"] == UNUSABLE:
            assert path not in after
        else:
            assert after[path]["given_label"] == row["decided"]  # the label the retrained run trained on

    proc, url = _serve(run_dir, "--retrained", str(out))
    try:
        changes = requests.get(f"{url}/api/changes", timeout=10).json()
        _open(browser, f"{url}/changes")
        table = _text(browser, "metrics")
        loaded = "return [...document.querySelectorAll('#changed img')].slice(0, 12).every(i => i.naturalWidth > 0)"
        _wait(browser, lambda d: d.execute_script(loaded), "the first changed tiles show")
        _screenshot(browser, "review_changes.png", workdir)
    finally:
        _stop(proc)
    assert "held-out test accuracy" in table and "labelled tiles" in table
    assert changes["dropped"] == 1 and changes["corrections"]["relabelled"] == relabelled
    before = {s["path"]: s["suggested_label"] for s in _suspects(run_dir)}
    expected = sorted(
        i
        for i, s in enumerate(_suspects(run_dir))
        if s["path"] in after and after[s["path"]]["suggested_label"] != before[s["path"]]
    )
    assert sorted(c["id"] for c in changes["changed"]) == expected


def test_bad_requests_get_4xx_with_a_message_and_change_nothing(run_dir, server, reviewed):
    corrections = (run_dir / "corrections.csv").read_bytes()
    n = len(_suspects(run_dir))
    cases = [
        ("get", "/api/tiles/99999/image", None, 404, "unknown tile id '99999'"),
        ("get", "/api/tiles/..%2F..%2Fetc%2Fpasswd/image", None, 404, "unknown tile id '../../etc/passwd'"),
        ("get", "/api/tiles/../../etc/passwd/image", None, 404, "no such page"),
        ("get", "/static/..%2Freview.py", None, 404, "no such page"),
        (
            "post",
            "/api/decisions",
            {"tile": "../../etc/passwd", "decided": "01_TUMOR", "who": "eve"},
            404,
            "unknown tile",
        ),
        ("post", "/api/decisions", {"tile": n, "decided": "01_TUMOR", "who": "eve"}, 404, f"0 to {n - 1}"),
        ("post", "/api/decisions", {"tile": 3, "decided": "09_BONE", "who": "eve"}, 422, "unknown class '09_BONE'"),
        ("post", "/api/decisions", {"tile": 3, "decided": "01_TUMOR"}, 422, "who: Field required"),
        ("post", "/api/decisions", {"tile": 3, "decided": "01_TUMOR", "who": "eve", "x": 1}, 422, "x: Extra inputs"),
        ("post", "/api/decisions", b'{"tile": 3, "decided": ', 400, "Invalid JSON"),
        ("post", "/api/decisions", [1, 2], 422, "malformed decision"),
        ("delete", "/api/decisions/..%2Fetc", None, 404, "unknown tile id"),
        ("get", "/api/tiles/0/context", None, 404, "a patch file, not a tile of a slide"),
    ]
    for method, path, body, status, message in cases:
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {}
        if body is not None and not isinstance(body, bytes):
            kwargs = {"json": body}
        response = requests.request(method, server + path, timeout=10, **kwargs)
        assert response.status_code == status, (path, body, response.text)
        assert message in response.json()["error"], (path, body, response.text)
    form = requests.post(server + "/api/decisions", data={"tile": 3}, timeout=10)  # a form: what other sites can send
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    rebound = requests.get(server + "/api/state", headers={"Host": "attacker.example"}, timeout=10)
    assert rebound.status_code == 400
    assert (run_dir / "corrections.csv").read_bytes() == corrections
    assert requests.get(server + "/api/state", timeout=10).status_code == 200  # still up


def test_cli_errors_name_the_file(tmp_path, capsys):
    assert review.main([str(tmp_path)]) == 2
    assert f"{tmp_path.resolve()}/suspects.csv: missing" in capsys.readouterr().err


def test_train_rejects_corrections_it_cannot_apply(run_dir, tmp_path, capsys):
    bad_class = tmp_path / "bad_class.csv"
    path = _suspects(run_dir)[0]["path"]
    bad_class.write_text(f"path,given,decided\n{path},01_TUMOR,09_BONE\n")
    other = tmp_path / "other.csv"
    other.write_text("path,given,decided\nsomewhere/else.png,01_TUMOR,02_STROMA\n")
    for file, message in ((bad_class, f"{bad_class}:2: decided '09_BONE'"), (other, "none of the 1 corrected tiles")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--data", str(FIXTURES), "--out", str(tmp_path / "out"), "--corrections", str(file), *QUICK])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_slide_tiles_show_a_crop_with_context(tmp_path, browser):
    """Annotation-based runs name tiles "<slide>/x<X>_y<Y>" (train.py --slides): the page reads them
    from the slide, and shows the tile framed among its neighbours."""
    import numpy as np
    import openslide
    from PIL import Image

    slide = ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
    run = tmp_path / "slide_run"
    run.mkdir()
    coords = [(600, 900), (900, 1200), (1200, 300)]  # a 300-pixel grid, as the slide job cuts it
    rows = "".join(
        f"{i + 1},{slide.name}/x{x}_y{y},tissue,other,{0.9 - i / 10:.4f}\n" for i, (x, y) in enumerate(coords)
    )
    (run / "suspects.csv").write_text("rank,path,given_label,suggested_label,score\n" + rows)
    (run / "report.json").write_text(
        json.dumps({"classes": ["other", "tissue"], "suspects": {"data_root": str(slide.parent)}})
    )
    proc, url = _serve(run)
    try:
        state = requests.get(f"{url}/api/state", timeout=10).json()
        tile = requests.get(f"{url}/api/tiles/1/image", timeout=30)
        context = requests.get(f"{url}/api/tiles/1/context", timeout=30)
        _open(browser, url)
        script = "const c = document.getElementById('context'); return [c.closest('figure').hidden, c.naturalWidth]"
        _wait(browser, lambda d: d.execute_script(script)[1] > 0, "the context crop loads")
        shown = browser.execute_script(script)
    finally:
        _stop(proc)
    assert [s["context"] for s in state["suspects"]] == [True, True, True]
    with openslide.OpenSlide(str(slide)) as handle:
        expected = np.asarray(handle.read_region(coords[1], 0, (300, 300)).convert("RGB"))
    got = np.asarray(Image.open(io.BytesIO(tile.content)))
    np.testing.assert_array_equal(got, expected)
    crop = Image.open(io.BytesIO(context.content))
    assert crop.size == (480, 480)
    assert max(crop.getpixel((240, 160))) < 60  # the frame around the tile in the middle
    assert shown == [False, 480]
