"""Training from QuPath annotations on generated slides of real tissue (Kather tile mosaics).

Annotation files are written exactly as QuPath writes them (FeatureCollection or bare array, v0.4+
and v0.2 classification forms); slides are pyramidal TIFFs OpenSlide reads; the end-to-end test
runs the real CLI, exports a real ONNX model and runs the real slide job on another slide.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely

from service import wsi
from tests.mosaic_slides import kather_tiles, make_mosaic, write_mosaic, write_qupath_geojson
from training import train
from training.annotations import read_qupath_geojson, write_suspects_geojson
from training.data import DataError, load_slide_patches
from training.noise import annotation_noise

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kather"
TRAIN_SOURCES = {"CRC-Prim-HE-01", "CRC-Prim-HE-03", "CRC-Prim-HE-05", "CRC-Prim-HE-06"}
TEST_SOURCES = {"CRC-Prim-HE-07", "CRC-Prim-HE-08"}
CLASSES = ["01_TUMOR", "02_STROMA", "04_LYMPHO", "06_MUCOSA"]
GEOMETRY = dict(mpp=0.495, patch_pixels=150, input_size=224)  # 150-px tiles on Kather's own scale

# Tissue fills x 150..1350, y 150..1050 of a 1500 x 1200 slide: 8 x 6 tiles of 150 px, glass around.
TISSUE = [
    ("01_TUMOR", shapely.box(150, 150, 750, 1050)),
    ("02_STROMA", shapely.box(750, 150, 1350, 600)),
    ("04_LYMPHO", shapely.box(750, 600, 1350, 1050)),
]
# The annotations do not follow the tissue: tumour spills 45 px (0.3 of a tile) into column 5,
# stroma and lymphocytes stop before column 8, whose lower tiles lymphocytes cover to 0.4.
ANNOTATED = [
    ("01_TUMOR", shapely.box(150, 150, 795, 1050)),
    ("02_STROMA", shapely.box(750, 150, 1200, 600)),
    ("04_LYMPHO", shapely.box(750, 600, 1260, 1050)),
]


@pytest.fixture(scope="module")
def grid_slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grid")
    return write_mosaic(folder / "grid.tif", TISSUE, 1500, 1200, kather_tiles(FIXTURES, TRAIN_SOURCES)).path


def _annotate(folder: Path, slide: Path, regions, **form) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_qupath_geojson(folder / f"{slide.stem}.geojson", regions, **form)
    return folder


def _labels(patches) -> dict[tuple[int, int], str]:
    return {tuple(xy): label for xy, label in zip(patches.tiles.coords.tolist(), patches.labels, strict=True)}


def test_exact_tile_counts_and_labels(grid_slide, tmp_path):
    ann = _annotate(tmp_path / "ann", grid_slide, ANNOTATED)
    patches, warnings = load_slide_patches([str(grid_slide)], ann, **GEOMETRY)
    assert warnings == []
    stats = patches.slide_report["grid.tif"]
    assert stats["tissue_tiles"] == 48
    assert patches.counts() == {"01_TUMOR": 24, "02_STROMA": 9, "04_LYMPHO": 9}
    assert stats["ambiguous_tiles"] == 6  # column 5: stroma or lymphocytes, with 0.3 of tumour
    assert stats["unlabelled_tissue_tiles"] == 6  # column 8: nothing, or lymphocytes at 0.4 < 0.5
    assert stats["annotation_area_mm2"]["01_TUMOR"] == pytest.approx(645 * 900 * 0.495**2 / 1e6, rel=1e-6)
    labels = _labels(patches)
    assert all(labels[(x, y)] == "01_TUMOR" for x in range(150, 750, 150) for y in range(150, 1050, 150))
    assert all(labels[(750, y)] == ("02_STROMA" if y < 600 else "04_LYMPHO") for y in range(150, 1050, 150))
    assert not any(x == 1200 for x, _ in labels)
    assert set(patches.slides) == {"grid.tif"}  # the slide id is the slide file
    lower = load_slide_patches([str(grid_slide)], ann, min_cover=0.4, **GEOMETRY)[0]
    assert lower.counts()["04_LYMPHO"] == 12
    # the tiles are the slide job's, pixel for pixel: the same grid and the same read
    from service.slides import open_slide, read_tile, tissue_tiles

    slide = open_slide(grid_slide)
    _, _, grid = tissue_tiles(slide, 0.495, 0.495, 150)
    i = 7
    x, y = patches.tiles.coords[i]
    assert np.array_equal(patches.load(i, 224), read_tile(slide, x, y, grid.level, grid.read_size, 224))
    slide.close()


def test_multipolygon_with_hole_in_bare_array_legacy_form(grid_slide, tmp_path):
    ring = shapely.box(150, 150, 600, 600).difference(shapely.box(300, 300, 450, 450))
    tumour = shapely.MultiPolygon([ring, shapely.box(900, 150, 1050, 300)])
    ann = _annotate(
        tmp_path / "ann",
        grid_slide,
        [("01_TUMOR", tumour), ("02_STROMA", shapely.box(300, 300, 450, 450))],
        bare_array=True,
        legacy=True,
    )
    raw = json.loads((ann / "grid.geojson").read_text())
    assert isinstance(raw, list) and raw[0]["geometry"]["type"] == "MultiPolygon"
    assert len(raw[0]["geometry"]["coordinates"][0]) == 2  # exterior + hole
    assert "colorRGB" in raw[0]["properties"]["classification"]
    patches, warnings = load_slide_patches([str(grid_slide)], ann, **GEOMETRY)
    assert warnings == []
    labels = _labels(patches)
    assert labels[(300, 300)] == "02_STROMA"  # the hole is not tumour
    assert sorted(xy for xy, c in labels.items() if c == "01_TUMOR") == sorted(
        [(x, y) for x in (150, 300, 450) for y in (150, 300, 450) if (x, y) != (300, 300)] + [(900, 150)]
    )
    assert patches.slide_report["grid.tif"]["ambiguous_tiles"] == 0


def test_suspects_geojson_round_trips_into_the_reader(tmp_path):
    coords = np.array([[0, 0], [150, 300], [600, 450]])
    path = tmp_path / "suspects" / "s.geojson"
    n = write_suspects_geojson(path, coords, 150, [0, 1, 2], [1, 2, 0], [0.2, 0.9, 0.5], ["A", "B", "C"])
    assert n == 3
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    first = data["features"][0]["properties"]  # highest score first
    assert first["classification"]["name"] == "C" and len(first["classification"]["color"]) == 3
    assert first["measurements"] == {"score": 0.9, "given class": 1, "suggested class": 2}
    back = read_qupath_geojson(path)
    assert back.warnings == []
    assert [(r.name, r.geometry.bounds) for r in back.regions] == [
        ("C", (150, 300, 300, 450)),
        ("A", (600, 450, 750, 600)),
        ("B", (0, 0, 150, 150)),
    ]


def test_bad_annotations_are_named_before_any_long_work(grid_slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(grid_slide, slides / "grid.tif")
    shutil.copy(grid_slide, slides / "unannotated.tif")
    ann = _annotate(tmp_path / "ann", grid_slide, ANNOTATED)
    features = json.loads((ann / "grid.geojson").read_text())["features"]
    bowtie = {"type": "Polygon", "coordinates": [[[150, 150], [750, 1050], [750, 150], [150, 1050], [150, 150]]]}
    features += [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [400, 400]},
            "properties": {"objectType": "annotation", "classification": {"name": "01_TUMOR"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [[0, 0], [500, 500]]},
            "properties": {"objectType": "annotation", "classification": {"name": "01_TUMOR"}},
        },
        {"type": "Feature", "id": "no-class", "geometry": bowtie, "properties": {"objectType": "annotation"}},
        {
            "type": "Feature",
            "id": "bowtie",
            "geometry": bowtie,
            "properties": {"objectType": "annotation", "classification": {"name": "01_TUMOR"}},
        },
    ]
    (ann / "grid.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    _annotate(ann, slides / "other.tif", [("01_TUMOUR", shapely.box(150, 150, 450, 450))])  # no such slide
    (ann / "other.geojson").rename(ann / "orphan.geojson")
    _annotate(ann, slides / "typo.tif", [("01_TUMOUR", shapely.box(150, 150, 450, 450))])
    shutil.copy(grid_slide, slides / "typo.tif")
    patches, warnings = load_slide_patches([str(slides)], ann, **GEOMETRY)
    text = "\n".join(warnings)
    assert "grid.geojson: feature 3 (01_TUMOR) is a Point, which holds no area; skipped" in text
    assert "feature 4 (01_TUMOR) is a LineString" in text
    assert "feature 5 (id no-class) has no classification; skipped" in text
    assert "feature 6 (id bowtie) (01_TUMOR) is an invalid polygon (Self-intersection" in text and "repaired" in text
    assert f"{ann / 'orphan.geojson'}: no slide named orphan" in text
    assert f"{slides / 'unannotated.tif'}: no annotation file" in text
    assert "class '01_TUMOUR' (feature 0" in text and "occurs in no other annotation file" in text
    assert set(patches.slides) == {"grid.tif", "typo.tif"}

    # coordinates of another slide (or scale): an error naming file and feature, before the encoder runs
    wrong = _annotate(tmp_path / "wrong", grid_slide, [("01_TUMOR", shapely.box(150, 150, 3000, 2400))] + ANNOTATED)
    with pytest.raises(DataError, match=r"grid\.geojson: feature 0 \(id [0-9a-f-]+\) \(01_TUMOR\) spans x 150\.\.3000"):
        load_slide_patches([str(grid_slide)], wrong, **GEOMETRY)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit):
        train.main(
            [
                "--slides",
                str(grid_slide),
                "--annotations",
                str(wrong),
                "--out",
                str(tmp_path / "o"),
                "--cache-dir",
                str(cache),
            ]
        )
    assert not cache.exists()  # stopped before cutting or embedding a tile
    (wrong / "grid.geojson").write_text("{not json")
    with pytest.raises(DataError, match="grid.geojson: cannot read as JSON"):
        load_slide_patches([str(grid_slide)], wrong, **GEOMETRY)


def test_annotation_noise_moves_boundaries_and_swallows_islands():
    host = shapely.box(0, 0, 2000, 2000).difference(shapely.Point(1000, 1000).buffer(100))
    island = shapely.Point(1000, 1000).buffer(100)
    regions = [("A", host), ("B", island), ("C", shapely.box(2000, 0, 4000, 2000))]
    assert annotation_noise(regions, 0, 0.5, seed=0) == regions
    coarse = dict(annotation_noise(regions, 100, 0.5, seed=0))  # 200 px; islands under (200 µm)² go
    assert set(coarse) == {"A", "C"}
    assert not list(coarse["A"].interiors)  # the hole is filled: the island is swallowed
    for name in ("A", "C"):  # each boundary moved 200 px out or in
        filled = shapely.Polygon(dict(regions)[name].exterior)
        moved = [filled.buffer(200).area, filled.buffer(-200).area]
        assert min(abs(coarse[name].area - area) for area in moved) < 0.01 * filled.area


@pytest.fixture(scope="module")
def trained_on_slides(tmp_path_factory):
    """train.py --slides --annotations on three coarse-annotated mosaics, then once more from the cache."""
    root = tmp_path_factory.mktemp("e2e")
    tiles = kather_tiles(FIXTURES, TRAIN_SOURCES)
    slides, ann = root / "slides", root / "annotations"
    slides.mkdir()
    ann.mkdir()
    for k in range(3):
        m = make_mosaic(
            slides / f"train{k}.tif",
            tiles,
            1350,
            1350,
            seed=k,
            classes=CLASSES,
            regions_per_class=1,
            islands=1,
            island_radius=110,
        )
        write_qupath_geojson(ann / f"train{k}.geojson", annotation_noise(m.regions, 25, m.mpp, seed=k))
    test = make_mosaic(
        root / "test.tif",
        kather_tiles(FIXTURES, TEST_SOURCES),
        1350,
        1350,
        seed=7,
        classes=CLASSES,
        regions_per_class=1,
        islands=0,
    )
    cache, out = root / "cache", root / "model"
    args = [
        "--slides",
        str(slides),
        "--annotations",
        str(ann),
        "--mpp",
        "0.495",
        "--epochs",
        "15",
        "--knn-k",
        "5",
        "--cache-dir",
        str(cache),
        "--export-tiles",
        str(root / "tiles"),
    ]
    report = train.main([*args, "--out", str(out)])
    again = train.main([*args, "--out", str(root / "again"), "--no-export"])
    return out, report, again, test, root


def test_training_on_annotations_writes_model_report_and_suspects(trained_on_slides):
    out, report, again, _, root = trained_on_slides
    assert report["data"]["embeddings_computed"] == report["data"]["n"] > 60
    assert again["data"]["embeddings_computed"] == 0  # same slides, same geometry: all from the cache
    assert set(report["slides"]) == {"train0.tif", "train1.tif", "train2.tif"}
    for stats in report["slides"].values():
        assert sum(stats["tiles_per_class"].values()) == stats["labelled_tiles"] > 0
        assert set(stats["annotation_area_mm2"]) <= set(CLASSES) and "ambiguous_tiles" in stats
    assert sorted(report["data"]["val_slides"]) and set(report["data"]["val_slides"]) < set(report["slides"])
    card = json.loads((out / "card.json").read_text())
    assert card["patch_size_pixels"] == 150 and card["mpp"] == 0.495 and card["input_size"] == 224
    exported = sorted(p.relative_to(root / "tiles").parts[0] for p in (root / "tiles").rglob("*.png"))
    assert len(exported) == report["data"]["n"] and set(exported) <= set(CLASSES)
    counts = report["suspects"]["geojson"]
    assert set(counts) == set(report["slides"]) and sum(counts.values()) == report["suspects"]["n_flagged"]
    for name, n in counts.items():
        back = read_qupath_geojson(out / "suspects" / f"{Path(name).stem}.geojson")
        assert len(back.regions) == n and {r.name for r in back.regions} <= set(card["classes"])
    assert (out / "suspects.png").stat().st_size > 0
    rows = (out / "suspects.csv").read_text().splitlines()
    assert len(rows) == report["data"]["n"] + 1 and "train" in rows[1] and "/x" in rows[1]


def test_model_from_annotations_classifies_another_slide_and_predictions_round_trip(trained_on_slides, tmp_path):
    out, _, _, test, _ = trained_on_slides
    assert wsi.main([str(test.path), "--out", str(tmp_path / "wsi"), "--model", str(out)]) == 0
    predictions = tmp_path / "wsi" / "test" / "predictions.geojson"
    # the slide job's predictions, read back as annotations: every tile gets its predicted class
    ann = tmp_path / "ann"
    ann.mkdir()
    shutil.copy(predictions, ann / "test.geojson")
    back, _ = load_slide_patches([str(test.path)], ann, **GEOMETRY)
    features = json.loads(predictions.read_text())["features"]
    predicted = {tuple(f["geometry"]["coordinates"][0][0]): f["properties"]["classification"]["name"] for f in features}
    assert _labels(back) == {xy: c for xy, c in predicted.items() if c != "OOD"}
    # and the predictions match the tissue the test slide really holds (from other source slides)
    exact, _ = load_slide_patches(
        [str(test.path)], _annotate(tmp_path / "exact", test.path, test.regions), min_cover=0.5, **GEOMETRY
    )
    truth = _labels(exact)
    hits = [predicted[xy] == c for xy, c in truth.items() if xy in predicted]
    assert len(hits) >= 30 and np.mean(hits) >= 0.6, np.mean(hits)
