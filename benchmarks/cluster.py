"""The slide job on Ray against the local job, side by side in one run on the same slides.

    .venv/bin/python benchmarks/cluster.py [--slides 6] [--side 2048] [--tissue 1500] [--repeats 3] [--gpus 0]

Generates ``--slides`` pyramidal TIFFs (a square of tissue on glass) and classifies them with
``python -m service.wsi`` three ways, each in its own output folder:

- the local job (the default engine);
- ``--engine ray`` on a one-node Ray cluster (a head with all the CPUs: one slide worker per CPU);
- ``--engine ray`` on a two-node cluster (a head with none, two workers with half the CPUs each);

and prints slides/s, tiles/s and tiles per CPU second for each (the CPU time of the job's processes
and of every process of the cluster). Both clusters are up at once and the three jobs alternate
(``--repeats`` rounds, the fastest run counting), so that load from other work on a shared machine
falls on all of them alike. Ray's fixed costs come from the same command run again on the finished
folders, where every slide is skipped: with one slide, Ray minus local is its cost per job (joining
the cluster, starting a worker and loading the model there, shutting down); the driver's round trip
for each skipped slide (hand-out, lock and done-check on the worker, result back) is its cost per slide.

All "nodes" share this machine's cores, so the run cannot show Ray scaling with nodes or GPUs: it
shows what Ray costs, how well slide parallelism in single-thread workers uses the same cores as the
local job's tile parallelism, and that the outputs agree to the byte. Writes
``benchmarks/results/cluster.json`` and ``cluster.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

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


def cpu_seconds(cluster: LocalRayCluster | None) -> float:
    """CPU time used so far by this process's finished children (the jobs' drivers) and by ``cluster``'s
    own processes (raylets, GCS, agents). Ray's worker processes are left out: a job's workers report
    their CPU time in its manifest (see :func:`worker_cpu_seconds`)."""
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime
    for node in cluster.nodes if cluster is not None else []:
        for pid in cluster.pids(node):
            try:
                process = psutil.Process(pid)
                if process.name().startswith("ray::"):
                    continue
                t = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def worker_cpu_seconds(out: Path) -> float:
    """CPU time of the Ray job's slide workers, from their start to their last slide (its manifest)."""
    if not (out / "run_manifest.json").is_file():
        return 0.0
    per_worker: dict[int, float] = {}
    for entry in json.loads((out / "run_manifest.json").read_text())["slides"]:
        if "pid" in entry:
            per_worker[entry["pid"]] = max(per_worker.get(entry["pid"], 0.0), entry["worker_cpu_seconds"])
    return sum(per_worker.values())


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
    load_before = round(os.getloadavg()[0], 1)

    with contextlib.ExitStack() as stack:
        # both clusters up at once, so that the engines' runs can alternate: load from other work on a
        # shared machine then falls on all three alike
        engines: dict[str, tuple[list[str], dict[str, str] | None]] = {"local": (common, None)}
        clusters: dict[str, LocalRayCluster | None] = {"local": None}
        for label, shape in (("ray_one_node", [cpus]), ("ray_two_nodes", [0, cpus // 2, cpus - cpus // 2])):
            cluster = stack.enter_context(LocalRayCluster(object_store_mb=150))
            t0 = time.perf_counter()
            cluster.start_head(num_cpus=shape[0], num_gpus=args.gpus if len(shape) == 1 else 0)
            for n in shape[1:]:
                cluster.add_worker(num_cpus=n, num_gpus=args.gpus)
            results[label] = {"cluster_start_s": round(time.perf_counter() - t0, 1)}
            engines[label] = ([*common, "--engine", "ray", "--ray-address", cluster.address], cluster.env)
            clusters[label] = cluster
        run_job(slides[:1], work / "warm-up", common)  # file cache and imports warm for everyone
        runs: dict[str, dict[str, list[float]]] = {
            label: {"job": [], "cpu": [], "one": [], "all": []} for label in engines
        }
        for rep in range(args.repeats):
            for label, (job_args, env) in engines.items():
                out = work / f"{label}-{rep}"
                cpu = cpu_seconds(clusters[label])
                runs[label]["job"].append(run_job(slides, out, job_args, env))
                runs[label]["cpu"].append(cpu_seconds(clusters[label]) - cpu + worker_cpu_seconds(out))
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
            cpu_s=round(min(times["cpu"]), 1),
            tiles_per_cpu_s=round(tiles / min(times["cpu"]), 1),
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
    results["machine"] = f"{cpus} CPUs ({platform.machine()}), shared with other work"
    results["load_average"] = [load_before, round(os.getloadavg()[0], 1)]
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
    check = r["local_done_check_per_slide_s"]
    local_check = f"{check} s a slide" if check >= 0.005 else f"nothing measurable ({check} s a slide: noise)"
    lines = [
        "# Slide job: local engine vs Ray (benchmarks/cluster.py)",
        "",
        f"{r['slides']} generated slides of {r['side']} x {r['side']} px, {r['tiles']} tissue tiles in all; "
        f"{r['machine']} (load average {r['load_average'][0]} at the start, {r['load_average'][1]} at the end); "
        f"GPUs per Ray node: {r['gpus']}. Every Ray node runs on the same cores. Each job ran "
        f"{len(r['local']['runs_s'])} times, the engines alternating; the fastest run counts.",
        "",
        "| engine | wall s (each run) | slides/s | tiles/s | CPU s | tiles per CPU s | rerun, 1 slide done (s) "
        "| rerun, all done (s) | outputs = local |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in rows:
        same = "yes" if m.get("same_outputs_as_local", True) else "NO"
        runs = ", ".join(str(t) for t in m["runs_s"])
        lines.append(
            f"| {name} | {m['seconds']} ({runs}) | {m['slides_per_s']} | {m['tiles_per_s']} | {m['cpu_s']} "
            f"| {m['tiles_per_cpu_s']} | {m['rerun_1_slide_s']} | {m['rerun_all_slides_s']} | {same} |"
        )
    lines += [
        "",
        "CPU s: the job's processes and, for Ray, its slide workers (as they report it) and the cluster's own "
        "processes (raylets, GCS, agents) while the job ran. On a machine busy with other work the kernel "
        "shares the cores per runnable thread, so wall time favours the job that runs more processes; tiles "
        "per CPU second do not.",
        "",
        f"Ray's fixed cost per job: **{one['cost_per_job_s']} s** on one node, {two['cost_per_job_s']} s on two "
        "(a rerun with one finished slide, Ray minus local: joining the cluster, starting a worker and loading "
        "the model in it, shutting down).",
        f"Ray's cost per slide: **{one['skipped_slide_round_trip_s']} s** on one node, "
        f"{two['skipped_slide_round_trip_s']} s on two (median round trip of a finished slide as the driver "
        "sees it: hand-out, the worker's lock and done-check, result back); the local job's own done-check "
        f"costs {local_check}. (The rerun of all slides takes longer than the "
        "rerun of one mostly because it starts two workers instead of one.)",
        f"Starting the clusters (`ray start`, once, not part of a job): {one['cluster_start_s']} s for one node, "
        f"{two['cluster_start_s']} s for a head and two workers.",
        "",
        "What this can show on 2 shared cores: the outputs agree to the byte; Ray's fixed costs; that slide "
        "parallelism in single-thread workers uses the same cores about as well as the local job's tile "
        "parallelism. What it cannot show: scaling with nodes or GPUs (both 'nodes' share the same two "
        "cores, so two nodes cannot beat one), network or shared-filesystem costs, or GPU speed. The GPU "
        "plan is in benchmarks/device/README.md.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
