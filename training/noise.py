"""Seeded synthetic label noise for experiments (training labels only, never the test set)."""

from __future__ import annotations

import numpy as np

NOISE_KINDS = ("uniform", "asym", "instance")


def parse_noise(spec: str | None) -> tuple[str, float] | None:
    """``uniform:0.4`` / ``asym:0.4`` / ``instance:0.4`` → (kind, rate); None or ``none`` → None."""
    if not spec or spec == "none":
        return None
    kind, _, rate = spec.partition(":")
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r} (e.g. uniform:0.4)")
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


def instance_noise(
    labels: np.ndarray, embeddings: np.ndarray, rate: float, n_classes: int, seed: int, k: int = 10
) -> np.ndarray:
    """Flip exactly ``round(rate·N)`` labels, the confusable tiles most likely, each to a class it looks like.

    Instance-dependent noise, as an annotator makes it: a tile's confusability is the share of its
    ``k`` nearest neighbours (cosine, standardised embeddings, itself left out) that carry another
    (clean) label. The flipped tiles are drawn without replacement with weight ``0.05 +
    confusability``, and each gets a class drawn from its neighbours' other classes (plus a small
    uniform share, so a tile with only same-class neighbours can still flip). Unlike uniform noise,
    the wrong labels sit where the classes meet, the hardest place to undo them.
    """
    rng = np.random.default_rng(seed)
    x = embeddings.astype(np.float32)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(x) - 1)
    other = np.zeros((len(x), n_classes))
    for start in range(0, len(x), 1024):
        sims = x[start : start + 1024] @ x.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -2.0  # leave the tile itself out
        neighbours = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        np.add.at(other[start : start + 1024], (np.arange(len(sims))[:, None], labels[neighbours]), 1.0)
    other[np.arange(len(x)), labels] = 0.0  # keep only the other classes' votes
    weight = 0.05 + other.sum(1) / k
    n_flip = int(round(rate * len(labels)))
    flip = rng.choice(len(labels), size=n_flip, replace=False, p=weight / weight.sum())
    noisy = labels.copy()
    for i in flip:
        p = other[i] + 0.1
        p[labels[i]] = 0.0
        noisy[i] = rng.choice(n_classes, p=p / p.sum())
    return noisy


def inject(
    labels: np.ndarray, spec: str | None, n_classes: int, seed: int, embeddings: np.ndarray | None = None
) -> np.ndarray:
    """Noisy copy of ``labels``; ``instance`` noise needs the tiles' ``embeddings``."""
    parsed = parse_noise(spec)
    if parsed is None:
        return labels.copy()
    kind, rate = parsed
    if kind == "instance":
        if embeddings is None:
            raise ValueError("instance-dependent noise needs the tiles' embeddings")
        return instance_noise(labels, embeddings, rate, n_classes, seed)
    return (uniform_noise if kind == "uniform" else asymmetric_noise)(labels, rate, n_classes, seed)
