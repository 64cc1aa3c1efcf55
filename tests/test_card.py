"""The model directory contract: card round trip and every load-time error, on the shipped model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.card import ModelCard, ModelLoadError, load_model_dir, save_model_dir
from service.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "default"


@pytest.fixture
def model_copy(tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(DEFAULT, dst, ignore=shutil.ignore_patterns("suspects.*", "*.png"))
    return dst


def test_default_model_card_is_complete():
    model = load_model_dir(DEFAULT)
    card = model.card
    assert len(card.classes) == 8 and card.classes[0] == "01_TUMOR"
    assert card.input_size == 224 and card.patch_size_pixels == 150 and card.mpp == pytest.approx(0.495)
    assert card.parity.passed and card.parity.max_abs_diff <= 1e-4
    assert card.encoder.weights_sha256 and card.data.data_sha256 and card.reproduce.seed == 0
    assert "CC BY 4.0" in card.credits[0]
    assert card.metrics["test"]["accuracy"] > 0.6
    wsinfer = json.loads((DEFAULT / "config.json").read_text())
    assert wsinfer["class_names"] == card.classes and wsinfer["spacing_um_px"] == card.mpp
    assert wsinfer["patch_size_pixels"] == 150


def test_card_round_trip(model_copy):
    card = load_model_dir(model_copy).card
    changed = card.model_copy(update={"name": "renamed", "onnx_sha256": ""})
    saved = save_model_dir(model_copy, changed)
    assert saved.onnx_sha256 == card.onnx_sha256  # recomputed from the file
    again = load_model_dir(model_copy).card
    assert again == saved and again.name == "renamed"
    assert ModelCard.model_validate_json(again.model_dump_json()) == again


def test_missing_onnx_file(model_copy):
    (model_copy / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: missing ONNX file"):
        load_model_dir(model_copy)


def test_missing_card(model_copy):
    (model_copy / "card.json").unlink()
    with pytest.raises(ModelLoadError, match=r"card\.json: missing model card"):
        load_model_dir(model_copy)


def test_wrong_sha256(model_copy):
    with open(model_copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelLoadError, match="does not match card.json"):
        load_model_dir(model_copy)


def test_unknown_schema_version(model_copy):
    raw = json.loads((model_copy / "card.json").read_text())
    raw["schema_version"] = 99
    (model_copy / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="unknown schema_version 99"):
        load_model_dir(model_copy)


def test_graph_outputs_must_match_card_classes(model_copy):
    raw = json.loads((model_copy / "card.json").read_text())
    raw["classes"] = raw["classes"][:-1]
    (model_copy / "card.json").write_text(json.dumps(raw))
    load_model_dir(model_copy)  # the card alone is valid...
    with pytest.raises(ModelLoadError, match="has 8 classes but the card lists 7"):
        Runtime(model_copy)  # ...but not for this graph: refused at load, not at the first request


def test_default_model_serves_without_torch_and_matches_torch(tmp_path):
    """onnxruntime in a process that never imports torch, vs encoder + head in torch, on held-out tiles."""
    tiles = sorted((ROOT / "tests/fixtures/kather").glob("*/*CRC-Prim-HE-07*.webp"))
    script = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from service.runtime import Runtime\n"
        "r = Runtime('models/default')\n"
        "x = np.stack([np.asarray(Image.open(p).convert('RGB').resize((224, 224), Image.BILINEAR))\n"
        "              for p in sys.argv[1:]])\n"
        f"np.save({str(tmp_path / 'probs.npy')!r}, r.predict(x).probabilities)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *map(str, tiles)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    onnx_probs = np.load(tmp_path / "probs.npy")

    import torch

    from training.embed import Normalize, load_rgb_resized
    from training.encoders import build_encoder
    from training.export import HEAD_FILE, load_head

    card = load_model_dir(DEFAULT).card
    encoder = build_encoder(card.encoder.id)
    head = load_head(DEFAULT / HEAD_FILE, card.head.kind, len(card.classes))
    pixels = torch.from_numpy(np.stack([load_rgb_resized(p, 224) for p in tiles]))
    with torch.no_grad():
        logits = head(encoder(Normalize(encoder.spec.mean, encoder.spec.std)(pixels)))
        torch_probs = torch.softmax(logits / card.calibration.temperature, 1).numpy()
    assert np.abs(onnx_probs - torch_probs).max() <= card.parity.tolerance
