"""Encoder registry: architectures, state-dict round trips through real files, key-mismatch errors."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from training.encoders import REGISTRY, EncoderError, build_encoder, spec_for

# (name, embedding dim) for architectures small enough to round-trip weights through a file here
SMALL = [("ctranspath", 768), ("phikon", 768), ("retccl", 2048), ("lunit_dino", 384)]
# the large foundation models, checked without allocating weights; parameter counts as published
# (UNI ViT-L 303M, H-optimus-0 ViT-g 1.13B, Virchow2 ViT-H 632M)
LARGE = [("uni", 1024, 303_350_784), ("h_optimus_0", 1536, 1_134_774_272), ("virchow2", 2560, 631_239_424)]


def _probe(encoder, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, encoder.spec.input_size, encoder.spec.input_size, generator=g)
    with torch.no_grad():
        return encoder(x)


@pytest.mark.parametrize(("name", "dim"), SMALL)
def test_round_trip_through_safetensors_and_torch_files(tmp_path, name, dim):
    source = build_encoder(name, random_init=True)
    assert source.embedding_dim == dim
    state = source.features.net.state_dict()
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pt = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)  # nested + DDP prefix
    expected = _probe(source)
    for path in (st, pt):
        loaded = build_encoder(name, path)
        assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64
        torch.testing.assert_close(_probe(loaded), expected)


@pytest.mark.parametrize(("name", "dim", "n_params"), LARGE)
def test_large_foundation_architectures(name, dim, n_params):
    with torch.device("meta"):
        net = spec_for(name).build()
        out = net(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, dim)
    assert sum(p.numel() for p in net.parameters()) == n_params


def _timm_vit_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of Hugging Face ViTModel checkpoints (what Phikon publishes)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
        "pooler.dense.weight": torch.zeros(768, 768),
    }
    names = {
        "attn.proj": "attention.output.dense",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for key, value in state.items():
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        i, part, kind = m.groups()
        if part == "attn.qkv":
            for j, qkv in enumerate(("query", "key", "value")):
                out[f"encoder.layer.{i}.attention.attention.{qkv}.{kind}"] = value.chunk(3)[j]
        else:
            out[f"encoder.layer.{i}.{names[part]}.{kind}"] = value
    return out


def test_phikon_loads_hugging_face_layout(tmp_path):
    source = build_encoder("phikon", random_init=True)
    hf = _timm_vit_to_hf(source.features.net.state_dict())
    path = tmp_path / "model.safetensors"
    save_file({f"vit.{k}": v.contiguous() for k, v in hf.items()}, str(path))
    torch.testing.assert_close(_probe(build_encoder("phikon", path)), _probe(source))


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path):
    other = build_encoder("resnet18", random_init=True).features.net.state_dict()
    other["extra.weight"] = torch.zeros(3)
    path = tmp_path / "resnet18.pth"
    torch.save(other, path)
    with pytest.raises(EncoderError) as err:
        build_encoder("retccl", path)
    message = str(err.value)
    assert str(path) in message
    assert "unexpected keys" in message and "extra.weight" in message
    assert "shape mismatch" in message or "missing keys" in message


def test_builtin_imagenet_efficientnet_is_real_and_frozen():
    encoder = build_encoder("efficientnet_lite0_ms")
    assert encoder.embedding_dim == 992  # mean+std of 24+40+112+320 channels
    assert encoder.weights_sha256.startswith("57934424")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.features.training  # BN statistics stay frozen
    # ImageNet weights, not random: BN running statistics differ from their init values
    bn = encoder.features.net.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_unknown_encoder_and_missing_weights_are_clear():
    with pytest.raises(EncoderError, match="unknown encoder 'no_such_net'"):
        build_encoder("no_such_net")
    with pytest.raises(EncoderError, match="has no built-in weights"):
        build_encoder("uni")
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("retccl", "/nonexistent/weights.pth")


def test_any_timm_model_by_name():
    encoder = build_encoder("timm:resnet18", random_init=True)
    assert encoder.embedding_dim == 512
    assert set(REGISTRY) >= {"ctranspath", "phikon", "uni", "h_optimus_0", "virchow2", "retccl", "lunit_dino"}


def test_builtin_imagenet_efficientnet_lite2_maps_onto_timm():
    """The Lite2 wheel's tensors land on timm's layout in order: the full network names real photos."""
    import numpy as np
    import skimage.data
    import timm
    from PIL import Image

    from training.encoders import IMAGENET_MEAN, IMAGENET_STD, read_state_dict

    encoder = build_encoder("efficientnet_lite2_ms")
    assert encoder.embedding_dim == 1088  # mean+std of 24+48+120+352 channels
    assert encoder.spec.input_size == 224 and encoder.feature_groups == (1088,)
    net = timm.create_model("efficientnet_lite2", pretrained=False)  # with its ImageNet classifier
    state = read_state_dict(encoder.spec.default_weights())
    net.load_state_dict(dict(zip(net.state_dict(), state.values(), strict=True)))  # the registry's order mapping
    assert torch.equal(net.conv_stem.weight, encoder.features.net.conv_stem.weight)
    net.eval()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    predicted = []
    for name in ("chelsea", "coffee"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((260, 260))
        x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            predicted.append(int(net(x[None]).argmax()))
    assert predicted == [285, 967]  # ImageNet "Egyptian cat", "espresso"


def test_stack_concatenates_its_members_on_one_input():
    stack = build_encoder("efficientnet_lite0_ms+efficientnet_lite2_ms")
    lite0, lite2 = build_encoder("efficientnet_lite0_ms"), build_encoder("efficientnet_lite2_ms")
    assert stack.feature_groups == (992, 1088) and stack.embedding_dim == 2080
    assert stack.spec.name == "efficientnet_lite0_ms+efficientnet_lite2_ms"
    assert stack.weights_sha256 not in (lite0.weights_sha256, lite2.weights_sha256)
    assert stack.cache_key not in (lite0.cache_key, lite2.cache_key)
    probe = _probe(stack)
    assert torch.allclose(probe, torch.cat([_probe(lite0), _probe(lite2)], 1), atol=1e-5)
    assert not any(p.requires_grad for p in stack.parameters())


def test_stack_errors_name_the_members():
    with pytest.raises(EncoderError, match="lunit_dino expects 224 px, mean .* stacked encoders share one input"):
        build_encoder("efficientnet_lite0_ms+lunit_dino")
    with pytest.raises(EncoderError, match="is a stack of encoders.*--weights FILE needs one encoder"):
        build_encoder("efficientnet_lite0_ms+efficientnet_lite2_ms", "/some/file.pth")
    with pytest.raises(EncoderError, match="two or more encoders"):
        build_encoder("efficientnet_lite0_ms+")
    with pytest.raises(EncoderError, match="unknown encoder 'no_such_net'"):
        build_encoder("efficientnet_lite0_ms+no_such_net")


def test_card_mpp_defaults_to_the_encoders_and_warns_when_tiles_differ(capsys):
    from training.encoders import training_mpp

    assert training_mpp(spec_for("ctranspath"), None) == 1.0  # the authors' recommendation
    assert training_mpp(spec_for("uni"), None) == 0.5
    assert capsys.readouterr().err == ""
    assert training_mpp(spec_for("efficientnet_lite0_ms"), 0.495) == 0.495  # Kather's 0.495 is "0.5"
    assert capsys.readouterr().err == ""
    assert training_mpp(spec_for("retccl"), 0.5) == 0.5  # declared wins, with a warning
    err = capsys.readouterr().err
    assert "tiles declared at 0.5 µm/px but encoder 'retccl' was pre-trained at 1 µm/px" in err
    with pytest.raises(EncoderError, match="--mpp must be positive"):
        training_mpp(spec_for("uni"), 0.0)


def test_train_cli_warns_before_touching_a_tile(tmp_path):
    """The warning comes from the CLI's fail-fast checks: visible before the long embedding run."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "training/train.py",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
            "--encoder",
            "ctranspath",
            "--mpp",
            "0.25",
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert result.returncode == 2  # then fails on the missing data, before any encoder work
    assert "encoder 'ctranspath' was pre-trained at 1 µm/px" in result.stderr
