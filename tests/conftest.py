"""Shared fixtures: a real `bentoml serve` of the shipped model on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.local_server import start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def served() -> Iterator[str]:
    """Base URL of a real server with small limits, so the limit tests stay cheap."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    proc, url = start_server(
        {"HISTO_MAX_IMAGES": "8", "HISTO_MAX_BODY_MB": "2", "HISTO_MAX_LATENCY_MS": "200", "HISTO_DEVICE": "cpu"},
        log_path=ROOT / ".pytest_cache" / "serve.log",
    )
    yield url
    stop_server(proc)
