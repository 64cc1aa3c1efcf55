"""Out-of-distribution score on the embedding, exported inside the ONNX graph.

A class-conditional Mahalanobis distance (Lee et al. 2018) in a whitened PCA space of the
training embeddings, plus the residual outside that space: pen marks, blur, folds, IHC or a
photograph of a cat land far from every tissue class even when the head names one with 99 %.
The scorer is a small torch module, so the graph emits ``ood_score`` next to the probabilities
and the service needs no extra data file; the threshold is chosen at training time as a high
quantile of the scores of (in-distribution) validation tiles.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MahalanobisScore(nn.Module):
    """score(x) = min_c ||W(x - μ) - m_c||² / k + ||residual||² / σ²_res, all fitted on training tiles."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 64) -> None:
        super().__init__()
        x = torch.from_numpy(embeddings).double()
        mean = x.mean(0)
        scale = x.std(0).clamp_min(1e-6)
        z = (x - mean) / scale
        k = int(min(k, z.shape[0] - 1, z.shape[1]))
        _, s, vt = torch.linalg.svd(z, full_matrices=False)
        comps = vt[:k]  # [k, D]
        var = (s[:k] ** 2) / (len(z) - 1)
        whiten = comps / var.sqrt()[:, None]
        proj = z @ whiten.T
        centres = torch.stack(
            [
                proj[torch.from_numpy(labels == c)].mean(0) if (labels == c).any() else proj.mean(0)
                for c in range(n_classes)
            ]
        )
        residual = z - (z @ comps.T) @ comps
        res_var = (residual**2).sum(1).mean().clamp_min(1e-6)
        self.k = k
        self.register_buffer("mean", mean.float())
        self.register_buffer("inv_scale", (1 / scale).float())
        self.register_buffer("whiten", whiten.float())
        self.register_buffer("comps", comps.float())
        self.register_buffer("centres", centres.float())
        self.register_buffer("inv_res_var", (1 / res_var).float())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = (embeddings - self.mean) * self.inv_scale
        proj = z @ self.whiten.T
        d2 = ((proj[:, None, :] - self.centres[None]) ** 2).sum(-1).min(dim=1).values / self.k
        residual = z - (z @ self.comps.T) @ self.comps
        return d2 + (residual**2).sum(1) * self.inv_res_var

    @torch.no_grad()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(embeddings).float()).numpy()
