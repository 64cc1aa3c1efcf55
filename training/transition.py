"""Learning through the noise model: the label transition used to fit, not only to calibrate.

With the transition ``T[i, j] = P(given j | true i)`` (estimated from anchor points,
:func:`training.calibration.anchor_transition`) and the clean class priors π, the tiles labelled j
are a known mixture of the clean classes: ``P(true k | given j) = π_k T[k, j] / Σ_i π_i T[i, j]``.
So the statistics of the noisy classes can be *de-mixed* into those of the clean ones, whatever the
noise rate, as long as T is invertible (:func:`demix_means`), and a model of the clean classes can
be fitted by maximum likelihood with the true class as a latent variable (:class:`DemixedGaussian`:
a shared-covariance Gaussian per class in a PCA of the embeddings, fitted by EM from the de-mixed
moments). Three ways to learn from it:

* ``lda``: the de-mixed Gaussian model itself as the head (a linear layer: exports unchanged);
* ``transition_clean``: the de-mixed model as a label cleaner: each tile relabelled to the class
  most probable given its embedding *and* its given label, ``P(k | x, ỹ) ∝ P(k | x) T[k, ỹ]``. Where
  T says labels are reliable the given label wins; where they are mostly wrong the embedding does.
  The cleaned labels feed the usual heads (:func:`training.robust.fit_head`);
* ``forward`` / ``backward`` losses (Patrini et al. 2017) for the linear and MLP heads
  (:func:`training.robust.corrected_loss`, ``TrainConfig.transition``).

:func:`choose_method` picks between the kNN-cleaned heads and the forward-corrected ones from what
a run can see without clean labels (the estimated transition: its condition number and whether its
rows favour particular classes); ``training/train.py --method auto`` prints its inputs (with the
estimated noise rate and each candidate's cross-slide fit to the given labels) and the decision in
``report.json``. What each piece measured on held-out slides: ``docs/noise.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from training.calibration import anchor_transition
from training.heads import make_head
from training.robust import TrainConfig, TrainResult, fit_head, knn_votes

log = logging.getLogger("histo_robust.transition")

TRANSITION_METHODS = ("lda", "transition_clean")


# ---------------------------------------------------------------- the mixture and its inverse
def clean_priors(noisy_priors: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """π with ``π T = ρ`` (the given labels' class shares ρ), non-negative and summing to 1."""
    pi, _ = nnls(transition.T, noisy_priors)
    pi = np.maximum(pi, 1e-3)
    return pi / pi.sum()


def noisy_posteriors(transition: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """``A[j, k] = P(true k | given j)``: how the tiles labelled j mix the clean classes."""
    joint = priors[:, None] * transition  # [true, given]
    return (joint / joint.sum(0, keepdims=True).clip(1e-12)).T


def demix_means(
    noisy_means: np.ndarray,
    noisy_counts: np.ndarray,
    transition: np.ndarray,
    priors: np.ndarray,
    shrinkage: float = 0.05,
) -> np.ndarray:
    """Clean class means from the noisy ones: solve ``A μ = M`` (method of moments), with Tikhonov shrinkage.

    ``M[j]`` is the mean embedding of the tiles labelled j; each is ``Σ_k A[j, k] μ_k``. The solve is
    weighted by the tiles behind each row and shrunk towards the grand mean by ``shrinkage`` (relative to
    the largest eigenvalue of ``AᵀWA``): where T is nearly singular (80 % uniform noise on 8 classes
    leaves it eigenvalues of 0.086), the exact inverse multiplies the sampling error of M by 1/0.086.
    """
    a = noisy_posteriors(transition, priors)
    w = noisy_counts / noisy_counts.sum()
    grand = w @ noisy_means
    gram = a.T @ (w[:, None] * a)
    lam = shrinkage * float(np.linalg.eigvalsh(gram).max())
    deviations = np.linalg.solve(gram + lam * np.eye(len(gram)), a.T @ (w[:, None] * (noisy_means - grand)))
    return grand + deviations


# ---------------------------------------------------------------- the de-mixed generative model
@dataclass
class DemixedGaussian:
    """Shared-covariance Gaussian per clean class in a PCA of the standardised embeddings (an LDA).

    Fitted without a single clean label: de-mixed means (:func:`demix_means`), the within-class
    covariance as the total covariance minus the de-mixed between-class part, then ``em_steps`` of EM
    with the true class latent and the given label observed through T. Every quantity is a linear
    function of the embedding, so the log-posterior is a linear layer (:meth:`as_head`).
    """

    mean: np.ndarray  # [D] standardisation
    std: np.ndarray  # [D]
    components: np.ndarray  # [D, d] PCA basis
    means: np.ndarray  # [C, d] clean class means (PCA space)
    precision: np.ndarray  # [d, d] inverse shared covariance
    priors: np.ndarray  # [C]
    transition: np.ndarray  # [C, C] the T it was fitted through

    def project(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std) @ self.components

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [C, D], b [C]) of the class log-posterior on the *standardised* embedding."""
        a = self.means @ self.precision  # [C, d]
        bias = -0.5 * np.einsum("cd,cd->c", a, self.means) + np.log(self.priors)
        return a @ self.components.T, bias

    def log_posterior(self, x: np.ndarray) -> np.ndarray:
        """``log P(true k | x)`` [N, C]."""
        weight, bias = self._linear()
        z = ((x - self.mean) / self.std) @ weight.T + bias
        return z - np.logaddexp.reduce(z, axis=1, keepdims=True)

    def clean_labels(self, x: np.ndarray, given: np.ndarray) -> np.ndarray:
        """Most probable true class given the embedding and the given label: ``P(k|x) T[k, ỹ]``."""
        return (self.log_posterior(x) + np.log(self.transition[:, given].T.clip(1e-12))).argmax(1)

    def as_head(self) -> nn.Sequential:
        """The model as the project's linear head (standardisation + one linear layer)."""
        weight, bias = self._linear()
        head = make_head(
            "linear", len(self.mean), len(self.priors), torch.from_numpy(self.mean), torch.from_numpy(self.std)
        )
        with torch.no_grad():
            head[1].weight.copy_(torch.from_numpy(weight).float())
            head[1].bias.copy_(torch.from_numpy(bias).float())
        return head.eval()


def fit_demixed_gaussian(
    x: np.ndarray,
    given: np.ndarray,
    transition: np.ndarray,
    n_classes: int,
    dim: int = 32,
    shrinkage: float = 0.05,
    cov_shrinkage: float = 0.1,
    em_steps: int = 20,
    learn_transition: bool = False,
) -> DemixedGaussian:
    """:class:`DemixedGaussian` from the given (noisy) labels and the transition; no clean label involved.

    ``learn_transition``: EM re-estimates T as well (the labels each latent class carries), starting
    from ``transition``; the model's own transition is then that estimate.
    """
    mean, std = x.mean(0), x.std(0).clip(1e-6)
    xs = (x - mean) / std
    components = _principal_axes(xs - xs.mean(0), min(dim, *xs.shape))
    z = xs @ components
    counts = np.bincount(given, minlength=n_classes).astype(float) + 1e-3
    noisy_means = np.stack([z[given == j].mean(0) if (given == j).any() else z.mean(0) for j in range(n_classes)])
    priors = clean_priors(counts / counts.sum(), transition)
    means = demix_means(noisy_means, counts, transition, priors, shrinkage)
    total = np.cov(z, rowvar=False)
    centred = means - priors @ means
    within = total - (priors[:, None] * centred).T @ centred
    model = DemixedGaussian(mean, std, components, means, _shrunk_precision(within, cov_shrinkage), priors, transition)
    onehot = np.eye(n_classes)[given]
    second = z.T @ z
    for _ in range(em_steps):  # EM: true class latent, given label observed through T
        a = model.means @ model.precision
        log_t = np.log(model.transition[:, given].T.clip(1e-12))  # [N, C]: log P(given | true k)
        logits = z @ a.T - 0.5 * np.einsum("cd,cd->c", a, model.means) + np.log(model.priors) + log_t
        r = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
        weight = r.sum(0) + 1e-6
        model.priors = weight / weight.sum()
        model.means = (r.T @ z) / weight[:, None]
        within = (second - (weight[:, None] * model.means).T @ model.means) / len(z)
        model.precision = _shrunk_precision(within, cov_shrinkage)
        if learn_transition:
            counts = r.T @ onehot + 1.0 / n_classes  # [true, given], smoothed as the anchor estimate is
            model.transition = counts / counts.sum(1, keepdims=True)
    return model


def _principal_axes(x: np.ndarray, dim: int, oversample: int = 10, power_steps: int = 3) -> np.ndarray:
    """Top ``dim`` principal axes [D, dim] by a seeded randomised range finder (Halko et al. 2011).

    The full SVD of a few thousand 992-d embeddings costs ~30x more and dominated each fit.
    """
    rng = np.random.default_rng(0)
    q = np.linalg.qr(x @ rng.normal(size=(x.shape[1], min(dim + oversample, x.shape[1]))))[0]
    for _ in range(power_steps):
        q = np.linalg.qr(x @ np.linalg.qr(x.T @ q)[0])[0]
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return vt[:dim].T


def _shrunk_precision(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """Inverse of a covariance made positive definite and shrunk towards its mean variance."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    floor = max(float(np.mean(np.abs(values))) * 1e-3, 1e-6)
    values = (1 - shrinkage) * values.clip(floor) + shrinkage * float(np.mean(values.clip(floor)))
    return (vectors / values) @ vectors.T


# ---------------------------------------------------------------- what train.py fits
@dataclass
class NoiseModel:
    """What a run knows about its label noise, from the given labels and the embeddings only."""

    transition: np.ndarray
    noise_rate: float  # 1 - Σ π_k T[k, k]
    condition_number: float  # of T: how much de-mixing amplifies estimation error

    def describe(self) -> dict:
        return {
            "estimated_noise_rate": round(self.noise_rate, 4),
            "transition_condition_number": round(self.condition_number, 2),
            "structured_rows": structured_rows(self.transition),
        }


def estimate_noise(x: np.ndarray, given: np.ndarray, n_classes: int, k: int) -> NoiseModel:
    """Anchor-point transition (as the calibration uses), structured (:func:`uniform_rows`), and its numbers."""
    votes = knn_votes(x, given, n_classes, k)
    transition = uniform_rows(anchor_transition(votes, given, n_classes))
    return noise_model(transition, given, n_classes)


def uniform_rows(transition: np.ndarray, max_distance: float = 0.25) -> np.ndarray:
    """Rows whose off-diagonal mass looks uniform made exactly uniform (same noise rate per row).

    The anchor estimate's off-diagonal entries carry the impurity of the anchors: at 80 % uniform
    noise on Kather its rows are off by 0.21 (L1) from the transition the noise made, 0.14 after this
    (``benchmarks/noise.py``). A row is made uniform when the total-variation distance of its
    normalised off-diagonal from uniform is below ``max_distance`` (0.04-0.23 measured for uniform
    noise, 0.64-0.84 for asymmetric: those rows stay as estimated).
    """
    out = transition.copy()
    n = len(transition)
    for i in range(n):
        off = np.delete(transition[i], i)
        rate = off.sum()
        if rate <= 0 or 0.5 * np.abs(off / rate - 1 / (n - 1)).sum() >= max_distance:
            continue
        out[i] = rate / (n - 1)
        out[i, i] = 1 - rate
    return out


def noise_model(transition: np.ndarray, given: np.ndarray, n_classes: int) -> NoiseModel:
    counts = np.bincount(given, minlength=n_classes).astype(float) + 1e-3
    priors = clean_priors(counts / counts.sum(), transition)
    return NoiseModel(
        transition=transition,
        noise_rate=float(1 - priors @ np.diag(transition)),
        condition_number=float(np.linalg.cond(transition)),
    )


def transition_clean(
    x: np.ndarray, given: np.ndarray, n_classes: int, transition: np.ndarray | None = None, k: int = 30
) -> np.ndarray:
    """The de-mixed model's labels (:meth:`DemixedGaussian.clean_labels`); T estimated from x when None.

    What ``method="transition_clean"`` trains on (``training/robust.py``), per slide-ensemble member,
    as ``knn_clean`` cleans per member.
    """
    if transition is None:
        transition = estimate_noise(x, given, n_classes, k).transition
    return fit_demixed_gaussian(x, given, transition, n_classes).clean_labels(x, given)


def fit_transition(
    method: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    slides_train: list[str] | np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    transition: np.ndarray,
) -> TrainResult:
    """``lda`` or ``transition_clean`` (module docstring) through ``transition``, on the given labels only.

    ``lda``: the de-mixed Gaussian model of the training tiles as the head. ``transition_clean``:
    :func:`training.robust.fit_head` with that method (head, loss and ensemble of ``config``).
    """
    if method not in TRANSITION_METHODS:
        raise ValueError(f"unknown transition method {method!r}; choose from {', '.join(TRANSITION_METHODS)}")
    if method == "lda":
        model = fit_demixed_gaussian(x_train, y_train, transition, n_classes)
        cleaned = model.clean_labels(x_train, y_train)
        return TrainResult(model.as_head(), cleaned, 0, [], float((cleaned != y_train).mean()))
    config = candidate_config(method, config, transition)
    return fit_head(x_train, y_train, slides_train, x_val, y_val, n_classes, config)


def _as_tuple(transition: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(transition))


# ---------------------------------------------------------------- choosing without clean labels
CANDIDATES = ("knn_clean", "forward")
MAX_CONDITION = 50.0  # above it T is too near singular to correct through (80 % uniform estimates: 70-1650)
STRUCTURED_SHARE = 0.5  # share of T's rows whose off-diagonal is far from uniform (uniform_rows left them)


def cross_slide_fit(result: TrainResult, x: np.ndarray, given: np.ndarray, slides: np.ndarray, transition: np.ndarray):
    """How well a slide ensemble's members explain the *given* labels of the slides each left out.

    Each member of :func:`training.robust.fit_head`'s ensemble never trained on its slide group, so
    its predictions there are cross-slide predictions. Returns ``{"agreement": share of argmax equal to
    the given label, "log_likelihood": mean log (p @ T)[given]}`` (the forward-corrected likelihood: for
    a right T it is highest for the true clean posterior), or None without a slide ensemble.
    """
    members = getattr(result.model, "members", None)
    if not result.member_slides or members is None or len(members) != len(result.member_slides):
        return None
    probs, labels = [], []
    for member, group in zip(members, result.member_slides, strict=True):
        out = np.isin(slides, group)
        with torch.no_grad():
            probs.append(torch.softmax(member(torch.from_numpy(x[out]).float()), 1).numpy())
        labels.append(given[out])
    p, y = np.concatenate(probs), np.concatenate(labels)
    rows = np.arange(len(y))
    return {
        "agreement": float((p.argmax(1) == y).mean()),
        "log_likelihood": float(np.log((p @ transition)[rows, y].clip(1e-12)).mean()),
        "n": len(y),
    }


def structured_rows(transition: np.ndarray, max_distance: float = 0.25) -> float:
    """Share of rows whose off-diagonal mass is not uniform (total-variation distance ≥ ``max_distance``)."""
    n = len(transition)
    shares = []
    for i in range(n):
        off = np.delete(transition[i], i)
        rate = off.sum()
        shares.append(rate > 0.02 and 0.5 * np.abs(off / rate - 1 / (n - 1)).sum() >= max_distance)
    return float(np.mean(shares))


def choose_method(noise: NoiseModel, scores: dict[str, dict | None] | None = None) -> tuple[str, str]:
    """(candidate, reason) from the estimated transition alone: never a clean label.

    * ``forward`` (the forward-corrected loss through T) where the noise is *structured*: at least
      ``STRUCTURED_SHARE`` of T's rows send their wrong labels to particular classes, and T is
      well-conditioned enough to correct through (condition number ≤ ``MAX_CONDITION``). A kNN vote
      is pulled towards the class the noise favours; the corrected loss undoes it.
    * ``knn_clean`` otherwise. Under uniform noise the kNN vote shares are ``p T`` with a uniform T,
      a monotone map of the clean posterior p: their top class already *is* the de-mixed one, and going
      through an estimated T only adds its estimation error (near 80 % the estimate is near-singular).

    ``scores`` (cross-slide agreement and forward log-likelihood of each candidate) are reported but
    not used: on the benchmark the higher log-likelihood picked the more accurate candidate in 37 of 54
    conditions, every time on clean labels and asymmetric noise but 3-5 times in 9 at 40-60 % uniform
    and instance-dependent noise, where picking by it cost 2 points at 60 % (``docs/noise.md``).
    """
    structured = structured_rows(noise.transition)
    if noise.condition_number > MAX_CONDITION:
        return "knn_clean", f"transition condition number {noise.condition_number:.0f} > {MAX_CONDITION:.0f}"
    if structured >= STRUCTURED_SHARE:
        return "forward", (
            f"structured noise: {structured:.0%} of the transition's rows favour particular classes "
            f"(condition number {noise.condition_number:.1f})"
        )
    return "knn_clean", f"unstructured noise: {structured:.0%} of the transition's rows favour particular classes"


def candidate_config(name: str, config: TrainConfig, transition: np.ndarray) -> TrainConfig:
    """The :class:`TrainConfig` of one candidate of :func:`choose_method` (head, loss, ensemble of ``config``)."""
    if name == "knn_clean":
        return dataclasses.replace(config, method="knn_clean", transition=None)
    if name == "forward":
        return dataclasses.replace(config, method="standard", loss="forward", transition=_as_tuple(transition))
    if name == "transition_clean":
        return dataclasses.replace(config, method="transition_clean", transition=_as_tuple(transition))
    raise ValueError(f"unknown candidate {name!r}; choose from knn_clean, forward, transition_clean")


def fit_chosen(
    x_train: np.ndarray,
    y_train: np.ndarray,
    slides_train: list[str] | np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    noise: NoiseModel,
) -> tuple[TrainResult, TrainConfig, dict]:
    """What ``training/train.py --method auto`` fits: every candidate, then :func:`choose_method`'s pick.

    Returns the chosen result, its config (for the cross-slide calibration fits) and the decision (its
    inputs, each candidate's scores, the pick and why) for ``report.json``.
    """
    slides_train = np.asarray(slides_train)
    results, configs, scores = {}, {}, {}
    for name in CANDIDATES:
        configs[name] = candidate_config(name, config, noise.transition)
        results[name] = fit_head(x_train, y_train, slides_train, x_val, y_val, n_classes, configs[name])
        scores[name] = cross_slide_fit(results[name], x_train, y_train, slides_train, noise.transition)
    chosen, reason = choose_method(noise, scores)
    log.info("method choice: %s (%s)", chosen, reason)
    decision = {**noise.describe(), "cross_slide": scores, "chosen": chosen, "reason": reason}
    return results[chosen], configs[chosen], decision
