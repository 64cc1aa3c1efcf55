"""Published checkpoints, laid out as their authors publish them, load and embed as the authors run them.

For every named foundation model: build the authors' architecture (their own code where it is timm or
torchvision, an independent re-implementation in ``tests/authors/`` where it is not), give it random
non-trivial weights, save them in the authors' file layout (key names, nesting, old Swin stages,
Hugging Face names with and without prefix, extra keys), load that file through the registry and
compare the embeddings on real tiles preprocessed the authors' way. Depth is reduced where the key
structure is the same, so the test stays fast; widths are the published ones. The preprocessing
constants are checked against the published values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms

from tests.authors.hf_vit import ViTModel
from tests.authors.transpath_swin import CTransPath
from training.embed import Normalize, load_rgb_resized
from training.encoders import build_encoder, spec_for

SLIDE = Path(__file__).parent / "fixtures" / "CMU-1-Small-Region.svs"  # 0.499 µm/px, H&E
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# published normalisation: Lunit's release notes (github.com/lunit-io/benchmark-ssl-pathology, tag
# pretrained-weights); H-optimus-0's timm config (huggingface.co/bioptimus/H-optimus-0)
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every float tensor moved off its init (layer scales of 1e-5 would hide a mis-mapped block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name.endswith("attn_mask"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:  # a tenth of the tensor's scale, at least 0.01: deep nets stay finite, tiny inits move
                t.add_(0.1 * max(float(t.abs().mean()), 0.1) * torch.randn(t.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Callable[[int], list[Path]]:
    """Two real H&E tiles cut from the bundled slide at a given size (PNG, as a user's tiles)."""
    import openslide

    root = tmp_path_factory.mktemp("tiles")
    slide = openslide.OpenSlide(str(SLIDE))

    def cut(size: int) -> list[Path]:
        paths = []
        for i, (x, y) in enumerate([(600, 900), (1200, 1500)]):
            path = root / f"{size}_{i}.png"
            slide.read_region((x, y), 0, (size, size)).convert("RGB").save(path)
            paths.append(path)
        return paths

    return cut


def _authors_input(paths: list[Path], transform: Callable) -> torch.Tensor:
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def _project_input(paths: list[Path], name: str) -> torch.Tensor:
    spec = spec_for(name)
    images = torch.from_numpy(np.stack([load_rgb_resized(p, spec.input_size) for p in paths]))
    return Normalize(spec.mean, spec.std)(images)


def _compare(name: str, path: Path, reference: Callable, authors_x: torch.Tensor, paths, **overrides) -> float:
    """Same tiles: the project's preprocessing + registry load vs the authors' transform + model."""
    project_x = _project_input(paths, name)
    assert project_x.shape == authors_x.shape, f"{name}: input {tuple(project_x.shape)} vs {tuple(authors_x.shape)}"
    input_diff = float((project_x - authors_x).abs().max())
    encoder = build_encoder(name, path, overrides=overrides)
    with torch.no_grad():
        ours, theirs = encoder(project_x), reference(authors_x)
    diff = float((ours - theirs).abs().max())
    print(f"{name} ({path.name}): input max|Δ| {input_diff:.2e}, embedding max|Δ| {diff:.2e}, scale {theirs.std():.2f}")
    assert input_diff < 1e-5, f"{name}: preprocessing differs from the authors' by {input_diff}"
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    return diff


def _standard(size: int, mean_std, resize: bool = True) -> transforms.Compose:
    steps = [transforms.Resize(size)] if resize else []
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(*mean_std)])


def test_ctranspath_published_pth(tmp_path, tiles):
    """ctranspath.pth: {"model": ...}, timm 0.5.4 stages (merging at the END), buffers saved, no head."""
    ref = _randomize(CTransPath(depths=(2, 2, 2, 2)), 1)
    state = ref.state_dict()
    assert "layers.0.downsample.reduction.weight" in state and "layers.3.downsample.norm.weight" not in state
    assert "layers.0.blocks.1.attn_mask" in state and "layers.0.blocks.0.attn.relative_position_index" in state
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": state}, path)
    paths = tiles(224)
    # get_features_CTransPath.py: Resize(224), ToTensor, Normalize(ImageNet)
    x = _authors_input(paths, _standard(224, IMAGENET))
    _compare("ctranspath", path, ref, x, paths, depths=(2, 2, 2, 2))
    assert spec_for("ctranspath").mpp == 1.0


@pytest.mark.parametrize(
    ("file_name", "prefix", "extra"),
    [
        ("model.safetensors", "", {}),  # owkin/phikon: ViTModel, pooler included
        ("pytorch_model.bin", "vit.", {"classifier.weight": torch.zeros(2, 768), "classifier.bias": torch.zeros(2)}),
        ("model.safetensors", "", {"embeddings.mask_token": torch.zeros(1, 1, 768)}),  # use_mask_token=True
    ],
)
def test_phikon_hugging_face_layouts(tmp_path, tiles, file_name, prefix, extra):
    ref = _randomize(ViTModel(depth=2), 2)
    state = {f"{prefix}{k}": v for k, v in (ref.state_dict() | extra).items()}
    assert "pooler.dense.weight" in ref.state_dict()
    path = tmp_path / file_name
    if file_name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    paths = tiles(224)
    # owkin/phikon preprocessor: ImageNet mean/std at 224 px; recipe: last_hidden_state[:, 0, :]
    x = _authors_input(paths, _standard(224, IMAGENET))
    _compare("phikon", path, lambda t: ref(t)[:, 0, :], x, paths, depth=2)


def test_uni_published_bin(tmp_path, tiles):
    """MahmoodLab/UNI pytorch_model.bin: timm ViT-L/16, init_values=1e-5, no head, loaded strictly."""
    ref = timm.create_model(
        "vit_large_patch16_224",
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
        depth=1,
    )
    _randomize(ref, 3)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    paths = tiles(224)
    # UNI card: Resize(224), CenterCrop(224), ToTensor, Normalize(ImageNet)
    transform = transforms.Compose(
        [transforms.Resize(224), transforms.CenterCrop(224), _standard(224, IMAGENET, False)]
    )
    _compare("uni", path, ref, _authors_input(paths, transform), paths, depth=1)


def test_h_optimus_0_published_safetensors(tmp_path, tiles):
    """bioptimus/H-optimus-0: timm vit_giant_patch14_reg4_dinov2 with its published model_args."""
    ref = timm.create_model(
        "vit_giant_patch14_reg4_dinov2",
        img_size=224,
        global_pool="token",
        init_values=1e-5,
        mlp_ratio=5.33334,
        num_classes=0,
        dynamic_img_size=False,
        depth=1,
    )
    _randomize(ref, 4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    paths = tiles(224)
    # the authors' card: 224 px tiles at 0.5 µm/px, ToTensor, Normalize(their mean/std); no resize
    _compare("h_optimus_0", path, ref, _authors_input(paths, _standard(224, HOPTIMUS, False)), paths, depth=1)
    spec = spec_for("h_optimus_0")
    assert (spec.mean, spec.std, spec.input_size, spec.mpp) == (*HOPTIMUS, 224, 0.5)


def test_virchow2_published_bin(tmp_path, tiles):
    """paige-ai/Virchow2: vit_huge_patch14_224 + SwiGLUPacked/SiLU; embedding = [CLS, mean of patch tokens]."""
    from timm.layers import SwiGLUPacked

    ref = timm.create_model(
        "vit_huge_patch14_224",
        img_size=224,
        init_values=1e-5,
        num_classes=0,
        mlp_ratio=5.3375,
        reg_tokens=4,
        global_pool="",
        dynamic_img_size=True,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        depth=1,
    )
    _randomize(ref, 5)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)

    def recipe(x: torch.Tensor) -> torch.Tensor:  # the Virchow2 card, verbatim in meaning
        output = ref(x)  # [B, 1 + 4 + 256, 1280]
        class_token, patch_tokens = output[:, 0], output[:, 5:]  # tokens 1-4 are registers
        return torch.cat([class_token, patch_tokens.mean(1)], dim=-1)

    paths = tiles(224)
    x = _authors_input(paths, _standard(224, IMAGENET))  # timm config: 224, crop_pct 1.0, ImageNet
    _compare("virchow2", path, recipe, x, paths, depth=1)


def test_retccl_published_ckpt(tmp_path, tiles):
    """RetCCL best_ckpt.pth: torchvision ResNet-50 names, fc replaced by identity; tiles resized to 256."""
    ref = torchvision.models.resnet50()
    ref.fc = nn.Identity()  # get_feature.py, before load_state_dict(strict=True): the file has no fc
    _randomize(ref, 6)
    path = tmp_path / "best_ckpt.pth"
    torch.save(ref.state_dict(), path)
    paths = tiles(256)
    x = _authors_input(paths, _standard(256, IMAGENET))  # get_feature.py: Resize(256), no crop
    _compare("retccl", path, ref, x, paths)
    assert (spec_for("retccl").input_size, spec_for("retccl").mpp) == (256, 1.0)


def test_lunit_dino_published_torch(tmp_path, tiles):
    """dino_vit_small_patch16_ep200.torch: the authors' timm VisionTransformer(384, 6 heads), raw state dict."""
    from timm.models.vision_transformer import VisionTransformer

    ref = _randomize(
        VisionTransformer(img_size=224, patch_size=16, embed_dim=384, num_heads=6, num_classes=0, depth=2), 7
    )
    path = tmp_path / "dino_vit_small_patch16_ep200.torch"
    torch.save(ref.state_dict(), path)
    paths = tiles(224)
    _compare("lunit_dino", path, ref, _authors_input(paths, _standard(224, LUNIT)), paths, depth=2)
    spec = spec_for("lunit_dino")
    assert (spec.mean, spec.std) == LUNIT


def test_large_checkpoints_are_memory_mapped(tmp_path):
    """A torch checkpoint's tensors stay file-backed: reading 64 MiB adds (almost) no anonymous memory."""
    import subprocess
    import sys

    path = tmp_path / "big.pth"
    torch.save({"model": {f"w{i}": torch.ones(16, 1024, 256) for i in range(4)}}, path)  # 64 MiB
    probe = (
        "import re, sys, torch\n"
        "from training.encoders import read_state_dict\n"
        "def anon(): return int(re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "before = anon(); state = read_state_dict(sys.argv[1]); total = sum(float(v.sum()) for v in state.values())\n"
        "print(anon() - before, total)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    grown, total = out.stdout.split()
    print(f"anonymous memory growth reading and touching 64 MiB: {grown} MiB")
    assert float(total) == 4 * 16 * 1024 * 256  # every tensor read in full
    assert int(grown) < 16
