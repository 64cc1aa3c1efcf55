"""The noise-resilience sweep end to end on a tiny real subset (the fixture tiles)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_noise_sweep_on_a_tiny_subset(tmp_path):
    noise = _load("noise")
    args = [
        "--data",
        str(ROOT / "tests" / "fixtures" / "kather"),
        "--holdout-slides",
        "CRC-Prim-HE-07",
        "--noise",
        "none",
        "uniform:0.4",
        "--seeds",
        "1",
        "--epochs",
        "10",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path),
    ]
    result = noise.main(args)
    methods = noise.all_methods()
    assert len(result["runs"]) == 2 * len(methods)
    assert result["n_test"] == {"CRC-Prim-HE-07": 14}
    assert all(0 <= r["test_accuracy"] <= 1 and r["seconds"] >= 0 for r in result["runs"])
    chosen = [r for r in result["runs"] if r["method"] == noise.DEFAULT]
    assert len(chosen) == 2 and all(r["chosen"] in ("knn_clean", "forward") for r in chosen)
    # the default's row is its pick's own fit, not a fit of its own
    for r in chosen:
        pick = next(
            q for q in result["runs"] if q["method"] == noise.CANDIDATE_ROWS[r["chosen"]] and q["noise"] == r["noise"]
        )
        assert r["test_accuracy"] == pick["test_accuracy"]
    saved = json.loads((tmp_path / "noise.json").read_text())
    assert saved["table"] and "uniform:0.4" in saved["drops"][noise.DEFAULT]
    table = (tmp_path / "noise.md").read_text()
    assert f"| imagenet-effnet-lite0-ms | **{noise.DEFAULT}** |" in table and "uniform:0.4" in table
    assert (tmp_path / "noise.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun measures nothing anew: every run comes back from the run cache, identical
    again = noise.main(args)
    assert [r["test_accuracy"] for r in again["runs"]] == [r["test_accuracy"] for r in result["runs"]]


def test_serve_benchmark_measures_every_server_and_accounts_for_cpu(tmp_path):
    """A one-second run of ``benchmarks/serve.py``: real servers, real load, numbers that add up."""
    result = _load("serve").main(
        ["--seconds", "1", "--clients", "4", "--batch", "8", "--out", str(tmp_path / "s.json")]
    )
    assert json.loads((tmp_path / "s.json").read_text())["report"] == result["report"]
    for key in ("raw_onnxruntime", "raw_onnxruntime_batch1", "http_batched", "http_unbatched", "http_batched_multi"):
        assert result[key] > 0, key
    assert result["http_over_raw"] == result["http_batched"] / result["raw_onnxruntime"]
    spent = result["http_batched_core_ms_per_image"]
    assert {"inference worker", "front-end workers", "load generator"} <= set(spent)
    # the inference worker runs the model, so it costs at least a good part of raw inference's CPU
    assert spent["inference worker"] > 0.5 * result["raw_core_ms_per_image"]
    assert 0 < result["cpu_only_http_ceiling"] == result["raw_core_ms_per_image"] / sum(spent.values())


def test_wsi_benchmark_on_two_small_slides(tmp_path):
    result = _load("wsi").main(
        ["--sizes", "2100", "3000", "--tissue", "900", "1200", "--raw-tiles", "32", "--out", str(tmp_path)]
    )
    small, large = result["runs"]["2100"], result["runs"]["3000"]
    # the tissue squares start at 600 and 900 px: multiples of the 150 px tile, so 6 x 6 and 8 x 8 tiles
    assert (small["tiles"], large["tiles"]) == (36, 64)
    for run in (small, large):
        assert run["end_to_end_tiles_per_s"] <= run["streaming_tiles_per_s"]
        assert run["peak_rss_mb"] > 50 and run["read_core_ms_per_tile"] > 0 and run["inference_core_ms_per_tile"] > 0
        assert 0 < run["cpu_only_streaming_ceiling"] < 1
    for mode in ("one_by_one", "ahead"):  # three copies of the small slide in one job
        job = result["job_gaps"][mode]
        assert job["tiles"] == 3 * 36 and len(job["gaps_s"]) == 2 and all(g >= 0 for g in job["gaps_s"])
    assert (tmp_path / "wsi.txt").read_text().splitlines() == result["report"]


def _run_on_fixture_pair(name: str, tmp_path: Path, monkeypatch, *extra: str) -> dict:
    """One benchmark on the fixture tiles: slides 01 and 07 held out, one seed, a private cache."""
    monkeypatch.setenv("HISTO_CACHE_DIR", str(tmp_path / "cache"))
    data = str(ROOT / "tests" / "fixtures" / "kather")
    pair = "CRC-Prim-HE-01,CRC-Prim-HE-07"
    args = ["--data", data, "--holdout-slides", pair, "--seeds", "1", "--out", str(tmp_path), *extra]
    return _load(name).main(args)


def test_confidence_benchmark_on_a_tiny_subset(tmp_path, monkeypatch):
    """Train, serve through onnxruntime and measure, one held-out pair, one seed: the plumbing."""
    result = _run_on_fixture_pair("confidence", tmp_path, monkeypatch, "--first-seed", "2")
    run = result["runs"][0]
    assert run["seed"] == 2 and result["first_seed"] == 2  # more seeds later without repeating these
    assert run["n_test"] == 25 and run["calibration"].startswith("temperature through the anchor-point")
    served = result["ece_summary"]["served"]
    assert served["per_pair"]["CRC-Prim-HE-01,CRC-Prim-HE-07"] == run["ece"]["served"]
    assert served["pooled"] == pytest.approx(run["ece"]["served"], abs=1e-6)  # one pair: pooling changes nothing
    assert 0 <= run["ece"]["served"] <= 1 and run["temperatures"]["oracle"] > 0
    assert set(run["ood"]) == {"ihc", "natural photographs", "blurred H&E", "pen-marked H&E", "all non-H&E"}
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in run["warned"])
    assert sum(r["runs"] for r in result["shifts"]) == len(run["held_out_shifts"])
    assert "## Classes that do not transfer" in (tmp_path / "confidence.md").read_text()
    assert json.loads((tmp_path / "confidence.json").read_text())["seeds"] == 1
    assert result["encoder"] == "efficientnet_lite0_ms"  # train.py's default
    assert "Encoder: `efficientnet_lite0_ms`" in (tmp_path / "confidence.md").read_text()
    assert "| **as served**" in (tmp_path / "confidence.md").read_text()
    assert (tmp_path / "confidence.png").stat().st_size > 0
    # a rerun reuses the measured run (kept in the cache folder) and summarises it the same way
    again = _run_on_fixture_pair("confidence", tmp_path, monkeypatch, "--first-seed", "2")
    assert json.dumps(again, sort_keys=True) == json.dumps(result, sort_keys=True)
    assert len(list((tmp_path / "cache" / "confidence-runs").glob("*.npz"))) == 1


def test_calibration_limits_on_a_tiny_subset(tmp_path, monkeypatch):
    result = _run_on_fixture_pair("calibration_limits", tmp_path, monkeypatch)
    # cross-slide predictions cover the labelled slides except 06 (it holds every empty tile)
    assert {r["slide"] for r in result["slides"]} == {"CRC-Prim-HE-03", "CRC-Prim-HE-05", "CRC-Prim-HE-08"}
    assert set(result["ece_mean"]) == {
        "one temperature",
        "temperature by confidence",
        "temperature by disagreement",
        "temperature by ood",
        "temperature by similarity",
    }
    assert all(0 <= v <= 1 for v in result["ece_mean"].values())
    maps = result["maps"]
    assert set(maps) == {
        "served",
        "slide_priors",
        "bias_noisy",
        "vector_noisy",
        "matching",
        "corrected_ece",
        "backward",
        "votes",
        "true_transition",
        "backward_true",
        "clean",
        "bias_clean",
        "vector_clean",
        "oracle",
        "bias_oracle",
    }
    # a temperature keeps every argmax; re-weighting each slide's priors may move some
    assert maps["clean"]["accuracy"] == maps["served"]["accuracy"] == maps["oracle"]["accuracy"]
    for row in maps.values():  # one pair, one seed: pooling changes nothing
        assert row["pooled"] == pytest.approx(row["per_pair"]["01/07"], abs=1e-9) and 0 <= row["pooled"] <= 1
    assert len(maps["served"]["temperature_per_pair"]["01/07"]) == 1
    assert "temperature_per_pair" not in maps["bias_clean"]  # no single temperature there
    # the clean-label temperature here is the same fit as section 2's "one temperature"
    assert maps["clean"]["pooled"] == pytest.approx(result["ece_mean"]["one temperature"], abs=1e-9)
    assert {c["slide"] for c in result["confusions"]} <= {"CRC-Prim-HE-01", "CRC-Prim-HE-07"}
    assert all(c["true"] != c["predicted"] and 0 < c["share_of_true_class"] <= 1 for c in result["confusions"])
    assert "vector scaling" in (tmp_path / "calibration_limits.md").read_text()


def test_noise_corrected_temperature_fits_recover_the_clean_label_fit():
    """40 % uniform noise on labels drawn from softmax(z/2): each label-free fit finds t≈2, as clean labels do."""
    limits = _load("calibration_limits")
    from training.calibration import fit_temperature, softmax
    from training.noise import inject

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 4))
    clean = (rng.random(len(logits))[:, None] > np.cumsum(softmax(logits, 2.0), 1)).sum(1)
    noisy = inject(clean, "uniform:0.4", 4, 0)
    t_mat = np.full((4, 4), 0.4 / 3) + np.eye(4) * (0.6 - 0.4 / 3)
    assert fit_temperature(logits, clean) == pytest.approx(2.0, abs=0.1)
    assert fit_temperature(logits, noisy) > 3  # naive: the noise learned as uncertainty
    assert limits.backward_temperature(logits, noisy, t_mat) == pytest.approx(2.0, abs=0.15)
    assert limits.accuracy_matching_temperature(logits, noisy, t_mat) == pytest.approx(2.0, abs=0.15)
    assert limits.corrected_ece_temperature(logits, noisy, t_mat) == pytest.approx(2.0, abs=0.2)
    probs = softmax(logits, 2.0)
    estimate = limits.corrected_accuracy(probs, noisy, t_mat).mean()
    assert estimate == pytest.approx((probs.argmax(1) == clean).mean(), abs=0.02)
    # soft targets that are the one-hot noisy labels: the served fit itself
    one_hot = np.eye(4)[noisy]
    assert limits.soft_label_temperature(logits, one_hot, t_mat) == pytest.approx(
        fit_temperature(logits, noisy, t_mat), abs=1e-3
    )


def test_slide_prior_adaptation_recovers_a_shifted_class_mix():
    """EM re-weighting (Saerens et al. 2002): posteriors calibrated under a 50/50 prior, tiles drawn 80/20."""
    adapt_priors = _load("calibration_limits").adapt_priors
    rng = np.random.default_rng(0)
    y = (rng.random(20000) < 0.2).astype(int)  # 80 % class 0
    score = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)  # one Gaussian per class, unit variance
    p1 = 1 / (1 + np.exp(-2 * score))  # the exact posterior under equal priors
    probs = np.c_[1 - p1, p1]
    adapted = adapt_priors(probs, np.array([0.5, 0.5]))
    assert adapted.mean(0) == pytest.approx([0.8, 0.2], abs=0.01)
    assert np.allclose(adapted.sum(1), 1)
    assert (adapted.argmax(1) == y).mean() > (probs.argmax(1) == y).mean()  # the right prior helps here
