"""Patch sets from a class-folder tree, a ``path,label`` CSV, or slides + QuPath annotations;
slide-aware splits.

Tiles cut from one slide look alike, so any split used to *measure* a model is made by slide:
a random split overstates accuracy by about 14 points on Kather 2016. Tiles of annotated slides
are cut by the slide job's own code (``service.slides.tissue_tiles``) and read on demand: no tile
image is written to disk.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.card import write_atomic
from service.slides import (
    DEFAULT_MIN_TISSUE,
    SlideError,
    TileGrid,
    TileReader,
    expand_inputs,
    open_slide,
    slide_mpp,
    tissue_tiles,
)
from training.annotations import (
    AnnotationError,
    SlideAnnotations,
    annotation_areas,
    check_bounds,
    label_tiles,
    pair_slides,
    read_qupath_geojson,
    unknown_class_warnings,
    write_suspects_geojson,
)

log = logging.getLogger("histo_robust.data")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
# Slide ids: Kather 2016 ("CRC-Prim-HE-07"), TCGA barcodes ("TCGA-AA-3812"); else the tile has none.
DEFAULT_SLIDE_REGEX = r"(CRC-Prim-HE-\d+|TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})"


class DataError(ValueError):
    """A dataset problem found before any long work starts; names the file and the problem."""


def load_rgb_resized(path: Path, size: int) -> np.ndarray:
    """Decode to RGB and resize to ``size`` (bilinear, as the service does) → uint8 HWC."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


@dataclass
class SlideTiles:
    """Where each tile of an annotation-based set lies: slide, level-0 corner, and how it is read."""

    slide_paths: list[Path]
    slide_sha256: list[str]
    grids: list[TileGrid]
    input_size: int
    patch_pixels: int  # at the training mpp: the card's patch_size_pixels
    slide_index: np.ndarray  # [N] into slide_paths
    coords: np.ndarray  # [N, 2] level-0 (x, y)
    _readers: dict[int, TileReader] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def subset(self, index: list[int]) -> SlideTiles:
        return SlideTiles(
            self.slide_paths,
            self.slide_sha256,
            self.grids,
            self.input_size,
            self.patch_pixels,
            self.slide_index[index],
            self.coords[index],
            self._readers,
            self._lock,
        )

    @property
    def root(self) -> Path:
        """The folder the slides share: tile names (``<slide file>/x<X>_y<Y>``) are relative to it."""
        return Path(os.path.commonpath([p.resolve().parent for p in self.slide_paths]))

    def write_suspects(
        self, folder: Path, given: np.ndarray, suggested: np.ndarray, scores: np.ndarray, classes: list[str]
    ) -> dict[str, int]:
        """``folder/<slide stem>.geojson`` per slide (QuPath: one square per tile whose suggested class
        differs from its given one); the folder has the layout ``--annotations`` reads. Returns counts."""
        counts = {}
        for s, path in enumerate(self.slide_paths):
            rows = np.flatnonzero((self.slide_index == s) & (suggested != given))
            counts[path.name] = write_suspects_geojson(
                folder / f"{path.stem}.geojson",
                self.coords[rows],
                self.grids[s].side,
                given[rows].tolist(),
                suggested[rows].tolist(),
                scores[rows].tolist(),
                classes,
            )
        return counts

    def keys(self) -> list[str]:
        """Embedding-cache keys: slide content, tile geometry and the resize (the encoder keys the cache file)."""
        keys = []
        for s, (x, y) in zip(self.slide_index.tolist(), self.coords.tolist(), strict=True):
            g = self.grids[s]
            blob = f"{self.slide_sha256[s]}:{x}:{y}:{g.side}:{g.level}:{g.read_size}:{self.input_size}"
            keys.append(hashlib.sha256(blob.encode()).hexdigest())
        return keys

    def load(self, i: int, size: int) -> np.ndarray:
        """uint8 ``[size, size, 3]`` pixels of tile ``i``, exactly as the slide job reads them."""
        s = int(self.slide_index[i])
        with self._lock:
            reader = self._readers.get(s)
            if reader is None:
                reader = self._readers[s] = TileReader(self.slide_paths[s], self.grids[s], self.input_size)
        pixels = reader.read(*self.coords[i])
        if size != self.input_size:
            pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
        return pixels


@dataclass
class PatchSet:
    """Image paths with their (possibly noisy) string labels and source-slide ids.

    For tiles of annotated slides, ``tiles`` says where to read each one and ``paths`` are only
    names (``<slide file>/x<X>_y<Y>``) for reports.
    """

    paths: list[Path]
    labels: list[str]
    slides: list[str]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    tiles: SlideTiles | None = None
    slide_report: dict | None = None  # per-slide statistics of an annotation-based set

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(c) for c in self.classes}

    def subset(self, index: np.ndarray | list[int]) -> PatchSet:
        index = list(map(int, index))
        return PatchSet(
            [self.paths[i] for i in index],
            [self.labels[i] for i in index],
            [self.slides[i] for i in index],
            self.source,
            tiles=self.tiles.subset(index) if self.tiles is not None else None,
            slide_report=self.slide_report,
        )

    def content_keys(self) -> list[str]:
        """What the embedding cache is keyed by: file content, or slide content + tile geometry."""
        return self.tiles.keys() if self.tiles is not None else [file_sha256(p) for p in self.paths]

    def load(self, i: int, size: int) -> np.ndarray:
        """uint8 ``[size, size, 3]`` pixels of item ``i`` (a file, or a tile read from its slide)."""
        return self.tiles.load(i, size) if self.tiles is not None else load_rgb_resized(self.paths[i], size)

    def patch_pixels(self) -> int:
        """The side of one patch in pixels at the training mpp (the card's ``patch_size_pixels``)."""
        if self.tiles is not None:
            return self.tiles.patch_pixels
        with Image.open(self.paths[0]) as first:
            return max(first.size)


def slide_of(path: Path, regex: str = DEFAULT_SLIDE_REGEX) -> str:
    match = re.search(regex, path.name)
    return match.group(1) if match else ""


def _readable(path: Path) -> str | None:
    """None if Pillow can decode the file header and pixels, else the reason."""
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def load_patches(source: str | Path, *, slide_regex: str = DEFAULT_SLIDE_REGEX, check_images: bool = True) -> PatchSet:
    """Read a class-folder tree or a CSV with ``path,label`` (optional ``slide``) columns.

    Unreadable images are reported and skipped (not fatal); a missing path, an empty class
    folder, a CSV with unknown columns or no readable image at all is a :class:`DataError`.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    if source.is_dir():
        paths, labels, slides = _from_folder(source, slide_regex)
    elif source.suffix.lower() == ".csv":
        paths, labels, slides = _from_csv(source, slide_regex)
    else:
        raise DataError(f"{source}: expected a folder with one sub-folder per class, or a .csv with path,label")
    skipped: list[tuple[str, str]] = []
    if check_images:
        keep = []
        for i, path in enumerate(paths):
            reason = _readable(path)
            if reason is None:
                keep.append(i)
            else:
                skipped.append((str(path), reason))
                log.warning("skipping unreadable image %s (%s)", path, reason)
        paths, labels, slides = [paths[i] for i in keep], [labels[i] for i in keep], [slides[i] for i in keep]
    if not paths:
        raise DataError(f"{source}: no readable images")
    return PatchSet(paths, labels, slides, str(source), skipped)


def _from_folder(root: Path, slide_regex: str) -> tuple[list[Path], list[str], list[str]]:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    paths, labels = [], []
    for d in class_dirs:
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{d}: class folder {d.name!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [d.name] * len(files)
    return paths, labels, [slide_of(p, slide_regex) for p in paths]


def _from_csv(path: Path, slide_regex: str) -> tuple[list[Path], list[str], list[str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"path", "label"} <= columns:
            raise DataError(f"{path}: CSV needs columns path,label (optional slide); found {sorted(columns)}")
        unknown = columns - {"path", "label", "slide"}
        if unknown:
            raise DataError(f"{path}: unknown CSV columns {sorted(unknown)}; allowed: path, label, slide")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: CSV has no rows")
    paths, labels, slides = [], [], []
    for line, row in enumerate(rows, start=2):
        file = (path.parent / row["path"]).resolve()
        if not file.is_file():
            raise DataError(f"{path}:{line}: image {row['path']!r} not found (paths are relative to the CSV)")
        if not row["label"]:
            raise DataError(f"{path}:{line}: empty label")
        paths.append(file)
        labels.append(row["label"])
        slides.append(row.get("slide") or slide_of(file, slide_regex))
    return paths, labels, slides


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_sha256(patches: PatchSet, file_hashes: list[str]) -> str:
    """Identity of a labelled dataset: sorted (file hash, label) pairs."""
    digest = hashlib.sha256()
    for h, label in sorted(zip(file_hashes, patches.labels, strict=True)):
        digest.update(f"{h}\t{label}\n".encode())
    return digest.hexdigest()


def slide_split(slides: list[str], labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train/validation by slide, keeping every class in training.

    Falls back to a stratified random split when fewer than three slides are known (e.g. a CSV
    without slide ids): a warning says the validation figures are then optimistic.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    unique = sorted({s for s in slides if s})
    if len(unique) >= 3:
        order = rng.permutation(unique)
        val_slides: set[str] = set()
        classes = set(labels.tolist())
        for slide in order:
            trial = val_slides | {slide}
            in_val = np.array([s in trial for s in slides])
            if set(labels[~in_val].tolist()) != classes:
                continue  # this slide holds the last training tiles of some class
            if in_val.sum() > val_fraction * n * 1.5:
                continue
            val_slides = trial
            if in_val.sum() >= val_fraction * n:
                break
        if val_slides:
            in_val = np.array([s in val_slides for s in slides])
            return np.flatnonzero(~in_val), np.flatnonzero(in_val)
    log.warning("fewer than 3 usable slides: validation split is random within classes (optimistic)")
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val += idx[: max(1, int(round(val_fraction * len(idx))))].tolist() if len(idx) > 1 else []
    in_val = np.zeros(n, bool)
    in_val[val] = True
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


# Bumped when the tiling changes, so cached grids are recomputed.
GRID_FORMAT = 1


def _cached_grid(
    path: Path, sha: str, level0_mpp: float, mpp: float, patch_pixels: int, min_tissue: float, cache: Path | None
) -> TileGrid:
    """The slide job's tile grid of one slide, from ``cache`` when this slide content and geometry
    were cut before (a second run then reads no pixel, not even the thumbnail)."""
    key = hashlib.sha256(json.dumps([GRID_FORMAT, sha, level0_mpp, mpp, patch_pixels, min_tissue]).encode()).hexdigest()
    file = cache / f"{key}.npz" if cache is not None else None
    if file is not None and file.is_file():
        try:
            with np.load(file) as data:
                meta = json.loads(str(data["meta"]))
                return TileGrid(coords=data["coords"], tissue_fraction=data["tissue_fraction"], **meta)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable grid cache %s (%s)", file, exc)
    slide = open_slide(path)
    try:
        _, _, grid = tissue_tiles(slide, level0_mpp, mpp, patch_pixels, min_tissue)
    finally:
        slide.close()
    if file is not None:
        import io

        meta = {k: getattr(grid, k) for k in ("side", "level", "level_downsample", "read_size", "n_grid")}
        buffer = io.BytesIO()
        np.savez(buffer, coords=grid.coords, tissue_fraction=grid.tissue_fraction, meta=json.dumps(meta))
        write_atomic(file, buffer.getvalue())
    return grid


def load_slide_patches(
    slides: list[str],
    annotations: str | Path,
    *,
    mpp: float,
    patch_pixels: int,
    input_size: int,
    min_cover: float = 0.5,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    grid_cache: Path | None = None,
) -> tuple[PatchSet, list[str]]:
    """Tiles of annotated slides, labelled by annotation cover, and the warnings to show.

    Every annotation file is read and checked against its slide's size before any tile is cut, so
    a wrong file stops the run (:class:`DataError`, naming file and feature) before any long work.
    Tiles are the slide job's tiles (tissue mask, grid at ``mpp`` × ``patch_pixels``, read level);
    the slide id of a tile is its slide's file name.
    """
    if not 0 < min_cover <= 1:
        raise DataError(f"--min-cover must be in (0, 1], got {min_cover}")
    paths = expand_inputs(slides)
    if missing := [str(p) for p in paths if not p.exists()]:
        raise DataError(f"--slides: no such file or directory: {', '.join(missing)}")
    if not paths:
        raise DataError(f"--slides: no slide files in {' '.join(slides)}")
    try:
        pairs, warnings = pair_slides(paths, annotations)
        read: list[tuple[Path, SlideAnnotations, float]] = []
        for slide_path, file in pairs:
            item = read_qupath_geojson(file)
            warnings += item.warnings
            slide = open_slide(slide_path)
            try:
                level0_mpp = slide_mpp(slide, slide_path)[0]
                check_bounds(item, slide_path, *slide.dimensions)
            finally:
                slide.close()
            if not item.regions:
                warnings.append(f"{file}: no classified polygon; slide {slide_path.name} not used")
                continue
            read.append((slide_path, item, level0_mpp))
        warnings += unknown_class_warnings([item for _, item, _ in read])
    except (AnnotationError, SlideError) as exc:
        raise DataError(str(exc)) from None
    if not read:
        raise DataError(f"{annotations}: no usable annotations on any slide")
    classes = sorted({name for _, item, _ in read for name in item.classes})

    names: list[Path] = []
    labels: list[str] = []
    slide_ids: list[str] = []
    tile_slide: list[np.ndarray] = []
    tile_coords: list[np.ndarray] = []
    shas: list[str] = []
    grids: list[TileGrid] = []
    report: dict[str, dict] = {}
    for s, (slide_path, item, level0_mpp) in enumerate(read):
        sha = file_sha256(slide_path)
        grid = _cached_grid(slide_path, sha, level0_mpp, mpp, patch_pixels, min_tissue, grid_cache)
        cover = label_tiles(grid.coords, grid.side, item.regions, classes, min_cover)
        keep = np.flatnonzero(cover.label >= 0)
        shas.append(sha)
        grids.append(grid)
        tile_slide.append(np.full(len(keep), s, np.int64))
        tile_coords.append(grid.coords[keep])
        for i in keep.tolist():
            x, y = grid.coords[i]
            names.append(slide_path.resolve() / f"x{x}_y{y}")
            labels.append(classes[cover.label[i]])
            slide_ids.append(slide_path.name)
        counts = np.bincount(cover.label[keep], minlength=len(classes))
        report[slide_path.name] = {
            "annotations": str(item.path),
            "mpp": level0_mpp,
            "tissue_tiles": len(grid.coords),
            "labelled_tiles": len(keep),
            "unlabelled_tissue_tiles": len(grid.coords) - len(keep),
            "tiles_per_class": {c: int(n) for c, n in zip(classes, counts, strict=True) if n},
            "ambiguous_tiles": int(cover.ambiguous.sum()),
            "annotation_area_mm2": {c: a for c, a in annotation_areas(item.regions, item.classes, level0_mpp).items()},
            "features_used": len(item.regions),
            "features_ignored": item.ignored,
            "warnings": len(item.warnings),
        }
        if not len(keep):
            warnings.append(
                f"{item.path}: no tissue tile of {slide_path.name} is covered to {min_cover:.0%} by an annotation"
            )
    if not names:
        raise DataError(f"{annotations}: no tissue tile is covered to {min_cover:.0%} by an annotation")
    for name in sorted(set(classes) - set(labels)):
        warnings.append(f"class {name!r} is annotated but covers no tile to {min_cover:.0%}; it is not learned")
    tiles = SlideTiles(
        [p for p, _, _ in read],
        shas,
        grids,
        input_size,
        patch_pixels,
        np.concatenate(tile_slide),
        np.concatenate(tile_coords).reshape(-1, 2),
    )
    source = f"{', '.join(slides)} + {annotations}"
    return PatchSet(names, labels, slide_ids, source, tiles=tiles, slide_report=report), warnings


def export_tiles(patches: PatchSet, out: Path, size: int) -> int:
    """Write every tile as ``out/<class>/<slide stem>_x<X>_y<Y>.png`` (a class-folder tree that
    ``--data`` reads); for looking at what the annotations labelled. Returns the count."""
    for i, (name, label) in enumerate(zip(patches.paths, patches.labels, strict=True)):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"{Path(name.parent).stem}_{name.name}.png"
        Image.fromarray(patches.load(i, size)).save(file)
    return len(patches)
