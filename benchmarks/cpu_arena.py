"""ONNX Runtime's CPU memory options for the served model: resident memory and throughput, side by side.

    python benchmarks/cpu_arena.py [--seconds 8] [--rounds 2]

Each option runs in a fresh process (resident memory is per process and never given back to a
fresh measurement): RSS after loading the model, after one warm-up image, after one batch of 64,
after a stream of batches of random size (1-64, what adaptive batching sends), and images/s on
that stream and on batches of 64, with the CPU core-milliseconds per image (steadier than images/s
on cores shared with other work). On a CPU, ONNX Runtime's arena keeps the largest batch's
buffers for the life of the session; the options trade that memory against allocation work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
# (HISTO_CPU_MEMORY, HISTO_CPU_RUN_SIZE): the arena options at full batches, then the default arena
# with batches cut into runs of at most that many images (the arena then holds one run's buffers)
OPTIONS = {
    "arena": ("arena", 64),
    "arena-shrink": ("arena-shrink", 64),
    "no-arena": ("no-arena", 64),
    "no-arena-no-pattern": ("no-arena-no-pattern", 64),
    "arena, runs of 32": ("arena", 32),
    "arena, runs of 16": ("arena", 16),
    "arena, runs of 8": ("arena", 8),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(option: str, seconds: float) -> dict:
    """One option, in this (fresh) process."""
    import numpy as np

    os.environ["HISTO_CPU_MEMORY"], run_size = OPTIONS[option]
    os.environ["HISTO_CPU_RUN_SIZE"] = str(run_size)
    from service.images import load_rgb
    from service.runtime import Runtime

    tiles = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))
    base = _rss_mb()
    runtime = Runtime(ROOT / "models" / "default", device="cpu", spinning=False)
    pixels = np.stack([load_rgb(t.read_bytes(), t.name, runtime.input_size, 8) for t in (tiles * 64)[:64]])
    out = {"option": option, "rss_mb": {"python": base, "loaded": _rss_mb()}}
    runtime.predict(pixels[:1])
    out["rss_mb"]["warm_1"] = _rss_mb()
    runtime.predict(pixels)
    out["rss_mb"]["after_64"] = _rss_mb()
    rng = np.random.default_rng(0)
    done, peak, start, cpu = 0, 0.0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        n = int(rng.integers(1, 65))
        runtime.predict(pixels[:n])
        done += n
        peak = max(peak, _rss_mb())
    out["mixed_images_per_s"] = done / (time.perf_counter() - start)
    out["mixed_core_ms_per_image"] = 1000 * (time.process_time() - cpu) / done
    out["rss_mb"]["mixed_end"], out["rss_mb"]["mixed_peak"] = _rss_mb(), peak
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        runtime.predict(pixels)
        done += 64
    out["batch64_images_per_s"] = done / (time.perf_counter() - start)
    out["batch64_core_ms_per_image"] = 1000 * (time.process_time() - cpu) / done
    out["rss_mb"]["end"] = _rss_mb()
    return out


def _median(results: list[dict], key: str) -> float:
    return float(statistics.median(r["rss_mb"][key] if key in r["rss_mb"] else r[key] for r in results))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--rounds", type=int, default=2, help="each option this many times, interleaved")
    p.add_argument("--one", choices=list(OPTIONS), help=argparse.SUPPRESS)  # the child process
    p.add_argument("--only", nargs="+", choices=list(OPTIONS), help="measure only these options")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_arena.json")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.seconds)))
        return {}
    runs: dict[str, list[dict]] = {o: [] for o in args.only or OPTIONS}
    for k in range(args.rounds):
        names = list(runs)
        for option in names[k % len(names) :] + names[: k % len(names)]:  # rotate the order between rounds
            child = subprocess.run(
                [sys.executable, __file__, "--one", option, "--seconds", str(args.seconds)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[option].append(json.loads(child.stdout.strip().splitlines()[-1]))
    lines = [
        f"ONNX Runtime CPU memory options, model default, {os.cpu_count()} CPUs (shared), {args.rounds} rounds "
        f"of {args.seconds:g} s per phase; RSS in MB (median), images/s (median)",
        f"{'option':22s} {'loaded':>7s} {'warm 1':>7s} {'after 64':>8s} {'mixed peak':>10s} "
        f"{'mixed/s':>8s} {'b64/s':>7s} {'mixed core-ms':>13s} {'b64 core-ms':>11s}",
    ]
    summary = {}
    for option, results in runs.items():
        row = {key: _median(results, key) for key in ("loaded", "warm_1", "after_64", "mixed_peak")}
        for key in (
            "mixed_images_per_s",
            "batch64_images_per_s",
            "mixed_core_ms_per_image",
            "batch64_core_ms_per_image",
        ):
            row[key] = _median(results, key)
        summary[option] = row
        lines.append(
            f"{option:22s} {row['loaded']:7.0f} {row['warm_1']:7.0f} {row['after_64']:8.0f} {row['mixed_peak']:10.0f} "
            f"{row['mixed_images_per_s']:8.1f} {row['batch64_images_per_s']:7.1f} "
            f"{row['mixed_core_ms_per_image']:13.1f} {row['batch64_core_ms_per_image']:11.1f}"
        )
    print("\n".join(lines))
    result = {"summary": summary, "runs": runs, "report": lines, "seconds": args.seconds, "rounds": args.rounds}
    from models.card import write_atomic

    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
