"""HTTP throughput vs raw onnxruntime vs an unbatched server, measured side by side in one run.

    python benchmarks/serve.py [--seconds 20] [--clients 32]

1. raw: ``Runtime.predict`` on batches of ``--batch`` decoded tiles, in this process, and on
   single tiles (batch 1): their ratio is all that batching can gain from the model on this device;
2. batched: ``bentoml serve`` with adaptive batching, ``--clients`` threads each posting one tile
   per request for ``--seconds``;
3. unbatched: the same server with ``HISTO_BATCHING=0``, same load;
4. for reference, the batched server with ``--images-per-request`` tiles in each request.
Prints images/s and the ratios HTTP/raw (target ≥ 0.85) and batched/unbatched (target ≥ 3).

It also accounts for CPU time: core-milliseconds per image spent by raw inference and, during the
batched run, by each server process and by the load generator. Without an accelerator they all
share the same cores, so HTTP can reach at most raw core-ms / total core-ms per image of raw
throughput, whatever the server does with its time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from models.card import write_atomic
from service.images import load_rgb
from service.local_server import start_server, stop_server
from service.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
TILES = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))


def raw_throughput(runtime: Runtime, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, CPU core-ms per image) of ``runtime.predict`` on ``batch`` decoded tiles at a time."""
    pixels = np.stack([load_rgb(t.read_bytes(), t.name, runtime.input_size, 8) for t in (TILES * batch)[:batch]])
    runtime.predict(pixels)  # warm-up
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        runtime.predict(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / done


def _cpu_seconds(pids: dict[int, str]) -> dict[str, float]:
    """User + system CPU seconds so far of each process, by role."""
    import psutil

    out: dict[str, float] = {}
    for pid, role in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def batch_stats(url: str) -> tuple[float, float]:
    """(onnxruntime batches, inference calls they merged) so far, from BentoML's batching histogram."""
    import re

    import requests

    text = requests.get(f"{url}/metrics", timeout=10).text

    def total(suffix: str) -> float:
        pattern = rf'adaptive_batch_size_{suffix}\{{[^}}]*method_name="predict"[^}}]*\}} (\S+)'
        return sum(float(v) for v in re.findall(pattern, text))

    return total("count"), total("sum")


def _snapshot(into: dict[str, float], roles: dict[int, str], url: str) -> None:
    into.update(_cpu_seconds(roles))
    into["batches"], into["calls"] = batch_stats(url)


def server_roles(proc) -> dict[int, str]:
    """The server's processes by role: the inference worker, the HTTP front-end workers, the supervisor."""
    import psutil

    roles = {proc.pid: "supervisor"}
    for child in psutil.Process(proc.pid).children(recursive=True):
        cmd = " ".join(child.cmdline())
        roles[child.pid] = "inference worker" if "histo_inference" in cmd else "front-end workers"
    roles[os.getpid()] = "load generator"
    return roles


def http_throughput(url: str, clients: int, seconds: float, on_start=None, per_request: int = 1) -> tuple[float, int]:
    """``clients`` concurrent connections (one asyncio client: the load generator must not eat the CPU
    the server needs), each posting ``per_request`` tiles per request back to back for ``seconds``."""
    import asyncio

    import aiohttp

    payloads = [(t.name, t.read_bytes()) for t in TILES]
    counts = [0] * clients

    async def client(i: int, session: aiohttp.ClientSession, stop: float) -> None:
        k = i
        while time.perf_counter() < stop:
            form = aiohttp.FormData()
            for j in range(per_request):
                name, data = payloads[(k + j) % len(payloads)]
                form.add_field("images", data, filename=name)
            async with session.post(f"{url}/classify", data=form) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                await r.read()
            counts[i] += per_request
            k += clients * per_request

    async def run() -> float:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
            await client(0, session, time.perf_counter() + 2)  # warm-up
            counts[0] = 0
            if on_start is not None:
                on_start()
            start = time.perf_counter()
            await asyncio.gather(*(client(i, session, start + seconds) for i in range(clients)))
            return sum(counts) / (time.perf_counter() - start), sum(counts)

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--images-per-request", type=int, default=8, help="for an extra batched run with several tiles per request"
    )
    p.add_argument(
        "--device",
        default=os.environ.get("HISTO_DEVICE", "cpu"),
        help="cpu or cuda, for raw inference and the servers alike (default $HISTO_DEVICE or cpu)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = p.parse_args(argv)
    runtime = Runtime(ROOT / "models" / "default", device=args.device)
    provider, model_name = runtime.providers[0], runtime.card.name
    result = {
        "clients": args.clients,
        "batch": args.batch,
        "seconds": args.seconds,
        "cpu_count": os.cpu_count(),
        "provider": provider,
    }
    result["raw_onnxruntime"], raw_core_ms = raw_throughput(runtime, args.batch, args.seconds)
    result["raw_onnxruntime_batch1"], _ = raw_throughput(runtime, 1, args.seconds)
    del runtime  # its threads and device memory are not the servers' to share
    result["raw_core_ms_per_image"] = raw_core_ms
    for name, env in [
        ("http_batched", {"HISTO_MAX_BATCH_SIZE": str(args.batch), "HISTO_MAX_LATENCY_MS": "10000"}),
        ("http_unbatched", {"HISTO_BATCHING": "0"}),
    ]:
        log = ROOT / "benchmarks" / "results" / "tmp" / f"serve-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, url = start_server({**env, "HISTO_DEVICE": args.device, "HISTO_MAX_BODY_MB": "32"}, log_path=log)
        try:
            roles = server_roles(proc)
            before: dict[str, float] = {}
            result[name], images = http_throughput(
                url, args.clients, args.seconds, on_start=partial(_snapshot, before, roles, url)
            )
            after = _cpu_seconds(roles)
            result[f"{name}_core_ms_per_image"] = {
                role: 1000 * (after[role] - before.get(role, 0.0)) / images for role in sorted(after)
            }
            batches, calls = batch_stats(url)
            if calls > before["calls"]:  # the batching histogram exists only with batching on
                result[f"{name}_images_per_call"] = images / (calls - before["calls"])
                result[f"{name}_calls_per_batch"] = (calls - before["calls"]) / (batches - before["batches"])
            if name == "http_batched" and args.images_per_request > 1:
                result["http_batched_multi"], _ = http_throughput(
                    url, args.clients, args.seconds, per_request=args.images_per_request
                )
        finally:
            stop_server(proc)
    result["http_over_raw"] = result["http_batched"] / result["raw_onnxruntime"]
    result["batched_over_unbatched"] = result["http_batched"] / result["http_unbatched"]
    result["raw_batch_over_batch1"] = result["raw_onnxruntime"] / result["raw_onnxruntime_batch1"]
    spent = result["http_batched_core_ms_per_image"]
    result["cpu_only_http_ceiling"] = raw_core_ms / sum(spent.values())
    lines = [
        f"images/s, model {model_name}, {provider}, "
        f"{args.clients} clients x 1 image/request, {args.seconds:.0f} s each, {os.cpu_count()} CPUs",
        f"  raw onnxruntime (batch {args.batch}) : {result['raw_onnxruntime']:8.1f}",
        f"  HTTP, adaptive batching       : {result['http_batched']:8.1f}",
        f"  HTTP, batching off            : {result['http_unbatched']:8.1f}",
        f"  HTTP / raw                    : {result['http_over_raw']:8.2f}  (target >= 0.85)",
        f"  batched / unbatched           : {result['batched_over_unbatched']:8.2f}  (target >= 3)",
        f"  raw batch 1                   : {result['raw_onnxruntime_batch1']:8.1f}  "
        f"(raw batch {args.batch} / batch 1 = {result['raw_batch_over_batch1']:.2f}: the most batching gains here)",
        f"CPU core-ms per image: raw inference {raw_core_ms:.2f}; HTTP with batching "
        + ", ".join(f"{role} {ms:.2f}" for role, ms in spent.items())
        + f" = {sum(spent.values()):.2f}",
    ]
    if "http_batched_images_per_call" in result:
        lines.append(
            f"  batched run: {result['http_batched_images_per_call']:.1f} images per inference call (front-end "
            f"coalescing), {result['http_batched_calls_per_batch']:.1f} calls per onnxruntime batch (adaptive batching)"
        )
    if provider == "CPUExecutionProvider":
        lines.append(f"  -> on shared CPU cores HTTP / raw can reach at most {result['cpu_only_http_ceiling']:.2f}")
    if "http_batched_multi" in result:
        lines.append(
            f"HTTP, adaptive batching, {args.images_per_request} images/request: {result['http_batched_multi']:.1f} "
            f"images/s ({result['http_batched_multi'] / result['raw_onnxruntime']:.2f} of raw): the per-request "
            "costs spread over more images"
        )
    print("\n".join(lines))
    result["report"] = lines
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
