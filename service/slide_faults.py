"""What the slide job does when part of a job goes wrong: unreadable tiles, failure stages, stale files.

* An unreadable tile (a corrupt compressed tile in the file) is recorded and the rest of the slide
  completes: its row in the partial file carries NaN probabilities, it is left out of the outputs,
  and ``summary.json`` counts it and lists its level-0 coordinates. OpenSlide marks a handle as
  failed after any read error (every later read on it fails too), so the handle is replaced.
* Every failure names its slide and its stage (``open``, ``tissue_mask``, ``tiles``, ``outputs``).
* A write that a kill interrupted leaves ``.<name>.<random>.tmp`` beside its target
  (:func:`models.card.atomic_file`); the next run of that slide removes it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.slides import SlideError, TileGrid, TileReader, open_slide, read_tile

log = logging.getLogger("histo_robust.wsi")

STAGES = ("open", "tissue_mask", "tiles", "outputs")
# white, like blank glass: what an unreadable tile is replaced by before inference (its result is dropped)
_FILL = 255


class StageError(SlideError):
    """A slide failure that names the slide and the stage it failed in."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


@contextlib.contextmanager
def failure_stage(path: Path, stage: str) -> Iterator[None]:
    """Re-raise any failure inside as a :class:`StageError` naming ``path`` and ``stage``."""
    try:
        yield
    except StageError:
        raise
    except Exception as exc:  # OpenSlide, PIL, numpy and the OS raise many types for a bad slide
        message = str(exc) if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
        if str(path) not in message:
            message = f"{path}: {message}"
        raise StageError(f"{message} [stage: {stage}]", stage) from exc


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Delete the ``.*.tmp`` files an interrupted atomic write left in a slide's output folder.

    Called with the folder's lock held, so no live writer owns them."""
    removed = []
    for stale in out_dir.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale.name)
    if removed:
        log.info("%s: removed %d temporary file(s) of an interrupted run", out_dir, len(removed))
    return removed


class TileFaults:
    """Tiles that could not be read, by level-0 ``(x, y)``; filled by readers in any thread."""

    def __init__(self) -> None:
        self.errors: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()

    def add(self, x: int, y: int, error: str) -> None:
        with self._lock:
            self.errors[(int(x), int(y))] = error

    def mask(self, coords: np.ndarray) -> np.ndarray:
        """True for each of ``coords`` that could not be read."""
        if not self.errors:
            return np.zeros(len(coords), bool)
        return np.array([(int(x), int(y)) in self.errors for x, y in coords], bool)


class ReopeningSlide:
    """One OpenSlide handle, replaced by :meth:`reopen` after a read error put it in its error state."""

    def __init__(self, path: Path) -> None:
        self.path, self.slide = path, open_slide(path)

    def reopen(self) -> None:
        self.slide.close()
        self.slide = open_slide(self.path)

    def close(self) -> None:
        self.slide.close()


def read_tiles_or_record(
    source, coords: np.ndarray, out: np.ndarray, level: int, read_size: int, faults: TileFaults
) -> None:
    """Read ``coords`` into ``out`` from ``source.slide``; an unreadable tile is filled, recorded in
    ``faults``, and ``source.reopen()`` called so the tiles after it still read."""
    size = out.shape[1]
    for i, (x, y) in enumerate(coords):
        try:
            out[i] = read_tile(source.slide, x, y, level, read_size, size)
        except Exception as exc:  # OpenSlide and PIL raise several types for a bad region
            out[i] = _FILL
            faults.add(x, y, f"{type(exc).__name__}: {exc}")
            log.warning("%s: unreadable tile at (%d, %d): %s", source.path, x, y, exc)
            source.reopen()


class FaultTolerantTileReader(TileReader):
    """:class:`TileReader` whose batches survive an unreadable tile (recorded in ``faults``)."""

    def __init__(self, path: Path, grid: TileGrid, input_size: int, faults: TileFaults) -> None:
        super().__init__(path, grid, input_size)
        self.faults = faults

    @property
    def slide(self):  # this thread's handle
        return self._slide()

    def reopen(self) -> None:
        # the failed handle stays in the list that close() closes; this thread opens a fresh one
        self._local.slide = None

    def read_batch(self, coords: np.ndarray) -> np.ndarray:
        batch = np.empty((len(coords), self.input_size, self.input_size, 3), np.uint8)
        read_tiles_or_record(self, coords, batch, self.grid.level, self.grid.read_size, self.faults)
        return batch


def unreadable_rows(probabilities: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """``probabilities`` with NaN in the rows of unreadable tiles (the partial file's marker)."""
    if not bad.any():
        return probabilities
    marked = probabilities.astype(np.float32, copy=True)
    marked[bad] = np.nan
    return marked


def split_unreadable(records: np.ndarray, n_classes: int) -> tuple[np.ndarray, list[list[int]]]:
    """Partial-file records without the unreadable tiles' rows, and those tiles' ``[x, y]``."""
    bad = np.isnan(records[:, 3 : 3 + n_classes]).any(axis=1)
    return records[~bad], records[bad, 1:3].astype(np.int64).tolist()
