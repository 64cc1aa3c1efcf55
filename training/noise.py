"""Seeded synthetic label noise for experiments (training labels only, never the test set)."""

from __future__ import annotations

import numpy as np


def parse_noise(spec: str | None) -> tuple[str, float] | None:
    """``uniform:0.4`` / ``asym:0.4`` → (kind, rate); None or ``none`` → None."""
    if not spec or spec == "none":
        return None
    kind, _, rate = spec.partition(":")
    if kind not in {"uniform", "asym"}:
        raise ValueError(f"noise kind must be uniform or asym, got {kind!r} (e.g. uniform:0.4)")
    try:
        value = float(rate)
    except ValueError:
        raise ValueError(f"noise rate must be a number in [0, 1), got {rate!r}") from None
    if not 0 <= value < 1:
        raise ValueError(f"noise rate must be in [0, 1), got {value}")
    return kind, value


def uniform_noise(labels: np.ndarray, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """Flip exactly ``round(rate·N)`` labels, each to a different class chosen uniformly.

    As in the code of Dedieu et al. 2024: the flipped set is drawn without replacement, and a
    flipped label never stays the same.
    """
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    n_flip = int(round(rate * len(labels)))
    flip = rng.choice(len(labels), size=n_flip, replace=False)
    offsets = rng.integers(1, n_classes, size=n_flip)
    noisy[flip] = (labels[flip] + offsets) % n_classes
    return noisy


def asymmetric_noise(labels: np.ndarray, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """Flip exactly ``round(rate·N_c)`` labels of each class c to the next class (c → c+1 mod C).

    The classic class-dependent pattern: a systematic confusion, much harder to undo than
    uniform noise because the wrong class is consistent.
    """
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        flip = rng.choice(idx, size=int(round(rate * len(idx))), replace=False)
        noisy[flip] = (c + 1) % n_classes
    return noisy


def inject(labels: np.ndarray, spec: str | None, n_classes: int, seed: int) -> np.ndarray:
    parsed = parse_noise(spec)
    if parsed is None:
        return labels.copy()
    kind, rate = parsed
    return (uniform_noise if kind == "uniform" else asymmetric_noise)(labels, rate, n_classes, seed)
