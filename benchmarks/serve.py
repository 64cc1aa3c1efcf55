"""HTTP throughput vs raw onnxruntime vs an unbatched server, measured side by side in one run.

    python benchmarks/serve.py [--seconds 20] [--clients 32]

1. raw: ``Runtime.predict`` on batches of ``--batch`` decoded tiles, in this process;
2. batched: ``bentoml serve`` with adaptive batching, ``--clients`` threads each posting one tile
   per request for ``--seconds``;
3. unbatched: the same server with ``HISTO_BATCHING=0``, same load.
Prints images/s and the ratios HTTP/raw (target ≥ 0.85) and batched/unbatched (target ≥ 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from models.card import write_atomic
from service.images import load_rgb
from service.local_server import start_server, stop_server
from service.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
TILES = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))


def raw_throughput(batch: int, seconds: float) -> float:
    runtime = Runtime(ROOT / "models" / "default", device="cpu")
    pixels = np.stack([load_rgb(t.read_bytes(), t.name, runtime.input_size, 8) for t in TILES[:batch]])
    runtime.predict(pixels)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runtime.predict(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - start)


def http_throughput(url: str, clients: int, seconds: float) -> float:
    """``clients`` concurrent connections (one asyncio client: the load generator must not eat the CPU
    the server needs), each posting one tile per request back to back for ``seconds``."""
    import asyncio

    import aiohttp

    payloads = [(t.name, t.read_bytes()) for t in TILES]
    counts = [0] * clients

    async def client(i: int, session: aiohttp.ClientSession, stop: float) -> None:
        k = i
        while time.perf_counter() < stop:
            name, data = payloads[k % len(payloads)]
            form = aiohttp.FormData()
            form.add_field("images", data, filename=name)
            async with session.post(f"{url}/classify", data=form) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                await r.read()
            counts[i] += 1
            k += clients

    async def run() -> float:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
            await client(0, session, time.perf_counter() + 2)  # warm-up
            counts[0] = 0
            start = time.perf_counter()
            await asyncio.gather(*(client(i, session, start + seconds) for i in range(clients)))
            return sum(counts) / (time.perf_counter() - start)

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = p.parse_args(argv)
    result = {"clients": args.clients, "batch": args.batch, "seconds": args.seconds, "cpu_count": os.cpu_count()}
    result["raw_onnxruntime"] = raw_throughput(args.batch, args.seconds)
    for name, env in [
        ("http_batched", {"HISTO_MAX_BATCH_SIZE": str(args.batch), "HISTO_MAX_LATENCY_MS": "10000"}),
        ("http_unbatched", {"HISTO_BATCHING": "0"}),
    ]:
        log = ROOT / "benchmarks" / "results" / "tmp" / f"serve-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, url = start_server({**env, "HISTO_DEVICE": "cpu", "HISTO_MAX_BODY_MB": "32"}, log_path=log)
        try:
            result[name] = http_throughput(url, args.clients, args.seconds)
        finally:
            stop_server(proc)
    result["http_over_raw"] = result["http_batched"] / result["raw_onnxruntime"]
    result["batched_over_unbatched"] = result["http_batched"] / result["http_unbatched"]
    lines = [
        f"images/s, model {Runtime(ROOT / 'models' / 'default', device='cpu').card.name}, CPU, "
        f"{args.clients} clients x 1 image/request, {args.seconds:.0f} s each",
        f"  raw onnxruntime (batch {args.batch}) : {result['raw_onnxruntime']:8.1f}",
        f"  HTTP, adaptive batching       : {result['http_batched']:8.1f}",
        f"  HTTP, batching off            : {result['http_unbatched']:8.1f}",
        f"  HTTP / raw                    : {result['http_over_raw']:8.2f}  (target >= 0.85)",
        f"  batched / unbatched           : {result['batched_over_unbatched']:8.2f}  (target >= 3)",
    ]
    print("\n".join(lines))
    result["report"] = lines
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
