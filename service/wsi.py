"""Classify whole-slide images: tissue mask → tiles at the model's µm/px → batched onnxruntime → outputs.

    python -m service.wsi SLIDE_OR_FOLDER... --out OUT [--model DIR] [--mpp X] [--batch-size N] [--workers N]

Per slide, ``OUT/<slide name>/`` gets ``tiles.csv``, ``predictions.geojson`` (QuPath), ``heatmap.png``
and ``summary.json``. Reading and decoding run ahead of inference in worker threads through a
bounded queue (memory stays flat whatever the slide size). Each finished batch is appended to
``.tiles.partial`` and fsync'ed, so a job killed at any moment — SIGKILL included — resumes where
it stopped when started again with the same arguments, and ends with the same outputs. A slide
that fails is listed in ``OUT/failures.json`` and the others go on; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.card import write_atomic
from service.outputs import tile_rows, write_geojson, write_heatmap, write_summary, write_tiles_csv
from service.runtime import Prediction, Runtime
from service.slides import SLIDE_SUFFIXES, SlideError, TileReader, open_slide, slide_mpp, tile_grid, tissue_mask

log = logging.getLogger("histo_robust.wsi")

PARTIAL = ".tiles.partial"
JOB = ".job.json"
Predict = Callable[[np.ndarray], Prediction]


def _job_signature(path: Path, runtime: Runtime, mpp: float, min_tissue: float) -> dict:
    stat = path.stat()
    return {
        "slide": path.name,
        "slide_size": stat.st_size,
        "slide_mtime": int(stat.st_mtime),
        "model_sha256": runtime.card.onnx_sha256,
        "mpp": mpp,
        "min_tissue": min_tissue,
    }


def _read_partial(path: Path, n_fields: int) -> np.ndarray:
    """Completed rows; a torn last line from a kill mid-write is cut off the file."""
    if not path.is_file():
        return np.zeros((0, n_fields))
    data = path.read_bytes()
    good_end, rows = 0, []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        fields = line.decode("ascii", "replace").strip().split(",")
        if len(fields) != n_fields:
            break
        try:
            rows.append([float(v) for v in fields])
        except ValueError:
            break
        good_end += len(line)
    if good_end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return np.array(rows).reshape(-1, n_fields)


def classify_slide(
    path: Path,
    runtime: Runtime,
    out_dir: Path,
    *,
    mpp: float | None = None,
    batch_size: int = 32,
    workers: int = 2,
    min_tissue: float = 0.5,
    predict: Predict | None = None,
    progress: bool = True,
) -> dict:
    """Classify one slide into ``out_dir`` (resuming a killed run) and return its summary."""
    started = time.perf_counter()
    predict = predict or runtime.predict
    card = runtime.card
    slide = open_slide(path)
    level0_mpp, mpp_source = slide_mpp(slide, path, mpp)
    mask, mask_ds = tissue_mask(slide)
    grid = tile_grid(slide, level0_mpp, card.mpp, card.patch_size_pixels, mask, mask_ds, min_tissue)
    out_dir.mkdir(parents=True, exist_ok=True)
    signature = _job_signature(path, runtime, level0_mpp, min_tissue)
    summary_path = out_dir / "summary.json"
    if summary_path.is_file():
        previous = json.loads(summary_path.read_text())
        if previous.get("job") == signature:
            log.info("%s: already done, skipping", path.name)
            return previous
    partial = out_dir / PARTIAL
    job_file = out_dir / JOB
    if not job_file.is_file() or json.loads(job_file.read_text()) != signature:
        partial.unlink(missing_ok=True)  # another model or slide version: start over
        write_atomic(job_file, json.dumps(signature))
    n_fields = 3 + len(card.classes) + 1
    done = _read_partial(partial, n_fields)
    done_idx = set(done[:, 0].astype(int).tolist())
    todo = [i for i in range(len(grid.coords)) if i not in done_idx]
    t_read = t_infer = 0.0

    if todo:
        reader = TileReader(path, grid, card.input_size)
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        ready: queue.Queue = queue.Queue(maxsize=max(2, 2 * workers))  # bounded: memory stays flat
        stop = threading.Event()

        def produce() -> None:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for chunk in batches:
                    if stop.is_set():
                        break
                    pieces = [p for p in np.array_split(np.array(chunk), max(1, workers)) if len(p)]
                    futures = [pool.submit(reader.read_batch, grid.coords[p]) for p in pieces]
                    try:
                        pixels = np.concatenate([f.result() for f in futures])  # pieces are contiguous: order kept
                    except Exception as exc:  # surfaced to the consumer, which stops the slide
                        ready.put(exc)
                        return
                    ready.put((np.array(chunk), pixels))
            ready.put(None)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        bar = tqdm(total=len(grid.coords), initial=len(done_idx), desc=path.name, unit="tile", disable=not progress)
        try:
            with open(partial, "a", encoding="ascii") as handle:
                while True:
                    t0 = time.perf_counter()
                    item = ready.get()
                    t_read += time.perf_counter() - t0
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        raise SlideError(f"{path}: reading tiles failed ({type(item).__name__}: {item})")
                    chunk, pixels = item
                    t0 = time.perf_counter()
                    pred = predict(pixels)
                    t_infer += time.perf_counter() - t0
                    ood = pred.ood_scores if pred.ood_scores is not None else np.full(len(chunk), np.nan)
                    lines = []
                    for i, probs, score in zip(chunk, pred.probabilities, ood, strict=True):
                        x, y = grid.coords[i]
                        lines.append(
                            ",".join(
                                [str(int(i)), str(int(x)), str(int(y)), *(f"{p:.9g}" for p in probs), f"{score:.9g}"]
                            )
                            + "\n"
                        )
                    handle.write("".join(lines))
                    handle.flush()
                    os.fsync(handle.fileno())  # a completed batch survives SIGKILL
                    bar.update(len(chunk))
        finally:
            stop.set()
            bar.close()
        done = _read_partial(partial, n_fields)

    records = done[np.argsort(done[:, 0], kind="stable")]
    if len(records) != len(grid.coords) or len(np.unique(records[:, 0])) != len(records):
        raise SlideError(f"{path}: {len(records)} tile results for {len(grid.coords)} tiles; rerun to resume")
    rows = tile_rows(records, card.classes, grid.side, runtime.abstain_threshold, runtime.ood_threshold)
    write_tiles_csv(out_dir / "tiles.csv", rows, card.classes)
    write_geojson(out_dir / "predictions.geojson", rows, card.classes)
    thumb_ds = max(slide.dimensions) / 1024 if max(slide.dimensions) > 1024 else 1.0
    thumbnail = slide.get_thumbnail((int(slide.dimensions[0] / thumb_ds), int(slide.dimensions[1] / thumb_ds)))
    write_heatmap(
        out_dir / "heatmap.png",
        thumbnail,
        slide.dimensions[0] / thumbnail.size[0],
        rows,
        card.classes,
        f"{path.name} — {card.name} ({len(rows)} tissue tiles at {card.mpp:g} µm/px)",
    )
    counts = {c: sum(r["label"] == c for r in rows) for c in card.classes}
    summary = {
        "slide": str(path),
        "model": card.name,
        "model_sha256": card.onnx_sha256,
        "mpp": level0_mpp,
        "mpp_source": mpp_source,
        "model_mpp": card.mpp,
        "tile_side_level0_px": grid.side,
        "read_level": grid.level,
        "grid_tiles": grid.n_grid,
        "tiles": len(rows),
        "tissue_area_mm2": float(mask.sum() * (mask_ds * level0_mpp) ** 2 / 1e6),
        "class_counts": counts,
        "class_fractions": {c: (n / len(rows) if rows else 0.0) for c, n in counts.items()},
        "abstained": sum(r["abstained"] is True for r in rows),
        "ood": sum(r["ood"] is True for r in rows),
        "timings_s": {
            "total": round(time.perf_counter() - started, 3),
            "waiting_for_tiles": round(t_read, 3),
            "inference": round(t_infer, 3),
        },
        "job": signature,
    }
    write_summary(summary_path, summary)
    partial.unlink(missing_ok=True)
    job_file.unlink(missing_ok=True)
    return summary


def expand_inputs(inputs: list[str]) -> list[Path]:
    slides = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            slides += sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        else:
            slides.append(path)
    return slides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(
        prog="python -m service.wsi",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("slides", nargs="+", help="slide files or folders of slides")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per slide)")
    p.add_argument(
        "--model", type=Path, default=None, help="model directory (default $HISTO_MODEL_DIR or models/default)"
    )
    p.add_argument("--mpp", type=float, default=None, help="override the slides' level-0 µm/px")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="tile-reading threads")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    args = p.parse_args(argv)
    runtime = Runtime(args.model, device=args.device)
    slides = expand_inputs(args.slides)
    if not slides:
        print(f"error: no slides found in {args.slides}", file=sys.stderr)
        return 2
    failures = []
    for path in slides:
        out_dir = args.out / path.stem
        try:
            if not path.is_file():
                raise SlideError(f"{path}: no such file")
            summary = classify_slide(
                path,
                runtime,
                out_dir,
                mpp=args.mpp,
                batch_size=args.batch_size,
                workers=args.workers,
                min_tissue=args.min_tissue,
            )
            print(f"{path.name}: {summary['tiles']} tiles -> {out_dir}/")
        except (SlideError, OSError, ValueError) as exc:
            failures.append({"slide": str(path), "error": str(exc)})
            print(f"error: {exc}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "failures.json", json.dumps(failures, indent=2) + "\n")
    if failures:
        print(f"{len(failures)} of {len(slides)} slides failed; see {args.out / 'failures.json'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
