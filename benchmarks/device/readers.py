"""Tile reading throughput with 1-16 threads (one OpenSlide handle each) against spawned processes
that send their tiles back pickled, and against the slide job's reader processes, which write them
into shared memory (only a slot number crosses the pipe); writes ``$OUT/readers.json``. Run from
the repository root. (Run E measured a first version of those processes written here; the job's
:class:`ReaderProcesses` grew out of it and replaced it.)"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.reader_processes import ReaderProcesses  # noqa: E402
from service.slides import TileGrid, TileReader, open_slide, slide_mpp, tile_grid, tissue_mask  # noqa: E402

_reader: TileReader | None = None
LIMIT = int(os.environ.get("READERS_MAX", "16"))  # most threads/processes tried (2 on a small machine)


def _start_reader(path: Path, grid: TileGrid, size: int) -> None:
    global _reader
    _reader = TileReader(path, grid, size)


def _read(coords: np.ndarray) -> np.ndarray:
    return _reader.read_batch(coords)


def shm_processes(path: Path, grid: TileGrid, size: int, processes: int, batch: int = 32) -> float:
    """Tiles/s of the slide job's own reader processes (:class:`ReaderProcesses`), ``processes`` of them."""
    starts = list(range(0, len(grid.coords), batch))
    with ReaderProcesses(processes, batch, size) as readers:
        for _ in readers.stream(path, grid, starts[:processes]):  # start-up and first handles, not timed
            pass
        begin = time.perf_counter()
        for _, pixels in readers.stream(path, grid, starts):
            np.copy(pixels)  # the consumer copies the batch out, as inference would read it
        return len(grid.coords) / (time.perf_counter() - begin)


def main() -> dict:
    from service.runtime import Runtime
    from service.wsi import DEFAULT_MIN_TISSUE
    from tests.slide_factory import write_streamed_pyramid

    side, tissue = 12_000, 10_000
    start = (side - tissue) // 2
    path = write_streamed_pyramid(
        Path(tempfile.mkdtemp()) / "slide.tiff", side, [(start, start, start + tissue, start + tissue)]
    )
    runtime = Runtime(ROOT / "models" / "default", device="cpu")
    slide = open_slide(path)
    mask, downsample = tissue_mask(slide)
    grid = tile_grid(
        slide,
        slide_mpp(slide, path)[0],
        runtime.card.mpp,
        runtime.card.patch_size_pixels,
        mask,
        downsample,
        DEFAULT_MIN_TISSUE,
    )
    chunks = [grid.coords[i : i + 32] for i in range(0, len(grid.coords), 32)]
    result: dict = {"tiles": len(grid.coords), "threads": {}, "processes": {}, "shm_processes": {}}
    for processes in [p for p in (1, 2, 4, 8, 12, 16) if p <= LIMIT]:
        result["shm_processes"][processes] = shm_processes(path, grid, runtime.input_size, processes)
        print("shm processes", processes, round(result["shm_processes"][processes]), flush=True)
    for threads in [t for t in (1, 2, 4, 8, 12, 16) if t <= LIMIT]:
        reader = TileReader(path, grid, runtime.input_size)
        part = chunks[: max(8, len(chunks) * threads // 16)]
        begin = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(reader.read_batch, part))
        result["threads"][threads] = sum(map(len, part)) / (time.perf_counter() - begin)
        reader.close()
        print("threads", threads, round(result["threads"][threads]), flush=True)
    for processes in [p for p in (2, 4, 8, 12, 16) if p <= LIMIT]:
        with ProcessPoolExecutor(
            processes,
            mp_context=get_context("spawn"),
            initializer=_start_reader,
            initargs=(path, grid, runtime.input_size),
        ) as pool:
            list(pool.map(_read, chunks[:processes]))  # start-up and first handles, not timed
            begin = time.perf_counter()
            list(pool.map(_read, chunks))
            result["processes"][processes] = len(grid.coords) / (time.perf_counter() - begin)
        print("processes", processes, round(result["processes"][processes]), flush=True)
    Path(os.environ.get("OUT", "."), "readers.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
