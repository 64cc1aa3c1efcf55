"""Generated pyramidal TIFF slides with known tissue regions, readable by OpenSlide's generic-tiff driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def tissue_image(width: int, height: int, boxes: list[tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """White glass with pink/purple textured H&E-like rectangles (x0, y0, x1, y1) where tissue is."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    for x0, y0, x1, y1 in boxes:
        h, w = y1 - y0, x1 - x0
        base = np.array([205, 120, 175], np.float32)
        texture = rng.normal(0, 18, (h // 4 + 1, w // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
        nuclei = (rng.random((h, w, 1)) < 0.02) * np.array([-110, -60, -30], np.float32)
        image[y0:y1, x0:x1] = np.clip(base + texture + nuclei, 0, 255).astype(np.uint8)
    return image


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256) -> Path:
    """Each level a tiled page, halving in size; resolution tags in pixels per centimetre (or none)."""
    extra = {}
    if mpp is not None:
        extra = {"resolution": (10_000 / mpp, 10_000 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        current = image
        for level in range(levels):
            tif.write(
                current,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if level == 0 else 1,
                **extra,
            )
            if level + 1 < levels:
                h, w = current.shape[:2]
                current = np.asarray(Image.fromarray(current).resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR))
                if mpp is not None:
                    extra = {
                        "resolution": (extra["resolution"][0] / 2, extra["resolution"][1] / 2),
                        "resolutionunit": "CENTIMETER",
                    }
    return path
