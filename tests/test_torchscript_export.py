"""model.ts.pt: the shipped model as TorchScript for wsinfer / QuPath, checked against model.onnx on real tiles.

The input is made the way wsinfer makes it — torchvision transforms built from the model's own
``config.json`` on PIL tiles — and the output is softmaxed the way wsinfer and QuPath do.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from training.embed import load_rgb_resized
from training.export import TORCHSCRIPT_FILE, ExportError, main, onnx_predict, torchscript_for_model_dir

ROOT = Path(__file__).resolve().parent.parent
TILES = sorted((ROOT / "tests" / "fixtures" / "kather").rglob("*.webp"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("model") / "default"
    shutil.copytree(ROOT / "models" / "default", model_dir)
    (model_dir / TORCHSCRIPT_FILE).unlink(missing_ok=True)
    main([str(model_dir), "--tiles", str(ROOT / "tests" / "fixtures" / "kather"), "--n-tiles", "16"])
    return model_dir


def _wsinfer_transform(config: dict) -> transforms.Compose:
    """wsinfer 0.6.1 modellib/transforms.py: each config item → the torchvision class of that name."""
    return transforms.Compose([getattr(transforms, t["name"])(**t.get("arguments", {})) for t in config["transform"]])


def test_torchscript_matches_onnx_on_real_tiles_as_wsinfer_feeds_it(exported):
    config = json.loads((exported / "config.json").read_text())
    transform = _wsinfer_transform(config)
    tiles = TILES[::3]  # 27 of the 81 tiles, every class
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in tiles])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(exported / TORCHSCRIPT_FILE))
    with torch.no_grad():
        logits = module(x)
        single = module(x[:1])
    assert logits.shape == (len(tiles), config["num_classes"])  # wsinfer: [N, C] → softmax over classes
    ts_probs = torch.softmax(logits, dim=1).numpy()
    onnx_probs, _ = onnx_predict(exported / "model.onnx", np.stack([load_rgb_resized(p, 224) for p in tiles]))
    diff = float(np.abs(ts_probs - onnx_probs).max())
    print(f"TorchScript (wsinfer input) vs model.onnx (service input): max |Δp| {diff:.2e} on {len(tiles)} tiles")
    assert diff < 1e-4
    assert (ts_probs.argmax(1) == onnx_probs.argmax(1)).all()
    torch.testing.assert_close(single, logits[:1], rtol=1e-4, atol=1e-5)  # dynamic batch axis
    # logits, not probabilities: wsinfer and QuPath apply softmax themselves
    assert not torch.allclose(logits.sum(1), torch.ones(len(tiles)), atol=1e-2)


def test_wrong_encoder_weights_are_refused(exported, tmp_path):
    from safetensors.torch import save_file

    from training.encoders import build_encoder

    other = build_encoder("efficientnet_lite0_ms", random_init=True).features.net.state_dict()
    weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(weights))
    images = np.stack([load_rgb_resized(p, 224) for p in TILES[:4]])
    with pytest.raises(ExportError, match="differ from the card's"):
        torchscript_for_model_dir(exported, images, weights)
