"""Whole-slide reading with OpenSlide: microns per pixel, tissue mask, tile grid, tile reads.

Tiles are cut at the model card's physical size (``patch_size_pixels × mpp`` µm), read from the
pyramid level closest above the needed resolution and resized, so a model trained at 0.5 µm/px
sees 0.5 µm/px tiles whatever the scanner.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm"}


class SlideError(RuntimeError):
    """A slide that cannot be processed; the message names the file and the reason."""


def open_slide(path: Path) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as exc:
        raise SlideError(f"{path}: cannot open with OpenSlide ({type(exc).__name__}: {exc})") from None


def slide_mpp(slide: openslide.OpenSlide, path: Path, override: float | None = None) -> tuple[float, str]:
    """µm/px of level 0 and where it came from: ``--mpp``, OpenSlide's property, or TIFF resolution tags."""
    if override is not None:
        if override <= 0:
            raise SlideError(f"{path}: --mpp must be positive, got {override}")
        return float(override), "--mpp"
    props = slide.properties
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(props.get(key, ""))
        except ValueError:
            continue
        if value > 0:
            return value, key
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        resolution = float(props.get("tiff.XResolution", ""))
    except ValueError:
        resolution = 0.0
    per_unit = {"centimeter": 10_000.0, "inch": 25_400.0}.get(unit)
    if per_unit and resolution > 0:
        return per_unit / resolution, "tiff.XResolution"
    raise SlideError(
        f"{path}: no usable microns-per-pixel (no {openslide.PROPERTY_NAME_MPP_X}, no TIFF resolution in cm/inch); "
        "pass --mpp"
    )


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_total * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def _shift_or(mask: np.ndarray, radius: int, op) -> np.ndarray:
    out = mask.copy()
    padded = np.pad(mask, radius, mode="constant", constant_values=op is np.logical_and)
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out = op(out, padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w])
    return out


def tissue_mask(
    slide: openslide.OpenSlide, max_side: int = 2048, min_saturation: int = 20, max_saturation: int = 50
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a low-resolution thumbnail, and its downsample from level 0.

    Otsu on HSV saturation (stained tissue is coloured, glass and white background are not),
    clamped to [min_saturation, max_saturation]: the floor keeps an almost empty slide from being
    split at noise level, the ceiling keeps a slide that is nearly all tissue from being split
    inside the tissue. Then a morphological opening + closing removes specks and fills pinholes.
    """
    w, h = slide.dimensions
    scale = max(w, h) / max_side if max(w, h) > max_side else 1.0
    thumb = slide.get_thumbnail((max(1, int(w / scale)), max(1, int(h / scale)))).convert("RGB")
    saturation = np.asarray(thumb.convert("HSV"))[..., 1]
    threshold = min(max(otsu_threshold(saturation), min_saturation), max_saturation)
    mask = saturation > threshold
    mask = _shift_or(_shift_or(mask, 1, np.logical_and), 1, np.logical_or)  # opening: drop specks
    mask = _shift_or(_shift_or(mask, 1, np.logical_or), 1, np.logical_and)  # closing: fill pinholes
    downsample = w / mask.shape[1]
    return mask, downsample


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``side`` level-0 pixels on a regular grid; ``keep`` holds the tissue tiles' (x, y)."""

    side: int
    level: int
    level_downsample: float
    read_size: int
    coords: np.ndarray  # [N, 2] level-0 x, y of tissue tiles, row-major order
    tissue_fraction: np.ndarray
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
    """The tissue tiles covering ``patch_pixels × target_mpp`` µm each, and the level to read them from."""
    side = max(1, int(round(patch_pixels * target_mpp / mpp)))
    w, h = slide.dimensions
    want = target_mpp / mpp  # downsample from level 0 that gives target_mpp
    level = slide.get_best_level_for_downsample(want + 1e-6)
    level_ds = float(slide.level_downsamples[level])
    read_size = max(1, int(math.ceil(side / level_ds)))
    xs, ys = np.arange(0, w - side + 1, side), np.arange(0, h - side + 1, side)
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    coords, fractions = [], []
    mh, mw = mask.shape
    for y in ys:
        y0 = min(mh - 1, int(y / mask_downsample))
        y1 = max(y0 + 1, min(mh, int(math.ceil((y + side) / mask_downsample))))
        for x in xs:
            x0 = min(mw - 1, int(x / mask_downsample))
            x1 = max(x0 + 1, min(mw, int(math.ceil((x + side) / mask_downsample))))
            area = (y1 - y0) * (x1 - x0)
            inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            fraction = inside / area
            if fraction >= min_tissue:
                coords.append((int(x), int(y)))
                fractions.append(fraction)
    return TileGrid(
        side,
        level,
        level_ds,
        read_size,
        np.array(coords, dtype=np.int64).reshape(-1, 2),
        np.array(fractions),
        len(xs) * len(ys),
    )


class TileReader:
    """Reads tiles at the grid's level and resizes them to the model input; one handle per thread."""

    def __init__(self, path: Path, grid: TileGrid, input_size: int) -> None:
        self.path, self.grid, self.input_size = path, grid, input_size
        self._local = threading.local()

    def _slide(self) -> openslide.OpenSlide:
        if not hasattr(self._local, "slide"):
            self._local.slide = open_slide(self.path)
        return self._local.slide

    def read(self, x: int, y: int) -> np.ndarray:
        g = self.grid
        region = self._slide().read_region((int(x), int(y)), g.level, (g.read_size, g.read_size))
        background = Image.new("RGBA", region.size, (255, 255, 255, 255))  # transparent = no tissue scanned
        rgb = Image.alpha_composite(background, region).convert("RGB")
        if rgb.size != (self.input_size, self.input_size):
            rgb = rgb.resize((self.input_size, self.input_size), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)

    def read_batch(self, coords: np.ndarray) -> np.ndarray:
        return np.stack([self.read(x, y) for x, y in coords])
