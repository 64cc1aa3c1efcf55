"""Robust losses and methods on real embeddings of the fixture tiles (8 classes, 81 tiles)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import file_sha256, load_patches
from training.embed import embed_files
from training.encoders import build_encoder
from training.noise import uniform_noise
from training.robust import (
    LOSSES,
    METHODS,
    FeatureGroupEnsemble,
    SlideEnsemble,
    TrainConfig,
    cross_slide_logits,
    fit_head,
    knn_clean,
    slide_groups,
    train_head,
)

FIXTURES = Path(__file__).parent / "fixtures" / "kather"


@pytest.fixture(scope="module")
def fixture_embeddings(tmp_path_factory):
    patches = load_patches(FIXTURES)
    encoder = build_encoder("efficientnet_lite0_ms")
    x, _ = embed_files(
        encoder,
        patches.paths,
        [file_sha256(p) for p in patches.paths],
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
    )
    y = np.array([patches.classes.index(label) for label in patches.labels])
    return x, y, len(patches.classes)


def test_losses_are_minimised_by_the_right_class():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    right, wrong = torch.tensor([0, 2]), torch.tensor([1, 1])
    for name, fn in LOSSES.items():
        good, bad = fn(logits, right), fn(logits, wrong)
        assert good.shape == (2,) and (good < bad).all(), name
        assert torch.isfinite(bad).all(), name


def test_bounded_losses_stay_bounded_on_confident_mistakes():
    logits = torch.tensor([[50.0, -50.0]])
    y = torch.tensor([1])
    assert LOSSES["ce"](logits, y).item() > 50  # CE explodes on a confidently wrong label...
    assert LOSSES["gce"](logits, y).item() <= 1 / 0.7 + 1e-6  # ...GCE is bounded by 1/q
    assert LOSSES["nce_rce"](logits, y).item() <= 1 + 9.22


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_fits_clean_fixture_labels(fixture_embeddings, loss):
    x, y, n = fixture_embeddings
    result = train_head(x, y, x, y, n, TrainConfig(method="standard", loss=loss, epochs=60, patience=60, knn_k=5))
    with torch.no_grad():
        acc = (result.model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc >= 0.9, f"{loss}: training accuracy {acc:.2f}"


@pytest.fixture(scope="module")
def slide_split_embeddings():
    """800 real tiles: train on five slides, validate on one (noisy), test on one held-out slide (clean)."""
    data = np.load(FIXTURES.parent / "kather_embeddings.npz")
    x, y, slides = data["embeddings"].astype(np.float32), data["labels"], data["slides"]
    test = slides == "CRC-Prim-HE-07"
    val = slides == "CRC-Prim-HE-05"
    return x[~test & ~val], y[~test & ~val], x[val], y[val], x[test], y[test], len(data["classes"])


def _test_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize("method", METHODS)
def test_each_method_resists_40_percent_noise_on_a_held_out_slide(slide_split_embeddings, method):
    """With 40 % of training *and* validation labels flipped, accuracy on the unseen slide stays close to clean."""
    xt, yt, xv, yv, xs, ys, n = slide_split_embeddings
    config = TrainConfig(method=method, loss="gce", epochs=80, knn_k=15, seed=0)
    clean = _test_accuracy(train_head(xt, yt, xv, yv, n, config).model, xs, ys)
    noisy_t, noisy_v = uniform_noise(yt, 0.4, n, seed=0), uniform_noise(yv, 0.4, n, seed=1)
    result = train_head(xt, noisy_t, xv, noisy_v, n, config)
    noisy = _test_accuracy(result.model, xs, ys)
    assert clean > 0.6, f"{method}: clean accuracy {clean:.2f} on the held-out slide"
    assert noisy > clean - 0.15, f"{method}: {noisy:.2f} at 40 % noise vs {clean:.2f} clean"
    assert 1 <= result.best_epoch <= 80


def test_knn_cleaning_repairs_most_flipped_labels(slide_split_embeddings):
    xt, yt, *_, n = slide_split_embeddings
    noisy = uniform_noise(yt, 0.6, n, seed=1)
    cleaned = knn_clean(xt, noisy, n, k=15)
    assert (noisy == yt).mean() == pytest.approx(0.4, abs=0.01)
    assert (cleaned == yt).mean() > 0.7


def test_unknown_method_or_loss_is_an_error(fixture_embeddings):
    x, y, n = fixture_embeddings
    with pytest.raises(ValueError, match="unknown method"):
        train_head(x, y, x, y, n, TrainConfig(method="magic"))
    with pytest.raises(ValueError, match="unknown loss"):
        train_head(x, y, x, y, n, TrainConfig(loss="mse"))


def test_slide_groups_deal_every_known_slide_once_into_balanced_groups():
    slides = ["a"] * 50 + ["b"] * 40 + ["c"] * 30 + ["d"] * 20 + ["e"] * 10 + ["f"] * 10 + [""] * 7
    groups = slide_groups(slides, 3)
    assert sorted(sum(groups, [])) == ["a", "b", "c", "d", "e", "f"]  # unknown ids form no group
    sizes = sorted(sum(slides.count(s) for s in g) for g in groups)
    assert len(groups) == 3 and sizes == [50, 50, 60]
    assert slide_groups(slides[:90], 5) == [["a"], ["b"]]


def test_slide_ensemble_averages_members_trained_without_their_slides():
    data = np.load(Path(__file__).parent / "fixtures" / "kather_embeddings.npz")
    x, y, slides = data["embeddings"].astype(np.float32), data["labels"], data["slides"]
    train = ~np.isin(slides, ["CRC-Prim-HE-07", "CRC-Prim-HE-05"])
    val = slides == "CRC-Prim-HE-05"
    config = TrainConfig(knn_k=15, seed=0)
    result = fit_head(x[train], y[train], slides[train], x[val], y[val], 8, config)
    assert isinstance(result.model, SlideEnsemble) and len(result.model.members) == 5
    assert sorted(sum(result.member_slides, [])) == sorted(set(slides[train]))
    with torch.no_grad():
        xt = torch.from_numpy(x[:20])
        mean = torch.stack([torch.softmax(m(xt), 1) for m in result.model.members]).mean(0)
        assert torch.allclose(torch.softmax(result.model(xt), 1), mean, atol=1e-6)
    # fewer than three slides, or asked for: one head
    two = np.isin(slides, ["CRC-Prim-HE-06", "CRC-Prim-HE-03"])
    assert not isinstance(fit_head(x[two], y[two], slides[two], x[val], y[val], 8, config).model, SlideEnsemble)
    single = fit_head(x[train], y[train], slides[train], x[val], y[val], 8, replace(config, ensemble="single"))
    assert not isinstance(single.model, SlideEnsemble) and single.member_epochs is None
    with pytest.raises(ValueError, match="unknown ensemble"):
        fit_head(x[train], y[train], slides[train], x[val], y[val], 8, replace(config, ensemble="bagging"))


def test_feature_groups_fit_one_ensemble_per_encoder_and_average_them():
    """A stacked encoder's column blocks each get fit_head's slide ensemble, on those columns only."""
    data = np.load(Path(__file__).parent / "fixtures" / "kather_embeddings.npz")
    x, y, slides = data["embeddings"].astype(np.float32), data["labels"], data["slides"]
    # two blocks: the Lite0 embedding's stage-1/2 statistics and its stage-3/4 statistics
    groups = (128, 864)
    train = ~np.isin(slides, ["CRC-Prim-HE-07", "CRC-Prim-HE-05"])
    val = slides == "CRC-Prim-HE-05"
    config = TrainConfig(knn_k=15, seed=0, ensemble_members=3, epochs=30)
    stacked = fit_head(x[train], y[train], slides[train], x[val], y[val], 8, replace(config, feature_groups=groups))
    model = stacked.model
    assert isinstance(model, FeatureGroupEnsemble) and model.slices == [(0, 128), (128, 992)]
    assert all(isinstance(m, SlideEnsemble) and len(m.members) == 3 for m in model.members)
    assert len(stacked.member_epochs) == 6 and len(stacked.member_slides) == 6
    # each block's ensemble is exactly what fit_head fits on those columns alone (same seed)
    alone = fit_head(x[train][:, 128:], y[train], slides[train], x[val][:, 128:], y[val], 8, config).model
    xt = torch.from_numpy(x[:20])
    with torch.no_grad():
        assert torch.allclose(model.members[1](xt[:, 128:]), alone(xt[:, 128:]), atol=1e-6)
        mean = (torch.softmax(model.members[0](xt[:, :128]), 1) + torch.softmax(alone(xt[:, 128:]), 1)) / 2
        assert torch.allclose(torch.softmax(model(xt), 1), mean, atol=1e-6)
    # the cross-slide predictions the temperature is fitted on come from the same kind of model
    idx, logp = cross_slide_logits(x[train], y[train], slides[train], 8, replace(config, feature_groups=groups))
    assert logp.shape == (len(idx), 8) and np.allclose(np.exp(logp).sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="do not cover 992"):
        fit_head(x[train], y[train], slides[train], x[val], y[val], 8, replace(config, feature_groups=(100, 100)))
