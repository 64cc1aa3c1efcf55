"""Whole-slide job: end-to-end tiles/s vs raw inference on the same tiles, and peak memory vs slide size.

    .venv/bin/python benchmarks/wsi.py [--sizes 10000 40000] [--tissue 6000 12000]

Generates pyramidal TIFFs tile by tile (a 40k × 40k slide never sits in memory), mostly glass
with a square of tissue in the middle so the run stays short. Each slide is classified by
``python -m service.wsi`` in its own process, which reports its own peak RSS; raw inference is
``Runtime.predict`` alone on the first tiles of the same grid, already decoded in memory, timed in
a separate process just before and just after the job (the mean of the two, because other work
on a shared machine moves both). Prints end-to-end / raw tiles/s (target ≥ 0.9) and the peak RSS
of the largest slide over the smallest (target ≤ 1.2), and writes ``benchmarks/results/wsi.txt``
and ``wsi.json``.

It also prints the CPU time one tile costs to read (OpenSlide decode + resize, one thread) and to
infer: without an accelerator both run on the same cores, so the streaming phase can reach at most
inference / (inference + reading) of raw inference; the tissue mask and the outputs are fixed
costs per slide on top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.card import write_atomic  # noqa: E402
from tests.slide_factory import write_streamed_pyramid  # noqa: E402

CHILD_JOB = """
import resource, runpy, sys
sys.argv = ["service.wsi", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("service.wsi", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
# the largest reader process (reader processes are joined before the job exits; 0 with threads)
print("PEAK_CHILD_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""

CHILD_RAW = """
import json, sys, time
from pathlib import Path
from service.runtime import Runtime
from service.slides import TileReader, open_slide, slide_mpp, tile_grid, tissue_mask
from service.wsi import DEFAULT_MIN_TISSUE
path, batch, limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
runtime = Runtime(sys.argv[4])
slide = open_slide(path)
mpp = slide_mpp(slide, path)[0]
mask, ds = tissue_mask(slide)
grid = tile_grid(slide, mpp, runtime.card.mpp, runtime.card.patch_size_pixels, mask, ds, DEFAULT_MIN_TISSUE)
reader = TileReader(path, grid, runtime.input_size)
cpu = time.process_time()
pixels = reader.read_batch(grid.coords[:limit])  # one thread: its CPU time is the reading cost per tile
read_cpu = time.process_time() - cpu
runtime.predict(pixels[:batch])  # warm-up: first-call allocations
start, cpu = time.perf_counter(), time.process_time()
for s in range(0, len(pixels), batch):
    runtime.predict(pixels[s : s + batch])
wall, infer_cpu = time.perf_counter() - start, time.process_time() - cpu
n = len(pixels)
print("RAW", json.dumps({"provider": runtime.providers[0], "tiles": n, "tiles_per_s": n / wall,
                         "read_core_ms": 1000 * read_cpu / n,
                         "infer_core_ms": 1000 * infer_cpu / n}))
"""


CHILD_GAPS = """
import json, shutil, sys, time
from pathlib import Path
from service.runtime import Runtime
from service.wsi import run_job
slides, out, processes = [Path(p) for p in sys.argv[4:]], Path(sys.argv[2]), int(sys.argv[3])
runtime = Runtime(sys.argv[1], spinning=False)
result = {}
for ahead in (False, True):
    calls = []
    def predict(pixels):
        start = time.perf_counter()
        prediction = runtime.predict(pixels)
        calls.append((start, time.perf_counter(), len(pixels)))
        return prediction
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_job(slides, runtime, out, progress=False, pipeline=ahead, predict=predict, reader_processes=processes)
    wall = time.perf_counter() - start
    tiles, gaps, seen = sum(n for *_, n in calls), [], 0
    per_slide = tiles // len(slides)
    for k, (begin, end, n) in enumerate(calls):
        if seen and seen % per_slide == 0:
            gaps.append(begin - calls[k - 1][1])
        seen += n
    result["ahead" if ahead else "one_by_one"] = {"wall_s": wall, "tiles": tiles, "gaps_s": gaps}
print("GAPS", json.dumps(result))
"""


def _python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def raw_inference(slide: Path, model: Path, batch: int, limit: int) -> dict:
    """tiles/s of Runtime.predict alone on the first ``limit`` tiles of the job's grid."""
    return json.loads(_python(CHILD_RAW, str(slide), str(batch), str(limit), str(model)).split("RAW", 1)[1])


def run_job(slide: Path, out: Path, model: Path, batch: int, readers: str, workers: int | None) -> dict:
    """The CLI in its own process; the child reports its own peak RSS (ru_maxrss) on exit."""
    shutil.rmtree(out, ignore_errors=True)
    stdout = _python(
        CHILD_JOB,
        str(slide),
        "--out",
        str(out),
        "--model",
        str(model),
        "--batch-size",
        str(batch),
        "--readers",
        readers,
        *(["--workers", str(workers)] if workers else []),
        "--no-progress",
    )
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    return {
        "readers": summary["readers"],
        "workers": summary["workers"],
        "peak_rss_mb": int(stdout.split("PEAK_RSS_KB")[1].split()[0]) / 1024,
        "largest_reader_process_rss_mb": int(stdout.split("PEAK_CHILD_RSS_KB")[1].split()[0]) / 1024,
        "tiles": summary["tiles"],
        "job_seconds": summary["timings_s"]["total"],
        "timings_s": summary["timings_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000], help="slide sides (level-0 px)")
    p.add_argument(
        "--tissue",
        type=int,
        nargs="+",
        default=[6_000, 12_000],
        help="side of the central tissue square for each size (level-0 px)",
    )
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--readers",
        nargs="+",
        choices=("auto", "threads", "processes"),
        default=["auto"],
        help="reader kinds to run the job with, side by side (the first is the headline)",
    )
    p.add_argument("--workers", type=int, default=2, help="reader threads")
    p.add_argument("--processes", type=int, default=None, help="reader processes (default: one per core)")
    p.add_argument("--raw-tiles", type=int, default=1024, help="tiles timed for raw inference")
    p.add_argument(
        "--job-copies",
        type=int,
        default=3,
        help="copies of the smallest slide run as one job, to time inference's idle gap between slides",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if len(args.tissue) != len(args.sizes):
        p.error("give one --tissue per --sizes")
    result: dict = {
        "batch": args.batch,
        "workers": args.workers,
        "processes": args.processes,
        "model": str(args.model.resolve().name),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "runs": {},
    }
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side, tissue in zip(args.sizes, args.tissue, strict=True):
            start = (side - tissue) // 2
            t = time.perf_counter()
            slide = write_streamed_pyramid(
                tmp / f"slide{side}.tiff", side, [(start, start, start + tissue, start + tissue)]
            )
            made = time.perf_counter() - t
            before = raw_inference(slide, args.model, args.batch, args.raw_tiles)
            jobs = {}
            for kind in args.readers:
                count = args.processes if kind == "processes" else args.workers
                jobs[kind] = run_job(slide, tmp / "out", args.model, args.batch, kind, count)
            run = jobs[args.readers[0]]
            after = raw_inference(slide, args.model, args.batch, args.raw_tiles)
            raw = (before["tiles_per_s"] + after["tiles_per_s"]) / 2
            read_ms = (before["read_core_ms"] + after["read_core_ms"]) / 2
            infer_ms = (before["infer_core_ms"] + after["infer_core_ms"]) / 2
            e2e = run["tiles"] / run["job_seconds"]
            streamed = run["tiles"] / run["timings_s"]["tiles"]
            run.update(
                generate_seconds=round(made, 1),
                slide_mb=round(slide.stat().st_size / 2**20, 1),
                raw_tiles_per_s_before=before["tiles_per_s"],
                raw_tiles_per_s_after=after["tiles_per_s"],
                raw_tiles_per_s=raw,
                provider=before["provider"],
                end_to_end_tiles_per_s=e2e,
                streaming_tiles_per_s=streamed,
                end_to_end_over_raw=e2e / raw,
                streaming_over_raw=streamed / raw,
                read_core_ms_per_tile=read_ms,
                inference_core_ms_per_tile=infer_ms,
                # when reading and inference share the same CPU cores (no accelerator), streaming can
                # reach at most this fraction of raw inference, however the work is scheduled
                cpu_only_streaming_ceiling=infer_ms / (infer_ms + read_ms),
            )
            others = {}
            for kind, job in list(jobs.items())[1:]:
                others[kind] = {
                    "readers": job["readers"],
                    "workers": job["workers"],
                    "peak_rss_mb": job["peak_rss_mb"],
                    "largest_reader_process_rss_mb": job["largest_reader_process_rss_mb"],
                    "end_to_end_tiles_per_s": job["tiles"] / job["job_seconds"],
                    "streaming_tiles_per_s": job["tiles"] / job["timings_s"]["tiles"],
                }
                others[kind]["end_to_end_over_raw"] = others[kind]["end_to_end_tiles_per_s"] / raw
                others[kind]["streaming_over_raw"] = others[kind]["streaming_tiles_per_s"] / raw
            run["other_readers"] = others
            result["runs"][str(side)] = run
            if side == args.sizes[0] and args.job_copies > 1:
                copies = [tmp / f"copy{i}.tiff" for i in range(args.job_copies)]
                for copy in copies:
                    os.link(slide, copy)
                processes = run["workers"] if run["readers"] == "processes" else 0
                gaps = json.loads(
                    _python(CHILD_GAPS, str(args.model), str(tmp / "job"), str(processes), *map(str, copies)).split(
                        "GAPS", 1
                    )[1]
                )
                result["job_gaps"] = gaps
                for copy in copies:
                    copy.unlink()
            slide.unlink()
            line = (
                f"{side:>6} x {side:<6} ({run['tiles']:5d} tissue tiles), {run['workers']} reader "
                f"{run['readers']}: end to end {e2e:6.1f} tiles/s, "
                f"streaming phase {streamed:6.1f}, raw inference {raw:6.1f} (before {before['tiles_per_s']:.1f}, "
                f"after {after['tiles_per_s']:.1f}) -> end to end / raw {e2e / raw:.2f}, streaming / raw "
                f"{streamed / raw:.2f}; peak RSS {run['peak_rss_mb']:.0f} MB"
                + (
                    f" (+ {run['largest_reader_process_rss_mb']:.0f} MB per reader process at most)"
                    if run["readers"] == "processes"
                    else ""
                )
                + "; CPU per tile: reading "
                f"{read_ms:.2f} ms, inference {infer_ms:.2f} ms"
                # the ceiling holds only where reading and inference share the CPU cores
                + (
                    f" -> streaming ceiling on shared cores {run['cpu_only_streaming_ceiling']:.2f}"
                    if run["provider"] == "CPUExecutionProvider"
                    else ""
                )
                + "; fixed costs: tissue mask "
                f"{run['timings_s']['tissue_mask']:.2f} s, outputs {run['timings_s']['outputs']:.2f} s"
            )
            for other in others.values():
                line += (
                    f"\n    with {other['workers']} reader {other['readers']}: end to end "
                    f"{other['end_to_end_tiles_per_s']:.1f} tiles/s ({other['end_to_end_over_raw']:.2f} of raw), "
                    f"streaming {other['streaming_tiles_per_s']:.1f} ({other['streaming_over_raw']:.2f}), "
                    f"peak RSS {other['peak_rss_mb']:.0f} MB"
                    + (
                        f" (+ {other['largest_reader_process_rss_mb']:.0f} MB per reader process at most)"
                        if other["readers"] == "processes"
                        else ""
                    )
                )
            print(line, flush=True)
            lines += line.split("\n")
    sizes = [str(s) for s in args.sizes]
    first, last = result["runs"][sizes[0]], result["runs"][sizes[-1]]
    result["peak_rss_ratio"] = last["peak_rss_mb"] / first["peak_rss_mb"]
    ratios = [r["end_to_end_over_raw"] for r in result["runs"].values()]
    lines += [
        f"end to end / raw inference: {', '.join(f'{r:.2f}' for r in ratios)} (target >= 0.9)",
        f"peak RSS {sizes[-1]} / {sizes[0]}: {result['peak_rss_ratio']:.2f} (target <= 1.2; "
        f"{last['peak_rss_mb']:.0f} MB vs {first['peak_rss_mb']:.0f} MB with {last['tiles']} vs {first['tiles']} "
        "tiles)",
        f"batch {args.batch}, {result['cpus']} CPUs ({result['machine']}), "
        f"model {result['model']} on {first['provider']}; raw = Runtime.predict on the first {args.raw_tiles} "
        "tiles of the same grid, decoded in memory",
    ]
    if "job_gaps" in result:
        g = result["job_gaps"]

        def _gaps(mode: str) -> str:
            return ", ".join(f"{x:.2f}" for x in g[mode]["gaps_s"])

        lines.append(
            f"job of {args.job_copies} copies of the {sizes[0]} slide: inference idle between slides "
            f"{_gaps('one_by_one')} s one by one, {_gaps('ahead')} s pipelined (next slide prepared ahead, "
            f"outputs written in the background); job "
            f"{g['one_by_one']['tiles'] / g['one_by_one']['wall_s']:.1f} vs "
            f"{g['ahead']['tiles'] / g['ahead']['wall_s']:.1f} tiles/s"
        )
    print("\n".join(lines[sum(len(r["other_readers"]) + 1 for r in result["runs"].values()) :]))
    result["report"] = lines
    write_atomic(args.out / "wsi.txt", "\n".join(lines) + "\n")
    write_atomic(args.out / "wsi.json", json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
