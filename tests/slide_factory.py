"""Generated pyramidal TIFF slides with known tissue regions, read by OpenSlide's generic-tiff driver.

Tissue is pink/purple H&E-like texture with dark "nuclei" on near-white glass, inside axis-aligned
boxes, so tests can assert the tissue mask and the tile count exactly. Each pyramid level is its
own tiled page (generic-tiff takes every tiled page as a level), with resolution tags in pixels
per centimetre, or none, to exercise the missing-mpp path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

GLASS = 245
TISSUE_RGB = np.array([205, 120, 175], np.float32)
NUCLEUS_SHIFT = np.array([-110, -60, -30], np.float32)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (level-0 pixels, end exclusive)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    texture = rng.normal(0, 18, (h // 4 + 1, w // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    nuclei = (rng.random((h, w, 1)) < 0.02) * NUCLEUS_SHIFT
    return np.clip(TISSUE_RGB + texture + nuclei, 0, 255).astype(np.uint8)


def tissue_image(width: int, height: int, boxes: list[Box], seed: int = 0) -> np.ndarray:
    """White glass with textured tissue rectangles where ``boxes`` say (whole image in memory)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), GLASS, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = _texture(rng, y1 - y0, x1 - x0)
    return image


def _resolution(mpp: float | None, downsample: float) -> dict:
    if mpp is None:
        return {}
    per_cm = 10_000 / (mpp * downsample)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256) -> Path:
    """``image`` as level 0 and ``levels - 1`` halvings, each a tiled zlib page."""
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        current = image
        for level in range(levels):
            tif.write(
                current,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if level == 0 else 1,
                **_resolution(mpp, 2**level),
            )
            h, w = current.shape[:2]
            current = np.asarray(Image.fromarray(current).resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR))
    return path


def write_streamed_pyramid(
    path: Path, side: int, boxes: list[Box], mpp: float | None = 0.495, tile: int = 512, min_level_side: int = 2048
) -> Path:
    """A ``side`` × ``side`` pyramid written tile by tile from generators (BigTIFF).

    No level is ever whole in memory, so a 40k × 40k slide (4.8 GB of RGB) is written with a few
    MB. Each level is rendered directly at its own scale (box corners divided by the downsample),
    so levels agree on where tissue is without being resampled from level 0.
    """

    def tiles(h: int, w: int, scale: int) -> Iterator[np.ndarray]:
        scaled = [tuple(v // scale for v in box) for box in boxes]
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                block = np.full((tile, tile, 3), GLASS, np.uint8)
                for x0, y0, x1, y1 in scaled:
                    ya, yb = max(y, y0), min(y + tile, y1, h)
                    xa, xb = max(x, x0), min(x + tile, x1, w)
                    if yb > ya and xb > xa:
                        rng = np.random.default_rng((y * 1_000_003 + x) * 64 + scale)
                        block[ya - y : yb - y, xa - x : xb - x] = _texture(rng, yb - ya, xb - xa)
                yield block

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        scale = 1
        while True:
            h = w = side // scale
            tif.write(
                tiles(h, w, scale),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if scale == 1 else 1,
                **_resolution(mpp, scale),
            )
            if max(h, w) <= min_level_side:
                break
            scale *= 2
    return path
