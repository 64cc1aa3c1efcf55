"""The slide job on Ray against the local job, side by side in one run on the same slides.

    .venv/bin/python benchmarks/cluster.py [--slides 6] [--side 2048] [--tissue 1500]

Generates ``--slides`` pyramidal TIFFs (a square of tissue on glass) and classifies them with
``python -m service.wsi`` four ways, each in its own output folder:

- the local job (the default engine);
- ``--engine ray`` on a one-node Ray cluster (a head with all the CPUs: one slide worker per CPU);
- ``--engine ray`` on a two-node cluster (a head with none, two workers with half the CPUs each);

and prints slides/s and tiles/s for each. Ray's fixed costs come from the same command run again on
the finished folders, where every slide is skipped: once with one slide and once with all of them,
against the local job doing the same. The difference for one slide is Ray's cost per job (joining the
cluster, starting a worker and loading the model there); the slope over the slides is its cost per
slide (handing the slide out, the lock and the done-check on the worker, the result back).

All "nodes" share this machine's cores, so the run cannot show Ray scaling with nodes or GPUs: it
shows what Ray costs, that its throughput on the same cores matches the local job's (slide
parallelism in single-thread workers instead of tile parallelism in one process), and that the
outputs agree to the byte. Writes ``benchmarks/results/cluster.json`` and ``cluster.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.card import write_atomic  # noqa: E402
from tests.ray_cluster import LocalRayCluster  # noqa: E402
from tests.slide_factory import tissue_image, write_pyramid  # noqa: E402

OUTPUTS = ("tiles.csv", "predictions.geojson", "heatmap.png")


def run_job(slides: list[Path], out: Path, args: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of one ``python -m service.wsi`` command (a new process, as a user would run it)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "service.wsi", *map(str, slides), "--out", str(out), "--no-progress", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def same_outputs(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / n / f).read_bytes() == (b / n / f).read_bytes() for n in names for f in OUTPUTS)


def measure(label: str, slides: list[Path], work: Path, tiles: int, args: list[str], env=None) -> dict:
    """The job on fresh folders, then its fixed costs from reruns on the finished ones."""
    out = work / label
    seconds = run_job(slides, out, args, env)
    result = {
        "seconds": round(seconds, 2),
        "slides_per_s": round(len(slides) / seconds, 3),
        "tiles_per_s": round(tiles / seconds, 1),
        "rerun_1_slide_s": round(run_job(slides[:1], out, args, env), 2),
        "rerun_all_slides_s": round(run_job(slides, out, args, env), 2),
    }
    manifest = out / "run_manifest.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["slides"]
        assert {e["status"] for e in entries} == {"skipped"}, "the rerun recomputed slides"
    print(f"{label:>14}: {seconds:6.1f} s, {result['slides_per_s']:.3f} slides/s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--side", type=int, default=2048, help="slide side in level-0 pixels")
    p.add_argument("--tissue", type=int, default=1500, help="side of the tissue square")
    p.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs each Ray node advertises (a lent GPU machine: 1; two nodes then share the one GPU)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    margin = (args.side - args.tissue) // 2
    box = (margin, margin, margin + args.tissue, margin + args.tissue)
    slides = [
        write_pyramid(work / f"slide{k}.tiff", tissue_image(args.side, args.side, [box], seed=k), 0.495)
        for k in range(args.slides)
    ]
    # the same per-slide arguments everywhere; reader threads as many as each process has cores
    common = ["--readers", "threads", "--batch-size", "32"]
    results: dict = {"slides": args.slides, "side": args.side, "cpus": cpus, "gpus": args.gpus}

    local = work / "local"
    run_job(slides[:1], work / "warm-up", common)  # file cache and imports warm for everyone
    results["local"] = measure("local", slides, work, 0, common)  # tiles filled in below
    names = [s.stem for s in slides]
    tiles = sum(json.loads((local / n / "summary.json").read_text())["tiles"] for n in names)
    results["tiles"] = tiles
    results["local"]["tiles_per_s"] = round(tiles / results["local"]["seconds"], 1)
    print(f"{args.slides} slides, {tiles} tissue tiles, {cpus} CPUs")

    for label, shape in (("ray_one_node", [cpus]), ("ray_two_nodes", [0, cpus // 2, cpus - cpus // 2])):
        with LocalRayCluster(object_store_mb=150) as cluster:
            t0 = time.perf_counter()
            cluster.start_head(num_cpus=shape[0], num_gpus=args.gpus if len(shape) == 1 else 0)
            for n in shape[1:]:
                cluster.add_worker(num_cpus=n, num_gpus=args.gpus)
            started = time.perf_counter() - t0
            ray_args = [*common, "--engine", "ray", "--ray-address", cluster.address]
            results[label] = measure(label, slides, work, tiles, ray_args, cluster.env)
            results[label]["cluster_start_s"] = round(started, 1)
            results[label]["same_outputs_as_local"] = same_outputs(work / label, local, names)
            manifest = json.loads((work / label / "run_manifest.json").read_text())
            results[label]["workers"] = manifest["workers"]

    one = results["ray_one_node"]
    results["ray_cost_per_job_s"] = round(one["rerun_1_slide_s"] - results["local"]["rerun_1_slide_s"], 2)
    slope = (one["rerun_all_slides_s"] - one["rerun_1_slide_s"]) / max(1, args.slides - 1)
    local_slope = (results["local"]["rerun_all_slides_s"] - results["local"]["rerun_1_slide_s"]) / max(
        1, args.slides - 1
    )
    results["ray_cost_per_slide_s"] = round(slope - local_slope, 3)
    results["machine"] = f"{cpus} CPUs ({platform.machine()}), shared with other work"
    report = render(results)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "cluster.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "cluster.md", report)
    return results


def render(r: dict) -> str:
    rows = [
        ("local job", r["local"]),
        (f"Ray, one node ({r['ray_one_node']['workers']} workers)", r["ray_one_node"]),
        (f"Ray, two nodes ({r['ray_two_nodes']['workers']} workers)", r["ray_two_nodes"]),
    ]
    lines = [
        "# Slide job: local engine vs Ray (benchmarks/cluster.py)",
        "",
        f"{r['slides']} generated slides of {r['side']} x {r['side']} px, {r['tiles']} tissue tiles in all; "
        f"{r['machine']}. Every Ray node runs on the same cores.",
        "",
        "| engine | wall s | slides/s | tiles/s | rerun, 1 slide done (s) | rerun, all done (s) | outputs = local |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in rows:
        same = "yes" if m.get("same_outputs_as_local", True) else "NO"
        lines.append(
            f"| {name} | {m['seconds']} | {m['slides_per_s']} | {m['tiles_per_s']} | {m['rerun_1_slide_s']} "
            f"| {m['rerun_all_slides_s']} | {same} |"
        )
    lines += [
        "",
        f"Ray's fixed cost per job: **{r['ray_cost_per_job_s']} s** (a rerun with one finished slide, Ray minus "
        "local: joining the cluster, starting a worker, loading the model there, shutting down).",
        f"Ray's cost per slide: **{r['ray_cost_per_slide_s']} s** (slope of the rerun time over the slides, "
        "Ray minus local: handing a slide out, its lock and done-check on the worker, the result back).",
        f"Starting the clusters themselves (`ray start`, not part of a job): "
        f"{r['ray_one_node']['cluster_start_s']} s for one node, {r['ray_two_nodes']['cluster_start_s']} s for three "
        "processes' worth of nodes (head + two workers).",
        "",
        "What this can show on 2 shared cores: the outputs agree to the byte; Ray's fixed costs; that slide "
        "parallelism in single-thread workers keeps up with the local job's tile parallelism on the same cores. "
        "What it cannot show: scaling with nodes or GPUs (both 'nodes' share the same two cores, so two nodes "
        "cannot beat one), network or shared-filesystem costs, or GPU speed. The GPU plan is in "
        "benchmarks/device/README.md.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
