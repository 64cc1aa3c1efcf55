"""Whole-slide job on real OpenSlide and the shipped model: a real Aperio slide and generated pyramidal TIFFs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from service import slides as slides_module
from service.runtime import Runtime
from service.slides import (
    SlideError,
    TileReader,
    mpp_from_properties,
    open_slide,
    read_thumbnail,
    slide_mpp,
    tile_grid,
    tissue_mask,
)
from service.wsi import PARTIAL, _exclusive, classify_slide, run_job
from tests.slide_factory import tissue_image, write_pyramid

ROOT = Path(__file__).resolve().parent.parent
CMU = ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
BOX = (300, 450, 1050, 1350)  # tile-aligned at 150 px: columns 2-6, rows 3-8 -> 30 tiles
BOX_TILES = {(x, y) for x in range(300, 1050, 150) for y in range(450, 1350, 150)}


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(ROOT / "models" / "default", device="cpu")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    image = tissue_image(2048, 2048, [BOX])
    double = np.repeat(np.repeat(image, 2, 0), 2, 1)  # the same tissue scanned at twice the resolution
    return {
        "0.495": write_pyramid(d / "half.tiff", image, 0.495),
        "0.2475": write_pyramid(d / "quarter.tiff", double, 0.2475, levels=4),
        "no-mpp": write_pyramid(d / "nompp.tiff", image, None),
    }


def test_mpp_from_properties_tiff_tags_override_and_missing(slides):
    assert slide_mpp(open_slide(CMU), CMU) == (pytest.approx(0.499), "openslide.mpp-x")  # Aperio MPP
    tiff = open_slide(slides["0.495"])
    assert slide_mpp(tiff, slides["0.495"]) == (pytest.approx(0.495), "openslide.mpp-x")  # OpenSlide reads the tags
    # Drivers that expose TIFF tags without deriving an mpp: the fallback reads the same tags.
    tags_only = {k: v for k, v in tiff.properties.items() if not k.startswith("openslide.mpp")}
    assert tags_only["tiff.ResolutionUnit"] == "centimeter"
    assert mpp_from_properties(tags_only, "x.tiff") == (pytest.approx(0.495), "tiff.XResolution")
    inch = {**tags_only, "tiff.ResolutionUnit": "inch", "tiff.XResolution": str(25_400 / 0.25)}
    assert mpp_from_properties(inch, "x.tiff") == (pytest.approx(0.25), "tiff.XResolution")
    assert slide_mpp(tiff, slides["0.495"], override=0.25) == (0.25, "--mpp")
    no_mpp = open_slide(slides["no-mpp"])
    assert "openslide.mpp-x" not in no_mpp.properties
    with pytest.raises(SlideError, match=r"nompp\.tiff: no usable microns-per-pixel.*pass --mpp"):
        slide_mpp(no_mpp, slides["no-mpp"])
    assert slide_mpp(no_mpp, slides["no-mpp"], override=0.5) == (0.5, "--mpp")
    with pytest.raises(SlideError, match="--mpp must be a positive number"):
        mpp_from_properties({}, "x.tiff", override=0.0)


def test_tissue_mask_and_tile_count_are_exact(slides, runtime):
    slide = open_slide(slides["0.495"])
    mask, ds = tissue_mask(slide)
    assert ds == 1.0
    x0, y0, x1, y1 = BOX
    assert mask[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].mean() > 0.999  # at most a faint texture block missed
    outside = mask.copy()
    outside[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2] = False
    assert not outside.any()
    grid = tile_grid(slide, 0.495, runtime.card.mpp, runtime.card.patch_size_pixels, mask, ds, 0.5)
    assert grid.side == 150 and grid.n_grid == 13 * 13 and grid.level == 0 and grid.read_size == 150
    assert [tuple(c) for c in grid.coords] == sorted(BOX_TILES, key=lambda c: (c[1], c[0]))  # row-major
    assert grid.tissue_fraction.min() > 0.99
    # a box that half-covers one tile: in at min_tissue 0.5, out above it
    half = np.zeros_like(mask)
    half[450:600, 300:375] = True
    fractions = tile_grid(slide, 0.495, 0.495, 150, half, 1.0, 0.0)
    by_tile = dict(zip(map(tuple, fractions.coords), fractions.tissue_fraction, strict=True))
    assert by_tile[(300, 450)] == pytest.approx(0.5) and by_tile[(450, 450)] == 0
    assert len(tile_grid(slide, 0.495, 0.495, 150, half, 1.0, 0.5).coords) == 1
    assert len(tile_grid(slide, 0.495, 0.495, 150, half, 1.0, 0.51).coords) == 0


def test_thumbnail_read_in_strips_matches_one_read(monkeypatch):
    slide = open_slide(CMU)
    whole, ds = read_thumbnail(slide, 512)  # 2220 x 2967 fits one strip
    monkeypatch.setattr(slides_module, "_STRIP_PIXELS", 2220 * 100)  # now ~30 strips
    strips, strip_ds = read_thumbnail(slide, 512)
    assert strips.size == whole.size == (383, 512) and strip_ds == ds == pytest.approx(2220 / 383)
    assert np.abs(np.asarray(strips, np.float32) - np.asarray(whole, np.float32)).mean() < 1
    reference = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"), np.float32)  # Lanczos, not box
    assert np.abs(np.asarray(strips, np.float32) - reference).mean() < 5


def test_same_tissue_at_two_resolutions_gives_the_same_grid_in_microns(slides, runtime):
    grids = {}
    for key in ("0.495", "0.2475"):
        slide = open_slide(slides[key])
        mpp = slide_mpp(slide, slides[key])[0]
        mask, ds = tissue_mask(slide)
        grids[key] = (tile_grid(slide, mpp, runtime.card.mpp, 150, mask, ds, 0.5), mpp)
    (fine, fine_mpp), (coarse, coarse_mpp) = grids["0.2475"], grids["0.495"]
    # 300 level-0 pixels of the finer scan, read from its 2x level as 150-pixel squares
    assert fine.side == 300 and fine.level == 1 and fine.level_downsample == 2 and fine.read_size == 150
    assert coarse.side == 150 and coarse.level == 0
    np.testing.assert_allclose(fine.coords * fine_mpp, coarse.coords * coarse_mpp)
    # and the pixels are the same tissue: the finer scan's 2x level is the coarse scan, resampled
    a = TileReader(slides["0.2475"], fine, 224).read_batch(fine.coords[:4]).astype(np.float32)
    b = TileReader(slides["0.495"], coarse, 224).read_batch(coarse.coords[:4]).astype(np.float32)
    assert np.abs(a - b).mean() < 12


def test_outputs_of_a_slide(slides, runtime, tmp_path):
    out = tmp_path / "half"
    summary = classify_slide(slides["0.495"], runtime, out, batch_size=8, progress=False)
    with open(out / "tiles.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 == summary["tiles"]
    assert {(int(r["x"]), int(r["y"])) for r in rows} == BOX_TILES
    assert list(rows[0]) == [
        "x",
        "y",
        "width",
        "height",
        *[f"prob_{c}" for c in runtime.classes],
        "label",
        "confidence",
        "abstained",
        "ood_score",
        "ood",
    ]
    assert {r["width"] for r in rows} == {r["height"] for r in rows} == {"150"}
    probs = np.array([[float(r[f"prob_{c}"]) for c in runtime.classes] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert [r["label"] for r in rows] == [runtime.classes[i] for i in probs.argmax(1)]

    geo = json.loads((out / "predictions.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 30
    for feature, row in zip(geo["features"], rows, strict=True):
        x, y = int(row["x"]), int(row["y"])
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["geometry"]["coordinates"] == [[[x, y], [x + 150, y], [x + 150, y + 150], [x, y + 150], [x, y]]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        expected = "OOD" if row["ood"] == "True" else row["label"]
        assert props["classification"]["name"] == expected and len(props["classification"]["color"]) == 3
        assert all(0 <= v <= 255 for v in props["classification"]["color"])
        assert {c: props["measurements"][c] for c in runtime.classes} == {
            c: pytest.approx(float(row[f"prob_{c}"]), abs=1e-6) for c in runtime.classes
        }

    assert summary["tissue_area_mm2"] == pytest.approx(750 * 900 * 0.495**2 / 1e6, rel=0.02)
    assert summary["model"] == runtime.card.name and summary["model_sha256"] == runtime.card.onnx_sha256
    assert summary["mpp"] == pytest.approx(0.495) and summary["mpp_source"] == "openslide.mpp-x"
    assert sum(summary["class_counts"].values()) == 30
    assert sum(summary["class_fractions"].values()) == pytest.approx(1)
    assert {"total", "inference", "tissue_mask", "outputs"} <= set(summary["timings_s"])
    assert json.loads((out / "summary.json").read_text()) == summary
    with Image.open(out / "heatmap.png") as heatmap:
        assert heatmap.format == "PNG" and min(heatmap.size) > 200
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "predictions.geojson", "summary.json", "tiles.csv"]
    # the job's tile is the region read by hand and resized like training and /classify do
    first = rows[0]
    region = openslide.OpenSlide(str(slides["0.495"])).read_region((int(first["x"]), int(first["y"])), 0, (150, 150))
    pixels = np.asarray(region.convert("RGB").resize((224, 224), Image.BILINEAR))[None]
    np.testing.assert_allclose(runtime.predict(pixels).probabilities[0], probs[0], atol=2e-6)


def test_failed_inference_stops_readers_and_the_rerun_resumes(slides, runtime, tmp_path):
    out = tmp_path / "half"
    calls = []

    def failing(pixels: np.ndarray):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return runtime.predict(pixels)

    with pytest.raises(RuntimeError, match="device lost"):
        classify_slide(slides["0.495"], runtime, out, batch_size=8, workers=2, predict=failing, progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("tile-reader")]
    assert (out / PARTIAL).read_text().count("\n") == 16 and not (out / "summary.json").exists()
    summary = classify_slide(slides["0.495"], runtime, out, batch_size=8, workers=2, progress=False)
    assert summary["resumed_tiles"] == 16 and summary["tiles"] == 30 and not (out / PARTIAL).exists()
    again = classify_slide(slides["0.495"], runtime, out, batch_size=8, workers=2, progress=False)
    assert again == summary  # finished with the same model and arguments: skipped, summary as written
    with _exclusive(out), pytest.raises(SlideError, match="another job is writing this output folder"):
        classify_slide(slides["0.495"], runtime, out, progress=False)


def test_one_output_folder_per_slide_name(slides, runtime, tmp_path):
    other = tmp_path / "elsewhere" / "half.tiff"
    other.parent.mkdir()
    other.write_bytes(slides["0.495"].read_bytes())
    failures = run_job([slides["0.495"], slides["0.495"], other], runtime, tmp_path / "out", progress=False)
    assert [f["slide"] for f in failures] == [str(other)] and "already belongs to" in failures[0]["error"]
    assert json.loads((tmp_path / "out" / "half" / "summary.json").read_text())["slide"] == str(slides["0.495"])


def test_job_overlaps_the_next_slides_mask_and_the_last_ones_outputs(slides, runtime, tmp_path, caplog):
    first, second = tmp_path / "first.tiff", tmp_path / "second.tiff"
    first.write_bytes(slides["0.495"].read_bytes())
    second.write_bytes(slides["0.495"].read_bytes())
    calls: list[float] = []

    def slow_accelerator(pixels: np.ndarray):
        time.sleep(0.2)
        calls.append(time.time())
        return runtime.predict(pixels)

    with caplog.at_level("DEBUG", logger="histo_robust.wsi"):
        failures = run_job(
            [first, second], runtime, tmp_path / "out", progress=False, batch_size=8, predict=slow_accelerator
        )
    assert failures == [] and len(calls) == 8  # 30 tiles a slide, in batches of 8
    ready = {r.getMessage().split(":")[0]: r for r in caplog.records if "tiles ready" in r.getMessage()}
    assert ready["second.tiff"].threadName.startswith("slide-prep")
    assert ready["second.tiff"].created < calls[3]  # ready before the first slide's last batch ran
    written = {r.getMessage().split(":")[0]: r for r in caplog.records if "outputs written" in r.getMessage()}
    assert {name: r.threadName.split("_")[0] for name, r in written.items()} == {
        "first.tiff": "slide-finish",  # written while the second slide streamed
        "second.tiff": "slide-finish",
    }
    rows = [(tmp_path / "out" / name / "tiles.csv").read_text() for name in ("first", "second")]
    assert rows[0] == rows[1] and rows[0].count("\n") == 31  # the same tissue gives the same 30 rows


def test_a_slide_whose_outputs_fail_in_the_background_is_listed_and_the_next_goes_on(slides, runtime, tmp_path):
    first, second = tmp_path / "first.tiff", tmp_path / "second.tiff"
    first.write_bytes(slides["0.495"].read_bytes())
    second.write_bytes(slides["0.495"].read_bytes())
    (tmp_path / "out" / "first" / "heatmap.png").mkdir(parents=True)  # the heatmap cannot replace a folder
    failures = run_job([first, second, tmp_path / "missing.svs"], runtime, tmp_path / "out", progress=False)
    assert [f["slide"] for f in failures] == [str(first), str(tmp_path / "missing.svs")]  # in input order
    assert "heatmap.png" in failures[0]["error"]
    assert not (tmp_path / "out" / "first" / "summary.json").exists()  # not marked done: a rerun redoes it
    assert (tmp_path / "out" / "first" / PARTIAL).is_file()  # with the tiles already classified
    assert json.loads((tmp_path / "out" / "second" / "summary.json").read_text())["tiles"] == 30
    (tmp_path / "out" / "first" / "heatmap.png").rmdir()
    assert run_job([first, second], runtime, tmp_path / "out", progress=False) == []
    assert json.loads((tmp_path / "out" / "first" / "summary.json").read_text())["resumed_tiles"] == 30


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.wsi", "--no-progress", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_unreadable_and_mpp_less_slides_among_good_ones(slides, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"this is not a slide")
    out = tmp_path / "out"
    good, nompp = str(slides["0.495"]), str(slides["no-mpp"])
    proc = _cli(good, str(broken), nompp, str(CMU), "--out", str(out), "--readers", "processes", "--workers", "2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    failures = {Path(f["slide"]).name: f["error"] for f in json.loads((out / "failures.json").read_text())}
    assert set(failures) == {"broken.svs", "nompp.tiff"}
    assert "cannot open with OpenSlide" in failures["broken.svs"] and "pass --mpp" in failures["nompp.tiff"]
    assert (out / "half" / "summary.json").is_file() and (out / "CMU-1-Small-Region" / "summary.json").is_file()
    assert "broken.svs" in err and "2 of 4 slides failed" in err
    # the missing mpp given on the command line: the slide goes through, at that mpp
    proc = _cli(str(slides["no-mpp"]), "--mpp", "0.495", "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((out / "failures.json").read_text()) == []
    summary = json.loads((out / "nompp" / "summary.json").read_text())
    assert summary["mpp_source"] == "--mpp" and summary["tiles"] == 30


def test_kill_and_resume_gives_the_uninterrupted_outputs(tmp_path):
    image = tissue_image(3000, 3000, [(0, 0, 3000, 3000)], seed=3)  # all tissue: 20 x 20 = 400 tiles
    slide = write_pyramid(tmp_path / "full.tiff", image, 0.495)
    # the uninterrupted run reads with threads, the killed and the resumed one with processes: the
    # outputs must match to the byte across reader kinds too
    args = [str(slide), "--batch-size", "4", "--workers", "2", "--readers", "processes"]
    reference = _cli(*args[:-1], "threads", "--out", str(tmp_path / "ref"))
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    out = tmp_path / "resumed"
    partial = out / "full" / PARTIAL
    proc = _cli(*args, "--out", str(out), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_bytes().count(b"\n") >= 40:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    lines = partial.read_bytes().splitlines(keepends=True)
    assert 40 <= len(lines) < 400, "the kill must land mid-slide"
    # leave the worst state a kill can: a batch cut in two and a torn line
    whole = len(lines) // 4 * 4
    partial.write_bytes(b"".join(lines[: whole - 2]) + lines[whole - 2][:9])
    again = _cli(*args, "--out", str(out))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"resuming after {whole - 4} of 400 tiles" in err

    for name in ("tiles.csv", "predictions.geojson", "heatmap.png"):
        assert (out / "full" / name).read_bytes() == (tmp_path / "ref" / "full" / name).read_bytes(), name
    with open(out / "full" / "tiles.csv") as handle:
        rows = [(r["x"], r["y"]) for r in csv.DictReader(handle)]
    assert len(rows) == len(set(rows)) == 400  # none missing, none twice
    ref_summary, summary = (json.loads((d / "full" / "summary.json").read_text()) for d in (tmp_path / "ref", out))
    assert summary["resumed_tiles"] == whole - 4
    assert (ref_summary["readers"], summary["readers"]) == ("threads", "processes")
    for key in ("timings_s", "tiles_per_s", "resumed_tiles", "slide", "readers"):
        ref_summary.pop(key), summary.pop(key)
    assert summary == ref_summary
    assert sorted(p.name for p in (out / "full").iterdir()) == [
        "heatmap.png",
        "predictions.geojson",
        "summary.json",
        "tiles.csv",
    ]


def test_sessions_that_share_cores_with_readers_do_not_spin():
    """Idle ONNX Runtime threads busy-wait by default and starve tile readers on many-core hosts
    (the streaming phase measured 0.45 of raw inference on 16 cores with spinning, 0.72 without)."""
    key = "session.intra_op.allow_spinning"
    quiet = Runtime(ROOT / "models" / "default", device="cpu", spinning=False)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    pixels = np.zeros((2, quiet.input_size, quiet.input_size, 3), np.uint8)
    loud = Runtime(ROOT / "models" / "default", device="cpu")
    assert np.allclose(quiet.predict(pixels).probabilities, loud.predict(pixels).probabilities, atol=1e-6)


def test_heatmap_paints_each_tile_in_its_class_colour_with_a_legend(tmp_path):
    """Two class tiles and one OOD tile on a white 100 × 60 thumbnail (downsample 10 from level 0)."""
    from service.outputs import OOD_COLOUR, TileTable, class_colours, write_heatmap

    classes = ["tumour", "stroma"]
    table = TileTable(
        classes,
        200,
        np.array([[0, 0], [200, 0], [400, 200]]),
        np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32),
        np.array([0.0, 0.0, 9.0], np.float32),
        ood_threshold=1.0,
    )
    write_heatmap(tmp_path / "h.png", Image.new("RGB", (100, 60), "white"), 10.0, table, "three tiles")
    colours = class_colours(classes)
    with Image.open(tmp_path / "h.png") as png:
        assert png.format == "PNG"
        canvas = np.asarray(png.convert("RGB")).astype(int)
    white = np.full(3, 255)
    # the thumbnail sits under a title band: find its top edge from the first tumour-coloured pixel
    expect = {name: np.round(0.45 * white + 0.55 * np.array(c)).astype(int) for name, c in colours.items()}
    expect["ood"] = np.round(0.45 * white + 0.55 * np.array(OOD_COLOUR)).astype(int)
    rows = np.nonzero((np.abs(canvas[:, 10] - expect["tumour"]) <= 1).all(1))[0]
    top = int(rows[0])
    assert len(rows) == 20  # the 200 px tile is 20 thumbnail px tall
    centre = {"tumour": (10, 10), "stroma": (30, 10), "ood": (50, 30)}  # (x, y) in thumbnail px
    for name, (x, y) in centre.items():
        np.testing.assert_allclose(canvas[top + y, x], expect[name], atol=1)
    np.testing.assert_array_equal(canvas[top + 50, 90], white)  # no tile there: the thumbnail as it was
    assert canvas.shape[1] > 100 + 50  # a legend to the right of the thumbnail
    legend = canvas[:, 100:]
    for colour in (*colours.values(), OOD_COLOUR):  # every class swatch, and OOD since one tile is OOD
        assert (legend == np.array(colour)).all(2).sum() >= 100
