"""Batched embedding extraction with an on-disk cache.

The frozen encoder is by far the slowest part of training, and it never changes between runs.
Embeddings are stored per encoder identity (name + weights sha256 + preprocessing, see
``FrozenEncoder.cache_key``) and looked up by each file's content sha256 (for tiles of annotated
slides: the slide file's sha256 + the tile's geometry, ``PatchSet.content_keys``), so renaming or
relabelling files, redrawing annotations, or training a different head never touches the encoder
again, while an edited image or slide or different weights are recomputed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.card import write_atomic
from training.data import load_rgb_resized
from training.encoders import FrozenEncoder

log = logging.getLogger("histo_robust.embed")


def default_cache_dir() -> Path:
    root = os.environ.get("HISTO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "histo-robust"
    )
    return Path(root) / "embeddings"


class Normalize(nn.Module):
    """uint8 NHWC RGB → normalised float NCHW: the exact preprocessing baked into the ONNX graph."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return x * self.scale - self.shift


class EmbeddingCache:
    """One ``.npz`` per encoder identity: file sha256 → embedding row."""

    def __init__(self, encoder: FrozenEncoder, cache_dir: Path | None = None) -> None:
        self.path = (
            cache_dir or default_cache_dir()
        ) / f"{encoder.spec.name.replace('/', '_')}-{encoder.cache_key}.npz"
        self.rows: dict[str, np.ndarray] = {}
        if self.path.is_file():
            try:
                with np.load(self.path) as data:
                    self.rows = dict(zip(data["hashes"].tolist(), data["embeddings"], strict=True))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable embedding cache %s (%s)", self.path, exc)

    def save(self) -> None:
        import io

        hashes = np.array(list(self.rows), dtype="U64")
        emb = np.stack(list(self.rows.values())).astype(np.float32) if self.rows else np.zeros((0, 0), np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, hashes=hashes, embeddings=emb)
        write_atomic(self.path, buffer.getvalue())


@torch.inference_mode()
def embed_files(
    encoder: FrozenEncoder,
    paths: list[Path],
    hashes: list[str],
    *,
    batch_size: int = 64,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    load: Callable[[int, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """Embeddings for ``paths`` (rows in order) and how many were computed (not cached).

    ``load(i, size)`` supplies the pixels of item ``i`` instead of decoding ``paths[i]`` (tiles
    read from a slide); ``hashes`` are then its cache keys.
    """
    read = load or (lambda i, size: load_rgb_resized(paths[i], size))
    cache = EmbeddingCache(encoder, cache_dir) if use_cache else None
    known = cache.rows if cache else {}
    todo = sorted({h: i for i, h in reversed(list(enumerate(hashes))) if h not in known}.values())
    if todo:
        normalize = Normalize(encoder.spec.mean, encoder.spec.std)
        size = encoder.spec.input_size
        computed: dict[str, np.ndarray] = {}
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        with (
            ThreadPoolExecutor(max_workers=2) as pool,
            tqdm(total=len(todo), desc=f"embedding ({encoder.spec.name})", unit="img", disable=not progress) as bar,
        ):
            decoded = pool.map(lambda b: np.stack([read(i, size) for i in b]), batches)
            for batch, pixels in zip(batches, decoded, strict=True):
                out = encoder(normalize(torch.from_numpy(pixels))).numpy().astype(np.float32)
                for i, row in zip(batch, out, strict=True):
                    computed[hashes[i]] = row
                bar.update(len(batch))
        known = {**known, **computed}
        if cache is not None:
            cache.rows = known
            cache.save()
    embeddings = np.stack([known[h] for h in hashes]).astype(np.float32)
    return embeddings, len(todo)
