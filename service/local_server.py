"""Start and stop a real `bentoml serve` on 127.0.0.1 (for tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    env_extra: dict[str, str], timeout: float = 120, log_path: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """`bentoml serve service.service:HistoClassifier` on a free port; returns (process, base URL) once ready."""
    port = free_port()
    env = {**os.environ, "HISTO_MODEL_DIR": str(ROOT / "models" / "default"), **env_extra}
    script = Path(sys.executable).with_name("bentoml")  # the venv's CLI; else bentoml on this interpreter's path
    bentoml = [str(script)] if script.exists() else [sys.executable, "-m", "bentoml"]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [*bentoml, "serve", "service.service:HistoClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode} (log: {log_path})")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"bentoml serve not ready after {timeout}s (log: {log_path})")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (BentoML runs each service in its own process)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
