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


def annotation_noise(
    regions: list,
    width_um: float,
    mpp: float,
    seed: int,
    min_region_um2: float | None = None,
    max_hole_um2: float | None = None,
) -> list:
    """The polygons a hurried annotator draws over exact regions: ``[(class, polygon)]`` → the same.

    Each region's boundary moves by ``width_um`` outwards or inwards (dilated or eroded, a coin
    flip per region, round corners); regions smaller than
    ``min_region_um2`` are not drawn at all and holes smaller than ``max_hole_um2`` are filled, so
    small islands of another class are swallowed by the region around them (both default to a
    square of 2 × ``width_um`` a side). The wrong labels this makes sit where they sit in real
    annotations: at boundaries and inside mixed tissue. ``width_um`` 0 returns the regions as given.
    """
    import shapely  # only the annotation experiments need it

    if width_um <= 0:
        return list(regions)
    rng = np.random.default_rng(seed)
    px = width_um / mpp
    min_area = (min_region_um2 if min_region_um2 is not None else (2 * width_um) ** 2) / mpp**2
    max_hole = (max_hole_um2 if max_hole_um2 is not None else (2 * width_um) ** 2) / mpp**2
    drawn = []
    for name, geometry in regions:
        if geometry.area < min_area:
            continue  # too small to bother: the neighbour's outline goes over it
        parts = []
        for polygon in shapely.get_parts(geometry):
            if polygon.geom_type != "Polygon":
                continue
            holes = [ring for ring in polygon.interiors if shapely.Polygon(ring).area >= max_hole]
            parts.append(shapely.Polygon(polygon.exterior, holes))
        coarse = shapely.union_all(parts).buffer(px if rng.random() < 0.5 else -px)
        if not coarse.is_empty and coarse.area > 0:
            drawn.append((name, coarse))
    return drawn
