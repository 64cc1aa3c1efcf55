"""What coarse slide annotations cost, and what the robust default recovers.

    python benchmarks/annotations.py --data ../shared/data/kather2016

Mosaic slides of real Kather 2016 tiles (``tests/mosaic_slides.py``): training mosaics from the
tiles of training slides, test mosaics from the tiles of other slides. Their exact regions are
redrawn as a hurried annotator would (``training.noise.annotation_noise``: boundaries moved by
0, 25, 50 or 100 µm, small islands swallowed, holes filled); tiles are cut and labelled exactly as
``train.py --slides --annotations`` does (``training.data.load_slide_patches``). For each width:
the share of training tiles whose annotation label differs from the tissue they hold (the
label noise that width makes) and the held-out accuracy, on the test mosaics' exact labels, of the
default method against the paper's MLP + cross-entropy, on the same labels and embeddings.
Writes ``benchmarks/results/annotations.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import shapely
import torch

from models.card import write_atomic
from tests.mosaic_slides import KATHER_MPP, Mosaic, kather_tiles, make_mosaic, mosaic_layout, write_qupath_geojson
from training.annotations import Region, label_tiles
from training.data import load_slide_patches, slide_split
from training.embed import embed_files
from training.encoders import build_encoder
from training.noise import annotation_noise
from training.robust import TrainConfig, fit_head
from training.transition import estimate_noise, fit_chosen

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_SLIDES = ["CRC-Prim-HE-01", "CRC-Prim-HE-03", "CRC-Prim-HE-04", "CRC-Prim-HE-05", "CRC-Prim-HE-06"]
TEST_SLIDES = ["CRC-Prim-HE-07", "CRC-Prim-HE-08"]
# tissue classes: adipose and empty glass are mostly white and fall outside the slide job's tissue mask
CLASSES = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA"]
_D = TrainConfig()
# "default" is train.py's --method auto (training/transition.py picks knn_clean or forward);
# then its knn_clean candidate alone, the same without the slide ensemble, and the paper's baseline
METHODS = {
    "default": "auto",
    "knn_clean": (_D.head, _D.method, _D.loss, _D.ensemble),
    "knn_clean, one head": (_D.head, _D.method, _D.loss, "single"),
    "mlp+ce (paper)": ("mlp", "standard", "ce", "single"),
}


def build_mosaics(args, folder: Path) -> tuple[list, list]:
    """The mosaics (deterministic from their seeds: a slide already written by an earlier run with
    the same arguments is laid out again but not re-rendered)."""
    layout = dict(regions_per_class=2, islands=args.islands, island_radius=200.0)
    folder.mkdir(parents=True, exist_ok=True)
    signature = json.dumps([args.side, args.islands, CLASSES, TRAIN_SLIDES, TEST_SLIDES])
    fresh = (folder / "signature.json").is_file() and (folder / "signature.json").read_text() == signature

    def mosaic(name: str, slides: list[str], seed: int) -> Mosaic:
        path = folder / f"{name}.tif"
        if fresh and path.is_file():
            return Mosaic(
                path,
                mosaic_layout(CLASSES, args.side, args.side, seed=seed, **layout),
                args.side,
                args.side,
                KATHER_MPP,
            )
        return make_mosaic(
            path, kather_tiles(args.data, set(slides)), args.side, args.side, seed=seed, classes=CLASSES, **layout
        )

    train = [mosaic(f"train_{k}", TRAIN_SLIDES, 100 + k) for k in range(args.train_mosaics)]
    test = [mosaic(f"test_{k}", TEST_SLIDES, 200 + k) for k in range(args.test_mosaics)]
    (folder / "signature.json").write_text(signature)
    return train, test


def tiles_of(mosaics, regions_of, folder: Path, encoder, cache: Path):
    """Labelled tiles and embeddings of ``mosaics`` under the annotations ``regions_of(mosaic)``,
    cut by train.py's own loader; also each tile's true class (largest exact cover)."""
    ann = folder / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for m in mosaics:
        write_qupath_geojson(ann / f"{m.path.stem}.geojson", regions_of(m))
    patches, _ = load_slide_patches(
        [str(m.path) for m in mosaics], ann, mpp=m.mpp, patch_pixels=150, input_size=224, grid_cache=cache / "grids"
    )
    x, _ = embed_files(encoder, patches.paths, patches.content_keys(), cache_dir=cache, load=patches.load)
    truth = np.empty(len(patches), np.int64)
    by_name = {m.path.name: m for m in mosaics}
    for s, name in enumerate(p.name for p in patches.tiles.slide_paths):
        rows = np.flatnonzero(patches.tiles.slide_index == s)
        regions = [Region(n, g, "exact") for n, g in by_name[name].regions]
        side = patches.tiles.grids[s].side
        cover = label_tiles(patches.tiles.coords[rows], side, regions, CLASSES, min_cover=1e-9)
        truth[rows] = cover.label
    given = np.array([CLASSES.index(label) for label in patches.labels])
    return x, given, truth, np.array(patches.slides)


def run(args) -> dict:
    folder = Path(args.work)
    started = time.perf_counter()
    train, test = build_mosaics(args, folder / "slides")
    t_mosaics = time.perf_counter() - started
    torch.manual_seed(0)
    encoder = build_encoder("efficientnet_lite0_ms")
    cache = Path(args.cache_dir)
    x_test, y_test, truth_test, _ = tiles_of(test, lambda m: m.regions, folder / "test", encoder, cache)
    rows = []
    for width in args.widths:

        def coarse(m, width=width):  # clipped to the slide, as QuPath clips what is drawn past its edge
            drawn = annotation_noise(m.regions, width, m.mpp, seed=int(m.path.stem.split("_")[1]))
            frame = shapely.box(0, 0, m.width, m.height)
            return [(name, g.intersection(frame)) for name, g in drawn if g.intersects(frame)]

        x, given, truth, slides = tiles_of(train, coarse, folder / f"train_w{width}", encoder, cache)
        noise = float((given != truth).mean())
        tr, va = slide_split(list(slides), given, 0.2, seed=0)
        noise_model = estimate_noise(x, given, len(CLASSES), _D.knn_k)  # as train.py: all labelled tiles
        for method, spec in METHODS.items():
            for seed in range(args.seeds):
                fit_args = (x[tr], given[tr], slides[tr], x[va], given[va], len(CLASSES))
                chosen = None
                if spec == "auto":
                    result, _, decision = fit_chosen(*fit_args, TrainConfig(seed=seed), noise_model)
                    chosen = decision["chosen"]
                else:
                    config = TrainConfig(head=spec[0], method=spec[1], loss=spec[2], ensemble=spec[3], seed=seed)
                    result = fit_head(*fit_args, config)
                with torch.no_grad():
                    pred = result.model(torch.from_numpy(x_test)).argmax(1).numpy()
                rows.append(
                    {
                        "width_um": width,
                        "method": method,
                        "seed": seed,
                        "train_tiles": len(given),
                        "noise_rate": noise,
                        "test_accuracy": float((pred == truth_test).mean()),
                        "chosen": chosen,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return {
        "data": str(args.data),
        "train_slides": TRAIN_SLIDES,
        "test_slides": TEST_SLIDES,
        "classes": CLASSES,
        "mosaic_side_px": args.side,
        "mpp": 0.495,
        "train_mosaics": len(train),
        "test_mosaics": len(test),
        "test_tiles": len(truth_test),
        "seeds": args.seeds,
        "encoder": "efficientnet_lite0_ms",
        "runs": rows,
        "seconds": {"mosaics": round(t_mosaics, 1), "total": round(time.perf_counter() - started, 1)},
    }


def table(result: dict) -> str:
    lines = [
        "| boundary width | training tiles | label noise | " + " | ".join(METHODS) + " | auto chose |",
        "|---|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for width in sorted({r["width_um"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["width_um"] == width]
        cells = []
        for method in METHODS:
            acc = np.array([r["test_accuracy"] for r in runs if r["method"] == method]) * 100
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f} %")
        first = runs[0]
        chosen = sorted({r["chosen"] for r in runs if r.get("chosen")})
        lines.append(
            f"| {width:g} µm | {first['train_tiles']} | {first['noise_rate'] * 100:.1f} % | "
            + " | ".join(cells)
            + f" | {', '.join(chosen)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kather2016")
    p.add_argument("--widths", type=float, nargs="+", default=[0, 25, 50, 100], help="boundary shifts in µm")
    p.add_argument("--side", type=int, default=3000, help="mosaic side in pixels (0.495 µm/px)")
    p.add_argument("--train-mosaics", type=int, default=6)
    p.add_argument("--test-mosaics", type=int, default=3)
    p.add_argument("--islands", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work", default=str(ROOT / "runs" / "annotations_bench"))
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "annotations_bench"))
    p.add_argument("--out", default="annotations", help="results name under benchmarks/results/")
    p.add_argument("--combine", nargs="+", type=Path, help="merge the runs of result JSONs (e.g. one per width)")
    args = p.parse_args(argv)
    if args.combine:
        parts = [json.loads(f.read_text()) for f in args.combine]
        result = {**parts[0], "runs": [r for part in parts for r in part["runs"]]}
        result["seconds"] = {"total": round(sum(part["seconds"]["total"] for part in parts), 1)}
    else:
        result = run(args)
    md = table(result)
    header = (
        f"# Coarse annotations: label noise and held-out accuracy\n\n"
        f"{result['train_mosaics']} training mosaics of Kather 2016 tiles from slides {', '.join(TRAIN_SLIDES)}; "
        f"{result['test_mosaics']} test mosaics ({result['test_tiles']} tiles, exact labels) from slides "
        f"{', '.join(TEST_SLIDES)}; {args.side} px square at 0.495 µm/px, {len(CLASSES)} classes; "
        f"{result['seeds']} seeds per cell (mean ± sd); encoder efficientnet_lite0_ms.\n\n"
    )
    write_atomic(RESULTS / f"{args.out}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(RESULTS / f"{args.out}.md", header + md + "\n")
    print(header + md)


if __name__ == "__main__":
    main()
