"""Noise-aware confidence calibration, expected calibration error and reliability diagrams.

Calibrating on noisy validation labels the naive way teaches the model the noise as uncertainty:
with 40 % of labels wrong, temperature scaling flattens every prediction until it is "right" 60 %
of the time. The fits here never take the noisy labels at face value:

* the label-noise transition ``T[i, j] = P(given j | true i)`` is estimated from **anchor points
  in embedding space** (:func:`anchor_transition`): tiles whose nearest neighbours vote most
  clearly for one class are almost surely of that class, so the labels they carry show how that
  class gets mislabelled;
* the temperature is fitted through it: ``softmax(z / t) @ T`` must match the given labels
  (:func:`fit_temperature`). ``training/train.py`` fits it on cross-slide predictions (every
  labelled slide predicted by an ensemble that never saw it), which is the condition the served
  model meets on a new slide;
* or, for comparison, against labels cleaned by a kNN vote.

The served probabilities are ``softmax(z / t)``: meant for the true classes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.card import write_atomic


def anchor_transition(
    votes: np.ndarray, given: np.ndarray, n_classes: int, share: float = 0.3, smoothing: float = 1.0
) -> np.ndarray:
    """Row-stochastic ``T[i, j] = P(given j | true i)`` from anchor points in embedding space.

    ``votes`` are leave-one-out kNN vote shares (:func:`training.robust.knn_votes`). For each class
    i, the anchors are the ``share`` of tiles voted i with the clearest vote; their neighbourhoods
    are nearly pure (98 % on Kather at 40 % noise), and a tile's own label plays no part in its
    vote, so the labels the anchors carry estimate row i. Counting every tile instead (cleaned vs
    given labels) charges the kNN vote's own mistakes to the labels, and a temperature fitted
    through an over-estimated noise comes out over-confident. At 40 % uniform noise on the test
    fixture, counting gives 0.49-0.50 and the anchors 0.43-0.46 (``tests/test_confidence.py``);
    on the Kather training slides the anchors gave 0.397-0.444 (``benchmarks/confidence.py``).
    """
    top, strength = votes.argmax(1), votes.max(1)
    counts = np.full((n_classes, n_classes), smoothing / n_classes)
    for c in range(n_classes):
        voted = np.flatnonzero(top == c)
        if len(voted) == 0:
            counts[c, c] += 1.0  # no evidence on this class: assume its labels are right
            continue
        anchors = voted[strength[voted] >= np.quantile(strength[voted], 1.0 - share)]
        np.add.at(counts[c], given[anchors], 1.0)
    return counts / counts.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, given: np.ndarray, transition: np.ndarray | None = None) -> float:
    """Temperature minimising the NLL of the given labels under ``softmax(z/t) @ T`` (T=I: plain scaling)."""
    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(given).long()
    t_mat = torch.from_numpy(transition if transition is not None else np.eye(logits.shape[1])).double()

    def nll(t: float) -> float:
        p = torch.softmax(z / t, dim=1) @ t_mat
        return float(-torch.log(p.gather(1, y[:, None]).clamp_min(1e-12)).mean())

    return minimise_temperature(nll)


def minimise_temperature(loss: Callable[[float], float], low: float = 0.05, high: float = 20.0) -> float:
    """The temperature in [low, high] minimising ``loss``: a log-spaced grid, then golden section.

    The grid first, because a loss fitted through a noise transition need not be convex in t.
    """
    grid = np.exp(np.linspace(np.log(low), np.log(high), 200))
    losses = [loss(t) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    for _ in range(40):  # golden-section refinement inside the bracketing grid cell
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    return binned_ece(probs.max(1), probs.argmax(1) == labels, n_bins)


def binned_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """ECE of confidences against correctness, which may be an estimate per tile (a float) instead of 0/1."""
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def ece_floor(confidences: np.ndarray, n_bins: int = 15, draws: int = 500, seed: int = 0) -> tuple[float, float]:
    """(mean, 95th percentile) ECE of a *perfectly* calibrated model with these confidences.

    Each prediction is drawn right with probability equal to its confidence, so any ECE measured
    this way is the binned estimator's own bias on this many samples: an ECE target below it
    cannot be shown on that test set, whatever the model.
    """
    rng = np.random.default_rng(seed)
    conf = np.asarray(confidences, dtype=float)
    values = [binned_ece(conf, rng.random(len(conf)) < conf, n_bins) for _ in range(draws)]
    return float(np.mean(values)), float(np.percentile(values, 95))


def selective_threshold(
    probs: np.ndarray, labels: np.ndarray | None, target: float, expected: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Lowest confidence threshold (on ``probs``) whose kept predictions reach ``target`` accuracy.

    With ``labels=None`` the accuracy of each prediction is estimated without clean labels — which
    is what in-house data allows (against noisy or kNN-cleaned labels a 90 % target can be
    unreachable even for a perfect model): by ``expected`` (e.g. the confidence after a
    noise-aware temperature fit) or else by the prediction's own confidence.
    Returns (threshold, selective accuracy, coverage); threshold 0 when even all tiles reach it.
    """
    conf = probs.max(1)
    if labels is not None:
        correct = probs.argmax(1) == labels
    else:
        correct = conf if expected is None else expected
    order = np.argsort(-conf)
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(cum_acc >= target)
    if len(ok) == 0:
        return 1.0, float("nan"), 0.0
    k = ok[-1] + 1  # largest prefix (by confidence) with accuracy >= target
    threshold = 0.0 if k == len(order) else float(conf[order[k - 1]])
    return threshold, float(cum_acc[k - 1]), float(k / len(order))


def reliability_diagram(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 10) -> None:
    """One panel per named (probabilities, labels) pair: accuracy vs confidence per bin, ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), squeeze=False)
    edges = np.linspace(0, 1, n_bins + 1)
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items(), strict=True):
        conf, correct = probs.max(1), probs.argmax(1) == labels
        accs, confs, counts = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            inside = (conf > lo) & (conf <= hi)
            counts.append(inside.sum())
            accs.append(correct[inside].mean() if inside.any() else 0)
            confs.append(conf[inside].mean() if inside.any() else (lo + hi) / 2)
        ax.bar(edges[:-1], accs, width=1 / n_bins, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_title(f"{name}\nECE {expected_calibration_error(probs, labels):.3f} (n={len(labels)})", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
