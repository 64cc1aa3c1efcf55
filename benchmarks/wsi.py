"""Whole-slide job: end-to-end tiles/s vs raw inference on the same tiles, and peak memory vs slide size.

    python benchmarks/wsi.py [--sizes 10000 40000]

Generates pyramidal TIFFs (streamed tile by tile, so a 40k x 40k slide never sits in memory) with
a tissue region of the same shape at every size, runs ``python -m service.wsi`` on each in its
own process and reads that process's peak RSS, then times ``Runtime.predict`` alone on the same
tiles. Prints tiles/s end to end / raw (target ≥ 0.9) and peak RSS 40k / 10k (target ≤ 1.2).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import tifffile

from models.card import write_atomic
from service.runtime import Runtime
from service.slides import TileReader, open_slide, slide_mpp, tile_grid, tissue_mask

ROOT = Path(__file__).resolve().parent.parent
TILE = 512


def _tile(level_shape: tuple[int, int], box: tuple[int, int, int, int], y: int, x: int, scale: int) -> np.ndarray:
    """One TILE x TILE block of the synthetic slide at a level ``scale`` times smaller than level 0."""
    h, w = level_shape
    block = np.full((TILE, TILE, 3), 245, np.uint8)
    x0, y0, x1, y1 = (v // scale for v in box)
    ys, xs = slice(max(y, y0) - y, min(y + TILE, y1, h) - y), slice(max(x, x0) - x, min(x + TILE, x1, w) - x)
    if ys.stop > ys.start and xs.stop > xs.start:
        rng = np.random.default_rng(y * 100_003 + x + scale)
        region = block[ys, xs]
        noise = rng.normal(0, 18, region.shape[:2] + (1,))
        nuclei = (rng.random(region.shape[:2] + (1,)) < 0.02) * np.array([-110, -60, -30])
        region[:] = np.clip(np.array([205, 120, 175]) + noise + nuclei, 0, 255).astype(np.uint8)
    return block


def write_slide(path: Path, side: int, box: tuple[int, int, int, int], mpp: float = 0.495) -> Path:
    """Pyramidal tiled TIFF written level by level from a tile iterator (flat memory)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        scale = 1
        while True:
            h = w = side // scale
            tiles = (_tile((h, w), box, y, x, scale) for y in range(0, h, TILE) for x in range(0, w, TILE))
            res = 10_000 / (mpp * scale)
            tif.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if scale == 1 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
            if max(h, w) <= 2048:
                break
            scale *= 2
    return path


def run_job(slide: Path, out: Path, batch: int, workers: int) -> dict:
    """Run the CLI in its own process; its peak RSS comes from the kernel's accounting for children."""
    code = (
        "import resource, sys, runpy; sys.argv = sys.argv[1:]; "
        "rc = 0\ntry:\n    runpy.run_module('service.wsi', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); sys.exit(rc)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "wsi",
            str(slide),
            "--out",
            str(out),
            "--batch-size",
            str(batch),
            "--workers",
            str(workers),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    peak = int(done.stdout.split("PEAK_RSS_KB")[1].split()[0])
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak / 1024,
        "tiles": summary["tiles"],
        "job_seconds": summary["timings_s"]["total"],
        "summary": summary,
    }


def raw_inference(slide: Path, out: Path, batch: int, limit: int) -> float:
    """tiles/s of Runtime.predict alone on the job's own tiles (read into memory first)."""
    runtime = Runtime(ROOT / "models" / "default", device="cpu")
    handle = open_slide(slide)
    mpp = slide_mpp(handle, slide)[0]
    mask, ds = tissue_mask(handle)
    grid = tile_grid(handle, mpp, runtime.card.mpp, runtime.card.patch_size_pixels, mask, ds, 0.5)
    with open(out / slide.stem / "tiles.csv") as f:
        coords = np.array([[int(r["x"]), int(r["y"])] for r in csv.DictReader(f)])[:limit]
    pixels = TileReader(slide, grid, runtime.input_size).read_batch(coords)
    runtime.predict(pixels[:batch])
    start = time.perf_counter()
    for s in range(0, len(pixels), batch):
        runtime.predict(pixels[s : s + batch])
    return len(pixels) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    p.add_argument("--tissue", type=int, default=6000, help="side of the square tissue region (level-0 px)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "wsi.json")
    args = p.parse_args(argv)
    result: dict = {"batch": args.batch, "workers": args.workers, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side in args.sizes:
            start = (side - args.tissue) // 2
            box = (start, start, start + args.tissue, start + args.tissue)
            t = time.perf_counter()
            slide = write_slide(tmp / f"slide{side}.tiff", side, box)
            made = time.perf_counter() - t
            run = run_job(slide, tmp / "out", args.batch, args.workers)
            run["generate_seconds"] = made
            run["end_to_end_tiles_per_s"] = run["tiles"] / run["job_seconds"]
            run.pop("summary")
            result["runs"][str(side)] = run
            print(
                f"{side}x{side}: {run['tiles']} tiles, job {run['job_seconds']:.1f}s, "
                f"{run['end_to_end_tiles_per_s']:.1f} tiles/s, peak RSS {run['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        first = str(args.sizes[0])
        raw = raw_inference(tmp / f"slide{first}.tiff", tmp / "out", args.batch, limit=1024)
    result["raw_inference_tiles_per_s"] = raw
    e2e = result["runs"][first]["end_to_end_tiles_per_s"]
    result["end_to_end_over_raw"] = e2e / raw
    sizes = [str(s) for s in args.sizes]
    result["peak_rss_ratio"] = result["runs"][sizes[-1]]["peak_rss_mb"] / result["runs"][sizes[0]]["peak_rss_mb"]
    lines = [
        f"end to end ({first}x{first}) : {e2e:8.1f} tiles/s",
        f"raw inference, same tiles    : {raw:8.1f} tiles/s",
        f"end to end / raw             : {result['end_to_end_over_raw']:8.2f}  (target >= 0.9)",
        f"peak RSS {sizes[-1]} / {sizes[0]}     : {result['peak_rss_ratio']:8.2f}  (target <= 1.2; "
        + ", ".join(f"{s}: {result['runs'][s]['peak_rss_mb']:.0f} MB" for s in sizes)
        + ")",
    ]
    print("\n".join(lines))
    result["report"] = lines
    result["self_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
