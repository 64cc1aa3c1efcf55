"""The HTTP service: POST patches to ``/classify``, get a class and every class's probability.

    bentoml serve service.service:HistoClassifier          # from the repository root, port 3000

Two BentoML services in one ``bentoml serve``: ``HistoClassifier`` faces HTTP (multipart
parsing, decoding, validation, response shaping) and hands uint8 arrays to ``Inference``, whose
``predict`` is ``batchable``: BentoML's adaptive batching groups the images of concurrent
requests into one onnxruntime call. Each front-end worker first merges the images of its own
concurrent requests into one call (:mod:`service.coalesce`), so the single inference process
pays its per-call cost once per group rather than once per image. Settings come from the
environment, so nothing is edited to tune a deployment:

``HISTO_MODEL_DIR`` (models/default) · ``HISTO_DEVICE`` (auto|cpu|cuda) · ``HISTO_MAX_BATCH_SIZE``
(64) · ``HISTO_MAX_LATENCY_MS`` (10000) · ``HISTO_BATCHING`` (1; 0 turns batching off) ·
``HISTO_MAX_IMAGES`` (64 per request) · ``HISTO_MAX_BODY_MB`` (32) · ``HISTO_MAX_SLIDE_MB`` (4096) ·
``HISTO_BODY_TIMEOUT_S`` (30) · ``HISTO_SLIDE_BODY_TIMEOUT_S`` (600) · ``HISTO_BODY_IDLE_S`` (10) ·
``HISTO_MAX_CONCURRENCY`` (256; see :mod:`service.request_guard`) · ``HISTO_THREADS`` (0 = all
cores) · ``HISTO_API_WORKERS`` (auto) · ``HISTO_INFERENCE_WORKERS`` (1) · ``HISTO_CUDA_OPTIONS``
(onnxruntime CUDA provider options) · ``HISTO_ABSTAIN_THRESHOLD`` / ``HISTO_OOD_THRESHOLD``
(override the card's).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from models.card import ModelLoadError, load_model_dir
from service.coalesce import Coalescer
from service.images import BadImage, load_rgb
from service.request_guard import SLIDE_BODY_TIMEOUT_S, RequestGuard, sweep_uploads, upload_path
from service.runtime import Runtime, model_dir_from_env, serving_thresholds
from service.schemas import ClassifyResponse, ErrorBody, PatchResult, SlideResult

log = logging.getLogger("histo_robust.service")

MAX_BATCH_SIZE = int(os.environ.get("HISTO_MAX_BATCH_SIZE", "64"))
# BentoML answers 503 when it cannot meet this latency, so it must exceed one full batch's compute
# time on the slowest device served (about 2 s for 64 tiles on 2 CPU cores); lower it on GPUs.
MAX_LATENCY_MS = int(os.environ.get("HISTO_MAX_LATENCY_MS", "10000"))
BATCHING = os.environ.get("HISTO_BATCHING", "1") != "0"
MAX_IMAGES = int(os.environ.get("HISTO_MAX_IMAGES", "64"))
# Front-end processes (multipart parsing, image decoding, JSON): one alone caps HTTP whatever the
# machine (docs/performance.md); the inference service stays one process, so requests from every
# front worker still meet in one batch.
# "auto" = one per core, at most 8 (each holds its own Python heap, about 150 MB).
_WORKERS = os.environ.get("HISTO_API_WORKERS", "auto")
API_WORKERS = min(8, os.cpu_count() or 1) if _WORKERS == "auto" else max(1, int(_WORKERS))
# Inference processes: one by default, so that every front end's calls meet in one batcher. Each
# further process adds a batcher and its own CUDA sessions (GPU memory); on an H200 a second one
# helped only without batching, because the batches split between them (docs/performance.md).
INFERENCE_WORKERS = max(1, int(os.environ.get("HISTO_INFERENCE_WORKERS", "1")))


def _load_model_or_exit():
    """Fail start-up (not the first request) with the reason when the model cannot be served."""
    try:
        return load_model_dir(model_dir_from_env())
    except ModelLoadError as exc:
        log.critical("cannot load model: %s", exc)
        raise SystemExit(f"histo-robust: cannot load model: {exc}") from None


def _error(status: int, kind: str, detail: str, index: int | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=kind, detail=detail, index=index).model_dump(), status_code=status)


@bentoml.service(
    name="histo_inference",
    workers=INFERENCE_WORKERS,
    traffic={"timeout": 120, "max_concurrency": 256},
    # On a GPU this process's event loop, not the model, limits batched HTTP. This hop is internal, so
    # it writes no access-log line and no trace span per call; with uvloop and httptools (the
    # serve/gpu extras) that cut its CPU per image by a third (benchmarks/results/h200-gpu, runs E-F).
    # BentoML also replaces a client session every `max_requests` calls (100 by default) even with
    # calls in flight on it, which failed some calls of a profiling harness.
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["predict"]},
    runner_connection={"max_requests": 1_000_000},
)
class Inference:
    """onnxruntime behind BentoML's adaptive batching: one call per batch of images."""

    def __init__(self) -> None:
        self.runtime = Runtime(_load_model_or_exit(), spinning=False)  # front-end workers share the cores
        log.info(
            "inference on %s, batching=%s max_batch_size=%d max_latency_ms=%d",
            self.runtime.providers[0],
            BATCHING,
            MAX_BATCH_SIZE,
            MAX_LATENCY_MS,
        )

    @bentoml.api(batchable=BATCHING, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, S, S, 3]`` → ``[N, C + 1]``: class probabilities, then the OOD score (NaN if none)."""
        pred = self.runtime.predict(images)
        ood = pred.ood_scores if pred.ood_scores is not None else np.full(len(images), np.nan, np.float32)
        return np.concatenate([pred.probabilities, ood[:, None]], axis=1).astype(np.float32)


_CARD_JSON: dict = {}  # filled when the service loads its model


async def _model_card(request):  # GET /model
    return JSONResponse(_CARD_JSON)


_model_app = Starlette(routes=[Route("/", _model_card, methods=["GET"])])


@bentoml.asgi_app(_model_app, path="/model")
# No max_concurrency here: BentoML would count a request from its first byte, so clients that stall
# mid-body would hold every slot; RequestGuard counts HISTO_MAX_CONCURRENCY from the body's last
# byte instead. The timeout covers a whole slide upload (the guard's own deadlines are shorter).
@bentoml.service(
    name="histo_classifier", workers=API_WORKERS, traffic={"timeout": max(120, int(SLIDE_BODY_TIMEOUT_S) + 60)}
)
class HistoClassifier:
    """POST /classify (multipart field ``images``), GET /model; /livez, /readyz, /metrics as usual."""

    inference = bentoml.depends(Inference)

    def __init__(self) -> None:
        model = _load_model_or_exit()
        if removed := sweep_uploads():
            log.info("removed %d slide uploads left by an earlier run", removed)
        self.model = model
        self._slide_runtime: Runtime | None = None  # created on the first slide task
        self.card = model.card
        _CARD_JSON.update(self.card.model_dump(mode="json"))
        self.abstain_threshold, self.ood_threshold = serving_thresholds(self.card)
        self.min_side = max(8, self.card.patch_size_pixels // 2)
        # images of concurrent requests in this worker share one inference call (batching on only)
        self._coalesce = Coalescer(self._infer, MAX_BATCH_SIZE) if BATCHING else None

    @bentoml.api(route="/classify")
    async def classify(self, images: list[Path]) -> ClassifyResponse:
        """Classify one or more patches; answers keep the order of the ``images`` field."""
        if not images:
            return _error(422, "no_images", "send one or more files in the multipart form field 'images'")
        if len(images) > MAX_IMAGES:
            return _error(413, "too_many_images", f"{len(images)} images in one request; the limit is {MAX_IMAGES}")
        names = [_client_name(p) for p in images]
        try:
            pixels = await asyncio.to_thread(self._decode, images, names)
        except _IndexedBadImage as exc:
            return _error(exc.status, "bad_image", str(exc.bad), exc.index)
        out = await (self._coalesce(pixels) if self._coalesce is not None else self._infer(pixels))
        if out is None:
            return _error(
                503,
                "overloaded",
                "the inference queue is full or timed out; retry shortly (or raise HISTO_MAX_LATENCY_MS)",
            )
        probs, ood = out[:, :-1], out[:, -1]
        results = []
        for i, (name, p, score) in enumerate(zip(names, probs, ood, strict=True)):
            top = int(p.argmax())
            conf = float(p[top])
            has_ood = bool(np.isfinite(score)) and self.ood_threshold is not None
            results.append(
                PatchResult(
                    index=i,
                    name=name,
                    label=self.card.classes[top],
                    confidence=conf,
                    probabilities={c: float(v) for c, v in zip(self.card.classes, p, strict=True)},
                    abstained=None if self.abstain_threshold is None else conf < self.abstain_threshold,
                    ood_score=float(score) if np.isfinite(score) else None,
                    ood=bool(score > self.ood_threshold) if has_ood else None,
                )
            )
        return ClassifyResponse(model=self.card.name, results=results)

    @bentoml.task(route="/classify_slide")
    def classify_slide(self, slide: Path, mpp: float | None = None) -> SlideResult:
        """Classify an uploaded whole-slide image (SVS, NDPI, MRXS, tiled TIFF...) as a background task.

        Submit with ``POST /classify_slide/submit`` (multipart field ``slide``; optional ``mpp``), poll
        ``GET /classify_slide/status?task_id=...`` and fetch ``GET /classify_slide/get?task_id=...``
        (retry while it answers 400 "not completed yet": status and get can reach different
        front-end workers, and one may see BentoML's task store a moment after the other).
        Only uploaded files are read: the service accepts no server-side path, so no request can
        reach files outside its own upload.
        """
        import tempfile

        from service.slides import SlideError
        from service.wsi import classify_slide

        # RequestGuard streamed the slide to a private file and sent its token in the slide's place
        upload = upload_path(Path(slide).read_text(errors="replace")[:64])
        if upload is None or not upload.is_file():
            raise bentoml.exceptions.InvalidArgument("the slide upload is no longer available; submit it again")
        if self._slide_runtime is None:
            self._slide_runtime = Runtime(self.model, spinning=False)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                named = Path(tmp) / _client_name(slide)  # OpenSlide picks its driver by the file name's suffix
                named.symlink_to(upload)
                try:
                    summary = classify_slide(named, self._slide_runtime, Path(tmp) / "out", mpp=mpp, progress=False)
                except SlideError as exc:
                    raise bentoml.exceptions.InvalidArgument(str(exc).replace(str(named), named.name)) from None
                geojson = json.loads((Path(tmp) / "out" / "predictions.geojson").read_text())
        finally:
            upload.unlink(missing_ok=True)  # the task's end, whatever it was
        summary.pop("job", None)
        summary["slide"] = named.name
        return SlideResult(summary=summary, geojson=geojson)

    async def _infer(self, pixels: np.ndarray, attempts: int = 3) -> np.ndarray | None:
        """Call the batching inference service; retry dropped keep-alive connections, None when overloaded."""
        for attempt in range(attempts):
            try:
                return await self.inference.to_async.predict(pixels)
            except Exception as exc:  # connection drops and the batcher's 503 arrive as several types
                log.warning("inference call %d/%d failed: %s", attempt + 1, attempts, exc)
                await asyncio.sleep(0.05 * (attempt + 1))
        return None

    def _decode(self, paths: list[Path], names: list[str]) -> np.ndarray:
        arrays = []
        for i, (path, name) in enumerate(zip(paths, names, strict=True)):
            try:
                arrays.append(load_rgb(Path(path).read_bytes(), name, self.card.input_size, self.min_side))
            except BadImage as exc:
                raise _IndexedBadImage(exc, i) from None
        return np.stack(arrays)


def _client_name(path: Path) -> str:
    """BentoML stores each upload as ``tmpXXXXXXXX<client file name>``; give the client its name back."""
    name = Path(path).name
    return name[11:] if re.match(r"tmp[a-z0-9_]{8}.", name) else name


class _IndexedBadImage(Exception):
    def __init__(self, bad: BadImage, index: int) -> None:
        super().__init__(str(bad))
        self.bad, self.index, self.status = bad, index, bad.status


def _slide_suffixes() -> frozenset[str]:
    from service.slides import SLIDE_SUFFIXES

    return frozenset(SLIDE_SUFFIXES)


HistoClassifier.add_asgi_middleware(
    RequestGuard, max_images=MAX_IMAGES, workers=API_WORKERS, slide_suffixes=_slide_suffixes()
)
