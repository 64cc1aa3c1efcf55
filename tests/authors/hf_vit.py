"""Phikon as its authors run it: Hugging Face ``transformers.ViTModel`` (``owkin/phikon``).

An independent re-implementation (written for these tests) of ``ViTModel``'s parameter names and
forward pass, so the project's loader is checked against the file layout Owkin publishes without
installing ``transformers``: ``embeddings.{cls_token, position_embeddings,
patch_embeddings.projection}``, ``encoder.layer.i.{layernorm_before, attention.attention.{query,key,
value}, attention.output.dense, layernorm_after, intermediate.dense, output.dense}``, ``layernorm``,
``pooler.dense``. Owkin's recipe: ``model(**inputs).last_hidden_state[:, 0, :]`` (768-d).
Config from huggingface.co/owkin/phikon config.json: hidden 768, 12 heads, intermediate 3072,
``layer_norm_eps`` 1e-6 (changed from 1e-12 "to match timm"), GELU, qkv bias.
"""

from __future__ import annotations

import torch
from torch import nn


class Embeddings(nn.Module):
    def __init__(self, dim: int, patch: int, img: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        return tokens + self.position_embeddings


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        probs = ((q @ k.transpose(-1, -2)) / (c // self.heads) ** 0.5).softmax(-1)
        return (probs @ v).transpose(1, 2).reshape(b, n, c)


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = nn.Module()
        self.attention.attention = SelfAttention(dim, heads)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(dim, dim)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(nn.functional.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViTModel(nn.Module):
    """``ViTModel(config, add_pooling_layer=True)``; ``forward`` returns ``last_hidden_state``."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, hidden: int = 3072, eps: float = 1e-6) -> None:
        super().__init__()
        self.embeddings = Embeddings(dim, 16, 224)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(dim, heads, hidden, eps) for _ in range(depth))
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.pooler = nn.Module()  # saved in the file, unused by Phikon's recipe
        self.pooler.dense = nn.Linear(dim, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)
