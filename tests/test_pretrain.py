"""Contrastive pre-training: the loss goes down, the result is a registry encoder, runs resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import pretrain
from training.encoders import build_encoder

FIXTURES = Path(__file__).parent / "fixtures" / "kather"


def test_a_few_steps_decrease_the_contrastive_loss():
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    tiles = sorted(FIXTURES.glob("*/*.webp"))[::4][:16]
    encoder = build_encoder("efficientnet_lite0_ms")
    for p in encoder.features.parameters():
        p.requires_grad_(True)
    model = pretrain.SimCLR(encoder.features, encoder.embedding_dim).train()
    views = pretrain.TileViews(tiles, 64, encoder.spec.mean, encoder.spec.std)
    a, b = map(torch.stack, zip(*[views[i] for i in range(len(tiles))], strict=True))
    assert a.shape == (16, 3, 64, 64) and not torch.equal(a, b)  # two different augmented views
    criterion, optimizer = NTXentLoss(temperature=0.2), torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = criterion(model(a), model(b))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def test_hed_jitter_keeps_images_valid_and_changes_stain():
    torch.manual_seed(0)
    image = torch.from_numpy(np.array(Image.open(next(FIXTURES.glob("01_TUMOR/*.webp"))).convert("RGB")))
    x = image.permute(2, 0, 1).float() / 255
    y = pretrain.HEDJitter(0.2, 0.05)(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert 0.005 < (y - x).abs().mean() < 0.2


def test_cli_saves_a_registry_encoder_and_resumes(tmp_path, caplog):
    out = tmp_path / "enc"
    common = ["--tiles", str(FIXTURES), "--out", str(out), "--image-size", "64", "--batch-size", "16", "--workers", "0"]
    first = pretrain.main([*common, "--epochs", "1"])
    assert len(first["history"]) == 1
    desc = json.loads((out / "encoder.json").read_text())
    assert desc["base"] == "efficientnet_lite0_ms" and desc["input_size"] == 64
    assert "81 unlabelled tiles" in desc["pretraining"]
    encoder = build_encoder(str(out))
    assert encoder.embedding_dim == 992 and encoder.spec.input_size == 64
    assert encoder.weights_sha256 == desc["weights_sha256"]
    imagenet = build_encoder("efficientnet_lite0_ms")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(encoder(x), imagenet(x))  # the weights really changed
    with caplog.at_level("INFO"):
        second = pretrain.main([*common, "--epochs", "2"])  # continues from the epoch-1 checkpoint
    assert "resuming" in caplog.text
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        pretrain.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_are_clear_errors_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.png").write_bytes(b"not an image")
    assert "no readable images" in _error(capsys, "--tiles", str(empty), "--out", str(tmp_path / "o1"))

    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (20, 20), "pink").save(small / "a.png")
    err = _error(capsys, "--tiles", str(small), "--out", str(tmp_path / "o2"), "--image-size", "160")
    assert "smaller than" in err

    assert "unknown encoder 'nope'" in _error(
        capsys, "--tiles", str(FIXTURES), "--out", str(tmp_path / "o3"), "--init", "nope"
    )
    stack = "efficientnet_lite0_ms+efficientnet_lite2_ms"
    assert "starts from one encoder, not a stack" in _error(
        capsys, "--tiles", str(FIXTURES), "--out", str(tmp_path / "o3"), "--init", stack
    )

    other = tmp_path / "o4"
    other.mkdir()
    shutil.copy(FIXTURES.parent / "README.md", other / "unrelated.txt")
    torch.save({"init": "retccl", "model": {"w": torch.zeros(1)}, "epoch": 1}, other / "checkpoint.pt")
    err = _error(capsys, "--tiles", str(FIXTURES), "--out", str(other), "--image-size", "64", "--workers", "0")
    assert "checkpoint is from encoder 'retccl'" in err
