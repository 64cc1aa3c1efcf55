"""The slide job on Ray against the local job, side by side in one run on the same slides.

    .venv/bin/python benchmarks/cluster.py [--slides 6] [--side 2048] [--tissue 1500]

Generates ``--slides`` pyramidal TIFFs (a square of tissue on glass) and classifies them with
``python -m service.wsi`` four ways, each in its own output folder:

- the local job (the default engine);
- ``--engine ray`` on a one-node Ray cluster (a head with all the CPUs: one slide worker per CPU);
- ``--engine ray`` on a two-node cluster (a head with none, two workers with half the CPUs each);

and prints slides/s and tiles/s for each. Both clusters are up at once and the three jobs alternate
(``--repeats`` rounds, the fastest run counting), so that load from other work on a shared machine
falls on all of them alike. Ray's fixed costs come from the same command run again on
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
import contextlib
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
from tests.slide_factory import write_streamed_pyramid  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--side", type=int, default=2048, help="slide side in level-0 pixels")
    p.add_argument("--tissue", type=int, default=1500, help="side of the tissue square")
    p.add_argument("--repeats", type=int, default=2, help="runs of each job, interleaved; the fastest counts")
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
    # written tile by tile: a 10,000 px slide never sits in memory
    slides = [write_streamed_pyramid(work / f"slide{k}.tiff", args.side, [box]) for k in range(args.slides)]
    # the same per-slide arguments everywhere; readers by the local rule on each process's CPUs
    common = ["--batch-size", "32"]
    names = [s.stem for s in slides]
    results: dict = {"slides": args.slides, "side": args.side, "cpus": cpus, "gpus": args.gpus}

    with contextlib.ExitStack() as stack:
        # both clusters up at once, so that the engines' runs can alternate: load from other work on a
        # shared machine then falls on all three alike
        engines: dict[str, tuple[list[str], dict[str, str] | None]] = {"local": (common, None)}
        for label, shape in (("ray_one_node", [cpus]), ("ray_two_nodes", [0, cpus // 2, cpus - cpus // 2])):
            cluster = stack.enter_context(LocalRayCluster(object_store_mb=150))
            t0 = time.perf_counter()
            cluster.start_head(num_cpus=shape[0], num_gpus=args.gpus if len(shape) == 1 else 0)
            for n in shape[1:]:
                cluster.add_worker(num_cpus=n, num_gpus=args.gpus)
            results[label] = {"cluster_start_s": round(time.perf_counter() - t0, 1)}
            engines[label] = ([*common, "--engine", "ray", "--ray-address", cluster.address], cluster.env)
        run_job(slides[:1], work / "warm-up", common)  # file cache and imports warm for everyone
        runs: dict[str, dict[str, list[float]]] = {label: {"job": [], "one": [], "all": []} for label in engines}
        for rep in range(args.repeats):
            for label, (job_args, env) in engines.items():
                out = work / f"{label}-{rep}"
                runs[label]["job"].append(run_job(slides, out, job_args, env))
                # reruns on the finished folder: every slide is skipped, what is left is the engine's cost
                runs[label]["one"].append(run_job(slides[:1], out, job_args, env))
                runs[label]["all"].append(run_job(slides, out, job_args, env))
                print(f"{label:>14} run {rep + 1}: {runs[label]['job'][-1]:6.1f} s", flush=True)
    tiles = sum(json.loads((work / "local-0" / n / "summary.json").read_text())["tiles"] for n in names)
    results["tiles"] = tiles
    for label, times in runs.items():
        best = min(times["job"])
        results.setdefault(label, {}).update(
            seconds=round(best, 2),
            runs_s=[round(t, 2) for t in times["job"]],
            slides_per_s=round(len(slides) / best, 3),
            tiles_per_s=round(tiles / best, 1),
            rerun_1_slide_s=round(min(times["one"]), 2),
            rerun_all_slides_s=round(min(times["all"]), 2),
        )
        if label != "local":
            manifest = json.loads((work / f"{label}-0" / "run_manifest.json").read_text())
            assert {e["status"] for e in manifest["slides"]} == {"skipped"}, "the rerun recomputed slides"
            results[label]["workers"] = manifest["workers"]
            trips = sorted(  # finished slides handed out again: Ray's round trip plus the done-check
                e["round_trip_seconds"]
                for rep in range(args.repeats)
                for e in json.loads((work / f"{label}-{rep}" / "run_manifest.json").read_text())["slides"]
            )
            results[label]["skipped_slide_round_trip_s"] = round(trips[len(trips) // 2], 3)
            results[label]["same_outputs_as_local"] = all(
                same_outputs(work / f"{label}-{rep}", work / "local-0", names) for rep in range(args.repeats)
            )

    def per_slide(m: dict) -> float:
        return (m["rerun_all_slides_s"] - m["rerun_1_slide_s"]) / max(1, args.slides - 1)

    local = results["local"]
    results["local_done_check_per_slide_s"] = round(per_slide(local), 3)
    for label in ("ray_one_node", "ray_two_nodes"):
        m = results[label]
        m["cost_per_job_s"] = round(m["rerun_1_slide_s"] - local["rerun_1_slide_s"], 2)
        m["cost_per_slide_s"] = round(per_slide(m) - per_slide(local), 3)
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
    one, two = r["ray_one_node"], r["ray_two_nodes"]
    per_slide_local = r["local_done_check_per_slide_s"]
    lines = [
        "# Slide job: local engine vs Ray (benchmarks/cluster.py)",
        "",
        f"{r['slides']} generated slides of {r['side']} x {r['side']} px, {r['tiles']} tissue tiles in all; "
        f"{r['machine']}; GPUs per Ray node: {r['gpus']}. Every Ray node runs on the same cores. Each job ran "
        f"{len(r['local']['runs_s'])} times, the engines alternating; the fastest run counts.",
        "",
        "| engine | wall s (each run) | slides/s | tiles/s | rerun, 1 slide done (s) | rerun, all done (s) "
        "| outputs = local |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in rows:
        same = "yes" if m.get("same_outputs_as_local", True) else "NO"
        runs = ", ".join(str(t) for t in m["runs_s"])
        lines.append(
            f"| {name} | {m['seconds']} ({runs}) | {m['slides_per_s']} | {m['tiles_per_s']} "
            f"| {m['rerun_1_slide_s']} | {m['rerun_all_slides_s']} | {same} |"
        )
    lines += [
        "",
        f"Ray's fixed cost per job: **{one['cost_per_job_s']} s** on one node, {two['cost_per_job_s']} s on two "
        "(a rerun with one finished slide, Ray minus local: joining the cluster, starting the workers and "
        "loading the model in them, shutting down).",
        f"Ray's cost per slide: **{one['cost_per_slide_s']} s** on one node, {two['cost_per_slide_s']} s on two "
        "(slope of the rerun time over the slides, Ray minus local: handing a slide out, its lock and "
        "done-check on the worker, the result back). Measured by the driver instead: a finished slide's round "
        f"trip, hand-out to result, takes {one['skipped_slide_round_trip_s']} s on one node and "
        f"{two['skipped_slide_round_trip_s']} s on two (median); the local job's own done-check costs "
        f"{round(per_slide_local, 3)} s a slide.",
        f"Starting the clusters (`ray start`, once, not part of a job): {one['cluster_start_s']} s for one node, "
        f"{two['cluster_start_s']} s for a head and two workers.",
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
