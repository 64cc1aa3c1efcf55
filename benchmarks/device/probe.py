"""CUDA checks for a lent GPU: CUDA vs CPU answers, raw throughput by batch size, and what a change
of batch size costs one session (run from the repository root; writes ``$OUT/probe.json``).

    HISTO_DEVICE=cuda python benchmarks/device/probe.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import raw_throughput  # noqa: E402
from service.images import load_rgb  # noqa: E402
from service.runtime import Runtime  # noqa: E402


def _timed(run, *args) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def _gpu_memory_mb() -> float | None:
    """GPU memory this process holds, from ``nvidia-smi`` (None where there is none)."""
    try:
        rows = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    mine = [float(r.split(",")[1]) for r in rows if r.split(",")[0].strip() == str(os.getpid())]
    return sum(mine) if mine else 0.0


MEMORY_CHILD = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from benchmarks.device.probe import _gpu_memory_mb
from benchmarks.serve import raw_throughput
from service.runtime import Runtime
begin = time.perf_counter()
runtime = Runtime("models/default", pad_batches=True)
started = time.perf_counter() - begin
memory = _gpu_memory_mb()
rates = {size: raw_throughput(runtime, size, 1.5)[0] for size in (32, 64)}
print("MEM", json.dumps({"start_s": started, "gpu_memory_mb": memory, "images_per_s": rates,
                         "after_runs_gpu_memory_mb": _gpu_memory_mb()}))
"""
# CUDA provider options that bound what each of the seven sessions allocates
MEMORY_VARIANTS = {
    "default": "",
    "no_max_workspace": "cudnn_conv_use_max_workspace=0",
    "same_as_requested": "arena_extend_strategy=kSameAsRequested",
    "both": "cudnn_conv_use_max_workspace=0,arena_extend_strategy=kSameAsRequested",
}


def memory_variants() -> dict:
    """GPU memory, start-up and raw throughput of the per-size runtime, one process per option set."""
    out = {}
    for name, options in MEMORY_VARIANTS.items():
        env = {**os.environ, "HISTO_CUDA_OPTIONS": options}
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0 or "MEM" not in done.stdout:
            out[name] = {"error": done.stderr[-1500:]}
        else:
            out[name] = {"options": options, **json.loads(done.stdout.split("MEM", 1)[1])}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> dict:
    tiles = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))
    device = os.environ.get("HISTO_DEVICE", "cuda")  # cpu only to try the script without a GPU
    begin = time.perf_counter()
    gpu = Runtime(ROOT / "models" / "default", device=device, pad_batches=False)
    one_session_start_s = time.perf_counter() - begin
    one_session_mb = _gpu_memory_mb()
    cpu = Runtime(ROOT / "models" / "default", device="cpu")
    pixels = np.stack([load_rgb(t.read_bytes(), t.name, gpu.input_size, 8) for t in tiles])
    on_gpu, on_cpu = gpu.predict(pixels), cpu.predict(pixels)
    result: dict = {
        "providers": gpu.providers,
        "tiles": len(pixels),
        "max_abs_prob_diff": float(np.abs(on_gpu.probabilities - on_cpu.probabilities).max()),
        "label_agreement": float((on_gpu.probabilities.argmax(1) == on_cpu.probabilities.argmax(1)).mean()),
        "max_abs_ood_diff": float(np.abs(on_gpu.ood_scores - on_cpu.ood_scores).max()),
        "raw_images_per_s": {},
        "start_s_one_session": one_session_start_s,
        "gpu_memory_mb_one_session": one_session_mb,
    }
    for size in (1, 8, 32, 64, 128, 256):
        result["raw_images_per_s"][size], _ = raw_throughput(gpu, size, 2.0)
    # one session that alternates between two batch sizes, against the padded runtime (one session per size)
    small, large = np.resize(pixels, (8, *pixels.shape[1:])), np.resize(pixels, (16, *pixels.shape[1:]))
    begin = time.perf_counter()
    padded = Runtime(ROOT / "models" / "default", device=device, pad_batches=True)
    result["start_s_session_per_size"] = time.perf_counter() - begin  # seven sessions, each warmed up
    result["gpu_memory_mb_both_runtimes"] = _gpu_memory_mb()
    for name, runtime in (("one_session", gpu), ("session_per_size", padded)):
        runtime.predict(small)
        runtime.predict(large)
        result[f"alternating_8_16_s_{name}"] = [_timed(runtime.predict, b) for b in (small, large) * 3]
    del gpu, padded
    result["seven_sessions_by_cuda_options"] = memory_variants()
    print(json.dumps(result, indent=1), flush=True)
    Path(os.environ.get("OUT", "."), "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
