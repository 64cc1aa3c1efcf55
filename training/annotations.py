"""QuPath GeoJSON in, tile labels by cover, suspects back out as QuPath GeoJSON.

QuPath writes objects (File ▸ Export objects as GeoJSON, or ``GsonTools`` in a script) as a
``FeatureCollection`` or as a bare JSON array of features. Each feature has a ``geometry`` in
level-0 pixel coordinates and ``properties`` with ``objectType`` and a ``classification``: since
v0.4 ``{"name": "Tumor", "color": [r, g, b]}`` (``"names": [...]`` for derived classes), before
that Gson's default form ``{"name": "Tumor", "colorRGB": -3670016}``; measurements are a map (or,
before v0.4, a list of ``{name, value}``). All of these are read here. Geometry is shapely's:
validity repair, unions, intersection areas.

A tile gets the class whose annotations cover at least ``min_cover`` of it; when several classes
cover it, the largest cover wins (a tie goes to the smaller annotation: a region drawn inside a
larger one is the more specific label), and the tile is counted as ambiguous.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape

from models.card import write_atomic
from service.outputs import class_colours

log = logging.getLogger("histo_robust.annotations")

# QuPath's "Ignore*" class marks regions to leave out; the slide job writes "OOD" for tiles it
# does not recognise: neither is a tissue class to learn.
IGNORED_CLASSES = frozenset({"Ignore*", "OOD"})
POLYGONAL = ("Polygon", "MultiPolygon")
# A feature may stick out of its slide by this share of the slide's side (QuPath lets a brush
# stroke run a little past the edge); beyond it the file belongs to another slide or scale.
BOUNDS_TOLERANCE = 0.01
_EPS = 1e-6  # covers below this share of a tile are rounding, not overlap


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and the feature."""


@dataclass
class Region:
    """One classified polygonal annotation, in level-0 pixels."""

    name: str  # class name
    geometry: shapely.Geometry  # Polygon or MultiPolygon, valid
    feature: str  # "feature 3 (id …)" for messages


@dataclass
class SlideAnnotations:
    """The usable regions of one annotation file and what was wrong with the rest."""

    path: Path
    regions: list[Region]
    warnings: list[str] = field(default_factory=list)
    ignored: int = 0  # features of an IGNORED_CLASSES class

    @property
    def classes(self) -> list[str]:
        return sorted({r.name for r in self.regions})


def classification_name(value: Any) -> str | None:
    """The class name of a QuPath ``classification`` in any of the forms QuPath has written."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        if isinstance(value.get("name"), str) and value["name"].strip():
            return value["name"].strip()
        names = value.get("names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)  # a derived class, as QuPath's PathClass.toString() joins it
    return None


def _feature_label(index: int, feature: dict) -> str:
    label = f"feature {index}"
    if feature.get("id") not in (None, ""):
        label += f" (id {feature['id']})"
    name = (feature.get("properties") or {}).get("name")
    if isinstance(name, str) and name:
        label += f" {name!r}"
    return label


def _features(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):  # GsonTools.toJson(annotations): a bare array of features
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
            return data["features"]
        if data.get("type") == "Feature":
            return [data]
    raise AnnotationError(
        f"{path}: not QuPath GeoJSON (expected a FeatureCollection, a Feature or an array of features)"
    )


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygonal part of a geometry (make_valid may add stray lines or points)."""
    if geometry.geom_type in POLYGONAL:
        return geometry
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type in POLYGONAL]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def read_qupath_geojson(path: str | Path) -> SlideAnnotations:
    """Read one QuPath GeoJSON export. Errors (:class:`AnnotationError`) for a file that is not
    GeoJSON or a feature whose geometry cannot be parsed; warnings (kept, and logged) for
    features without a classification, points and lines (skipped) and invalid polygons (repaired)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read as JSON ({exc})") from None
    result = SlideAnnotations(path, [])

    def warn(message: str) -> None:
        result.warnings.append(f"{path}: {message}")
        log.warning("%s: %s", path, message)

    for index, feature in enumerate(_features(data, path)):
        if not isinstance(feature, dict):
            raise AnnotationError(f"{path}: feature {index} is not a JSON object")
        label = _feature_label(index, feature)
        properties = feature.get("properties") or {}
        name = classification_name(properties.get("classification"))
        if name is None:
            warn(f"{label} has no classification; skipped")
            continue
        if name in IGNORED_CLASSES:
            result.ignored += 1
            continue
        if not isinstance(feature.get("geometry"), dict):
            warn(f"{label} ({name}) has no geometry; skipped")
            continue
        try:
            geometry = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.ShapelyError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise AnnotationError(f"{path}: {label} ({name}): malformed geometry ({reason})") from None
        if geometry.geom_type not in (*POLYGONAL, "GeometryCollection"):
            warn(f"{label} ({name}) is a {geometry.geom_type}, which holds no area; skipped")
            continue
        if not geometry.is_valid:
            reason = shapely.is_valid_reason(geometry)
            geometry = shapely.make_valid(geometry)
            warn(f"{label} ({name}) is an invalid polygon ({reason}); repaired")
        geometry = _polygonal(geometry)
        if geometry.is_empty or geometry.area <= 0:
            warn(f"{label} ({name}) has no area; skipped")
            continue
        result.regions.append(Region(name, geometry, label))
    return result


def check_bounds(annotations: SlideAnnotations, slide: Path, width: int, height: int) -> None:
    """Every region must lie on its slide (up to :data:`BOUNDS_TOLERANCE`): coordinates beyond it
    mean the file belongs to another slide or was exported at another scale."""
    for region in annotations.regions:
        x0, y0, x1, y1 = region.geometry.bounds
        slack_x, slack_y = max(2.0, BOUNDS_TOLERANCE * width), max(2.0, BOUNDS_TOLERANCE * height)
        if x0 < -slack_x or y0 < -slack_y or x1 > width + slack_x or y1 > height + slack_y:
            raise AnnotationError(
                f"{annotations.path}: {region.feature} ({region.name}) spans x {x0:.0f}..{x1:.0f}, "
                f"y {y0:.0f}..{y1:.0f} "
                f"but slide {slide.name} is {width} x {height} px: wrong slide, or exported at another scale "
                "(QuPath exports level-0 pixel coordinates)"
            )


def unknown_class_warnings(annotations: list[SlideAnnotations]) -> list[str]:
    """A class that occurs in one file only, among several, is often a typo ("Tumour" vs "Tumor")."""
    if len(annotations) < 2:
        return []
    files_of: dict[str, set[Path]] = {}
    for item in annotations:
        for region in item.regions:
            files_of.setdefault(region.name, set()).add(item.path)
    messages = []
    for item in annotations:
        for name in item.classes:
            if files_of[name] == {item.path}:
                first = next(r.feature for r in item.regions if r.name == name)
                others = sorted(n for n in files_of if n != name)
                messages.append(
                    f"{item.path}: class {name!r} ({first}) occurs in no other annotation file (others: {others}); "
                    "a spelling variant?"
                )
    return messages


def pair_slides(slides: list[Path], annotations: str | Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``(slide, annotation file)`` pairs and warnings. ``annotations`` is a folder of
    ``<slide stem>.geojson`` (or ``.json``) files or a CSV with columns ``slide,annotations``
    (paths relative to the CSV)."""
    source = Path(annotations)
    warnings: list[str] = []
    if not source.exists():
        raise AnnotationError(f"{source}: no such file or directory")
    if source.is_dir():
        files = {p.stem: p for p in sorted(source.iterdir()) if p.suffix.lower() in (".geojson", ".json")}
        if not files:
            raise AnnotationError(f"{source}: no .geojson files (expected <slide stem>.geojson per slide)")
        by_slide = {s: files.get(s.stem) for s in slides}
        for stem, file in files.items():
            if stem not in {s.stem for s in slides}:
                warnings.append(f"{file}: no slide named {stem}.* among --slides; file not used")
    elif source.suffix.lower() == ".csv":
        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"slide", "annotations"} <= set(reader.fieldnames or []):
                raise AnnotationError(f"{source}: CSV needs columns slide,annotations; found {reader.fieldnames}")
            rows = list(reader)
        by_name = {s.name: s for s in slides}
        by_slide = {s: None for s in slides}
        for line, row in enumerate(rows, start=2):
            slide = by_name.get(Path(row["slide"]).name)
            file = (source.parent / row["annotations"]).resolve()
            if slide is None:
                warnings.append(f"{source}:{line}: slide {row['slide']!r} is not among --slides; row not used")
                continue
            if not file.is_file():
                raise AnnotationError(f"{source}:{line}: annotation file {row['annotations']!r} not found")
            by_slide[slide] = file
    else:
        raise AnnotationError(f"{source}: expected a folder of <slide stem>.geojson files or a CSV slide,annotations")
    pairs = []
    for slide, file in by_slide.items():
        if file is None:
            warnings.append(f"{slide}: no annotation file for this slide in {source}; slide not used")
        else:
            pairs.append((slide, file))
    if not pairs:
        raise AnnotationError(f"{source}: no annotation file matches any of the {len(slides)} slides")
    return pairs, warnings


@dataclass
class TileCover:
    """Per grid tile: the class index it gets (-1: not labelled), its cover and whether two classes overlap it."""

    label: np.ndarray  # [N] int, index into ``classes``, -1 where no class covers min_cover
    cover: np.ndarray  # [N] float, the winning class's share of the tile
    ambiguous: np.ndarray  # [N] bool, labelled and another class covers part of it
    classes: list[str]


def label_tiles(
    coords: np.ndarray, side: int, regions: list[Region], classes: list[str], min_cover: float
) -> TileCover:
    """Label square tiles (level-0 top-left ``coords``, ``side`` px) by annotation cover.

    Overlapping annotations of one class are merged first, so they never count twice.
    """
    n, n_classes = len(coords), len(classes)
    cover = np.zeros((n, n_classes))
    smallest = np.full((n, n_classes), np.inf)  # area of the smallest annotation part of each class over the tile
    parts, part_class = [], []
    for c, name in enumerate(classes):
        geoms = [r.geometry for r in regions if r.name == name]
        if geoms:
            merged = shapely.get_parts(shapely.union_all(geoms))
            parts += list(merged)
            part_class += [c] * len(merged)
    if n and parts:
        x, y = coords[:, 0].astype(float), coords[:, 1].astype(float)
        tiles = shapely.box(x, y, x + side, y + side)
        tree = shapely.STRtree(parts)
        tile_idx, part_idx = tree.query(tiles, predicate="intersects")
        part_array = np.asarray(parts, dtype=object)
        share = shapely.area(shapely.intersection(tiles[tile_idx], part_array[part_idx])) / float(side * side)
        cls = np.asarray(part_class)[part_idx]
        np.add.at(cover, (tile_idx, cls), share)
        np.minimum.at(smallest, (tile_idx, cls), shapely.area(part_array[part_idx]))
    cover = np.minimum(cover, 1.0)
    best = cover.max(1) if n_classes else np.zeros(n)
    # largest cover wins; among equal covers, the class with the smaller annotation (drawn inside the other)
    tied = cover >= best[:, None] - 1e-9
    label = np.where(tied, smallest, np.inf).argmin(1) if n_classes else np.zeros(n, int)
    labelled = best >= min_cover
    ambiguous = labelled & ((cover > _EPS).sum(1) >= 2)
    return TileCover(np.where(labelled, label, -1), best, ambiguous, classes)


def annotation_areas(regions: list[Region], classes: list[str], mpp: float) -> dict[str, float]:
    """Annotated area per class in mm² (overlaps of one class counted once)."""
    areas = {}
    for name in classes:
        geoms = [r.geometry for r in regions if r.name == name]
        areas[name] = round(shapely.union_all(geoms).area * mpp * mpp / 1e6, 6) if geoms else 0.0
    return areas


def _square(x: float, y: float, side: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]}


def write_suspects_geojson(
    path: Path,
    coords: np.ndarray,
    side: int,
    given: Iterable[int],
    suggested: Iterable[int],
    scores: Iterable[float],
    classes: list[str],
) -> int:
    """A QuPath FeatureCollection with one square annotation per suspect tile; returns how many.

    Classification = the suggested class (with its colour), so the squares show where the model
    would draw another class; measurements (numbers only, as QuPath stores them) = the suspect
    score and the given and suggested class indices, whose names are in the feature's name and
    metadata. Highest score first.
    """
    colours = class_colours(classes)
    rows = sorted(zip(scores, given, suggested, coords.tolist(), strict=True), key=lambda r: -r[0])
    features = []
    for score, g, s, (x, y) in rows:
        features.append(
            {
                "type": "Feature",
                "geometry": _square(x, y, side),
                "properties": {
                    "objectType": "annotation",
                    "name": f"suspect: {classes[g]} -> {classes[s]}",
                    "classification": {"name": classes[s], "color": list(colours[classes[s]])},
                    "measurements": {
                        "score": round(float(score), 6),
                        "given class": int(g),
                        "suggested class": int(s),
                    },
                    "metadata": {"given_class": classes[g], "suggested_class": classes[s]},
                },
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"type": "FeatureCollection", "features": features}, indent=1)
    write_atomic(path, text + "\n")
    return len(features)
