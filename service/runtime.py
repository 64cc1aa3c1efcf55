"""ONNX Runtime inference shared by the HTTP service and the WSI job (never imports torch).

One :class:`Runtime` owns one InferenceSession on the best available execution provider
(CUDA when onnxruntime-gpu sees a GPU, CPU otherwise) and turns uint8 RGB batches into
per-class probabilities and embeddings, exactly as the model card describes them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.card import (
    EMBEDDINGS_OUTPUT,
    INPUT_NAME,
    OOD_OUTPUT,
    PROBABILITIES_OUTPUT,
    ModelCard,
    ModelDir,
    ModelLoadError,
    check_graph_signature,
    load_model_dir,
)

log = logging.getLogger("histo_robust.runtime")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


# On CUDA an InferenceSession rebuilds its cuDNN state whenever the batch size differs from its
# previous call, and adaptive batching sends any size from 1 to the maximum. So on CUDA batches are
# padded to a few sizes (``batch_plan``), each with its own session warmed up at start. HEURISTIC
# spares the exhaustive cuDNN search at each session's first run; kSameAsRequested keeps the seven
# sessions' arenas from growing by powers of two. Both cost no throughput on an H200 (measured:
# docs/performance.md, benchmarks/results/h200-gpu/README.md).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


# CPU memory. ONNX Runtime's CPU arena keeps, for the session's life, the buffers of the largest
# batch it has run: a runtime at 131 MB after loading stood at 809 MB after one batch of 64 and
# peaked at 974 MB under batches of 1-64 (benchmarks/cpu_arena.py, 2 cores shared with other work).
# Giving the memory back instead costs CPU: an arena shrunk after every run (arena-shrink) or no
# arena took 18-22 core-ms per image against 13-14. What bounds it for free is running a batch in
# runs of at most CPU_RUN_SIZE images, so that the arena holds one run's buffers: runs of 8 peaked
# at 225 MB at 11.8-12.5 core-ms per image, runs of 16 at 343 MB (12.9-14.2), the whole batch at
# 974 MB (12.8-14.0), in two measurements. Measured on 2 cores only: a CPU with many more cores may
# want larger runs (HISTO_CPU_RUN_SIZE). HISTO_CPU_MEMORY picks the allocator.
CPU_MEMORY_OPTIONS = ("arena", "arena-shrink", "no-arena", "no-arena-no-pattern")
DEFAULT_CPU_MEMORY = "arena"
CPU_RUN_SIZE = 8


def cpu_memory() -> str:
    """The CPU memory option: ``$HISTO_CPU_MEMORY`` or :data:`DEFAULT_CPU_MEMORY`.

    ``arena``: ONNX Runtime's default (the arena grows to the largest batch and stays there);
    ``arena-shrink``: the same arena, shrunk back at the end of every run; ``no-arena``: plain
    malloc/free per tensor; ``no-arena-no-pattern``: also no pre-planned memory pattern."""
    value = (os.environ.get("HISTO_CPU_MEMORY") or DEFAULT_CPU_MEMORY).strip().lower()
    if value not in CPU_MEMORY_OPTIONS:
        raise ValueError(f"HISTO_CPU_MEMORY must be one of {', '.join(CPU_MEMORY_OPTIONS)}, got {value!r}")
    return value


def batch_plan(n: int, buckets: tuple[int, ...] = BUCKETS) -> list[tuple[int, int, int]]:
    """``(start, stop, padded size)`` runs covering ``n`` images with only ``buckets`` sizes.

    Chunks of the largest bucket, then the remainder padded up to the next bucket: at most half of
    any run is padding, and a GPU doing 7,900 images/s loses far less to it than to a change of size.
    """
    largest, plan, start = buckets[-1], [], 0
    while start < n:
        stop = min(start + largest, n)
        plan.append((start, stop, next(b for b in buckets if b >= stop - start)))
        start = stop
    return plan


def cuda_options() -> dict[str, str]:
    """:data:`CUDA_OPTIONS` with ``HISTO_CUDA_OPTIONS`` (``key=value,key=value``: onnxruntime's CUDA
    provider options, e.g. ``gpu_mem_limit`` or ``cudnn_conv_use_max_workspace``) on top."""
    options = dict(CUDA_OPTIONS)
    for item in filter(None, (os.environ.get("HISTO_CUDA_OPTIONS") or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"HISTO_CUDA_OPTIONS takes key=value pairs separated by commas, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def model_dir_from_env() -> Path:
    """The model directory the service serves: ``$HISTO_MODEL_DIR`` or ``models/default``."""
    return Path(os.environ.get("HISTO_MODEL_DIR") or DEFAULT_MODEL_DIR)


def _requested_device(requested: str | None) -> str:
    return (requested or os.environ.get("HISTO_DEVICE") or "auto").lower()


def choose_providers(requested: str | None = None) -> list[str]:
    """CUDA first when available (and not refused with ``cpu``), CPU always last as fallback."""
    requested = _requested_device(requested)
    available = ort.get_available_providers()
    if requested not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(f"device 'cuda' requested but onnxruntime offers only {available}")
    if requested != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find CUDA and cuDNN installed as pip packages (``nvidia-*``).

    It looks for them only on the system's library path, so a pip-only install otherwise fails
    with ``libcublasLt.so.13: cannot open shared object file`` and runs on the CPU. Libraries
    installed system-wide (the CUDA base image of the Dockerfile) still load as before.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # a failed preload only means the default search applies
            log.warning("could not preload CUDA libraries: %s", exc)


def confirm_device(requested: str | None, wanted: list[str], got: list[str]) -> None:
    """Refuse a silent CPU fallback the caller did not accept.

    onnxruntime lists the CUDA provider whenever onnxruntime-gpu is installed, and a session whose
    CUDA provider cannot start (no driver, missing CUDA 13 / cuDNN 9 libraries) quietly runs on the
    CPU instead: an error for ``cuda``, a warning for ``auto``.
    """
    if wanted[0] != "CUDAExecutionProvider" or got[0] == "CUDAExecutionProvider":
        return
    message = (
        "onnxruntime could not start its CUDA provider (see its error above: a GPU driver, CUDA 13 "
        "and cuDNN 9 libraries are needed)"
    )
    if _requested_device(requested) == "cuda":
        raise RuntimeError(f"device 'cuda' requested but {message}")
    log.warning("%s; running on the CPU", message)


def serving_thresholds(card: ModelCard) -> tuple[float | None, float | None]:
    """(abstention, OOD) thresholds: the card's, overridable at serving time by
    ``HISTO_ABSTAIN_THRESHOLD`` / ``HISTO_OOD_THRESHOLD`` without touching the model."""
    abstain = _env_float("HISTO_ABSTAIN_THRESHOLD")
    if abstain is None and card.abstention is not None:
        abstain = card.abstention.threshold
    ood = _env_float("HISTO_OOD_THRESHOLD")
    if ood is None and card.ood is not None:
        ood = card.ood.threshold
    return abstain, ood


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch: probabilities ``[N, C]``, embeddings ``[N, D]`` and, for models that
    carry an OOD scorer, ``ood_scores`` ``[N]`` (None for older artifacts)."""

    probabilities: np.ndarray
    embeddings: np.ndarray
    ood_scores: np.ndarray | None = None

    @property
    def label_index(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(1)


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


class Runtime:
    """A verified model directory plus its ONNX Runtime session."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | ModelDir | None = None,
        *,
        device: str | None = None,
        variant: str | None = None,
        intra_op_threads: int | None = None,
        spinning: bool = True,
        pad_batches: bool | None = None,
    ) -> None:
        """``spinning=False`` when other threads or processes need the same cores (the WSI job's tile
        readers, the service's front-end workers): ONNX Runtime's idle intra-op threads otherwise
        busy-wait between batches and starve them.

        ``pad_batches`` (default: on CUDA only) runs every batch at one of :data:`BUCKETS` sizes, each
        on a session of its own that sees no other size, all warmed up here. On a CPU padding would
        cost compute in proportion and a change of size costs nothing, so it stays off there."""
        self.model = model_dir if isinstance(model_dir, ModelDir) else load_model_dir(model_dir or model_dir_from_env())
        self.card: ModelCard = self.model.card
        path = self.model.variant_path(variant or os.environ.get("HISTO_MODEL_VARIANT"))
        options = ort.SessionOptions()
        threads = intra_op_threads if intra_op_threads is not None else int(os.environ.get("HISTO_THREADS", "0"))
        options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.cpu_memory = cpu_memory()
        options.enable_cpu_mem_arena = self.cpu_memory.startswith("arena")
        options.enable_mem_pattern = self.cpu_memory != "no-arena-no-pattern"
        self._run_options: ort.RunOptions | None = None  # only arena-shrink needs any
        if self.cpu_memory == "arena-shrink":
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        wanted = choose_providers(device)
        if wanted[0] == "CUDAExecutionProvider":
            preload_cuda_libraries()
        try:
            self.session = self._new_session(path, options, wanted)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad graph
            raise ModelLoadError(f"{path}: onnxruntime cannot load the graph ({exc})") from exc
        self.providers = self.session.get_providers()
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.cpu_run_size = max(1, int(os.environ.get("HISTO_CPU_RUN_SIZE", str(CPU_RUN_SIZE)))) if on_cpu else 1 << 30
        confirm_device(device, wanted, self.providers)
        check_graph_signature(
            self.card,
            {i.name: list(i.shape) for i in self.session.get_inputs()},
            {o.name: list(o.shape) for o in self.session.get_outputs()},
            str(path),
        )
        served = (PROBABILITIES_OUTPUT, EMBEDDINGS_OUTPUT, OOD_OUTPUT)
        self._outputs = [o.name for o in self.session.get_outputs() if o.name in served]
        self.abstain_threshold, self.ood_threshold = serving_thresholds(self.card)
        self.pad_batches = self.providers[0] == "CUDAExecutionProvider" if pad_batches is None else pad_batches
        self._sessions: dict[int, ort.InferenceSession] = {}
        if self.pad_batches:
            # the first session takes the smallest size; each other size gets its own
            self._sessions = {BUCKETS[0]: self.session}
            self._sessions.update({size: self._new_session(path, options, self.providers) for size in BUCKETS[1:]})
            self._warm_up()
        if self.card.calibration is None or self.card.ood is None or OOD_OUTPUT not in self._outputs:
            log.warning(
                "model %s has no calibration/OOD data (older artifact): abstained/ood fields will be null",
                self.card.name,
            )
        log.info("model %s (%s) on %s", self.card.name, path.name, self.providers[0])

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    def predict(self, images: np.ndarray) -> Prediction:
        """Run a uint8 ``[N, S, S, 3]`` batch (S = card input size); N may be anything ≥ 1."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected uint8 [N, {self.input_size}, {self.input_size}, 3], got {images.dtype} {images.shape}"
            )
        if not len(images):  # onnxruntime fails on an empty batch with an error about broadcasting
            raise ValueError("expected at least one image, got an empty batch")
        images = np.ascontiguousarray(images)
        if not self.pad_batches and len(images) <= self.cpu_run_size:
            outputs = self._run(self.session, images)
        elif not self.pad_batches:  # see CPU_RUN_SIZE
            runs = [
                self._run(self.session, images[i : i + self.cpu_run_size])
                for i in range(0, len(images), self.cpu_run_size)
            ]
            outputs = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
        else:
            runs = []
            for start, stop, size in batch_plan(len(images)):
                chunk = images[start:stop]
                if size > len(chunk):
                    chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.uint8)])
                outs = self._run(self._sessions[size], chunk)
                runs.append([out[: stop - start] for out in outs])
            outputs = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*runs, strict=True)]
        results = dict(zip(self._outputs, outputs, strict=True))
        probabilities = results[PROBABILITIES_OUTPUT].astype(np.float32, copy=False)
        embeddings = results.get(EMBEDDINGS_OUTPUT)
        if embeddings is None:
            embeddings = np.zeros((len(images), 0), np.float32)
        ood = results.get(OOD_OUTPUT)
        return Prediction(probabilities, embeddings, None if ood is None else ood.reshape(-1).astype(np.float32))

    def _run(self, session: ort.InferenceSession, images: np.ndarray) -> list[np.ndarray]:
        if self._run_options is None:
            return session.run(self._outputs, {INPUT_NAME: images})
        return session.run(self._outputs, {INPUT_NAME: images}, self._run_options)

    @staticmethod
    def _new_session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        with_options = [(p, cuda_options()) if p == "CUDAExecutionProvider" else p for p in providers]
        return ort.InferenceSession(str(path), sess_options=options, providers=with_options)

    def _warm_up(self) -> None:
        """Run each size's session once, so that no request pays for its first run."""
        start = time.perf_counter()
        side = self.input_size
        for size, session in self._sessions.items():
            session.run(self._outputs, {INPUT_NAME: np.zeros((size, side, side, 3), np.uint8)})
        log.info("warmed up batch sizes %s in %.1f s", list(BUCKETS), time.perf_counter() - start)

    def abstained(self, prediction: Prediction) -> np.ndarray | None:
        """True where the top probability is under the abstention threshold (None: model has none)."""
        if self.abstain_threshold is None:
            return None
        return prediction.confidence < self.abstain_threshold

    def out_of_distribution(self, prediction: Prediction) -> np.ndarray | None:
        """True where the OOD score exceeds the threshold (None: model has no OOD scorer)."""
        if self.ood_threshold is None or prediction.ood_scores is None:
            return None
        return prediction.ood_scores > self.ood_threshold
