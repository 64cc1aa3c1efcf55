"""Classification heads on frozen embeddings.

Each head starts with a fixed standardisation (train-set mean/std of the embedding), so the
exported graph needs no separate scaler and the head sees well-conditioned inputs whatever the
encoder's feature scale.
"""

from __future__ import annotations

import torch
from torch import nn

HEADS = ("linear", "mlp")


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone().float())
        self.register_buffer("inv_std", 1.0 / std.clone().float().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def make_head(kind: str, dim: int, n_classes: int, mean: torch.Tensor, std: torch.Tensor) -> nn.Sequential:
    """``linear``, or ``mlp``: the 4-layer MLP of Dedieu et al. 2024 (d→512→128→64→C, ReLU)."""
    scale = Standardize(mean, std)
    if kind == "linear":
        return nn.Sequential(scale, nn.Linear(dim, n_classes))
    if kind == "mlp":
        return nn.Sequential(
            scale,
            nn.Linear(dim, 512),
            nn.ReLU(),
            nn.Linear(512, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, n_classes),
        )
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")
