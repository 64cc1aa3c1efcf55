"""Classify whole-slide images: tissue mask → tiles at the model's µm/px → batched onnxruntime → outputs.

    python -m service.wsi SLIDE_OR_FOLDER... --out OUT [--model DIR] [--mpp X] [--batch-size N]
        [--readers auto|threads|processes] [--workers N] [--engine local|ray [--ray-address ADDR]]

Per slide, ``OUT/<slide stem>/`` gets ``tiles.csv``, ``predictions.geojson`` (QuPath), ``heatmap.png``
and ``summary.json``. Tile readers (``--workers`` threads or spawned processes, one OpenSlide handle
each) decode and resize tiles ahead of inference; at most a few batches are in flight, so memory
stays flat whatever the slide size. Each finished batch is appended to
``OUT/<slide stem>/.tiles.partial`` and fsync'ed: a job killed at any moment, SIGKILL included,
resumes where it stopped when started again with the same arguments and ends with the same
outputs as an uninterrupted run. A slide whose ``summary.json`` was written by the same model with
the same arguments is skipped. A slide that fails is listed in ``OUT/failures.json`` and the others
go on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from tqdm import tqdm

from models.card import ModelCard, ModelLoadError, write_atomic
from service.outputs import TileTable, write_geojson, write_heatmap, write_summary, write_tiles_csv
from service.reader_processes import ReaderProcesses
from service.runtime import Prediction, Runtime
from service.slide_faults import (
    FaultTolerantTileReader,
    TileFaults,
    failure_stage,
    remove_stale_temporaries,
    split_unreadable,
    unreadable_rows,
)
from service.slides import (
    DEFAULT_MIN_TISSUE,
    SLIDE_SUFFIXES,
    SlideError,
    TileGrid,
    TileReader,
    expand_inputs,
    open_slide,
    read_thumbnail,
    slide_mpp,
    tissue_tiles,
)

log = logging.getLogger("histo_robust.wsi")

PARTIAL = ".tiles.partial"
JOB = ".job.json"
LOCK = ".lock"
OUTPUT_FILES = ("tiles.csv", "predictions.geojson", "heatmap.png", "summary.json")
FAILURES = "failures.json"
_CORES = os.cpu_count() or 1
# Tile readers: threads stop scaling near 8 (they contend for the GIL), spawned processes writing
# into shared memory (service.reader_processes) keep scaling to 16 but cost about a second of the
# cores' time to start, which a small job on few cores does not win back: processes are the default
# from 8 cores (measured: docs/performance.md, benchmarks/device/readers.py).
DEFAULT_WORKERS = min(8, _CORES)  # reader threads
READER_KINDS = ("auto", "threads", "processes")


def resolve_readers(kind: str = "auto", workers: int | None = None) -> tuple[str, int]:
    """``(threads | processes, how many)`` for ``--readers`` and ``--workers`` (None: the kind's default)."""
    if kind not in READER_KINDS:
        raise ValueError(f"readers must be one of {READER_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "processes" if _CORES >= 8 else "threads"
    return kind, workers or (_CORES if kind == "processes" else DEFAULT_WORKERS)


# Bumped when the tiling or the partial format changes, so old partial results are not reused.
JOB_FORMAT = 2

Predict = Callable[[np.ndarray], Prediction]


def job_signature(path: Path, runtime: Runtime, mpp: float, min_tissue: float) -> dict[str, Any]:
    """Everything the results depend on. Partial results and a finished summary are reused only
    when it is unchanged: another model, slide file, µm/px, tissue threshold or serving threshold
    starts the slide over instead of mixing results."""
    stat = path.stat()
    card = runtime.card
    return {
        "format": JOB_FORMAT,
        "slide": path.name,
        "slide_bytes": stat.st_size,
        "slide_mtime": int(stat.st_mtime),
        "model_sha256": card.onnx_sha256,
        "variant": os.environ.get("HISTO_MODEL_VARIANT") or "fp32",
        "model_mpp": card.mpp,
        "patch_size_pixels": card.patch_size_pixels,
        "input_size": card.input_size,
        "mpp": mpp,
        "min_tissue": min_tissue,
        "abstain_threshold": runtime.abstain_threshold,
        "ood_threshold": runtime.ood_threshold,
    }


def read_partial(path: Path, grid: TileGrid, n_classes: int, batch_size: int) -> np.ndarray:
    """Rows ``[index, x, y, p_1..p_C, ood_score]`` of the whole batches already done.

    The file is trusted only as far as it is consistent: row ``i`` must carry index ``i`` and the
    grid's coordinates for that tile. It is cut back (on disk too) to the last whole batch, which
    drops a line torn by a kill mid-write and the rows of a batch the kill split; those tiles are
    redone in the same batches an uninterrupted run uses, so the results are identical to the bit.
    """
    n_fields = 3 + n_classes + 1
    rows: list[list[float]] = []
    ends = [0]  # byte offset after each valid row
    if path.is_file():
        with open(path, "rb") as handle:
            for line in handle:
                i = len(rows)
                if i >= len(grid.coords) or not line.endswith(b"\n"):
                    break
                fields = line.split(b",")
                if len(fields) != n_fields:
                    break
                try:
                    values = [float(v) for v in fields]
                except ValueError:
                    break
                if values[0] != i or values[1] != grid.coords[i, 0] or values[2] != grid.coords[i, 1]:
                    break
                rows.append(values)
                ends.append(ends[-1] + len(line))
    keep = len(rows) if len(rows) == len(grid.coords) else len(rows) // batch_size * batch_size
    if path.is_file() and path.stat().st_size != ends[keep]:
        with open(path, "r+b") as handle:
            handle.truncate(ends[keep])
            os.fsync(handle.fileno())
    return np.array(rows[:keep], dtype=np.float64).reshape(-1, n_fields)


def _format_rows(start: int, grid: TileGrid, prediction: Prediction, bad: np.ndarray | None = None) -> str:
    """Partial-file lines; ``%.9g`` round-trips float32 exactly, so a resumed job loses nothing.
    Unreadable tiles (``bad``) get NaN probabilities (see :mod:`service.slide_faults`)."""
    n = len(prediction.probabilities)
    probabilities = prediction.probabilities if bad is None else unreadable_rows(prediction.probabilities, bad)
    ood = prediction.ood_scores if prediction.ood_scores is not None else np.full(n, np.nan, np.float32)
    lines = []
    for k in range(n):
        i = start + k
        x, y = grid.coords[i]
        values = ",".join(f"{float(v):.9g}" for v in (*probabilities[k], ood[k]))
        lines.append(f"{i},{x},{y},{values}\n")
    return "".join(lines)


def _append_durably(
    handle: Any, start: int, grid: TileGrid, prediction: Prediction, bad: np.ndarray | None = None
) -> None:
    handle.write(_format_rows(start, grid, prediction, bad))
    handle.flush()
    os.fsync(handle.fileno())  # a completed batch survives SIGKILL and power loss


def stream_batches(
    reader: TileReader, grid: TileGrid, starts: list[int], batch_size: int, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, pixels)`` per batch in order, read by ``workers`` threads ahead of the consumer.

    At most ``workers + 1`` batches are being read or waiting, so memory is bounded by a few
    batches however many tiles the slide has. Closing the generator (an inference error, a
    KeyboardInterrupt) cancels what is queued and waits for the readers, so no thread outlives it.
    """
    depth = workers + 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-reader")
    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    todo = iter(starts)
    try:
        while True:
            while len(pending) < depth and (start := next(todo, None)) is not None:
                pending.append((start, pool.submit(reader.read_batch, grid.coords[start : start + batch_size])))
            if not pending:
                return
            start, future = pending.popleft()
            yield start, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _exclusive(out_dir: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir``, so two jobs pointed at the same output folder cannot
    interleave their partial results; the kernel drops the lock when a process dies, even by SIGKILL
    (on NFS v4 the server does, once a dead client's lease runs out: 90 s by default).

    ``wait`` > 0 waits up to that long for the holder instead of failing at once: on a cluster a
    slide is delivered at least once, and its second copy then finds the first one's outputs done.
    The file names its holder (host and pid) for the error message.
    """
    lock_path = out_dir / LOCK
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if time.monotonic() >= deadline:
                held = f" ({holder})" if holder else ""
                raise SlideError(f"{out_dir}: another job is writing this output folder{held}") from None
            time.sleep(0.2)
            continue
        except OSError:
            os.close(fd)
            raise
        # the holder before us unlinks the file as it lets go: a lock on that unlinked file would not
        # exclude a job that opens the path afresh, so only a lock on the file at the path counts
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _outputs_done(out_dir: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The previous summary when this exact job already finished and all its outputs are there."""
    summary_path = out_dir / "summary.json"
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return None
    try:
        previous = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return previous if isinstance(previous, dict) and previous.get("job") == signature else None


@dataclass(frozen=True)
class PreparedSlide:
    """A slide's tissue mask and tile grid, which can be computed while the slide before it streams."""

    mask: np.ndarray
    mask_downsample: float
    grid: TileGrid
    seconds: float


def _prepare(slide: openslide.OpenSlide, runtime: Runtime, level0_mpp: float, min_tissue: float) -> PreparedSlide:
    t0 = time.perf_counter()
    card = runtime.card
    mask, mask_ds, grid = tissue_tiles(slide, level0_mpp, card.mpp, card.patch_size_pixels, min_tissue)
    return PreparedSlide(mask, mask_ds, grid, time.perf_counter() - t0)


def prepare_slide(
    path: Path, runtime: Runtime, mpp: float | None = None, min_tissue: float = DEFAULT_MIN_TISSUE
) -> PreparedSlide:
    """Tissue mask and grid of ``path`` on its own OpenSlide handle (safe in a background thread)."""
    slide = open_slide(path)
    try:
        ready = _prepare(slide, runtime, slide_mpp(slide, path, mpp)[0], min_tissue)
    finally:
        slide.close()
    log.debug("%s: tissue mask and %d tiles ready in %.2f s", path.name, len(ready.grid.coords), ready.seconds)
    return ready


def _slide_steps(
    path: str | os.PathLike[str],
    runtime: Runtime,
    out_dir: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    batch_size: int = 32,
    workers: int = DEFAULT_WORKERS,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    predict: Predict | None = None,
    progress: bool = True,
    prepared: Future[PreparedSlide] | None = None,
    readers: ReaderProcesses | None = None,
    lock_wait: float = 0.0,
) -> Generator[None, None, dict[str, Any]]:
    """:func:`classify_slide` in two steps: the generator yields once the tiles are classified (the
    accelerator's part) and returns the summary once the outputs are written. A finished slide
    returns at once. The slide handle and the output folder's lock are held until it returns;
    ``lock_wait``: seconds to wait for another copy of this slide that holds the lock (see :func:`_exclusive`).
    """
    started = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")
    if readers is not None and readers.batch_size != batch_size:
        raise ValueError(f"the reader processes read batches of {readers.batch_size}, not {batch_size}")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be within [0, 1], got {min_tissue}")
    stage = "open"  # named in any failure (see service.slide_faults)
    with failure_stage(path, stage):
        slide = open_slide(path)
    try:
        level0_mpp, mpp_source = slide_mpp(slide, path, mpp)
        if level0_mpp > runtime.card.mpp * 1.1:
            log.warning(
                "%s: scanned at %.3g µm/px, coarser than the model's %.3g: tiles are upsampled and "
                "predictions may degrade",
                path.name,
                level0_mpp,
                runtime.card.mpp,
            )
        signature = job_signature(path, runtime, level0_mpp, min_tissue)
        out_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(out_dir, lock_wait):
            remove_stale_temporaries(out_dir)  # of a write a kill interrupted; the lock says no one owns them
            if (previous := _outputs_done(out_dir, signature)) is not None:
                log.info("%s: already done with this model and these arguments, skipping", path.name)
                (out_dir / PARTIAL).unlink(missing_ok=True)
                (out_dir / JOB).unlink(missing_ok=True)
                if prepared is not None:
                    prepared.cancel()
                return previous
            stage = "tissue_mask"
            ready = prepared.result() if prepared is not None else _prepare(slide, runtime, level0_mpp, min_tissue)
            mask, mask_ds, grid = ready.mask, ready.mask_downsample, ready.grid
            timings = {"tissue_mask": ready.seconds}
            stage = "tiles"
            resumed = _classify_tiles(
                path,
                grid,
                runtime,
                out_dir,
                signature,
                predict or runtime.predict,
                batch_size,
                workers,
                progress,
                timings,
                readers,
            )
            yield  # the rest only writes outputs: a multi-slide job lets it finish in the background
            t0 = time.perf_counter()
            stage = "outputs"
            table, unreadable = _tile_table(out_dir / PARTIAL, grid, runtime, batch_size, path)
            _write_outputs(slide, path, runtime.card, table, out_dir)
            timings["outputs"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - started
            counts = table.counts()
            abstained, ood = table.abstained, table.ood
            summary = {
                "slide": str(path),
                "model": runtime.card.name,
                "model_version": runtime.card.version,
                "model_sha256": runtime.card.onnx_sha256,
                "mpp": level0_mpp,
                "mpp_source": mpp_source,
                "model_mpp": runtime.card.mpp,
                "tile_side_um": round(grid.side * level0_mpp, 3),
                "tile_side_level0_px": grid.side,
                "read_level": grid.level,
                "read_level_downsample": grid.level_downsample,
                "min_tissue": min_tissue,
                "grid_tiles": grid.n_grid,
                "tiles": len(table),
                "unreadable_tiles": len(unreadable),
                "unreadable_tile_coords": unreadable,  # level-0 [x, y] of tiles OpenSlide could not read
                "tissue_area_mm2": round(float(mask.sum() * (mask_ds * level0_mpp) ** 2 / 1e6), 4),
                "class_counts": counts,
                "class_fractions": {c: round(n / len(table), 6) if len(table) else 0.0 for c, n in counts.items()},
                "abstained": None if abstained is None else int(abstained.sum()),
                "ood": None if ood is None else int(ood.sum()),
                "resumed_tiles": resumed,
                "batch_size": batch_size,
                "readers": "threads" if readers is None else "processes",
                "workers": workers if readers is None else readers.processes,
                "timings_s": {
                    k: round(timings[k], 3)
                    for k in (
                        "total",
                        "tissue_mask",
                        "tiles",
                        "waiting_for_tiles",
                        "inference",
                        "partial_writes",
                        "outputs",
                    )
                },
                "tiles_per_s": round((len(table) - resumed) / timings["tiles"], 2) if len(table) > resumed else None,
                "job": signature,
            }
            write_summary(out_dir / "summary.json", summary)  # written last: it marks the slide as done
            log.debug("%s: outputs written", path.name)
            (out_dir / PARTIAL).unlink(missing_ok=True)
            (out_dir / JOB).unlink(missing_ok=True)
            return summary
    except Exception:
        with failure_stage(path, stage):
            raise
    finally:
        slide.close()


def classify_slide(
    path: str | os.PathLike[str],
    runtime: Runtime,
    out_dir: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    batch_size: int = 32,
    workers: int = DEFAULT_WORKERS,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    predict: Predict | None = None,
    progress: bool = True,
    prepared: Future[PreparedSlide] | None = None,
    readers: ReaderProcesses | None = None,
) -> dict[str, Any]:
    """Classify one slide into ``out_dir`` (resuming a killed run, skipping a finished one); return its summary.

    ``predict`` replaces ``runtime.predict`` (e.g. a batching client); ``runtime`` still supplies the
    card and thresholds. ``prepared``: the slide's :func:`prepare_slide`, started earlier with the
    same ``mpp`` and ``min_tissue`` (a multi-slide job computes it while the previous slide streams).
    ``readers``: reader processes (built with the same ``batch_size``) that read the tiles instead
    of ``workers`` threads. Raises :class:`SlideError` for a slide that cannot be read or has no mpp.
    """
    return _run_steps(
        _slide_steps(
            path,
            runtime,
            out_dir,
            mpp=mpp,
            batch_size=batch_size,
            workers=workers,
            min_tissue=min_tissue,
            predict=predict,
            progress=progress,
            prepared=prepared,
            readers=readers,
        )
    )


def _run_steps(steps: Generator[None, None, dict[str, Any]]) -> dict[str, Any]:
    """Run a slide's remaining steps; the summary is what the generator returns."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def _classify_tiles(
    path: Path,
    grid: TileGrid,
    runtime: Runtime,
    out_dir: Path,
    signature: dict[str, Any],
    predict: Predict,
    batch_size: int,
    workers: int,
    progress: bool,
    timings: dict[str, float],
    readers: ReaderProcesses | None = None,
) -> int:
    """Run the tiles not yet in the partial file through ``predict``, appending each batch durably.

    Returns how many tiles an earlier, interrupted run had already done.
    """
    partial, job_file = out_dir / PARTIAL, out_dir / JOB
    try:
        same_job = json.loads(job_file.read_text()) == signature
    except (OSError, json.JSONDecodeError):
        same_job = False
    if not same_job:  # another model, slide version or argument: start over
        partial.unlink(missing_ok=True)
        write_atomic(job_file, json.dumps(signature, indent=1) + "\n")
    resumed = len(read_partial(partial, grid, len(runtime.card.classes), batch_size))
    if resumed:
        log.info("%s: resuming after %d of %d tiles", path.name, resumed, len(grid.coords))
    t_wait = t_infer = t_write = 0.0
    t0 = time.perf_counter()
    starts = list(range(resumed, len(grid.coords), batch_size))
    faults = TileFaults()  # unreadable tiles: recorded, and the slide goes on
    if starts:
        reader = FaultTolerantTileReader(path, grid, runtime.card.input_size, faults) if readers is None else None
        bar = tqdm(
            total=len(grid.coords),
            initial=resumed,
            desc=path.name,
            unit="tile",
            disable=not progress,
            dynamic_ncols=True,
        )
        batches = (
            readers.stream(path, grid, starts, faults=faults)
            if readers is not None
            else stream_batches(reader, grid, starts, batch_size, workers)
        )
        try:
            # the writer thread formats and fsyncs one batch while the next is inferred; it exits
            # (finishing its batch) before the file closes, so the partial file never loses a batch
            # that was written, whatever stops the loop
            with (
                open(partial, "a", encoding="ascii") as handle,
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="partial-writer") as writer,
            ):
                writing: Future[None] | None = None
                while True:
                    t1 = time.perf_counter()
                    try:
                        start, pixels = next(batches)
                    except StopIteration:
                        break
                    except SlideError:
                        raise
                    except Exception as exc:  # OpenSlide and PIL raise several types for a bad region
                        raise SlideError(f"{path}: reading tiles failed ({type(exc).__name__}: {exc})") from exc
                    t2 = time.perf_counter()
                    prediction = predict(pixels)
                    t3 = time.perf_counter()
                    if writing is not None:
                        writing.result()  # one batch in writing at most; a failed write stops the slide
                    bad = faults.mask(grid.coords[start : start + len(pixels)])
                    writing = writer.submit(_append_durably, handle, start, grid, prediction, bad)
                    t_wait, t_infer = t_wait + t2 - t1, t_infer + t3 - t2
                    t_write += time.perf_counter() - t3
                    bar.update(len(pixels))
                if writing is not None:
                    writing.result()
        finally:
            batches.close()
            bar.close()
            if reader is not None:
                reader.close()
    timings.update(tiles=time.perf_counter() - t0, waiting_for_tiles=t_wait, inference=t_infer, partial_writes=t_write)
    return resumed


def _tile_table(
    partial: Path, grid: TileGrid, runtime: Runtime, batch_size: int, path: Path
) -> tuple[TileTable, list[list[int]]]:
    """All tile results, from the partial file, in grid order; refuses anything short of complete.
    Also returns the level-0 ``[x, y]`` of the tiles that could not be read (left out of the table)."""
    n_classes = len(runtime.card.classes)
    records = read_partial(partial, grid, n_classes, batch_size)
    if len(records) != len(grid.coords):
        raise SlideError(f"{path}: {len(records)} tile results for {len(grid.coords)} tiles; rerun to resume")
    records, unreadable = split_unreadable(records, n_classes)
    table = TileTable(
        runtime.card.classes,
        grid.side,
        records[:, 1:3].astype(np.int64),
        records[:, 3 : 3 + n_classes].astype(np.float32),
        records[:, -1].astype(np.float32),
        runtime.abstain_threshold,
        runtime.ood_threshold,
    )
    return table, unreadable


def _write_outputs(slide: openslide.OpenSlide, path: Path, card: ModelCard, table: TileTable, out_dir: Path) -> None:
    write_tiles_csv(out_dir / "tiles.csv", table)
    write_geojson(out_dir / "predictions.geojson", table)
    thumbnail, thumb_ds = read_thumbnail(slide, 1024)
    write_heatmap(
        out_dir / "heatmap.png",
        thumbnail,
        thumb_ds,
        table,
        f"{path.name}: {card.name}, {len(table)} tissue tiles of {card.patch_size_um:.0f} microns",
    )


def plan_slides(slides: list[Path], out: Path) -> list[tuple[Path, Exception | None]]:
    """Each slide with the error that keeps it from running (None: it runs): a missing file, or an
    output folder another slide of the same name already takes; a file given twice runs once."""
    owners: dict[str, Path] = {}
    planned: set[Path] = set()  # resolved paths of the slides that will run
    planned_links: set[str] = set()
    plan: list[tuple[Path, Exception | None]] = []
    for path in slides:
        if not path.is_file():
            if path.is_symlink():  # a dangling or looping link: listed once, however often it is reached
                if os.path.realpath(path) in planned_links:
                    continue
                planned_links.add(os.path.realpath(path))
            why = "broken or looping symbolic link" if path.is_symlink() else "no such file"
            plan.append((path, SlideError(f"{path}: {why}")))
            continue
        owner = owners.setdefault(path.stem, path)
        if owner.resolve() != path.resolve():
            plan.append(
                (
                    path,
                    SlideError(
                        f"{path}: output folder {out / path.stem} already belongs to {owner} in this "
                        "run; rename the slide or run it separately"
                    ),
                )
            )
        elif path.resolve() not in planned:  # a file given twice runs once
            planned.add(path.resolve())
            plan.append((path, None))
    return plan


def run_job(
    slides: list[Path],
    runtime: Runtime,
    out: Path,
    *,
    progress: bool = True,
    pipeline: bool = True,
    reader_processes: int = 0,
    **options: Any,
) -> list[dict[str, str]]:
    """Classify every slide into ``out/<stem>/``; a failing slide is recorded and the others go on.

    With ``pipeline``, the accelerator does not wait between slides: while one slide streams, one
    background thread computes the next slide's tissue mask and tile grid and another writes the
    previous slide's outputs. A job interrupted meanwhile still finishes the outputs being written.
    ``reader_processes`` > 0 reads tiles in that many spawned processes, started once for the job,
    instead of ``workers`` threads per slide.
    """
    plan = plan_slides(slides, out)
    runnable = [path for path, error in plan if error is None]
    prepare_options = {k: options[k] for k in ("mpp", "min_tissue") if k in options}
    failures: list[tuple[int, dict[str, str]]] = []

    def record(index: int, path: Path, exc: Exception) -> None:
        if not isinstance(exc, SlideError | OSError):
            log.error("%s: unexpected error", path, exc_info=exc)
        failures.append((index, {"slide": str(path), "error": str(exc) or type(exc).__name__}))
        print(f"error: {exc}", file=sys.stderr, flush=True)

    def report(path: Path, summary: dict[str, Any]) -> None:
        print(f"{path.name}: {summary['tiles']} tiles -> {out / path.stem}/", flush=True)

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-prep") as prep_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-finish") as finish_pool,
        contextlib.ExitStack() as stack,
    ):
        if reader_processes and runnable:
            batch_size = options.get("batch_size", 32)
            options["readers"] = stack.enter_context(
                ReaderProcesses(reader_processes, batch_size, runtime.card.input_size)
            )
        prepared: dict[Path, Future[PreparedSlide]] = {}
        finishing: list[tuple[int, Path, Future[dict[str, Any]]]] = []

        def prefetch(k: int) -> None:
            if k < len(runnable) and runnable[k] not in prepared:
                prepared[runnable[k]] = prep_pool.submit(prepare_slide, runnable[k], runtime, **prepare_options)

        def collect(wait: bool) -> None:
            for item in [f for f in finishing if wait or f[2].done()]:
                finishing.remove(item)
                index, path, future = item
                try:
                    report(path, future.result())
                except Exception as exc:  # recorded like any failing slide
                    record(index, path, exc)

        started = 0
        for index, (path, error) in enumerate(plan):
            collect(wait=False)
            try:
                if error is not None:
                    raise error
                prefetch(started)
                if pipeline:
                    prefetch(started + 1)  # the next slide's mask, while this one streams
                started += 1
                steps = _slide_steps(
                    path, runtime, out / path.stem, progress=progress, prepared=prepared.pop(path), **options
                )
                try:
                    next(steps)  # reads and classifies the tiles
                except StopIteration as finished:  # already done earlier: nothing left to write
                    report(path, finished.value)
                    continue
                if pipeline:
                    finishing.append((index, path, finish_pool.submit(_run_steps, steps)))
                else:
                    report(path, _run_steps(steps))
            except Exception as exc:  # one bad slide must not stop the others
                record(index, path, exc)
        collect(wait=True)
        for future in prepared.values():
            future.cancel()
    out.mkdir(parents=True, exist_ok=True)
    ordered = [failure for _, failure in sorted(failures, key=lambda f: f[0])]
    write_atomic(out / FAILURES, json.dumps(ordered, indent=2) + "\n")
    return ordered


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m service.wsi", description=__doc__.split("\n\n")[0])
    p.add_argument("slides", nargs="+", help="slide files or folders of slides")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per slide)")
    p.add_argument(
        "--model", type=Path, default=None, help="model directory (default $HISTO_MODEL_DIR or models/default)"
    )
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for every slide, overriding the file's")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per onnxruntime call (default %(default)s)")
    p.add_argument(
        "--readers",
        choices=READER_KINDS,
        default="auto",
        help="read tiles in threads or spawned processes (default auto: processes from 8 cores)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tile readers (default: one process per core, or one thread per core up to 8)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=DEFAULT_MIN_TISSUE,
        help="minimum tissue fraction of a tile (default %(default)s)",
    )
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default $HISTO_DEVICE or auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (default); ray: one slide per Ray worker (docs/cluster.md)",
    )
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default $RAY_ADDRESS; none: a Ray of this machine's own)",
    )
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs per Ray slide worker (default: CPUs per GPU, or 1)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.workers is not None and args.workers < 1) or not 0 <= args.min_tissue <= 1:
        p.error("--batch-size and --workers must be >= 1 and --min-tissue within [0, 1]")
    if args.mpp is not None and not args.mpp > 0:
        p.error("--mpp must be positive")
    slides = expand_inputs(args.slides)
    if not slides:
        print(
            f"error: no slides found in {' '.join(args.slides)} (suffixes: {' '.join(sorted(SLIDE_SUFFIXES))})",
            file=sys.stderr,
        )
        return 2
    if args.engine == "ray":
        from service.cluster import main_ray  # the only import of ray, and only when asked

        return main_ray(args, slides)
    try:
        runtime = Runtime(args.model, device=args.device, spinning=False)  # the tile readers share the cores
    except (ModelLoadError, ValueError, RuntimeError) as exc:
        print(f"error: cannot load model: {exc}", file=sys.stderr)
        return 2
    readers, workers = resolve_readers(args.readers, args.workers)
    try:
        failures = run_job(
            slides,
            runtime,
            args.out,
            progress=not args.no_progress,
            reader_processes=workers if readers == "processes" else 0,
            mpp=args.mpp,
            batch_size=args.batch_size,
            workers=workers if readers == "threads" else DEFAULT_WORKERS,
            min_tissue=args.min_tissue,
        )
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if failures:
        print(f"{len(failures)} of {len(slides)} slides failed; see {args.out / FAILURES}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
