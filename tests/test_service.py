"""The HTTP service on a real `bentoml serve`: answers, bad input, adaptive batching."""

from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from benchmarks.serve import batch_stats
from service.images import load_rgb
from service.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
TILES = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(ROOT / "models" / "default", device="cpu")


def _post(url: str, files: list[tuple[str, bytes]], field: str = "images") -> requests.Response:
    return requests.post(f"{url}/classify", files=[(field, (name, data)) for name, data in files], timeout=60)


def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _expect_alive(url: str) -> None:
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    ok = _post(url, [(TILES[0].name, TILES[0].read_bytes())])
    assert ok.status_code == 200 and ok.json()["results"][0]["name"] == TILES[0].name


def test_answers_equal_onnxruntime_on_the_same_images(served, runtime):
    tiles = TILES[::10][:8]
    response = _post(served, [(t.name, t.read_bytes()) for t in tiles])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == runtime.card.name
    pixels = np.stack([load_rgb(t.read_bytes(), t.name, 224, 75) for t in tiles])
    expected = runtime.predict(pixels)
    for i, (tile, result) in enumerate(zip(tiles, body["results"], strict=True)):
        assert result["index"] == i and result["name"] == tile.name
        assert list(result["probabilities"]) == runtime.classes
        probs = np.array(list(result["probabilities"].values()))
        np.testing.assert_allclose(probs, expected.probabilities[i], atol=1e-5)
        assert result["label"] == runtime.classes[int(expected.probabilities[i].argmax())]
        assert result["confidence"] == pytest.approx(float(expected.probabilities[i].max()), abs=1e-6)
        assert result["ood_score"] == pytest.approx(float(expected.ood_scores[i]), rel=1e-4)
        assert result["ood"] == (result["ood_score"] > runtime.ood_threshold)
        assert result["abstained"] == (result["confidence"] < runtime.abstain_threshold)
    # the shipped model gets most of these real tiles right
    right = sum(r["label"] == t.parent.name for r, t in zip(body["results"], tiles, strict=True))
    assert right >= 5


def test_model_card_endpoint_and_bentoml_endpoints(served):
    response = requests.get(f"{served}/model", timeout=10, allow_redirects=False)
    assert response.status_code == 200
    card = response.json()
    assert card["classes"][0] == "01_TUMOR" and card["input_size"] == 224
    assert requests.get(f"{served}/livez", timeout=10).status_code == 200
    assert "bentoml_service_request" in requests.get(f"{served}/metrics", timeout=10).text
    schema = requests.get(f"{served}/docs.json", timeout=10).json()
    assert "/classify" in schema["paths"]


def _bomb() -> bytes:
    """A valid-looking PNG whose header declares 100000 x 100000 pixels."""
    png = bytearray(_png(Image.new("RGB", (8, 8), "white")))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    png[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr : ihdr + 17])))
    return bytes(png)


CONVERTIBLE = {
    "grey.png": lambda t: _png(Image.open(t).convert("L")),
    "rgba.png": lambda t: _png(Image.open(t).convert("RGBA")),
    "palette.png": lambda t: _png(Image.open(t).convert("P")),
    "grey16.png": lambda t: _png(Image.fromarray(np.asarray(Image.open(t).convert("L"), np.uint16) * 257)),
    "cmyk.jpg": lambda t: _png(Image.open(t).convert("CMYK"), "JPEG"),
    "tile.tif": lambda t: _png(Image.open(t).convert("RGB"), "TIFF"),
    "tile.jpg": lambda t: _png(Image.open(t).convert("RGB"), "JPEG", quality=95),
}


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_safe_modes_and_formats_are_converted(served, name):
    response = _post(served, [(name, CONVERTIBLE[name](TILES[3]))])
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["name"] == name and abs(sum(result["probabilities"].values()) - 1) < 1e-4


def _bad_inputs() -> dict[str, tuple[list[tuple[str, bytes]], str, int, str]]:
    tile = TILES[0].read_bytes()
    png = _png(Image.open(TILES[0]).convert("RGB"))
    jpg = _png(Image.open(TILES[0]).convert("RGB"), "JPEG")
    floats = _png(Image.fromarray(np.random.default_rng(0).random((150, 150), dtype=np.float32)), "TIFF")
    return {
        "not an image": ([("notes.txt", b"hello, this is text")], "images", 415, "not an image"),
        "truncated png": ([("cut.png", png[: len(png) // 2])], "images", 422, "truncated or corrupt"),
        "truncated jpeg": ([("cut.jpg", jpg[: len(jpg) // 2])], "images", 422, "truncated or corrupt"),
        "decompression bomb": ([("bomb.png", _bomb())], "images", 413, "decompression bomb"),
        "far too small": ([("tiny.png", _png(Image.new("RGB", (20, 20), "pink")))], "images", 422, "smaller"),
        "32-bit float image": ([("float.tif", floats)], "images", 422, "unsupported image mode 'F'"),
        "too many images": ([(f"{i}.webp", tile) for i in range(9)], "images", 413, "limit is 8"),
        "body too large": ([("big.bin", b"\0" * (3 * 1024 * 1024))], "images", 413, "byte limit"),
        "wrong field name": ([("a.webp", tile)], "image", 422, "'images'"),
        "empty file": ([("empty.png", b"")], "images", 400, "empty file"),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_bad_input_gets_4xx_json_and_server_keeps_serving(served, case):
    files, field, status, message = _bad_inputs()[case]
    response = _post(served, files, field)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and message in body["detail"]
    _expect_alive(served)


def test_bad_image_among_good_ones_names_its_index(served):
    good = TILES[1].read_bytes()
    response = _post(served, [("a.webp", good), ("b.txt", b"nope"), ("c.webp", good)])
    assert response.status_code == 415 and response.json()["index"] == 1
    assert "b.txt" in response.json()["detail"]


def test_requests_without_files(served):
    empty_form = requests.post(f"{served}/classify", files=[("note", ("", b"x"))], timeout=10)
    assert empty_form.status_code == 422 and "'images'" in empty_form.json()["detail"]
    no_body = requests.post(f"{served}/classify", timeout=10)
    assert no_body.status_code == 415 and "multipart" in no_body.json()["detail"]
    _expect_alive(served)


def test_concurrent_requests_are_batched_and_answers_match(served):
    tiles = TILES[:24]
    singles = [_post(served, [(t.name, t.read_bytes())]).json()["results"][0] for t in tiles]  # one at a time
    batches_before, images_before = batch_stats(served)
    with ThreadPoolExecutor(len(tiles)) as pool:
        concurrent = list(pool.map(lambda t: _post(served, [(t.name, t.read_bytes())]), tiles))
    batches_after, calls_after = batch_stats(served)
    batches, calls = batches_after - batches_before, calls_after - images_before
    # each front-end worker merges concurrent requests into fewer calls; the batcher merges the calls
    assert 1 <= batches <= calls < len(tiles), f"{len(tiles)} requests: {calls} inference calls"
    assert batches < len(tiles) / 2, f"{len(tiles)} concurrent requests ran in {batches} batches"
    for single, response in zip(singles, concurrent, strict=True):
        assert response.status_code == 200
        result = response.json()["results"][0]
        assert result["label"] == single["label"]
        np.testing.assert_allclose(
            list(result["probabilities"].values()), list(single["probabilities"].values()), atol=1e-5
        )


def _run_slide_task(url: str, name: str, data: bytes) -> requests.Response:
    """Submit, poll the status, then fetch, as a client would.

    ``status`` and ``get`` may be answered by different front-end workers, and BentoML's task store
    (SQLite) can show one of them the finished task a moment later than the other: a CI run saw
    ``get`` answer 400 "not completed yet" right after ``status`` said completed. So ``get`` is
    retried while it says so.
    """
    task = requests.post(f"{url}/classify_slide/submit", files=[("slide", (name, data))], timeout=60).json()
    params = {"task_id": task["task_id"]}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/classify_slide/status", params=params, timeout=10).json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.3)
    while True:
        response = requests.get(f"{url}/classify_slide/get", params=params, timeout=30)
        if response.status_code != 400 or "not completed" not in response.text or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


def test_slide_task_returns_summary_and_geojson(served):
    slide = ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
    response = _run_slide_task(served, slide.name, slide.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    summary, geo = body["summary"], body["geojson"]
    assert summary["slide"] == slide.name and summary["mpp"] == pytest.approx(0.499)
    assert summary["tiles"] == len(geo["features"]) > 50
    assert geo["type"] == "FeatureCollection"
    not_a_slide = _run_slide_task(served, "notes.svs", b"not a slide at all")
    assert "cannot open with OpenSlide" in not_a_slide.text and "/tmp" not in not_a_slide.text
    _expect_alive(served)


def test_device_choice_and_a_cuda_provider_that_does_not_start(monkeypatch, caplog):
    """onnxruntime-gpu lists CUDA even where it cannot start (no driver): `cuda` must fail, `auto` warn."""
    from service.runtime import choose_providers, confirm_device

    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert Runtime(ROOT / "models" / "default", device="cpu").providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        choose_providers("gpu")
    wanted, fell_back = ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        confirm_device("cuda", wanted, fell_back)
    monkeypatch.setenv("HISTO_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="device 'cuda' requested"):
        confirm_device(None, wanted, fell_back)  # the environment's choice counts like the argument
    with caplog.at_level("WARNING", logger="histo_robust.runtime"):
        confirm_device("auto", wanted, fell_back)
    assert "running on the CPU" in caplog.text
    confirm_device("cuda", wanted, wanted)  # CUDA started: nothing to say
    confirm_device("cpu", ["CPUExecutionProvider"], fell_back)


def test_cuda_provider_options_from_the_environment(monkeypatch):
    from service.runtime import CUDA_OPTIONS, cuda_options

    monkeypatch.delenv("HISTO_CUDA_OPTIONS", raising=False)
    defaults = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    assert cuda_options() == CUDA_OPTIONS == defaults
    monkeypatch.setenv("HISTO_CUDA_OPTIONS", "gpu_mem_limit=4294967296, cudnn_conv_algo_search=DEFAULT")
    assert cuda_options() == {**defaults, "cudnn_conv_algo_search": "DEFAULT", "gpu_mem_limit": "4294967296"}
    assert CUDA_OPTIONS == defaults  # not changed in place
    monkeypatch.setenv("HISTO_CUDA_OPTIONS", "gpu_mem_limit")
    with pytest.raises(ValueError, match="key=value pairs"):
        cuda_options()


def test_padded_batches_give_each_size_its_own_session_and_the_same_answers(caplog):
    """On CUDA a session that changes batch size rebuilds its cuDNN state (0.19-0.32 s per call on an
    H200), so batches are padded to a few sizes, each run by a session that sees no other size.
    Padding must not change any answer; forced on here, on the CPU, where sessions are real and
    batch-invariant."""
    from models.card import INPUT_NAME
    from service.runtime import BUCKETS, batch_plan

    assert batch_plan(1) == [(0, 1, 1)]
    assert batch_plan(3) == [(0, 3, 4)]
    assert batch_plan(70) == [(0, 64, 64), (64, 70, 8)]
    assert batch_plan(0) == []
    plain = Runtime(ROOT / "models" / "default", device="cpu")
    assert not plain.pad_batches  # off by default on the CPU
    with caplog.at_level("INFO", logger="histo_robust.runtime"):
        padded = Runtime(ROOT / "models" / "default", device="cpu", pad_batches=True)
    assert "warmed up batch sizes" in caplog.text
    assert all(s.get_providers() == padded.providers for s in padded._sessions.values())
    seen: list[tuple[int, int]] = []  # (session's size, batch it was given)

    class Recorder:  # a real session, with the batch sizes it is given noted down
        def __init__(self, size, session):
            self.size, self.session = size, session

        def run(self, names, feed):
            seen.append((self.size, len(feed[INPUT_NAME])))
            return self.session.run(names, feed)

    padded._sessions = {size: Recorder(size, s) for size, s in padded._sessions.items()}
    assert sorted(padded._sessions) == list(BUCKETS)
    pixels = np.random.default_rng(0).integers(0, 256, (70, padded.input_size, padded.input_size, 3), np.uint8)
    for n in (1, 3, 5, 33, 70):
        a, b = plain.predict(pixels[:n]), padded.predict(pixels[:n])
        assert b.probabilities.shape == (n, len(plain.classes))
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-6)
        np.testing.assert_allclose(b.embeddings, a.embeddings, atol=1e-5)
        np.testing.assert_allclose(b.ood_scores, a.ood_scores, atol=1e-5)
    assert seen == [(1, 1), (4, 4), (8, 8), (64, 64), (64, 64), (8, 8)]
    for runtime in (plain, padded):
        with pytest.raises(ValueError, match="at least one image"):
            runtime.predict(pixels[:0])
