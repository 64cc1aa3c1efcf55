"""A real multi-node Ray cluster on 127.0.0.1 for tests and benchmarks, torn down whatever happens.

Each node is ``ray start --block`` in its own session, with ports of its own, a small object store
and token authentication on (a random token in ``RAY_AUTH_TOKEN``, as Ray 2.60 expects for a
cluster started by hand). Stopping kills each node's whole process tree (raylet, agents, workers:
Ray's worker processes start sessions of their own, so a process group would miss them) and
nothing else: no ``ray stop``, which would also stop any other Ray on this machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# `ray` as this interpreter runs it: no console script needed (a machine with Ray installed by --target has none)
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
READY = "Ray runtime started."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """``with LocalRayCluster() as cluster: cluster.start_head(); cluster.add_worker(num_gpus=1)``."""

    def __init__(self, object_store_mb: int = 100) -> None:
        # short: Ray's Unix socket paths live under it and must stay under 108 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="hr-ray-", dir="/tmp"))
        self.object_store_mb = object_store_mb
        self.address = ""
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(self.temp_dir),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, args: list[str], num_cpus: int, num_gpus: int, timeout: float) -> subprocess.Popen:
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        low = free_port()
        log = self.temp_dir / f"node{len(self.nodes)}.log"
        with log.open("w") as output:  # the node keeps writing to it; this process need not
            proc = subprocess.Popen(
                [
                    *RAY,
                    "start",
                    "--block",
                    *args,
                    "--node-ip-address",
                    "127.0.0.1",
                    "--num-cpus",
                    str(num_cpus),
                    "--num-gpus",
                    str(num_gpus),
                    "--object-store-memory",
                    str(self.object_store_mb * 2**20),
                    "--min-worker-port",
                    str(low),
                    "--max-worker-port",
                    str(low + 20),
                    *(str(v) for item in ports.items() for v in item),
                    "--disable-usage-stats",
                ],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nodes.append(proc)
        deadline = time.monotonic() + timeout
        while READY not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return proc

    def start_head(self, num_cpus: int = 1, num_gpus: int = 0, timeout: float = 120) -> str:
        port = free_port()
        self._start(
            ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(self.temp_dir)],
            num_cpus,
            num_gpus,
            timeout,
        )
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_worker(self, num_cpus: int = 1, num_gpus: int = 0, timeout: float = 120) -> subprocess.Popen:
        """A worker node; ``num_gpus`` may be advertised without a GPU (Ray then schedules GPU work there)."""
        return self._start(["--address", self.address], num_cpus, num_gpus, timeout)

    def pids(self, node: subprocess.Popen) -> set[int]:
        """Every process of a node: ``ray start``, its raylet and agents, and the raylet's workers."""
        try:
            return {node.pid, *(p.pid for p in psutil.Process(node.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self, node: subprocess.Popen) -> None:
        """Remove a node the hard way: SIGKILL to all its processes at once, as when a machine dies."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait(timeout=30)

    def processes(self) -> list[psutil.Process]:
        """Ray processes of this cluster, including an embedded Ray started with its environment:
        those naming its temp dir on their command line or in ``RAY_TMPDIR`` (workers rename
        themselves ``ray::...`` but keep the environment)."""
        found = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                ours = str(self.temp_dir) in " ".join(proc.cmdline())
                if (ours or proc.environ().get("RAY_TMPDIR") == str(self.temp_dir)) and proc.status() != "zombie":
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def kill_leftovers(self) -> None:
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        self.kill_leftovers()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
