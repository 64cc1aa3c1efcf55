"""Honest clients beside stalled ones, against a real `bentoml serve`, in one run.

    python benchmarks/abuse.py [--seconds 25] [--clients 64] [--stalled 300]

1. idle: the service's resident memory (all its processes) after start-up;
2. alone: ``--clients`` honest clients, each posting one tile per request back to back (after one
   request of 64 tiles, the largest a client may send, which sizes ONNX Runtime's buffers);
3. beside stalled: the same clients while ``--stalled`` connections send their headers and the
   first bytes of a body and then nothing (each is reopened when the server drops it, as an
   attacker would, so the pressure lasts the whole phase; from a child process at the lowest CPU
   priority, since a real attacker spends its own CPU);
4. phases alone and beside stalled in turn (``--rounds``), so that drifting load from other work
   on shared cores does not decide the ratio;
5. shutdown: SIGTERM with the stalled connections open, and the seconds until the server exits.

Prints images/s, p50/p99 latency and refused requests per phase, honest throughput beside stalled
over the mean of the two phases alone (target >= 0.8, 0 refused), and resident memory of the
whole service and of its inference process: idle, after the 64-tile request, and the plateau
under load (the largest sample in the second half of each phase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.card import write_atomic
from service.local_server import start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
TILES = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))


def service_rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory of the server's whole process tree and of its inference process, in MB."""
    import psutil

    total = inference = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                total += rss
                if "histo_inference" in " ".join(proc.cmdline()):
                    inference += rss
            except psutil.Error:
                pass
    except psutil.Error:
        return float("nan"), float("nan")
    return total / 2**20, inference / 2**20


class RssSampler:
    """Samples :func:`service_rss_mb` every ``period`` seconds in a thread."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), *service_rss_mb(self.pid)))
            self._stop.wait(self.period)

    def plateau(self, start: float, end: float) -> tuple[float, float]:
        """The largest samples (service, inference process) in the second half of ``[start, end]``."""
        middle = (start + end) / 2
        window = [(total, inference) for t, total, inference in self.samples if middle <= t <= end]
        return tuple(max((w[k] for w in window), default=float("nan")) for k in (0, 1))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def _stalled(host: str, port: int, stop: float, opened: list[int]) -> None:
    """One stalled upload, reopened whenever the server drops it, until ``stop``."""
    head = (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        "Content-Length: 200000\r\n\r\n"
        '--b0undary\r\nContent-Disposition: form-data; name="images"; filename="stalled.png"\r\n\r\n'
    ).encode()
    while time.perf_counter() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened[0] += 1
        try:
            writer.write(head)
            await writer.drain()
            await asyncio.wait_for(reader.read(), max(0.01, stop - time.perf_counter()))  # until the server drops it
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()


async def _honest(url: str, clients: int, seconds: float) -> dict:
    import aiohttp

    payloads = [(t.name, t.read_bytes()) for t in TILES]
    latencies: list[float] = []
    refused: dict[int, int] = {}

    async def client(i: int, session: aiohttp.ClientSession, stop: float) -> None:
        k = i
        while time.perf_counter() < stop:
            name, data = payloads[k % len(payloads)]
            form = aiohttp.FormData()
            form.add_field("images", data, filename=name)
            t0 = time.perf_counter()
            async with session.post(f"{url}/classify", data=form) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    refused[r.status] = refused.get(r.status, 0) + 1
            k += clients

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await client(0, session, time.perf_counter() + 2)  # warm-up
        latencies.clear()
        refused.clear()
        start = time.perf_counter()
        wall_start = time.monotonic()
        await asyncio.gather(*(client(i, session, start + seconds) for i in range(clients)))
        elapsed = time.perf_counter() - start
        wall_end = time.monotonic()
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "answered": len(latencies),
        "refused": sum(refused.values()),
        "refused_by_status": refused,
        "window": (wall_start, wall_end),
    }


def _stall_process(url: str, stalled: int, seconds: float, opened) -> None:
    """The attacker: ``stalled`` stalled uploads for ``seconds``, at the lowest CPU priority (a real
    attacker spends its own machine's CPU, not the server's; here they share two cores)."""
    os.nice(19)
    host, port = url.removeprefix("http://").split(":")
    counter = [0]

    async def run() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_stalled(host, int(port), stop, counter) for _ in range(stalled)))

    asyncio.run(run())
    opened.value = counter[0]


class Stallers:
    """Runs :func:`_stall_process` in a child process for the length of a ``with`` block."""

    def __init__(self, url: str, stalled: int, seconds: float) -> None:
        import multiprocessing

        self.opened = multiprocessing.Value("i", 0)
        self.proc = multiprocessing.get_context("fork").Process(
            target=_stall_process, args=(url, stalled, seconds, self.opened), daemon=True
        )

    def __enter__(self) -> Stallers:
        self.proc.start()
        time.sleep(3)  # let them all connect and stall first
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


def _server_cpu_s(pid: int) -> float:
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def _shutdown_with_stalled(proc, url: str, stalled: int) -> float:
    host, port = url.removeprefix("http://").split(":")
    opened = [0]
    stop = time.perf_counter() + 120
    stallers = [asyncio.create_task(_stalled(host, int(port), stop, opened)) for _ in range(stalled)]
    await asyncio.sleep(3)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    while proc.poll() is None and time.monotonic() - started < 115:
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - started
    for task in stallers:
        task.cancel()
    await asyncio.gather(*stallers, return_exceptions=True)
    return seconds


def _one_full_request(url: str, images: int) -> float:
    """One request of ``images`` tiles (the per-request maximum): the largest batch a client can
    send, which sizes ONNX Runtime's buffers. Returns the seconds it took."""
    import requests

    files = [("images", (t.name, t.read_bytes())) for t in (TILES * images)[:images]]
    started = time.perf_counter()
    response = requests.post(f"{url}/classify", files=files, timeout=300)
    response.raise_for_status()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--stalled", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2, help="phases beside stalled clients (one more alone)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "abuse.json")
    args = p.parse_args(argv)
    log = ROOT / "benchmarks" / "results" / "tmp" / "abuse-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc, url = start_server({"HISTO_DEVICE": "cpu"}, log_path=log)
    sampler = RssSampler(proc.pid)
    result: dict = {"clients": args.clients, "seconds": args.seconds, "cpu_count": os.cpu_count()}
    try:
        time.sleep(2)
        result["rss_idle_mb"], result["inference_rss_idle_mb"] = service_rss_mb(proc.pid)
        _one_full_request(url, 64)
        time.sleep(1)
        result["rss_after_64_image_request_mb"], result["inference_rss_after_64_image_request_mb"] = service_rss_mb(
            proc.pid
        )
        settings = {k: v for k, v in os.environ.items() if k.startswith("HISTO_")}
        result["settings_from_environment"] = settings
        # alone and beside stalled in turn: the cores are shared with other work whose load drifts, so
        # each kind is measured in several phases spread over the run
        phases = []
        for k in range(2 * args.rounds + 1):
            stalled = args.stalled if k % 2 else 0
            cpu = _server_cpu_s(proc.pid)
            if stalled:
                with Stallers(url, stalled, args.seconds + 8) as stallers:
                    cpu = _server_cpu_s(proc.pid)
                    phase = asyncio.run(_honest(url, args.clients, args.seconds))
                phase["stalled_connections_opened"] = stallers.opened.value
            else:
                phase = asyncio.run(_honest(url, args.clients, args.seconds))
            phase["server_core_ms_per_image"] = 1000 * (_server_cpu_s(proc.pid) - cpu) / max(1, phase["answered"])
            phase["stalled_connections"] = stalled
            phase["rss_plateau_mb"], phase["inference_rss_plateau_mb"] = sampler.plateau(*phase.pop("window"))
            phases.append(phase)
        result["phases"] = phases
        for name, picked in (("alone", phases[0::2]), ("beside_stalled", phases[1::2])):
            result[name] = {
                key: sum(p[key] for p in picked) / len(picked)
                for key in ("images_per_s", "p50_ms", "p99_ms", "server_core_ms_per_image", "rss_plateau_mb")
            }
            result[name]["p99_ms"] = max(p["p99_ms"] for p in picked)
            result[name]["refused"] = sum(p["refused"] for p in picked)
            result[name]["inference_rss_plateau_mb"] = max(p["inference_rss_plateau_mb"] for p in picked)
            result[name]["rss_plateau_mb"] = max(p["rss_plateau_mb"] for p in picked)
        result["throughput_ratio"] = result["beside_stalled"]["images_per_s"] / result["alone"]["images_per_s"]
        result["rss_peak_mb"] = max(total for _, total, _ in sampler.samples)
        result["inference_rss_peak_mb"] = max(inference for _, _, inference in sampler.samples)
        sampler.stop()
        result["shutdown_s_with_stalled"] = asyncio.run(_shutdown_with_stalled(proc, url, args.stalled))
    finally:
        sampler.stop()
        stop_server(proc)
    a, b = result["alone"], result["beside_stalled"]
    lines = [
        f"{args.clients} honest clients x 1 image/request, CPU provider, {os.cpu_count()} CPUs shared with other "
        f"work; {args.rounds + 1} phases alone and {args.rounds} beside {args.stalled} stalled uploads, "
        f"{args.seconds:g} s each, in turn (short phases on shared cores: absolute numbers drift)",
    ]
    for k, phase in enumerate(result["phases"]):
        kind = f"beside {args.stalled} stalled" if phase["stalled_connections"] else "alone"
        lines.append(
            f"  phase {k + 1} {kind:18s}: {phase['images_per_s']:6.1f} images/s  p50 {phase['p50_ms']:6.0f} ms  "
            f"p99 {phase['p99_ms']:6.0f} ms  refused {phase['refused']}  "
            f"server {phase['server_core_ms_per_image']:5.1f} core-ms/image"
            + (
                f"  ({phase['stalled_connections_opened']} stalled connections opened)"
                if "stalled_connections_opened" in phase
                else ""
            )
        )
    lines += [
        f"  beside stalled / alone (means): {result['throughput_ratio']:.2f} images/s (target >= 0.8), refused "
        f"{b['refused']} (target 0); server core-ms per image {b['server_core_ms_per_image']:.1f} vs "
        f"{a['server_core_ms_per_image']:.1f}",
        f"  service RSS (all processes): idle {result['rss_idle_mb']:.0f} MB, after one 64-image request "
        f"{result['rss_after_64_image_request_mb']:.0f} MB, plateau under load {a['rss_plateau_mb']:.0f} MB alone, "
        f"{b['rss_plateau_mb']:.0f} MB beside stalled, peak {result['rss_peak_mb']:.0f} MB",
        f"  inference process RSS: idle {result['inference_rss_idle_mb']:.0f} MB, after one 64-image request "
        f"{result['inference_rss_after_64_image_request_mb']:.0f} MB, plateau under load "
        f"{max(a['inference_rss_plateau_mb'], b['inference_rss_plateau_mb']):.0f} MB, "
        f"peak {result['inference_rss_peak_mb']:.0f} MB",
        f"  SIGTERM with {args.stalled} stalled uploads open: exited after {result['shutdown_s_with_stalled']:.1f} s",
    ]
    print("\n".join(lines))
    result["report"] = lines
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
