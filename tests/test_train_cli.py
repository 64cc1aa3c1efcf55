"""`python training/train.py` end to end on real fixture tiles, and its bad-input errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import load_model_dir
from training import train

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "kather"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "training/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _quick_main(data: Path, tmp_path: Path, *extra: str) -> dict:
    """``train.main`` in-process on ``data``, small and fast: no export, k=5, 5 epochs, a private cache."""
    small = ["--no-export", "--knn-k", "5", "--epochs", "5", "--cache-dir", str(tmp_path / "cache")]
    return train.main(["--data", str(data), "--out", str(tmp_path / "out"), *small, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    cache = tmp_path_factory.mktemp("cache")
    args = [
        "--data",
        str(FIXTURES),
        "--out",
        str(out),
        "--holdout-slides",
        "CRC-Prim-HE-07",
        "--inject-noise",
        "uniform:0.4",
        "--knn-k",
        "5",
        "--epochs",
        "40",
        "--mpp",
        "0.495",
        "--cache-dir",
        str(cache),
        "--variants",
        "fp16,int8",
    ]
    first = _run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_cli(*[a if a != str(out) else str(out) + "_again" for a in args])
    assert second.returncode == 0, second.stderr[-3000:]
    return out, Path(str(out) + "_again")


def test_run_writes_a_servable_model_and_reports(trained):
    out, _ = trained
    report = json.loads((out / "report.json").read_text())
    model = load_model_dir(out)
    card = model.card
    assert card.classes == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    assert card.input_size == 224 and card.patch_size_pixels == 150 and card.mpp == 0.495
    assert card.parity.passed and card.parity.max_abs_diff <= 1e-4
    assert card.data.injected_noise == "uniform:0.4"
    assert set(card.variants) <= {"fp16", "int8"} and "fp16" in card.variants
    # the held-out slide is the clean test set; its labels were never noised
    assert report["test"]["n"] == 14  # fixture tiles of slide 07
    assert 0 <= report["test"]["accuracy"] <= 1
    assert report["injected_noise"]["flipped_fraction"] == pytest.approx(0.4, abs=0.02)
    assert "auroc_vs_injected_flips" in report["suspects"]
    # default calibration: a temperature fitted on cross-slide predictions, baked into the graph
    confidence = report["confidence"]
    assert confidence["calibration"] == "cross-slide" and "cross-slide" in card.calibration.method
    assert 0 < confidence["cross_slide"]["n"] <= 81 - 14
    assert card.calibration.temperature == confidence["temperature"] == confidence["cross_slide"]["temperature"]
    # classes the heads that never saw a slide mostly call something else (none need be on 81 tiles)
    assert all(r["share"] >= 0.3 and r["n"] >= 20 for r in confidence["cross_slide"]["disagreements"])
    assert "cross-slide" in card.abstention.measured_on
    for name in ("confusion.png", "confusion_test.png", "suspects.png", "config.json"):
        assert (out / name).stat().st_size > 0
    with open(out / "suspects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 81 - 14
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all((FIXTURES / r["path"]).is_file() for r in rows)  # relative to the data folder


def test_second_run_reuses_the_embedding_cache(trained):
    first, second = trained
    assert json.loads((first / "report.json").read_text())["data"]["embeddings_computed"] == 81
    assert json.loads((second / "report.json").read_text())["data"]["embeddings_computed"] == 0


def test_exported_graph_matches_torch_at_batch_1_and_17(trained):
    """The graph's probabilities equal encoder + head in torch on real tiles, for any batch size."""
    import onnxruntime as ort

    from training.embed import Normalize, load_rgb_resized
    from training.encoders import build_encoder

    out, _ = trained
    card = load_model_dir(out).card
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    paths = sorted(FIXTURES.glob("*/*.webp"))[:17]
    images = np.stack([load_rgb_resized(p, 224) for p in paths])
    encoder = build_encoder(card.encoder.id)
    with torch.no_grad():
        emb = encoder(Normalize(encoder.spec.mean, encoder.spec.std)(torch.from_numpy(images))).numpy()
    for n in (1, 17):
        probs, embeddings, ood = session.run(None, {"images": images[:n]})
        assert probs.shape == (n, len(card.classes)) and embeddings.shape == (n, 992) and ood.shape == (n,)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(embeddings, emb[:n], atol=1e-4, rtol=1e-4)


def _main_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_fail_fast_with_the_file_named(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no such file or directory" in _main_error(capsys, "--data", str(tmp_path / "nope"), "--out", out)

    empty = tmp_path / "empty"
    shutil.copytree(FIXTURES, empty)
    for f in (empty / "08_EMPTY").iterdir():
        f.unlink()
    err = _main_error(capsys, "--data", str(empty), "--out", out)
    assert "08_EMPTY" in err and "has no images" in err

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,label,grade\nx.webp,A,1\n")
    err = _main_error(capsys, "--data", str(bad_csv), "--out", out)
    assert str(bad_csv) in err and "unknown CSV columns ['grade']" in err

    test_csv = tmp_path / "test.csv"
    tile = next(FIXTURES.glob("01_TUMOR/*.webp"))
    test_csv.write_text(f"path,label\n{tile},09_MUSCLE\n")
    err = _main_error(capsys, "--data", str(FIXTURES), "--test", str(test_csv), "--out", out)
    assert str(test_csv) in err and "09_MUSCLE" in err

    err = _main_error(capsys, "--data", str(FIXTURES), "--out", out, "--encoder", "resnet_9000")
    assert "unknown encoder 'resnet_9000'" in err

    weights = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    err = _main_error(capsys, "--data", str(FIXTURES), "--out", out, "--weights", str(weights))
    assert str(weights) in err and "missing keys" in err and "unexpected keys (1): conv.weight" in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_unreadable_image_is_skipped_and_reported(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    broken = data / "01_TUMOR" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    report = _quick_main(data, tmp_path)
    assert report["data"]["n"] == 81
    assert [p for p, _ in report["data"]["skipped"]] == [str(broken)]
    assert "broken.png" in capsys.readouterr().err


def test_help_documents_every_option():
    text = train.build_parser().format_help()
    for option in (
        "--data",
        "--out",
        "--test",
        "--encoder",
        "--weights",
        "--head",
        "--method",
        "--loss",
        "--inject-noise",
        "--seed",
        "--holdout-slides",
        "--variants",
    ):
        assert option in text


def test_data_without_slide_ids_falls_back_to_the_validation_split_for_calibration(tmp_path, capsys):
    listing = tmp_path / "tiles.csv"
    tiles = sorted(p for p in FIXTURES.rglob("*") if p.is_file())
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in tiles))
    report = _quick_main(listing, tmp_path, "--slide-regex", "(no slide id in these names)")
    assert "cross-slide calibration needs tiles of at least 3 slides" in capsys.readouterr().err
    confidence = report["confidence"]
    assert confidence["calibration"] == "transition" and "cross_slide" not in confidence
    assert confidence["temperature"] == confidence["transition_adjusted_temperature"]
    assert confidence["abstention"]["measured_on"].startswith("validation split")


def test_stacked_encoders_export_one_graph_that_serves_their_mean(tmp_path):
    """``--encoder a+b``: both backbones and both heads in one graph, served like any model."""
    from service.runtime import Runtime
    from training.embed import Normalize, load_rgb_resized
    from training.encoders import build_encoder
    from training.export import HEAD_FILE, load_head
    from training.robust import FeatureGroupEnsemble

    out = tmp_path / "stack"
    stack = "efficientnet_lite0_ms+efficientnet_lite2_ms"
    small = ["--knn-k", "5", "--epochs", "10", "--cache-dir", str(tmp_path / "cache"), "--holdout-slides"]
    train.main(["--data", str(FIXTURES), "--out", str(out), "--encoder", stack, *small, "CRC-Prim-HE-07"])
    card = load_model_dir(out).card
    assert card.encoder.id == stack and card.encoder.embedding_dim == 2080 and card.head.members == 8
    assert card.parity.passed and card.parity.max_abs_diff <= 1e-4
    assert "slide ensemble of 4 per encoder, 2 encoders averaged" in card.description
    head = load_head(out / HEAD_FILE, card.head.kind, len(card.classes))
    assert isinstance(head, FeatureGroupEnsemble) and head.slices == [(0, 992), (992, 2080)]
    images = np.stack([load_rgb_resized(p, 224) for p in sorted(FIXTURES.glob("*/*.webp"))[:9]])
    served = Runtime(out).predict(images)
    encoder = build_encoder(card.encoder.id)
    with torch.no_grad():
        emb = encoder(Normalize(encoder.spec.mean, encoder.spec.std)(torch.from_numpy(images)))
        members = [torch.softmax(m(emb[:, a:b]), 1) for m, (a, b) in zip(head.members, head.slices, strict=True)]
        mean = torch.stack(members).mean(0)
        expected = torch.softmax(torch.log(mean) / card.calibration.temperature, 1).numpy()
    np.testing.assert_allclose(served.probabilities, expected, atol=1e-4)
    assert served.ood_scores.shape == (9,)
