"""Slides of real tissue for annotation tests: pyramidal TIFF mosaics of Kather 2016 tiles.

A mosaic is a layout of polygonal regions, one tissue class each (Voronoi cells of random points,
merged by class, with small round islands of another class cut into them), inside a margin of
glass. Every region is filled with real Kather tiles of its class, so the slide looks like H&E
tissue to the encoder and the exact ground truth is known to the pixel. It is written as a
pyramidal TIFF with µm/px tags (``slide_factory.write_pyramid``, OpenSlide's generic-tiff driver),
with the matching annotations as QuPath writes them (``write_qupath_geojson``): exact, or as a
hurried annotator would draw them (``training.noise.annotation_noise``).

Kather JN et al., Sci Rep 6, 27988 (2016), doi:10.5281/zenodo.53169, CC BY 4.0.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw
from shapely.geometry import mapping

from tests.slide_factory import GLASS, write_pyramid

KATHER_MPP = 0.495
KATHER_TILE = 150
Regions = list[tuple[str, shapely.Geometry]]


@dataclass
class Mosaic:
    path: Path
    regions: Regions  # exact: (class, polygon), disjoint
    width: int
    height: int
    mpp: float


def kather_tiles(root: Path, slides: set[str] | None = None) -> dict[str, list[Path]]:
    """Class folder name → tile files (``.webp``/``.tif``), only from ``slides`` (ids like CRC-Prim-HE-07)."""
    tiles = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".webp", ".tif", ".tiff", ".png"))
        if slides is not None:
            files = [f for f in files if (m := re.search(r"CRC-Prim-HE-\d+", f.name)) and m.group(0) in slides]
        if files:
            tiles[folder.name] = files
    return tiles


def mosaic_layout(
    classes: list[str],
    width: int,
    height: int,
    *,
    seed: int = 0,
    regions_per_class: int = 2,
    islands: int = 4,
    island_radius: float = 120.0,
    margin: int = 150,
) -> Regions:
    """Disjoint polygonal regions, each of one class, covering the tissue box inside ``margin``.

    Voronoi cells of random points (every class gets ``regions_per_class`` cells), merged where
    neighbours share a class; then ``islands`` discs of another class are cut out of the regions
    they fall in, leaving holes there (a lymphoid aggregate in stroma, say).
    """
    rng = np.random.default_rng(seed)
    tissue = shapely.box(margin, margin, width - margin, height - margin)
    n = len(classes) * regions_per_class
    points = shapely.MultiPoint(np.c_[rng.uniform(margin, width - margin, n), rng.uniform(margin, height - margin, n)])
    cells = [c.intersection(tissue) for c in shapely.get_parts(shapely.voronoi_polygons(points, extend_to=tissue))]
    owner = rng.permutation(np.arange(n) % len(classes))
    regions: Regions = []
    for c, name in enumerate(classes):
        merged = shapely.union_all([cell for cell, o in zip(cells, owner, strict=True) if o == c])
        regions += [(name, part) for part in shapely.get_parts(merged) if part.area > 0]
    for _ in range(islands):
        centre = shapely.Point(
            rng.uniform(margin + 2 * island_radius, width - margin - 2 * island_radius),
            rng.uniform(margin + 2 * island_radius, height - margin - 2 * island_radius),
        )
        host = next((k for k, (_, g) in enumerate(regions) if g.contains(centre)), None)
        if host is None:
            continue
        disc = centre.buffer(island_radius, quad_segs=8).intersection(regions[host][1])
        other = [c for c in classes if c != regions[host][0]]
        name = other[rng.integers(len(other))]
        regions = [(n_, g.difference(disc)) for n_, g in regions]
        regions.append((name, disc))
    polygonal = [
        (name, shapely.union_all([p for p in shapely.get_parts(g) if p.geom_type == "Polygon"])) for name, g in regions
    ]
    return [(name, g) for name, g in polygonal if not g.is_empty and g.area > 0]


def _draw(draw: ImageDraw.ImageDraw, geometry: shapely.Geometry, value: int) -> None:
    for polygon in shapely.get_parts(geometry):
        if polygon.geom_type != "Polygon":
            continue
        draw.polygon([tuple(p) for p in np.asarray(polygon.exterior.coords)], fill=value)
        for ring in polygon.interiors:
            draw.polygon([tuple(p) for p in np.asarray(ring.coords)], fill=0)


def render(regions: Regions, width: int, height: int, tiles: dict[str, list[Path]], seed: int = 0) -> np.ndarray:
    """RGB mosaic: glass outside the regions, each region filled with random tiles of its class
    laid on a grid of its own random offset (so tile seams do not line up with the model's grid)."""
    rng = np.random.default_rng(seed)
    labels = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(labels)
    order = sorted(range(len(regions)), key=lambda k: -regions[k][1].area)  # islands over their hosts' holes
    for k in order:
        _draw(draw, regions[k][1], k + 1)
    label = np.asarray(labels)
    image = np.full((height, width, 3), GLASS, np.uint8)
    cache: dict[Path, np.ndarray] = {}
    for name in sorted({n for n, _ in regions}):
        inside = np.isin(label, [k + 1 for k, (n, _) in enumerate(regions) if n == name])
        if not inside.any():
            continue
        ox, oy = rng.integers(0, KATHER_TILE, 2)
        canvas = np.empty((height + KATHER_TILE, width + KATHER_TILE, 3), np.uint8)
        for y in range(0, height + KATHER_TILE - oy, KATHER_TILE):
            for x in range(0, width + KATHER_TILE - ox, KATHER_TILE):
                file = tiles[name][rng.integers(len(tiles[name]))]
                if file not in cache:
                    with Image.open(file) as tile:
                        cache[file] = np.asarray(tile.convert("RGB").resize((KATHER_TILE, KATHER_TILE)))
                patch = cache[file]
                h, w = min(KATHER_TILE, canvas.shape[0] - y), min(KATHER_TILE, canvas.shape[1] - x)
                canvas[y : y + h, x : x + w] = patch[:h, :w]
        image[inside] = canvas[oy : oy + height, ox : ox + width][inside]
    return image


def make_mosaic(
    path: Path,
    tiles: dict[str, list[Path]],
    width: int,
    height: int,
    *,
    seed: int = 0,
    classes: list[str] | None = None,
    **layout,
) -> Mosaic:
    """Lay out, render and write one mosaic slide at Kather's 0.495 µm/px (3 pyramid levels)."""
    regions = mosaic_layout(classes or sorted(tiles), width, height, seed=seed, **layout)
    return write_mosaic(path, regions, width, height, tiles, seed)


def write_mosaic(path: Path, regions: Regions, width: int, height: int, tiles: dict[str, list[Path]], seed: int = 0):
    """Render ``regions`` (a layout of one's own: rectangles on the tile grid, say) and write the slide."""
    write_pyramid(path, render(regions, width, height, tiles, seed), KATHER_MPP, levels=3)
    return Mosaic(path, regions, width, height, KATHER_MPP)


def _colour(name: str) -> tuple[int, int, int]:
    digest = uuid.uuid5(uuid.NAMESPACE_URL, name).bytes
    return digest[0], digest[1], digest[2]


def qupath_feature(name: str, geometry: shapely.Geometry, index: int, legacy: bool = False) -> dict:
    """A feature as QuPath writes an annotation: v0.4+ (``id`` UUID, ``classification.color``
    [r, g, b], measurements a map) or, with ``legacy``, v0.2/0.3 (``id`` PathAnnotationObject,
    ``classification.colorRGB`` a packed signed int, measurements a list of {name, value})."""
    r, g, b = _colour(name)
    if legacy:
        packed = (0xFF << 24 | r << 16 | g << 8 | b) - (1 << 32)  # Java's signed ARGB int
        return {
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": mapping(geometry),
            "properties": {
                "classification": {"name": name, "colorRGB": packed},
                "isLocked": False,
                "measurements": [{"name": "Area px^2", "value": geometry.area}],
            },
        }
    return {
        "type": "Feature",
        "id": str(uuid.UUID(int=index + 1)),
        "geometry": mapping(geometry),
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": [r, g, b]},
            "isLocked": True,
            "measurements": {"Area px^2": geometry.area},
        },
    }


def write_qupath_geojson(path: Path, regions: Regions, *, bare_array: bool = False, legacy: bool = False) -> Path:
    """QuPath's export of ``regions``: a FeatureCollection (File ▸ Export objects), or a bare array
    of features (``GsonTools.getInstance().toJson(annotations)`` in a script)."""
    features = [qupath_feature(name, geometry, k, legacy) for k, (name, geometry) in enumerate(regions)]
    body = features if bare_array else {"type": "FeatureCollection", "features": features}
    path.write_text(json.dumps(body, indent=2))
    return path
