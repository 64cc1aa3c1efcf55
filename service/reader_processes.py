"""Tile reading in spawned processes that write each batch into shared memory.

Why processes: reader threads share one interpreter. On a 16-core H200 host they peaked at 3,600
tiles/s with 8 threads and slowed down beyond that, while the GPU infers 7,400-9,000 tiles/s.
Spawned processes that sent their tiles back pickled were slower still (1,200-1,800 tiles/s),
because the parent unpickled every tile. Here each process writes its batch straight into a
shared ring of batch slots and sends back only the slot number. With 16 processes that read 8,877
tiles/s on the same host (``benchmarks/device/readers.py``, results in
``benchmarks/results/h200-gpu/session-per-size/readers.json``).

One :class:`ReaderProcesses` serves a whole job: the processes start once, keep the current
slide's OpenSlide handle open, and move on to the next slide when its tasks arrive. Batches come
back in order, and at most ``slots`` are being read or waiting, so memory stays flat whatever the
slide size.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
from collections.abc import Iterator
from multiprocessing import get_context
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from service.slide_faults import ReopeningSlide, TileFaults, read_tiles_or_record
from service.slides import SlideError, TileGrid, read_tile

log = logging.getLogger("histo_robust.readers")

# How often a waiting reader checks that the job is still alive, and the job that its readers are.
_POLL_S = 1.0


def _read_loop(shm_name: str, shape: tuple[int, ...], tasks, done, parent: int) -> None:
    """A reader process: read each task's tiles into its ring slot, answer ``(seq, slot, error, faults)``.

    With ``tolerant`` tasks an unreadable tile is filled, listed in ``faults`` as ``(x, y, error)``
    and the handle reopened (OpenSlide fails every read on a handle after its first error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the job's to handle; it stops the readers
    shm = SharedMemory(name=shm_name)
    ring = np.ndarray(shape, np.uint8, buffer=shm.buf)
    current: tuple[str, ReopeningSlide] | None = None  # (path, handle) of the slide being read
    try:
        while True:
            try:
                task = tasks.get(timeout=_POLL_S)
            except queue.Empty:
                if os.getppid() != parent:  # the job was killed (SIGKILL leaves no one to say stop)
                    return
                continue
            if task is None:
                return
            seq, path, level, read_size, coords, slot, tolerant = task
            try:
                if current is None or current[0] != path:
                    if current is not None:
                        current[1].close()
                        current = None
                    current = (path, ReopeningSlide(Path(path)))
                faults = TileFaults()
                if tolerant:
                    read_tiles_or_record(current[1], coords, ring[slot], level, read_size, faults)
                else:
                    for i, (x, y) in enumerate(coords):
                        ring[slot, i] = read_tile(current[1].slide, x, y, level, read_size, shape[2])
                done.put((seq, slot, None, [(x, y, e) for (x, y), e in faults.errors.items()]))
            except Exception as exc:  # OpenSlide and PIL raise several types for a bad file or region
                error = str(exc) if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
                done.put((seq, slot, error, []))
    finally:
        if current is not None:
            current[1].close()
        del ring
        shm.close()


class ReaderProcesses:
    """``processes`` spawned tile readers sharing a ring of ``slots`` batches of ``batch_size`` tiles.

    Use as a context manager (or call :meth:`close`): the processes and the shared memory live
    until then. A reader that dies (a crash inside a slide library, the OOM killer) fails the slide
    being read with a :class:`SlideError`; the next slide gets fresh readers.
    """

    def __init__(self, processes: int, batch_size: int, input_size: int, slots: int | None = None) -> None:
        if processes < 1 or batch_size < 1:
            raise ValueError(f"processes and batch_size must be >= 1, got {processes} and {batch_size}")
        self.processes, self.batch_size = processes, batch_size
        self.slots = slots or 2 * processes
        self.shape = (self.slots, batch_size, input_size, input_size, 3)
        self._ctx = get_context("spawn")  # fork would copy the job's onnxruntime and CUDA state
        self._procs: list = []
        self._shm: SharedMemory | None = None
        self._ring: np.ndarray | None = None
        self._start()

    def _start(self) -> None:
        self._shm = SharedMemory(create=True, size=int(np.prod(self.shape)))
        self._ring = np.ndarray(self.shape, np.uint8, buffer=self._shm.buf)
        self._tasks, self._done = self._ctx.Queue(), self._ctx.Queue()
        self._procs = [
            self._ctx.Process(
                target=_read_loop,
                args=(self._shm.name, self.shape, self._tasks, self._done, os.getpid()),
                name=f"tile-reader-{i}",
                daemon=True,
            )
            for i in range(self.processes)
        ]
        for proc in self._procs:
            proc.start()

    def _stop(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                self._tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs = []
        for q in (self._tasks, self._done):
            q.close()
            q.join_thread()
        self._ring = None  # the view must go before the mapping closes
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    def close(self) -> None:
        """Stop the readers and free the shared memory (idempotent)."""
        if self._shm is not None:
            self._stop()

    def __enter__(self) -> ReaderProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self) -> tuple[int, int, str | None, list]:
        """The next finished task; a reader that died makes this a :class:`SlideError`."""
        while True:
            try:
                return self._done.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in dead)
                    raise _ReadersDied(f"tile reader process died ({codes})") from None

    def stream(
        self, path: Path, grid: TileGrid, starts: list[int], faults: TileFaults | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, pixels)`` for each batch start, in order, read ahead by the processes.

        With ``faults``, an unreadable tile is recorded there (before its batch is yielded) and the
        slide goes on; without, it fails the slide.

        ``pixels`` is a view of a ring slot, valid until the next batch is asked for: the slot is
        then handed to another read. Closing the generator early waits for the reads in flight, so
        no slot is written after the next slide starts.
        """
        if self._shm is None:
            raise RuntimeError("ReaderProcesses is closed")
        if not self._procs or any(not p.is_alive() for p in self._procs):
            self._stop()
            self._start()
        n = len(grid.coords)
        free = list(range(self.slots))
        in_flight: dict[int, int] = {}  # seq -> slot, sent and not yet answered
        answered: dict[int, tuple[int, str | None]] = {}  # seq -> (slot, error), out of order
        todo = iter(enumerate(starts))
        seq = 0
        try:
            while True:
                while free and (item := next(todo, None)) is not None:
                    k, start = item
                    coords = grid.coords[start : start + self.batch_size]
                    slot = free.pop()
                    self._tasks.put((k, str(path), grid.level, grid.read_size, coords, slot, faults is not None))
                    in_flight[k] = slot
                if seq not in in_flight and seq not in answered:
                    return
                while seq not in answered:
                    k, slot, error, bad = self._answer()
                    del in_flight[k]
                    answered[k] = (slot, error)
                    for x, y, why in bad:
                        faults.add(x, y, why)
                slot, error = answered.pop(seq)
                if error is not None:
                    raise SlideError(f"{path}: reading tiles failed ({error})")
                start = starts[seq]
                yield start, self._ring[slot, : min(self.batch_size, n - start)]
                free.append(slot)
                seq += 1
        except _ReadersDied as exc:
            in_flight.clear()  # their answers went with the old readers
            self._stop()
            self._start()
            raise SlideError(f"{path}: {exc}") from None
        finally:
            try:
                while in_flight:  # reads already sent still write their slots: let them finish
                    k, *_ = self._answer()
                    in_flight.pop(k, None)
            except _ReadersDied:
                self._stop()
                self._start()


class _ReadersDied(RuntimeError):
    pass
