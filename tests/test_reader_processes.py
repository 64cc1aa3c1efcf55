"""Tile reader processes on real OpenSlide and generated pyramidal TIFFs: the same pixels as the
thread reader, in order, across slides; clear errors; a dead reader; readers outliving a killed job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.reader_processes import ReaderProcesses
from service.slides import SlideError, TileReader, open_slide, slide_mpp, tile_grid, tissue_mask
from tests.slide_factory import tissue_image, write_pyramid

ROOT = Path(__file__).resolve().parent.parent
INPUT = 224


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """Two slides read at different levels (0.495 µm/px from level 0, 0.2475 from level 1)."""
    d = tmp_path_factory.mktemp("slides")
    image = tissue_image(1500, 1500, [(150, 150, 1350, 1200)], seed=5)
    double = np.repeat(np.repeat(image, 2, 0), 2, 1)
    out = {}
    for path in (write_pyramid(d / "half.tiff", image, 0.495), write_pyramid(d / "quarter.tiff", double, 0.2475)):
        slide = open_slide(path)
        mask, downsample = tissue_mask(slide)
        out[path] = tile_grid(slide, slide_mpp(slide, path)[0], 0.5, 224, mask, downsample, 0.5)
        slide.close()
    return out


def _threads(path, grid, starts, batch):
    reader = TileReader(path, grid, INPUT)
    try:
        return [reader.read_batch(grid.coords[s : s + batch]) for s in starts]
    finally:
        reader.close()


def test_batches_equal_the_thread_reader_in_order_across_slides(grids):
    (half, g_half), (quarter, g_quarter) = grids.items()
    assert (g_half.level, g_quarter.level) == (0, 1) and len(g_half.coords) == len(g_quarter.coords) == 20
    batch = 4
    with ReaderProcesses(2, batch, INPUT, slots=3) as readers:  # fewer slots than batches: slots are reused
        for path, grid in ((half, g_half), (quarter, g_quarter), (half, g_half)):
            starts = list(range(0, len(grid.coords), batch))
            got = [(start, pixels.copy()) for start, pixels in readers.stream(path, grid, starts)]
            assert [start for start, _ in got] == starts
            for (_, pixels), expected in zip(got, _threads(path, grid, starts, batch), strict=True):
                assert pixels.dtype == np.uint8 and np.array_equal(pixels, expected)
        # a resumed slide starts mid-grid and ends with a short batch
        starts = [6, 10, 14, 18]
        got = [pixels.copy() for _, pixels in readers.stream(half, g_half, starts)]
        assert [len(p) for p in got] == [4, 4, 4, 2]
        assert np.array_equal(np.concatenate(got), np.concatenate(_threads(half, g_half, starts, batch)))


def test_errors_name_the_slide_and_the_readers_recover(grids, tmp_path):
    (half, grid), _ = grids.items()
    starts = list(range(0, len(grid.coords), 2))  # 10 batches, 4 slots: at most 4 read ahead
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"not a slide")
    with ReaderProcesses(2, 2, INPUT) as readers:
        with pytest.raises(SlideError, match=r"broken\.tiff: reading tiles failed .*cannot open with OpenSlide"):
            list(readers.stream(broken, grid, starts))
        # closing a stream early waits for the reads in flight; the next stream starts clean
        early = readers.stream(half, grid, starts)
        next(early)
        early.close()
        batches = list(readers.stream(half, grid, starts))
        assert len(batches) == 10
        # readers killed mid-slide (a crash in a slide library, the OOM killer) fail that slide only
        stream = readers.stream(half, grid, starts)
        next(stream)
        for proc in readers._procs:
            os.kill(proc.pid, signal.SIGKILL)
        died = r"half\.tiff: tile reader process died \(tile-reader-0 exit code -9, tile-reader-1 exit code -9\)"
        with pytest.raises(SlideError, match=died):
            for _ in stream:
                pass
        again = [pixels.copy() for _, pixels in readers.stream(half, grid, starts)]
        assert np.array_equal(np.concatenate(again), np.concatenate(_threads(half, grid, starts, 2)))
    with pytest.raises(RuntimeError, match="closed"):
        next(readers.stream(half, grid, starts))


ORPHAN_JOB = """
import sys, time
from service.reader_processes import ReaderProcesses
if __name__ == "__main__":
    readers = ReaderProcesses(2, 4, 32)
    print(*(p.pid for p in readers._procs), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie is gone, just not yet reaped
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_readers_exit_when_the_job_is_killed(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(ORPHAN_JOB)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in job.stdout.readline().split()]
    assert len(pids) == 2 and all(map(_alive, pids))
    job.kill()  # SIGKILL: the job cannot tell its readers to stop
    job.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    assert not any(map(_alive, pids)), "reader processes outlived the killed job"
