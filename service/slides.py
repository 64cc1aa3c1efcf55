"""Whole-slide reading with OpenSlide: microns per pixel, tissue mask, tile grid, tile reads.

Tiles are cut at the model card's physical size (``patch_size_pixels × mpp`` µm), read from the
pyramid level closest above the needed resolution and resized to the graph's input, so a model
trained at 0.5 µm/px sees 0.5 µm/px tiles whatever the scanner. Everything here reads a bounded
amount of pixels at a time, so memory does not grow with the slide's size.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm"}
# Per TIFF ResolutionUnit: micrometres in one unit (resolution tags are pixels per unit).
_MICRONS_PER_UNIT = {"centimeter": 10_000.0, "inch": 25_400.0}
# A thumbnail is read in horizontal strips of at most this many level pixels, so a slide without a
# small pyramid level (a single-level tiled TIFF, say) never needs its whole level in memory.
_STRIP_PIXELS = 4 * 1024 * 1024
# A tile is kept when at least this share of it is tissue (the slide job's --min-tissue default).
DEFAULT_MIN_TISSUE = 0.5


class SlideError(RuntimeError):
    """A slide that cannot be processed; the message names the file and the reason."""


def open_slide(path: Path) -> openslide.OpenSlide:
    """Open with OpenSlide, turning its several exception types into one :class:`SlideError`."""
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as exc:
        raise SlideError(f"{path}: cannot open with OpenSlide ({type(exc).__name__}: {exc})") from None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders as their slide files (by suffix, not recursive), in sorted order.

    A folder or file reached twice (given twice, or through a symbolic link, a loop included) is
    listed once, so a job neither runs nor counts it twice."""
    slides: list[Path] = []
    seen: set[str] = set()  # real paths (os.path.realpath never raises on a symlink loop)
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if os.path.realpath(path) in seen:
                continue
            seen.add(os.path.realpath(path))
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        else:
            found = [path]
        for slide in found:
            if os.path.realpath(slide) not in seen:
                seen.add(os.path.realpath(slide))
                slides.append(slide)
    return slides


def _positive_float(value: str | None) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) and number > 0 else None


def mpp_from_properties(
    properties: Mapping[str, str], name: str | Path, override: float | None = None
) -> tuple[float, str]:
    """Level-0 µm/px and where it came from: ``--mpp``, ``openslide.mpp-x/y``, or TIFF resolution tags.

    OpenSlide fills ``openslide.mpp-x`` for most vendors (and, from 4.0, for generic TIFFs with a
    centimetre or inch resolution unit); the TIFF-tag fallback covers the drivers and versions that
    expose ``tiff.XResolution`` without deriving an mpp. Guessing a default would silently tile at
    the wrong scale, so a slide with neither is an error unless ``--mpp`` is given.
    """
    if override is not None:
        if not (math.isfinite(override) and override > 0):
            raise SlideError(f"{name}: --mpp must be a positive number, got {override}")
        return float(override), "--mpp"
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        value = _positive_float(properties.get(key))
        if value is not None:
            return value, key
    unit = (properties.get("tiff.ResolutionUnit") or "").lower()
    for key in ("tiff.XResolution", "tiff.YResolution"):
        resolution = _positive_float(properties.get(key))
        if resolution is not None and unit in _MICRONS_PER_UNIT:
            return _MICRONS_PER_UNIT[unit] / resolution, key
    raise SlideError(
        f"{name}: no usable microns-per-pixel (no {openslide.PROPERTY_NAME_MPP_X} property and no TIFF "
        f"resolution in centimeter/inch units; ResolutionUnit={unit or 'absent'}); pass --mpp"
    )


def slide_mpp(slide: openslide.OpenSlide, path: Path, override: float | None = None) -> tuple[float, str]:
    """:func:`mpp_from_properties` of an open slide."""
    return mpp_from_properties(slide.properties, path, override)


def read_thumbnail(slide: openslide.OpenSlide, max_side: int) -> tuple[Image.Image, float]:
    """RGB thumbnail whose longer side is at most ``max_side``, and its downsample from level 0.

    Like ``OpenSlide.get_thumbnail`` (best level, then an area-averaging resize), but read in strips:
    ``get_thumbnail`` reads the whole chosen level at once, which for a 40k × 40k slide without a
    small pyramid level is gigabytes.
    """
    w, h = slide.dimensions
    scale = max(w, h) / max_side if max(w, h) > max_side else 1.0
    out_w, out_h = max(1, round(w / scale)), max(1, round(h / scale))
    level = slide.get_best_level_for_downsample(scale)
    lw, lh = slide.level_dimensions[level]
    level_ds = float(slide.level_downsamples[level])
    thumb = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    rows_per_out = lh / out_h  # level rows behind one thumbnail row
    chunk = max(1, int(_STRIP_PIXELS / max(1, lw) / rows_per_out))  # thumbnail rows per strip
    for o0 in range(0, out_h, chunk):
        o1 = min(out_h, o0 + chunk)
        f0, f1 = o0 * rows_per_out, o1 * rows_per_out  # exact (fractional) level rows of this strip
        r0, r1 = int(math.floor(f0)), min(lh, int(math.ceil(f1)))
        region = _on_white(slide.read_region((0, int(r0 * level_ds)), level, (lw, r1 - r0)))
        # the fractional box makes each strip resample exactly as the whole level would: no seams
        thumb.paste(region.resize((out_w, o1 - o0), Image.BOX, box=(0, f0 - r0, lw, f1 - r0)), (0, o0))
    return thumb, w / out_w


def _on_white(region: Image.Image) -> Image.Image:
    """RGBA from OpenSlide → RGB; transparent pixels (not scanned) become white glass."""
    if region.getchannel("A").getextrema()[0] == 255:  # the common case: fully scanned, skip compositing
        return region.convert("RGB")
    background = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, region).convert("RGB")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (the split that maximises between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def _morph(mask: np.ndarray, radius: int, op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Square-window erosion (``np.logical_and``) or dilation (``np.logical_or``) by shifting the mask."""
    h, w = mask.shape
    padded = np.pad(mask, radius, mode="constant", constant_values=op is np.logical_and)
    out = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out = op(out, padded[dy : dy + h, dx : dx + w])
    return out


def tissue_mask(
    slide: openslide.OpenSlide, max_side: int = 2048, min_saturation: int = 20, max_saturation: int = 50
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a low-resolution thumbnail, and its downsample from level 0.

    Otsu on HSV saturation (stained tissue is coloured; glass, dust shadows and white background are
    not), clamped to [min_saturation, max_saturation]: the floor keeps an almost empty slide from
    being split at noise level, the ceiling keeps a slide that is nearly all tissue from being split
    inside the tissue. A 3 × 3 opening then drops specks and a closing fills pinholes, so isolated
    pixels neither create nor puncture tiles.
    """
    thumb, downsample = read_thumbnail(slide, max_side)
    saturation = np.asarray(thumb.convert("HSV"))[..., 1]
    threshold = min(max(otsu_threshold(saturation), min_saturation), max_saturation)
    mask = saturation > threshold
    mask = _morph(_morph(mask, 1, np.logical_and), 1, np.logical_or)  # opening: drop specks
    mask = _morph(_morph(mask, 1, np.logical_or), 1, np.logical_and)  # closing: fill pinholes
    return mask, downsample


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of ``side`` level-0 pixels on a regular grid from (0, 0).

    ``coords`` holds the level-0 (x, y) of the tiles with enough tissue, in row-major order (the
    order of every output); they are read at ``level`` as ``read_size``-pixel squares.
    """

    side: int
    level: int
    level_downsample: float
    read_size: int
    coords: np.ndarray  # [N, 2] int64
    tissue_fraction: np.ndarray  # [N] float64
    n_grid: int


def tile_grid(
    slide: openslide.OpenSlide,
    mpp: float,
    target_mpp: float,
    patch_pixels: int,
    mask: np.ndarray,
    mask_downsample: float,
    min_tissue: float,
) -> TileGrid:
    """The tissue tiles covering ``patch_pixels × target_mpp`` µm each, and the level to read them from.

    The read level is the coarsest whose downsample does not exceed the one needed (OpenSlide's
    ``get_best_level_for_downsample``), so tiles are only ever shrunk from finer pixels or resized
    by a small factor, never blown up from a coarse level.
    """
    side = max(1, round(patch_pixels * target_mpp / mpp))
    w, h = slide.dimensions
    level = slide.get_best_level_for_downsample(target_mpp / mpp + 1e-6)
    level_ds = float(slide.level_downsamples[level])
    read_size = max(1, math.ceil(side / level_ds))
    xs = np.arange(0, w - side + 1, side, dtype=np.int64)
    ys = np.arange(0, h - side + 1, side, dtype=np.int64)
    mh, mw = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def spans(starts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.minimum(limit - 1, (starts / mask_downsample).astype(np.int64))
        hi = np.maximum(lo + 1, np.minimum(limit, np.ceil((starts + side) / mask_downsample).astype(np.int64)))
        return lo, hi

    x0, x1 = spans(xs, mw)
    y0, y1 = spans(ys, mh)
    y0, y1 = y0[:, None], y1[:, None]
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    fraction = inside / ((y1 - y0) * (x1 - x0))
    rows, cols = np.nonzero(fraction >= min_tissue)  # row-major, like reading order
    coords = np.stack([xs[cols], ys[rows]], axis=1).reshape(-1, 2)
    return TileGrid(side, level, level_ds, read_size, coords, fraction[rows, cols], len(xs) * len(ys))


def tissue_tiles(
    slide: openslide.OpenSlide,
    level0_mpp: float,
    target_mpp: float,
    patch_pixels: int,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> tuple[np.ndarray, float, TileGrid]:
    """Tissue mask, its downsample and the tile grid: the one way tiles are cut from a slide.

    The slide job classifies these tiles and training cuts its annotation tiles with this same
    function, so a model trained on annotations sees the pixels the slide job later feeds it.
    """
    mask, mask_downsample = tissue_mask(slide)
    grid = tile_grid(slide, level0_mpp, target_mpp, patch_pixels, mask, mask_downsample, min_tissue)
    return mask, mask_downsample, grid


def read_tile(slide: openslide.OpenSlide, x: int, y: int, level: int, read_size: int, input_size: int) -> np.ndarray:
    """uint8 ``[input_size, input_size, 3]``: the ``read_size`` square at ``level`` whose level-0
    top-left corner is (x, y), on white, resized as training and ``/classify`` resize."""
    rgb = _on_white(slide.read_region((int(x), int(y)), level, (read_size, read_size)))
    if rgb.size != (input_size, input_size):
        rgb = rgb.resize((input_size, input_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


class TileReader:
    """Reads grid tiles and resizes them to the model input, with one OpenSlide handle per thread.

    OpenSlide handles may be shared between threads, but each keeps one tile cache and decoding
    lock-steps on it; a handle per reader thread lets threads decode in parallel. ``close`` closes
    every handle this reader opened.
    """

    def __init__(self, path: Path, grid: TileGrid, input_size: int) -> None:
        self.path, self.grid, self.input_size = path, grid, input_size
        self._local = threading.local()
        self._handles: list[openslide.OpenSlide] = []
        self._lock = threading.Lock()

    def _slide(self) -> openslide.OpenSlide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._local.slide = open_slide(self.path)
            with self._lock:
                self._handles.append(slide)
        return slide

    def read(self, x: int, y: int) -> np.ndarray:
        """uint8 ``[S, S, 3]`` tile whose top-left level-0 corner is (x, y)."""
        return read_tile(self._slide(), x, y, self.grid.level, self.grid.read_size, self.input_size)

    def read_batch(self, coords: np.ndarray) -> np.ndarray:
        """uint8 ``[len(coords), S, S, 3]``, in the order of ``coords``."""
        batch = np.empty((len(coords), self.input_size, self.input_size, 3), np.uint8)
        for i, (x, y) in enumerate(coords):
            batch[i] = self.read(x, y)
        return batch

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for slide in handles:
            slide.close()
