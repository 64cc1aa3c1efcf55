"""Hostile and careless clients against a real `bentoml serve` (issue 25): malformed multipart,
stalled bodies, slide uploads, task ids after a restart, EXIF orientation."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image

from service.images import load_rgb
from service.local_server import start_server, stop_server
from service.runtime import Runtime
from service.slides import expand_inputs
from service.wsi import classify_slide, plan_slides, run_job
from tests.slide_factory import tissue_image, write_pyramid

ROOT = Path(__file__).resolve().parent.parent
TILES = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))
SLIDE = ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
IDLE_S = 2  # the server's HISTO_BODY_IDLE_S: a stalled body is refused after this long


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    """One server with small limits: 16 request slots for the whole service, a 2 s idle limit."""
    tmp = tmp_path_factory.mktemp("hardening")
    env = {
        "HISTO_MAX_IMAGES": "8",
        "HISTO_MAX_BODY_MB": "2",
        "HISTO_MAX_SLIDE_MB": "3",
        "HISTO_BODY_IDLE_S": str(IDLE_S),
        "HISTO_BODY_TIMEOUT_S": "20",
        "HISTO_MAX_CONCURRENCY": "16",
        "HISTO_MAX_LATENCY_MS": "2000",
        "HISTO_DEVICE": "cpu",
        "HISTO_UPLOAD_DIR": str(tmp / "uploads"),
        "BENTOML_RESULT_STORE": str(tmp / "tasks.db"),  # not the shared ~/bentoml one
    }
    proc, url = start_server(env, log_path=tmp / "serve.log")
    state = {"proc": proc, "url": url, "env": env, "tmp": tmp}
    yield state
    stop_server(state["proc"])


def _raw_post(url: str, body: bytes, content_type: str, path: str = "/classify") -> requests.Response:
    return requests.post(f"{url}{path}", data=body, headers={"Content-Type": content_type}, timeout=60)


def _part(name: str | None, data: bytes, filename: str | bytes | None = None, boundary: bytes = b"b0undary") -> bytes:
    disposition = b"form-data"
    if name is not None:
        disposition += b'; name="' + name.encode() + b'"'
    if filename is not None:
        disposition += b'; filename="' + (filename if isinstance(filename, bytes) else filename.encode()) + b'"'
    return b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"


def _form(*parts: bytes, boundary: bytes = b"b0undary") -> bytes:
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


MP = "multipart/form-data; boundary=b0undary"


def _malformed() -> dict[str, tuple[bytes, str, int, str]]:
    """Each case: body, Content-Type, expected status, a phrase of the detail."""
    tile = TILES[0].read_bytes()
    good = _form(_part("images", tile, "a.webp"))
    return {
        # the seven that BentoML answered with 500
        "no boundary parameter": (good, "multipart/form-data", 400, "boundary"),
        "boundary that does not match the body": (good, "multipart/form-data; boundary=other", 400, "boundary"),
        "file name over 255 bytes": (_form(_part("images", tile, "a" * 300 + ".webp")), MP, 422, "limit is 200"),
        "file name of 150 two-byte characters": (_form(_part("images", tile, "é" * 150 + ".webp")), MP, 422, "bytes"),
        "text value in the images field": (_form(_part("images", b"http://example.org/x.png")), MP, 422, "text"),
        "a file and a text value under images": (
            _form(_part("images", tile, "a.webp"), _part("images", b"hello")),
            MP,
            422,
            "text value",
        ),
        "5000 parts": (_form(*[_part("images", b"x", f"{i}.png") for i in range(5000)]), MP, 413, "limit is 8"),
        # more framing and naming mistakes
        "body cut before the closing boundary": (good[:-12], MP, 400, "closing boundary"),
        "part without a name": (_form(_part(None, tile, "a.webp")), MP, 422, "no name"),
        "NUL byte in the file name": (_form(_part("images", tile, b"a\x00b.webp")), MP, 422, "control"),
        "empty multipart body": (b"", MP, 400, "boundary"),
        "JSON instead of multipart": (b'{"images": []}', "application/json", 415, "multipart"),
        # already covered before the guard learnt framing, kept here so they stay 4xx
        "wrong field name": (_form(_part("image", tile, "a.webp")), MP, 422, "'images'"),
        "body too large": (_form(_part("images", b"\0" * (3 * 1024 * 1024), "big.bin")), MP, 413, "byte limit"),
        "nine images": (_form(*[_part("images", tile, f"{i}.webp") for i in range(9)]), MP, 413, "limit is 8"),
    }


def _alive(url: str) -> None:
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    ok = requests.post(f"{url}/classify", files=[("images", ("t.webp", TILES[0].read_bytes()))], timeout=60)
    assert ok.status_code == 200, ok.text


def test_every_malformed_request_gets_a_4xx_error_body(server):
    url = server["url"]
    answers = {case: _raw_post(url, body, ctype) for case, (body, ctype, _, _) in _malformed().items()}
    for case, (_, _, status, phrase) in _malformed().items():
        response = answers[case]
        assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
        body = response.json()
        assert set(body) == {"error", "detail", "index"}, case
        assert phrase in body["detail"], f"{case}: {body['detail']}"
    # a long file name that fits is still accepted, and answered under the client's name
    fits = "n" * 190 + ".webp"
    response = _raw_post(url, _form(_part("images", TILES[0].read_bytes(), fits)), MP)
    assert response.status_code == 200 and response.json()["results"][0]["name"] == fits
    _alive(url)


def _stalled_socket(url: str, path: str = "/classify") -> socket.socket:
    """Headers and the first part of a 200 kB body, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {MP}\r\nContent-Length: 200000\r\n\r\n").encode()
    sock.sendall(head + b'--b0undary\r\nContent-Disposition: form-data; name="images"; filename="s.png"\r\n\r\n')
    return sock


def test_stalled_uploads_hold_no_slot_and_are_cut_off(server):
    """40 stalled bodies against 16 slots: BentoML counted them from the first byte and refused
    everyone else with 429 until its 120 s timeout; now honest clients are served meanwhile and each
    stalled client gets a 408 after the idle limit."""
    url = server["url"]
    stalled = [_stalled_socket(url) for _ in range(40)]
    try:
        time.sleep(0.5)
        started = time.monotonic()
        tiles = TILES[:16]
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda t: (
                        requests.post(
                            f"{url}/classify", files=[("images", (t.name, t.read_bytes()))], timeout=60
                        ).status_code
                    ),
                    tiles,
                )
            )
        assert answers == [200] * len(tiles)
        for sock in stalled:
            sock.settimeout(max(1.0, IDLE_S + 15 - (time.monotonic() - started)))
            reply = b""
            while chunk := sock.recv(4096):  # the server closes the connection after its answer
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"HISTO_BODY_IDLE_S" in reply
    finally:
        for sock in stalled:
            sock.close()
    _alive(url)


def _slide_post(url: str, files: list, data: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/classify_slide/submit", files=files, data=data, timeout=60)


def test_slide_submit_validates_before_accepting(server):
    url, uploads = server["url"], server["tmp"] / "uploads"
    slide = SLIDE.read_bytes()
    cases = {
        "slide in the wrong field": (_slide_post(url, [("image", (SLIDE.name, slide))]), 422, "'slide'"),
        "slide as a text value": (_slide_post(url, [("slide", (None, "CMU-1.svs"))]), 422, "text value"),
        "not a slide file name": (_slide_post(url, [("slide", ("notes.txt", b"hello"))]), 415, "suffix"),
        "mpp not a number": (_slide_post(url, [("slide", (SLIDE.name, slide))], {"mpp": "fine"}), 422, "number"),
        "negative mpp": (_slide_post(url, [("slide", (SLIDE.name, slide))], {"mpp": "-0.5"}), 422, "positive"),
        "two slides": (_slide_post(url, [("slide", ("a.svs", b"x")), ("slide", ("b.svs", b"y"))]), 413, "parts"),
        "empty slide": (_slide_post(url, [("slide", ("a.svs", b""))]), 400, "empty"),
        "over HISTO_MAX_SLIDE_MB": (
            _slide_post(url, [("slide", ("big.svs", b"\0" * (4 * 1024 * 1024)))]),
            413,
            "HISTO_MAX_SLIDE_MB",
        ),
        "retry": (requests.post(f"{url}/classify_slide/retry", params={"task_id": "0" * 32}, timeout=10), 410, "again"),
    }
    for case, (response, status, phrase) in cases.items():
        assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
        body = response.json()
        assert set(body) == {"error", "detail", "index"} and phrase in body["detail"], f"{case}: {body}"
    assert not list(uploads.glob("*")) if uploads.exists() else True  # refused uploads leave nothing behind


def _finish(url: str, task_id: str, timeout: float = 120) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/classify_slide/get", params={"task_id": task_id}, timeout=30)
        if response.status_code != 400 or "not completed" not in response.text:
            return response
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} not finished in {timeout} s")


def test_slide_upload_goes_to_disk_and_is_removed_when_its_task_ends(server):
    url, tmp = server["url"], server["tmp"]
    submitted = _slide_post(url, [("slide", (SLIDE.name, SLIDE.read_bytes()))], {"mpp": "0.499"})
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    response = _finish(url, task_id)
    assert response.status_code == 200, response.text
    summary = response.json()["summary"]
    assert summary["slide"] == SLIDE.name and summary["tiles"] > 50 and summary["mpp_source"] == "--mpp"
    assert list((tmp / "uploads").glob("*")) == []  # the upload went with its task
    # BentoML's task database holds the request BentoML saw: the token, not the 1.9 MB slide
    store = sum(p.stat().st_size for p in tmp.glob("tasks.db*"))
    assert store < SLIDE.stat().st_size / 2, store
    server["completed_task"] = task_id
    # a slide that OpenSlide cannot open passes the form checks and fails as a task, cleaned up too
    bad = _slide_post(url, [("slide", ("notes.svs", b"not a slide at all"))]).json()["task_id"]
    failed = _finish(url, bad)
    assert failed.status_code >= 400 and "cannot open with OpenSlide" in failed.text and "/tmp" not in failed.text
    assert list((tmp / "uploads").glob("*")) == []


def _rotated_jpeg(tile: Path) -> tuple[bytes, np.ndarray]:
    """A JPEG as a camera held sideways writes it: pixels stored turned, EXIF orientation 6
    ("rotate 90° clockwise to display"). Returns it and the pixels a viewer displays."""
    stored = Image.open(tile).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return buffer.getvalue(), np.rot90(decoded, k=-1)  # what the orientation tag says to show


def test_exif_orientation_is_applied_before_classification(server):
    jpeg, displayed = _rotated_jpeg(TILES[5])
    assert Image.open(io.BytesIO(jpeg)).getexif()[0x0112] == 6
    png = io.BytesIO()
    Image.fromarray(displayed).save(png, format="PNG")
    np.testing.assert_array_equal(load_rgb(jpeg, "r.jpg", 224, 75), load_rgb(png.getvalue(), "shown.png", 224, 75))
    unturned = io.BytesIO()
    Image.fromarray(np.rot90(displayed, k=1)).save(unturned, format="PNG")  # the stored pixels, tag ignored
    files = [
        ("images", ("r.jpg", jpeg)),
        ("images", ("shown.png", png.getvalue())),
        ("images", ("raw.png", unturned.getvalue())),
    ]
    results = requests.post(f"{server['url']}/classify", files=files, timeout=60).json()["results"]
    probs = [np.array(list(r["probabilities"].values())) for r in results]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)  # classified as displayed
    assert np.abs(probs[0] - probs[2]).max() > 1e-3  # and orientation matters to the model


def test_shutdown_does_not_wait_for_stalled_bodies_and_lost_tasks_say_so(server):
    """Runs last: stops the module's server with stalled uploads open (and some that their clients
    abandoned: BentoML's timeout middleware kept those waiting for the whole traffic timeout until
    the guard answered them too), then starts a new one on the same task database and asks for a
    task the old one completed."""
    url, proc = server["url"], server["proc"]
    stalled = [_stalled_socket(url) for _ in range(20)]
    stalled += [_stalled_socket(url, "/classify_slide/submit") for _ in range(5)]
    gone = [_stalled_socket(url) for _ in range(10)]  # clients that give up mid-body
    time.sleep(0.5)
    for sock in gone:
        sock.close()
    time.sleep(0.5)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    shutdown_s = time.monotonic() - started
    for sock in stalled:
        sock.close()
    assert shutdown_s < IDLE_S + 15, f"shutdown took {shutdown_s:.1f} s"
    server["proc"], url = start_server(server["env"], log_path=server["tmp"] / "serve2.log")
    server["url"] = url
    task_id = server.get("completed_task", "f" * 32)
    for endpoint in ("get", "status"):
        response = requests.get(f"{url}/classify_slide/{endpoint}", params={"task_id": task_id}, timeout=10)
        assert response.status_code == 404
        body = response.json()
        assert body["error"] == "task_not_found" and "lost when it restarts" in body["detail"]


# --- the slide job ---------------------------------------------------------------------------------

BOX = (300, 450, 1050, 1350)  # 30 tissue tiles of 150 px at 0.495 µm/px
SIDE = 4096  # the tissue mask (at most 2048 px a side) then reads level 1, and tiles read level 0
TIFF_TILE = 256  # the generated pyramid's own tile size


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(ROOT / "models" / "default", device="cpu")


def _corrupt_tiff_tiles(path: Path, page: int, tiles: list[int]) -> None:
    """Overwrite compressed tiles of one TIFF page with junk: zlib then fails on exactly those."""
    with tifffile.TiffFile(path) as tif:
        spans = [(tif.pages[page].dataoffsets[k], tif.pages[page].databytecounts[k]) for k in tiles]
    with open(path, "r+b") as handle:
        for offset, count in spans:
            handle.seek(offset)
            handle.write(b"\xff" * count)


@pytest.fixture(scope="module")
def slide_pair(tmp_path_factory) -> dict[str, Path]:
    """The same generated slide intact and with one level-0 TIFF tile (512-768, 512-768) corrupt,
    which only tile reads touch."""
    d = tmp_path_factory.mktemp("slides")
    image = tissue_image(SIDE, SIDE, [BOX])
    (d / "good").mkdir(), (d / "bad").mkdir()
    good, bad = (write_pyramid(d / kind / "slide.tiff", image, 0.495) for kind in ("good", "bad"))
    _corrupt_tiff_tiles(bad, 0, [2 * (SIDE // TIFF_TILE) + 2])
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def reference(slide_pair, runtime, tmp_path_factory) -> tuple[dict, Path]:
    """The intact slide's summary and output folder, classified once for the tests below."""
    out = tmp_path_factory.mktemp("reference")
    return classify_slide(slide_pair["good"], runtime, out, batch_size=8, workers=2, progress=False), out


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path) as handle:
        return {(r["x"], r["y"]): r for r in csv.DictReader(handle)}


@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_an_unreadable_tile_is_recorded_and_the_rest_of_the_slide_completes(
    slide_pair, reference, runtime, tmp_path, readers
):
    reference, reference_dir = reference
    if readers == "threads":
        failures = run_job([slide_pair["bad"]], runtime, tmp_path / "out", progress=False, batch_size=8, workers=2)
    else:
        failures = run_job(
            [slide_pair["bad"]], runtime, tmp_path / "out", progress=False, batch_size=8, reader_processes=2
        )
    assert failures == []
    summary = json.loads((tmp_path / "out" / "slide" / "summary.json").read_text())
    # the grid tiles whose read overlaps the corrupt TIFF tile, and no others
    side = reference["tile_side_level0_px"]
    good_rows = _rows(reference_dir / "tiles.csv")
    expected = sorted(
        [int(x), int(y)]
        for x, y in good_rows
        if int(x) < 768 and int(x) + side > 512 and int(y) < 768 and int(y) + side > 512
    )
    assert expected and summary["unreadable_tiles"] == len(expected)
    assert sorted(summary["unreadable_tile_coords"]) == expected
    assert summary["tiles"] == reference["tiles"] - len(expected) and summary["readers"] == readers
    rows = _rows(tmp_path / "out" / "slide" / "tiles.csv")
    assert set(rows) == set(good_rows) - {(str(x), str(y)) for x, y in expected}
    for key, row in rows.items():  # every readable tile is classified as in the intact slide
        assert row == good_rows[key]
    geo = json.loads((tmp_path / "out" / "slide" / "predictions.geojson").read_text())
    assert len(geo["features"]) == summary["tiles"]
    assert sorted(p.name for p in (tmp_path / "out" / "slide").iterdir()) == [
        "heatmap.png",
        "predictions.geojson",
        "summary.json",
        "tiles.csv",
    ]


def test_a_tissue_mask_failure_names_the_slide_and_the_stage(tmp_path, runtime, caplog):
    broken = write_pyramid(tmp_path / "masked.tiff", tissue_image(2048, 2048, [BOX]), 0.495)
    _corrupt_tiff_tiles(broken, 0, [2 * (2048 // TIFF_TILE) + 2])  # a 2048 px slide's mask reads level 0
    with caplog.at_level("ERROR"):
        failures = run_job([broken], runtime, tmp_path / "out", progress=False, batch_size=8, workers=2)
    assert [f["slide"] for f in failures] == [str(broken)]
    error = failures[0]["error"]
    assert str(broken) in error and "[stage: tissue_mask]" in error and "ZIPDecode" in error
    assert "unexpected error" not in caplog.text  # a recorded failure, not a traceback
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == failures


_KILL_IN_OUTPUTS = """
import os, signal, sys
from pathlib import Path
import service.wsi as wsi
from models.card import atomic_file
from service.runtime import Runtime

def dies_while_writing(path, table):  # a SIGKILL in the middle of an atomic write
    with atomic_file(path, "w") as handle:
        handle.write("half a file")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

wsi.write_geojson = dies_while_writing
runtime = Runtime(sys.argv[3], device="cpu")
wsi.classify_slide(Path(sys.argv[1]), runtime, Path(sys.argv[2]), batch_size=8, workers=2, progress=False)
"""


def test_resume_after_a_kill_in_output_writing_removes_the_stale_temporary_file(
    slide_pair, reference, runtime, tmp_path
):
    reference = reference[1]
    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_IN_OUTPUTS, str(slide_pair["good"]), str(out), str(ROOT / "models" / "default")],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    stale = [p.name for p in out.glob(".*.tmp")]
    assert stale and stale[0].startswith(".predictions.geojson."), sorted(p.name for p in out.iterdir())
    summary = classify_slide(slide_pair["good"], runtime, out, batch_size=8, workers=2, progress=False)
    assert summary["resumed_tiles"] == summary["tiles"]  # every tile came from the killed run
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "predictions.geojson", "summary.json", "tiles.csv"]
    for name in ("tiles.csv", "predictions.geojson", "heatmap.png"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_folder_reached_twice_through_a_symlink_loop_is_walked_once(slide_pair, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "slide.tiff").symlink_to(slide_pair["good"])
    (folder / "again").symlink_to(folder, target_is_directory=True)  # folder/again/again/... forever
    (folder / "loop.svs").symlink_to(folder / "loop.svs")  # a link to itself
    inputs = [
        str(folder),
        str(folder / "again"),
        str(folder / "again" / "again"),
        str(folder / "loop.svs"),
        str(folder / "again" / "loop.svs"),
    ]
    slides = expand_inputs(inputs)
    assert slides == [folder / "slide.tiff", folder / "loop.svs"]
    # the job's plan: the slide runs once, the looping link is one failure however often it is given
    plan = plan_slides([*slides, folder / "again" / "slide.tiff", folder / "again" / "loop.svs"], tmp_path / "out")
    assert [(path, error is None) for path, error in plan] == [
        (folder / "slide.tiff", True),
        (folder / "loop.svs", False),
    ]
    assert str(plan[1][1]) == f"{folder / 'loop.svs'}: broken or looping symbolic link"


def test_cpu_batches_run_in_bounded_runs_with_the_same_answers(monkeypatch):
    """On the CPU a batch runs in runs of at most HISTO_CPU_RUN_SIZE images, so ONNX Runtime's arena
    holds one run's buffers, not the largest batch's (benchmarks/cpu_arena.py); answers must not change."""
    model = ROOT / "models" / "default"
    monkeypatch.setenv("HISTO_CPU_RUN_SIZE", "4")
    runs = Runtime(model, device="cpu")
    monkeypatch.setenv("HISTO_CPU_RUN_SIZE", "64")
    whole = Runtime(model, device="cpu")
    assert (runs.cpu_run_size, whole.cpu_run_size, runs.cpu_memory) == (4, 64, "arena")
    pixels = np.random.default_rng(1).integers(0, 256, (10, runs.input_size, runs.input_size, 3), np.uint8)
    a, b = runs.predict(pixels), whole.predict(pixels)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    np.testing.assert_allclose(a.ood_scores, b.ood_scores, rtol=1e-5)
    monkeypatch.setenv("HISTO_CPU_MEMORY", "pool")
    with pytest.raises(ValueError, match="HISTO_CPU_MEMORY must be one of"):
        Runtime(model, device="cpu")
