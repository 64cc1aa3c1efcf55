"""Shared fixtures: a real `bentoml serve` of the shipped model on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_extra: dict[str, str], timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start `bentoml serve service.service:HistoClassifier` and wait for /readyz."""
    port = free_port()
    env = {**os.environ, "HISTO_MODEL_DIR": str(ROOT / "models" / "default"), **env_extra}
    env.pop("BENTOML_HOME", None)
    bentoml = Path(sys.executable).with_name("bentoml")
    log = open(ROOT / ".pytest_cache" / f"serve-{port}.log", "wb") if (ROOT / ".pytest_cache").is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(bentoml), "serve", "service.service:HistoClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"bentoml serve not ready after {timeout}s")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def served() -> Iterator[str]:
    """Base URL of a real server with small limits, so the limit tests stay cheap."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    proc, url = start_server({"HISTO_MAX_IMAGES": "8", "HISTO_MAX_BODY_MB": "2", "HISTO_MAX_LATENCY_MS": "200",
                              "HISTO_DEVICE": "cpu"})
    yield url
    stop_server(proc)
