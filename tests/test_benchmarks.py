"""The noise-resilience sweep end to end on a tiny real subset (the fixture tiles)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_noise_sweep_on_a_tiny_subset(tmp_path):
    noise = _load("noise")
    result = noise.main(
        [
            "--data",
            str(ROOT / "tests" / "fixtures" / "kather"),
            "--test-slides",
            "CRC-Prim-HE-07",
            "--noise",
            "none",
            "uniform:0.4",
            "--seeds",
            "1",
            "--epochs",
            "10",
            "--encoders",
            "imagenet-effnet-lite0-ms",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path),
        ]
    )
    methods = noise.all_methods()
    assert len(result["runs"]) == 2 * len(methods)
    assert result["n_test"] == 14 and "CRC-Prim-HE-07" not in result["val_slides"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in result["runs"])
    flipped = [r for r in result["runs"] if r["method"] == "default" and r["noise"] == "uniform:0.4"]
    assert 0 <= flipped[0]["suspects_auroc"] <= 1
    saved = json.loads((tmp_path / "noise.json").read_text())
    assert saved["table"] and saved["default"].startswith("linear+knn_clean+gce")
    table = (tmp_path / "noise.md").read_text()
    assert "| imagenet-effnet-lite0-ms | **default** |" in table and "uniform:0.4" in table
    assert (tmp_path / "noise.png").read_bytes()[:4] == b"\x89PNG"
