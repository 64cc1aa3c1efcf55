"""CTransPath as its authors run it: TransPath's ``ctran.py`` on their modified timm 0.5.4 Swin.

An independent re-implementation (written for these tests, not copied) of the layout that
``ctranspath.pth`` was saved from, so the project's loader is checked against the authors' file and
forward pass rather than against its own:

* ``ConvStem`` as in TransPath's ``ctran.py`` (two stride-2 3x3 conv+BN+ReLU, a 1x1 conv; tokens
  flattened to ``[B, L, C]``), in the ``patch_embed`` slot;
* timm 0.5.4 ``SwinTransformer``: ``layers.i`` = blocks of stage i **then** its ``PatchMerging``
  (``layers.i.downsample``, i < 3), tokens kept as ``[B, L, C]``, shifted windows with a saved
  ``attn_mask`` buffer, saved ``relative_position_index`` buffers, LayerNorm + mean over tokens;
* ``model.head = nn.Identity()`` before ``load_state_dict(td["model"], strict=True)`` (the authors'
  ``get_features_CTransPath.py``), so the file has no head.

Semantics follow Swin Transformer (Liu et al. 2021, github.com/microsoft/Swin-Transformer, MIT) as
packaged in timm 0.5.4 (Apache-2.0) and TransPath (github.com/Xiyue-Wang/TransPath).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    def __init__(self, embed_dim: int = 96) -> None:
        super().__init__()
        c = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * c, embed_dim, 1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, w*w, C], windows in row-major order."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _unwindows(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    b = x.shape[0] // ((h // w) * (wd // w))
    return x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, w*w
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n_win_b, n, c = x.shape
        q, k, v = self.qkv(x).view(n_win_b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            n_win = mask.shape[0]
            attn = (attn.view(-1, n_win, self.heads, n, n) + mask[None, :, None]).view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n_win_b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        if resolution <= window:  # one window covers the map: no partition, no shift (timm 0.5.4)
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        mask = None
        if shift:
            region = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for i, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
                region[:, hs, ws] = i
            ids = _windows(region, window).squeeze(-1)
            mask = (ids[:, None, :] - ids[:, :, None]).ne(0).float() * -100.0
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r = self.resolution
        y = self.norm1(x).view(b, r, r, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _unwindows(self.attn(_windows(y, self.window), self.attn_mask), self.window, r, r)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        # concatenation order (row, col) offsets (0,0), (1,0), (0,1), (1,1), as Swin defines it
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if merge else None  # at the END of the stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class CTransPath(nn.Module):
    """Swin-T (embed 96, heads 3/6/12/24, window 7) with ConvStem; ``depths`` reducible for tests."""

    def __init__(self, depths: tuple[int, ...] = (2, 2, 6, 2), img_size: int = 224) -> None:
        super().__init__()
        dim, heads, res = 96, (3, 6, 12, 24), img_size // 4
        self.patch_embed = ConvStem(dim)
        self.layers = nn.Sequential(
            *(Stage(dim * 2**i, res // 2**i, d, heads[i], 7, merge=i < len(depths) - 1) for i, d in enumerate(depths))
        )
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
        self.head = nn.Identity()  # get_features_CTransPath.py: model.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x)))
        return self.head(x.mean(dim=1))
