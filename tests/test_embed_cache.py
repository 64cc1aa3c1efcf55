"""Embedding cache: a second run does not touch the encoder; new weights or edited files invalidate."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import file_sha256
from training.embed import embed_files
from training.encoders import FrozenEncoder, build_encoder

FIXTURES = Path(__file__).parent / "fixtures" / "kather"


@pytest.fixture(scope="module")
def encoder() -> FrozenEncoder:
    return build_encoder("efficientnet_lite0_ms")


def _tiles(tmp_path: Path, n: int = 6) -> list[Path]:
    out = []
    for src in sorted(FIXTURES.glob("*/*.webp"))[:n]:
        dst = tmp_path / src.name
        shutil.copy(src, dst)
        out.append(dst)
    return out


def test_second_run_is_served_from_cache(tmp_path, encoder, monkeypatch):
    paths = _tiles(tmp_path)
    hashes = [file_sha256(p) for p in paths]
    first, n1 = embed_files(encoder, paths, hashes, cache_dir=tmp_path / "cache", progress=False)
    assert n1 == len(paths) and first.shape == (len(paths), 992)

    def boom(*args, **kwargs):
        raise AssertionError("encoder called on a cache hit")

    monkeypatch.setattr(encoder, "forward", boom)
    second, n2 = embed_files(encoder, paths[::-1], hashes[::-1], cache_dir=tmp_path / "cache", progress=False)
    assert n2 == 0
    np.testing.assert_array_equal(second, first[::-1])


def test_edited_file_and_other_weights_are_recomputed(tmp_path, encoder):
    paths = _tiles(tmp_path, 3)
    cache = tmp_path / "cache"
    hashes = [file_sha256(p) for p in paths]
    base, _ = embed_files(encoder, paths, hashes, cache_dir=cache, progress=False)
    Image.open(paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[0], lossless=True)
    hashes2 = [file_sha256(p) for p in paths]
    again, computed = embed_files(encoder, paths, hashes2, cache_dir=cache, progress=False)
    assert computed == 1
    assert not np.allclose(again[0], base[0]) and np.allclose(again[1:], base[1:])

    other = build_encoder("efficientnet_lite0_ms", random_init=True)
    assert other.cache_key != encoder.cache_key
    _, computed = embed_files(other, paths, hashes2, cache_dir=cache, progress=False)
    assert computed == len(paths)


def test_cached_embeddings_equal_direct_encoder_output(tmp_path, encoder):
    paths = _tiles(tmp_path, 2)
    emb, _ = embed_files(encoder, paths, [file_sha256(p) for p in paths], cache_dir=tmp_path / "c", progress=False)
    from training.embed import Normalize, load_rgb_resized

    pixels = torch.from_numpy(np.stack([load_rgb_resized(p, 224) for p in paths]))
    with torch.no_grad():
        direct = encoder(Normalize(encoder.spec.mean, encoder.spec.std)(pixels)).numpy()
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-5)
