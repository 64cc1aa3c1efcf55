"""Whole-slide job on real OpenSlide: a real Aperio slide and generated pyramidal TIFFs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest

from service.runtime import Runtime
from service.slides import SlideError, open_slide, slide_mpp, tile_grid, tissue_mask
from service.wsi import classify_slide
from tests.slide_factory import tissue_image, write_pyramid

ROOT = Path(__file__).resolve().parent.parent
CMU = ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
BOX = (300, 450, 1050, 1350)  # tile-aligned at 150 px: columns 2-6, rows 3-8 -> 30 tiles


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(ROOT / "models" / "default", device="cpu")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    image = tissue_image(2048, 2048, [BOX])
    double = np.repeat(np.repeat(image, 2, 0), 2, 1)  # same tissue scanned at twice the resolution
    return {
        "0.495": write_pyramid(d / "half.tiff", image, 0.495),
        "0.2475": write_pyramid(d / "quarter.tiff", double, 0.2475, levels=4),
        "no-mpp": write_pyramid(d / "nompp.tiff", image, None),
        "broken": (d / "broken.svs").__class__(d / "broken.svs"),
    }


def test_mpp_from_properties_tiff_tags_override_and_missing(slides):
    cmu = open_slide(CMU)
    assert slide_mpp(cmu, CMU) == (pytest.approx(0.499), "openslide.mpp-x")
    tiff = open_slide(slides["0.495"])
    assert tiff.properties["tiff.ResolutionUnit"] == "centimeter"
    assert slide_mpp(tiff, slides["0.495"])[0] == pytest.approx(0.495)
    assert slide_mpp(tiff, slides["0.495"], override=0.25) == (0.25, "--mpp")
    with pytest.raises(SlideError, match="no usable microns-per-pixel.*pass --mpp"):
        slide_mpp(open_slide(slides["no-mpp"]), slides["no-mpp"])


def test_tissue_mask_and_tile_count_are_exact(slides, runtime):
    slide = open_slide(slides["0.495"])
    mask, ds = tissue_mask(slide)
    assert ds == 1.0
    x0, y0, x1, y1 = BOX
    assert mask[y0 + 5 : y1 - 5, x0 + 5 : x1 - 5].mean() > 0.98
    assert not mask[: y0 - 5].any() and not mask[:, x1 + 5 :].any() and not mask[y1 + 5 :].any()
    grid = tile_grid(slide, 0.495, runtime.card.mpp, runtime.card.patch_size_pixels, mask, ds, 0.5)
    assert grid.side == 150 and grid.n_grid == 13 * 13 and grid.level == 0
    assert len(grid.coords) == 30
    assert set(map(tuple, grid.coords)) == {(x, y) for x in range(300, 1050, 150) for y in range(450, 1350, 150)}


def test_same_tissue_at_two_resolutions_gives_the_same_grid_in_microns(slides, runtime):
    grids = {}
    for key in ("0.495", "0.2475"):
        slide = open_slide(slides[key])
        mpp = slide_mpp(slide, slides[key])[0]
        mask, ds = tissue_mask(slide)
        grids[key] = (tile_grid(slide, mpp, runtime.card.mpp, 150, mask, ds, 0.5), mpp)
    (fine, fine_mpp), (coarse, coarse_mpp) = grids["0.2475"], grids["0.495"]
    assert fine.side == 300 and fine.level == 1 and fine.level_downsample == 2 and fine.read_size == 150
    np.testing.assert_allclose(fine.coords * fine_mpp, coarse.coords * coarse_mpp)


def test_outputs_of_a_slide(slides, runtime, tmp_path):
    summary = classify_slide(slides["0.495"], runtime, tmp_path / "half", batch_size=8, progress=False)
    out = tmp_path / "half"
    with open(out / "tiles.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 == summary["tiles"]
    assert list(rows[0])[:4] == ["x", "y", "width", "height"]
    assert {f"prob_{c}" for c in runtime.classes} <= set(rows[0]) and "label" in rows[0]
    probs = np.array([[float(r[f"prob_{c}"]) for c in runtime.classes] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    geo = json.loads((out / "predictions.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 30
    feature = geo["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
    assert feature["properties"]["objectType"] == "tile"
    assert feature["properties"]["classification"]["name"] in runtime.classes + ["OOD"]
    assert len(feature["properties"]["classification"]["color"]) == 3
    assert set(runtime.classes) <= set(feature["properties"]["measurements"])
    assert summary["tissue_area_mm2"] == pytest.approx(750 * 900 * 0.495**2 / 1e6, rel=0.02)
    assert summary["model_sha256"] == runtime.card.onnx_sha256 and summary["mpp_source"] == "openslide.mpp-x"
    assert sum(summary["class_counts"].values()) == 30
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".tiles.partial").exists()
    # the pipeline's tile equals reading the region by hand and resizing it
    slide = openslide.OpenSlide(str(slides["0.495"]))
    first = rows[0]
    from service.images import load_rgb  # noqa: F401  (same resize as the HTTP path)

    region = slide.read_region((int(first["x"]), int(first["y"])), 0, (150, 150)).convert("RGB").resize((224, 224), 2)
    pred = runtime.predict(np.asarray(region)[None])
    np.testing.assert_allclose(pred.probabilities[0], probs[0], atol=1e-5)


def _run_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.wsi", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_unreadable_slide_among_good_ones(slides, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"this is not a slide")
    proc = _run_cli(str(slides["0.495"]), str(broken), str(CMU), "--out", str(tmp_path / "out"), "--batch-size", "16")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["slide"] for f in failures] == [str(broken)] and "cannot open" in failures[0]["error"]
    assert (tmp_path / "out" / "half" / "summary.json").is_file()
    assert (tmp_path / "out" / "CMU-1-Small-Region" / "tiles.csv").is_file()
    assert "broken.svs" in err


def test_kill_and_resume_gives_the_uninterrupted_outputs(tmp_path):
    image = tissue_image(4096, 4096, [(0, 0, 4096, 4096)], seed=3)  # all tissue: 27 x 27 = 729 tiles
    slide = write_pyramid(tmp_path / "full.tiff", image, 0.495)
    args = [str(slide), "--batch-size", "4", "--workers", "2"]
    reference = _run_cli(*args, "--out", str(tmp_path / "ref"))
    reference.communicate(timeout=600)
    assert reference.returncode == 0
    partial = tmp_path / "resumed" / "full" / ".tiles.partial"
    proc = _run_cli(*args, "--out", str(tmp_path / "resumed"), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_bytes().count(b"\n") >= 40:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done_before = partial.read_bytes().count(b"\n")
    assert 40 <= done_before < 729, "the kill must land mid-slide"
    with open(partial, "ab") as handle:
        handle.write(b"17,450,300,0.1")  # a torn line, as a kill mid-write would leave
    again = _run_cli(*args, "--out", str(tmp_path / "resumed"))
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err

    def load(out: Path) -> list[dict]:
        with open(out / "full" / "tiles.csv") as handle:
            return list(csv.DictReader(handle))

    ref, resumed = load(tmp_path / "ref"), load(tmp_path / "resumed")
    assert len(resumed) == len(ref) == 729
    assert [(r["x"], r["y"]) for r in resumed] == [(r["x"], r["y"]) for r in ref]  # none missing, none twice
    assert [r["label"] for r in resumed] == [r["label"] for r in ref]
    cols = [c for c in ref[0] if c.startswith("prob_")]
    np.testing.assert_allclose(
        [[float(r[c]) for c in cols] for r in resumed], [[float(r[c]) for c in cols] for r in ref], atol=1e-5
    )
    ref_geo = json.loads((tmp_path / "ref" / "full" / "predictions.geojson").read_text())
    res_geo = json.loads((tmp_path / "resumed" / "full" / "predictions.geojson").read_text())
    assert [f["geometry"] for f in res_geo["features"]] == [f["geometry"] for f in ref_geo["features"]]
