"""Learning through the noise transition: de-mixing, corrected losses, and a method choice blind to clean labels."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from training import train
from training.data import load_patches
from training.noise import inject, instance_noise
from training.robust import TrainConfig, corrected_loss, train_head
from training.transition import (
    choose_method,
    clean_priors,
    demix_means,
    estimate_noise,
    fit_demixed_gaussian,
    noise_model,
    uniform_rows,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def _uniform(rate: float, n: int) -> np.ndarray:
    t = np.full((n, n), rate / (n - 1))
    np.fill_diagonal(t, 1 - rate)
    return t


def _mixture(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four Gaussian classes in 6-d with unequal sizes: (x, y, true means)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, size=(4, 6))
    sizes = [n_per_class, 2 * n_per_class, n_per_class, 3 * n_per_class]
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    x = means[y] + rng.normal(0, 1, size=(len(y), 6))
    return x, y, means


def test_demixing_recovers_the_clean_means_of_a_synthetic_mixture():
    x, y, means = _mixture(2000, seed=0)
    noisy = inject(y, "uniform:0.6", 4, seed=1)
    t = np.zeros((4, 4))
    np.add.at(t, (y, noisy), 1.0)
    t /= t.sum(1, keepdims=True)  # the transition this draw made (about 0.4 on the diagonal)
    assert np.allclose(t, _uniform(0.6, 4), atol=0.03)
    counts = np.bincount(noisy, minlength=4).astype(float)
    noisy_means = np.stack([x[noisy == j].mean(0) for j in range(4)])
    priors = clean_priors(counts / counts.sum(), t)
    assert np.allclose(priors, np.bincount(y) / len(y), atol=0.005)  # π from ρ = π T
    demixed = demix_means(noisy_means, counts, t, priors, shrinkage=0.0)
    naive_error = np.linalg.norm(noisy_means - means, axis=1).max()
    error = np.linalg.norm(demixed - means, axis=1).max()
    assert naive_error > 2.0  # the noisy classes' means sit far towards the grand mean...
    assert error < 0.35, f"de-mixed means off by {error:.2f}"  # ...the de-mixed ones on the clean means
    # the full model (EM from the de-mixed moments) relabels most tiles right where 60 % were wrong
    model = fit_demixed_gaussian(x, noisy, t, 4, dim=6)
    assert (model.clean_labels(x, noisy) == y).mean() > 0.9
    assert (model.log_posterior(x).argmax(1) == y).mean() > 0.9
    # and as the project's linear head it predicts the same classes
    with torch.no_grad():
        head_pred = model.as_head()(torch.from_numpy(x).float()).argmax(1).numpy()
    assert (head_pred == model.log_posterior(x).argmax(1)).mean() > 0.999


def test_shrinkage_pulls_towards_the_grand_mean_where_the_system_amplifies_error():
    x, y, _ = _mixture(50, seed=3)
    t = _uniform(0.7, 4)
    noisy = inject(y, "uniform:0.7", 4, seed=4)
    counts = np.bincount(noisy, minlength=4).astype(float)
    m = np.stack([x[noisy == j].mean(0) for j in range(4)])
    priors = clean_priors(counts / counts.sum(), t)
    spread = [np.linalg.norm(demix_means(m, counts, t, priors, s) - m.mean(0)) for s in (0.0, 0.05, 1.0)]
    assert spread[0] > spread[1] > spread[2]


def test_uniform_rows_keep_asymmetric_rows_and_fix_uniform_ones():
    rng = np.random.default_rng(0)
    noisy_uniform = _uniform(0.8, 8) + rng.uniform(0, 0.02, size=(8, 8))
    noisy_uniform /= noisy_uniform.sum(1, keepdims=True)
    fixed = uniform_rows(noisy_uniform)
    assert np.allclose(np.diag(fixed), np.diag(noisy_uniform))  # the noise rate of each row is kept
    off = fixed[~np.eye(8, dtype=bool)].reshape(8, 7)
    assert np.allclose(off, off[:, :1])
    asym = np.eye(8) * 0.6 + np.roll(np.eye(8), 1, axis=1) * 0.4
    assert np.array_equal(uniform_rows(asym), asym)


@pytest.mark.parametrize("noise_seed", [0, 1])
def test_forward_corrected_head_recovers_the_clean_decision_where_plain_ce_degrades(noise_seed):
    """Real embeddings, held-out slide: 40 % asymmetric noise (c → c+1) costs CE, not the forward-corrected loss."""
    data = np.load(FIXTURES / "kather_embeddings.npz")
    x, y, slides = data["embeddings"].astype(np.float32), data["labels"], data["slides"]
    test, val = slides == "CRC-Prim-HE-07", slides == "CRC-Prim-HE-05"
    fit = ~test & ~val
    t = np.eye(8) * 0.6 + np.roll(np.eye(8), 1, axis=1) * 0.4
    y_fit, y_val = inject(y[fit], "asym:0.4", 8, noise_seed), inject(y[val], "asym:0.4", 8, noise_seed + 10)
    config = TrainConfig(method="standard", loss="ce", epochs=60, seed=0)

    def accuracy(labels: np.ndarray, val_labels: np.ndarray, cfg: TrainConfig) -> float:
        model = train_head(x[fit], labels, x[val], val_labels, 8, cfg).model
        with torch.no_grad():
            return float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())

    clean = accuracy(y[fit], y[val], config)
    plain = accuracy(y_fit, y_val, config)
    forward = accuracy(y_fit, y_val, dataclasses.replace(config, loss="forward", transition=tuple(map(tuple, t))))
    assert plain < clean - 0.05, f"CE {plain:.2f} vs clean {clean:.2f}: the noise should cost plain CE"
    # the corrected loss wins back at least 40 % of what the noise cost plain CE (measured: 63-85 %)
    assert forward - plain >= max(0.05, 0.4 * (clean - plain)), (
        f"forward {forward:.2f}, CE {plain:.2f}, clean {clean:.2f}"
    )
    with pytest.raises(ValueError, match="needs TrainConfig.transition"):
        train_head(x[fit], y_fit, x[val], y_val, 8, dataclasses.replace(config, loss="forward"))


def test_corrected_losses_are_consistent_with_the_clean_loss():
    """Backward: unbiased (its expectation over labels drawn through T is the clean CE); forward: CE of p @ T."""
    rng = np.random.default_rng(0)
    t = np.eye(5) * 0.5 + np.roll(np.eye(5), 1, axis=1) * 0.3 + np.roll(np.eye(5), 2, axis=1) * 0.2
    logits = torch.from_numpy(rng.normal(size=(6, 5)))
    backward, forward = corrected_loss("backward", t), corrected_loss("forward", t)
    clean = torch.nn.functional.cross_entropy(logits.float(), torch.arange(5).repeat(2)[:6], reduction="none")
    for i in range(6):
        y = i % 5
        expected = sum(t[y, j] * backward(logits[i : i + 1].float(), torch.tensor([j])).item() for j in range(5))
        assert expected == pytest.approx(clean[i].item(), rel=1e-4)
        p = torch.softmax(logits[i].float(), 0).numpy() @ t
        assert forward(logits[i : i + 1].float(), torch.tensor([y])).item() == pytest.approx(-np.log(p[y]), rel=1e-4)
    with pytest.raises(ValueError, match="unknown corrected loss"):
        corrected_loss("sideways", t)


def test_instance_noise_flips_exactly_the_rate_and_prefers_confusable_tiles():
    data = np.load(FIXTURES / "kather_embeddings.npz")
    x, y = data["embeddings"].astype(np.float32), data["labels"]
    noisy = instance_noise(y, x, 0.4, 8, seed=0)
    flipped = noisy != y
    assert flipped.sum() == round(0.4 * len(y))
    assert np.array_equal(noisy, instance_noise(y, x, 0.4, 8, seed=0))  # seeded
    # flipped tiles are the confusable ones: more of their neighbours carry another class
    estimated = estimate_noise(x, y, 8, 10)  # on clean labels: a near-identity transition
    assert estimated.noise_rate < 0.2
    votes_other = 1 - np.array([np.mean(y[np.argsort(-(x @ x[i]))[1:11]] == y[i]) for i in range(len(y))])
    assert votes_other[flipped].mean() > votes_other[~flipped].mean()
    with pytest.raises(ValueError, match="needs the tiles' embeddings"):
        inject(y, "instance:0.4", 8, 0)


def test_choice_rule_reads_the_estimated_transition():
    given = np.repeat(np.arange(8), 10)
    # uniform noise: the kNN vote is already the de-mixed vote
    assert choose_method(noise_model(_uniform(0.4, 8), given, 8))[0] == "knn_clean"
    # structured (c -> c+1) noise, well conditioned: correct through T
    asym = np.eye(8) * 0.6 + np.roll(np.eye(8), 1, axis=1) * 0.4
    chosen, reason = choose_method(noise_model(asym, given, 8))
    assert chosen == "forward" and "structured" in reason
    # structured but near-singular (two classes labelled alike): never corrected through
    near_singular = asym.copy()
    near_singular[0] = 0.999 * asym[1] + 0.001 * asym[0]
    assert np.linalg.cond(near_singular) > 50
    assert choose_method(noise_model(near_singular, given, 8))[0] == "knn_clean"


def test_the_choice_is_the_same_whether_clean_labels_exist_or_not(tmp_path):
    """train.py decides the same with injected noise (clean labels known) as on those noisy labels given as data."""
    fixtures = FIXTURES / "kather"
    small = ["--no-export", "--knn-k", "5", "--epochs", "5", "--cache-dir", str(tmp_path / "cache"), "--seed", "3"]
    first = train.main(["--data", str(fixtures), "--out", str(tmp_path / "a"), "--inject-noise", "uniform:0.6", *small])
    # the same tiles with the noisy labels as their only labels: no clean label anywhere
    with open(tmp_path / "a" / "suspects.csv") as handle:
        given = {str(fixtures / r["path"]): r["given_label"] for r in csv.DictReader(handle)}
    order = [str(p) for p in load_patches(fixtures).paths]  # the folder's order: the fits see the same rows
    listing = tmp_path / "noisy.csv"
    listing.write_text("path,label\n" + "".join(f"{path},{given[path]}\n" for path in order))
    second = train.main(["--data", str(listing), "--out", str(tmp_path / "b"), *small])
    a, b = first["method_choice"], second["method_choice"]
    assert "injected_noise" in first and "injected_noise" not in second
    assert a == b, f"{a} != {b}"
    assert a["chosen"] in ("knn_clean", "forward") and a["reason"]
    assert a["chosen"] in (first["config"]["method"], first["config"]["loss"])
