"""Why no temperature learned on the training slides reaches ECE 0.03 on one pair of unseen slides.

    python benchmarks/calibration_limits.py --data ../shared/data/kather2016 [--noise uniform:0.4] [--seeds 3]

Works on cached embeddings with the head and calibration code of ``training/train.py`` (no ONNX
export: the served graph matches the torch head to 1e-6). For each held-out slide pair and seed it
builds the default slide ensemble and the cross-slide predictions the served temperature is fitted
on, then asks two questions with the *clean* labels, which no label-free method can beat:

1. **Can a slide's accuracy be told without labels?** Per left-out slide of the cross-slide
   predictions: accuracy against mean confidence, ensemble disagreement (mutual information
   between the members' predictions), OOD score (the served Mahalanobis score) and similarity to
   the 10 nearest training tiles. Their correlations across slides and runs.
2. **Does a tile-dependent temperature help?** ``t(x) = exp(a + b·f(x))`` with f one of those tile
   signals, fitted on the clean labels of the cross-slide predictions, against one temperature
   fitted the same way: ECE on the held-out pair.
3. **Does a richer calibration map help?** A temperature plus a bias per class, and vector scaling
   (a scale and a bias per class), fitted as the served temperature is (noisy labels through the
   anchor-point transition) and on clean labels. Other label-free objectives for the one
   temperature: matching the mean confidence to the noise-corrected accuracy, or minimising the
   ECE against it; the backward-corrected NLL (Patrini et al. 2017), unbiased for the clean-label
   NLL; the kNN vote shares as soft labels. The temperature fitted through the *true* transition,
   forward and backward (what a perfect noise estimate would give); and fits on the clean test
   labels themselves. And one map
   that a slide job could fit on each slide's own tiles: the class priors re-estimated per held-out
   slide by EM (Saerens et al. 2002), on top of the served temperature. ECE and accuracy per pair
   and pooled over the pairs (each tile scored by the model it was held out from).
4. **Where are the held-out errors?** The most frequent (true class → predicted class) confusions
   per held-out slide, with their mean confidence.

Writes ``benchmarks/results/calibration_limits.{md,json}`` (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

from models.card import write_atomic
from training.calibration import (
    anchor_transition,
    binned_ece,
    expected_calibration_error,
    fit_temperature,
    minimise_temperature,
    softmax,
)
from training.data import file_sha256, load_patches, slide_split
from training.embed import embed_files
from training.encoders import build_encoder
from training.noise import inject
from training.ood import MahalanobisScore
from training.robust import TrainConfig, cross_slide_fits, fit_head, knn_votes

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = "CRC-Prim-HE-01,CRC-Prim-HE-07;CRC-Prim-HE-03,CRC-Prim-HE-08;CRC-Prim-HE-04,CRC-Prim-HE-05"
SIGNALS = ("confidence", "disagreement", "ood", "similarity")


def tile_signals(model: torch.nn.Module, x_train: np.ndarray, labels: np.ndarray, x: np.ndarray) -> dict:
    """Log-probabilities and the label-free signals of each tile of ``x`` for a head fitted on ``x_train``."""
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        logp = torch.log_softmax(model(xt), 1).numpy()
        members = getattr(model, "members", [model])
        p = np.stack([torch.softmax(m(xt), 1).numpy() for m in members])
    mean = p.mean(0)

    def entropy(q: np.ndarray) -> np.ndarray:
        return -(q * np.log(np.clip(q, 1e-12, 1))).sum(-1)

    train = torch.from_numpy(x_train).float()
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    a, b = F.normalize((train - mu) / sd, dim=1), F.normalize((xt - mu) / sd, dim=1)
    return {
        "logp": logp,
        "confidence": np.exp(logp).max(1),
        "disagreement": entropy(mean) - entropy(p).mean(0),
        "ood": MahalanobisScore(x_train, labels, int(logp.shape[1]), k=128).score(x),
        "similarity": (b @ a.T).topk(10, dim=1).values.mean(1).numpy(),
    }


def feature(signals: dict, name: str) -> np.ndarray:
    """The tile signal on a scale where a linear log-temperature is plausible."""
    value = signals[name]
    return np.log(value + 1e-4) if name in ("disagreement", "ood") else value


def fit_tile_temperature(logp: np.ndarray, f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a, b) minimising the NLL of ``softmax(z / exp(a + b f))``."""
    z, ft, yt = torch.from_numpy(logp).double(), torch.from_numpy(f).double(), torch.from_numpy(y).long()
    w = torch.zeros(2, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / torch.exp(w[0] + w[1] * ft)[:, None], yt)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def fit_scaling(
    logp: np.ndarray, given: np.ndarray, transition: np.ndarray | None, per_class_scale: bool, l2: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """(log scale, bias) minimising the NLL of the given labels under ``softmax(z·exp(-s) + b) @ T``.

    One scale (temperature plus a bias per class) or one per class (vector scaling). ``T=None``:
    the labels are taken as clean. A small L2 on the biases keeps classes absent from the fit at 0.
    """
    n = logp.shape[1]
    z, yt = torch.from_numpy(logp).double(), torch.from_numpy(given).long()
    t_mat = torch.from_numpy(np.eye(n) if transition is None else transition).double()
    s = torch.zeros(n if per_class_scale else 1, dtype=torch.double, requires_grad=True)
    b = torch.zeros(n, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([s, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        p = torch.softmax(z * torch.exp(-s) + b, 1) @ t_mat
        loss = -torch.log(p.gather(1, yt[:, None]).clamp_min(1e-12)).mean() + l2 * (b**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return s.detach().numpy(), b.detach().numpy()


def scaled(logp: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return softmax(logp * np.exp(-params[0]) + params[1])


def corrected_accuracy(probs: np.ndarray, given: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """Per tile, an unbiased estimate from its noisy label of whether the prediction is right.

    A prediction ŷ agrees with its noisy label with probability ``c·T[ŷ,ŷ] + (1-c)·o``, where c is
    the chance ŷ is right and o the chance a wrong truth gets relabelled ŷ (the remaining predicted
    mass pushed through T); solving for c gives the estimate (not confined to [0, 1]).
    """
    pred = probs.argmax(1)
    rest = probs.copy()
    rest[np.arange(len(probs)), pred] = 0
    rest /= np.maximum(rest.sum(1, keepdims=True), 1e-12)
    o, d = (rest * transition[:, pred].T).sum(1), transition[pred, pred]
    return ((given == pred) - o) / (d - o)


def accuracy_matching_temperature(logp: np.ndarray, given: np.ndarray, transition: np.ndarray) -> float:
    """Temperature at which the mean confidence equals the noise-corrected accuracy."""

    def gap(t: float) -> float:
        p = softmax(logp, t)
        return abs(p.max(1).mean() - corrected_accuracy(p, given, transition).mean())

    return minimise_temperature(gap)


def corrected_ece_temperature(logp: np.ndarray, given: np.ndarray, transition: np.ndarray) -> float:
    """Temperature minimising the 15-bin ECE against the noise-corrected accuracy of each tile."""

    def ece(t: float) -> float:
        p = softmax(logp, t)
        return binned_ece(p.max(1), corrected_accuracy(p, given, transition), 15)

    return minimise_temperature(ece)


def backward_temperature(logp: np.ndarray, given: np.ndarray, transition: np.ndarray) -> float:
    """Temperature minimising the backward-corrected NLL (Patrini et al. 2017).

    Weighting each class's loss by the row of ``T⁻¹`` for the given label makes the loss unbiased
    for the clean-label NLL, whatever the map's misfit; the served (forward) fit through T is
    unbiased only if some temperature calibrates the model exactly.
    """
    weights = np.linalg.inv(transition)[given]

    def loss(t: float) -> float:
        return float(-(weights * np.log(np.clip(softmax(logp, t), 1e-12, 1))).sum(1).mean())

    return minimise_temperature(loss)


def soft_label_temperature(logp: np.ndarray, targets: np.ndarray, transition: np.ndarray) -> float:
    """Temperature minimising the cross-entropy of soft targets (e.g. kNN vote shares) under ``softmax(z/t) @ T``.

    A tile's 30 neighbours' labels instead of its own one: less label noise per tile.
    """

    def loss(t: float) -> float:
        return float(-(targets * np.log(np.clip(softmax(logp, t) @ transition, 1e-12, 1))).sum(1).mean())

    return minimise_temperature(loss)


def true_transition(clean: np.ndarray, given: np.ndarray, n: int, fallback: np.ndarray) -> np.ndarray:
    """``T[i, j]`` counted from the clean and given labels (rows without tiles: ``fallback``'s)."""
    counts = np.zeros((n, n))
    np.add.at(counts, (clean, given), 1.0)
    rows = counts.sum(1, keepdims=True)
    return np.where(rows > 0, counts / np.maximum(rows, 1), fallback)


def adapt_priors(probs: np.ndarray, prior: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Posteriors re-weighted to the class priors of these tiles, estimated by EM (Saerens et al. 2002)."""
    estimate = prior.copy()
    for _ in range(iterations):
        adapted = probs * (estimate / prior)
        adapted /= adapted.sum(1, keepdims=True)
        new = adapted.mean(0)
        if np.abs(new - estimate).max() < 1e-7:
            break
        estimate = new
    return adapted


MAPS = {  # key → what the row says (section 3)
    "served": "temperature, noisy labels through the anchor transition (**as served**)",
    "slide_priors": "served temperature, then each held-out slide's class priors re-estimated by EM",
    "bias_noisy": "temperature + class bias, noisy labels through the anchor transition",
    "vector_noisy": "vector scaling, noisy labels through the anchor transition",
    "matching": "temperature matching mean confidence to the noise-corrected accuracy",
    "corrected_ece": "temperature minimising the ECE against the noise-corrected accuracy",
    "backward": "temperature, backward-corrected NLL of the noisy labels (anchor transition)",
    "votes": "temperature, kNN vote shares as soft labels through the anchor transition",
    "true_transition": "*reference:* temperature, noisy labels through the true transition",
    "backward_true": "*reference:* temperature, backward-corrected NLL with the true transition",
    "clean": "*reference:* temperature, clean labels",
    "bias_clean": "*reference:* temperature + class bias, clean labels",
    "vector_clean": "*reference:* vector scaling, clean labels",
    "oracle": "*reference:* temperature on the clean test labels",
    "bias_oracle": "*reference:* temperature + class bias on the clean test labels",
}


def calibration_maps(
    cross_logp, noisy, clean, votes, transition, test_logp, y_test, test_slides
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Held-out probabilities under each map of :data:`MAPS` (fitted on the cross-slide predictions),
    and the fitted temperature of each one-temperature map."""
    n = cross_logp.shape[1]
    true_t = true_transition(clean, noisy, n, transition)
    temperatures = {
        "served": fit_temperature(cross_logp, noisy, transition),
        "matching": accuracy_matching_temperature(cross_logp, noisy, transition),
        "corrected_ece": corrected_ece_temperature(cross_logp, noisy, transition),
        "backward": backward_temperature(cross_logp, noisy, transition),
        "votes": soft_label_temperature(cross_logp, votes, transition),
        "true_transition": fit_temperature(cross_logp, noisy, true_t),
        "backward_true": backward_temperature(cross_logp, noisy, true_t),
        "clean": fit_temperature(cross_logp, clean),
        "oracle": fit_temperature(test_logp, y_test),
    }
    probs = {key: softmax(test_logp, t) for key, t in temperatures.items()}
    by_slide = probs["served"].copy()
    prior = softmax(cross_logp, temperatures["served"]).mean(0)  # what the model predicts on slides it never saw
    for slide in np.unique(test_slides):
        m = test_slides == slide
        by_slide[m] = adapt_priors(probs["served"][m], prior)
    probs |= {
        "slide_priors": by_slide,
        "bias_noisy": scaled(test_logp, fit_scaling(cross_logp, noisy, transition, False)),
        "vector_noisy": scaled(test_logp, fit_scaling(cross_logp, noisy, transition, True)),
        "bias_clean": scaled(test_logp, fit_scaling(cross_logp, clean, None, False)),
        "vector_clean": scaled(test_logp, fit_scaling(cross_logp, clean, None, True)),
        "bias_oracle": scaled(test_logp, fit_scaling(test_logp, y_test, None, False)),
    }
    return {key: probs[key] for key in MAPS}, temperatures


def run(x, y, slides, pair: list[str], noise: str, seed: int, n: int) -> tuple[list[dict], dict, dict]:
    held = np.isin(slides, pair)
    lab = np.flatnonzero(~held)
    x_lab, y_lab, s_lab = x[lab], y[lab], slides[lab]
    noisy = inject(y_lab, noise, n, seed)
    train_idx, val_idx = slide_split(list(s_lab), noisy, 0.2, seed)
    config = TrainConfig(seed=seed)
    served = fit_head(x_lab[train_idx], noisy[train_idx], s_lab[train_idx], x_lab[val_idx], noisy[val_idx], n, config)
    votes = knn_votes(x_lab, noisy, n, config.knn_k)
    cleaned, transition = votes.argmax(1), anchor_transition(votes, noisy, n)
    slide_rows, parts = [], []
    for out, model in cross_slide_fits(x_lab, noisy, s_lab, n, config, cleaned):
        signals = tile_signals(model, x_lab[~out], cleaned[~out], x_lab[out])
        correct = signals["logp"].argmax(1) == y_lab[out]
        for slide in np.unique(s_lab[out]):
            m = s_lab[out] == slide
            slide_rows.append(
                {"slide": str(slide), "n": int(m.sum()), "accuracy": float(correct[m].mean())}
                | {k: float(np.mean(feature(signals, k)[m])) for k in SIGNALS}
            )
        parts.append((signals, y_lab[out], noisy[out], votes[out]))
    cross = {k: np.concatenate([p[0][k] for p in parts]) for k in ("logp", *SIGNALS)}
    y_cross, noisy_cross, votes_cross = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
    test = tile_signals(served.model, x_lab[train_idx], served.train_labels, x[held])
    maps, temperatures = calibration_maps(
        cross["logp"], noisy_cross, y_cross, votes_cross, transition, test["logp"], y[held], slides[held]
    )
    ece = {"one temperature": expected_calibration_error(maps["clean"], y[held])}  # fitted on clean labels
    for name in SIGNALS:
        f_cross, f_test = feature(cross, name), feature(test, name)
        mu, sd = f_cross.mean(), f_cross.std() + 1e-9
        a, b = fit_tile_temperature(cross["logp"], (f_cross - mu) / sd, y_cross)
        temps = np.exp(a + b * (f_test - mu) / sd)
        ece[f"temperature by {name}"] = expected_calibration_error(softmax(test["logp"] / temps[:, None]), y[held])
    return slide_rows, ece, {"probs": maps, "temperatures": temperatures, "y": y[held], "slides": slides[held]}


def confusions(held: list[dict], classes: list[str], top: int = 2) -> list[dict]:
    """Per held-out slide, the ``top`` most frequent wrong (true → predicted) pairs as served, over seeds."""
    rows = []
    for slide in sorted({str(s) for h in held for s in h["slides"]}):
        counts: dict[tuple[int, int], list[float]] = {}
        n_true = np.zeros(len(classes))
        for h in held:
            m = h["slides"] == slide
            p = h["probs"]["served"][m]
            n_true += np.bincount(h["y"][m], minlength=len(classes))
            for t, q, c in zip(h["y"][m], p.argmax(1), p.max(1), strict=True):
                if t != q:
                    counts.setdefault((int(t), int(q)), []).append(float(c))
        for (t, q), confs in sorted(counts.items(), key=lambda kv: -len(kv[1]))[:top]:
            rows.append(
                {
                    "slide": slide,
                    "true": classes[t],
                    "predicted": classes[q],
                    "share_of_true_class": len(confs) / n_true[t],
                    "mean_confidence": float(np.mean(confs)),
                }
            )
    return rows


def map_summary(held: list[dict]) -> dict:
    """Per map: ECE per pair (mean over seeds) and pooled over the pairs per seed."""
    pairs, seeds = list(dict.fromkeys(h["pair"] for h in held)), sorted({h["seed"] for h in held})
    out = {}
    for key in MAPS:
        pooled = []
        for seed in seeds:
            hs = [h for h in held if h["seed"] == seed]
            pooled.append(
                expected_calibration_error(
                    np.concatenate([h["probs"][key] for h in hs]), np.concatenate([h["y"] for h in hs])
                )
            )
        per_pair = {
            pr: [expected_calibration_error(h["probs"][key], h["y"]) for h in held if h["pair"] == pr] for pr in pairs
        }
        out[key] = {
            "accuracy": float(np.mean([(h["probs"][key].argmax(1) == h["y"]).mean() for h in held])),
            "per_pair": {pr: float(np.mean(v)) for pr, v in per_pair.items()},
            "pooled_per_seed": pooled,
            "pooled": float(np.mean(pooled)),
        }
        if key in held[0]["temperatures"]:
            out[key]["temperature_per_pair"] = {
                pr: [h["temperatures"][key] for h in held if h["pair"] == pr] for pr in pairs
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kather2016"))
    p.add_argument("--holdout-slides", default=PAIRS, help="';' between held-out sets, ',' within one")
    p.add_argument("--noise", default="uniform:0.4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="calibration_limits", help="stem of the result files")
    args = p.parse_args(argv)
    patches = load_patches(args.data, check_images=False)
    encoder = build_encoder("efficientnet_lite0_ms", None)
    x, _ = embed_files(encoder, patches.paths, [file_sha256(q) for q in patches.paths], batch_size=64)
    classes = patches.classes
    y = np.array([classes.index(label) for label in patches.labels])
    slides = np.array(patches.slides)
    pairs = [h.split(",") for h in args.holdout_slides.split(";") if h]
    slide_rows, ece_rows, held = [], [], []
    for pair in pairs:
        for seed in range(args.seeds):
            rows, ece, test = run(x, y, slides, pair, args.noise, seed, len(classes))
            short = "/".join(s.rsplit("-", 1)[-1] for s in pair)
            slide_rows += [r | {"pair": short, "seed": seed} for r in rows]
            ece_rows.append({"pair": short, "seed": seed} | ece)
            held.append(test | {"pair": short, "seed": seed})
            print(short, seed, " ".join(f"{k}={v:.3f}" for k, v in ece.items()), flush=True)
    acc = np.array([r["accuracy"] for r in slide_rows])
    correlations = {k: float(np.corrcoef(acc, [r[k] for r in slide_rows])[0, 1]) for k in SIGNALS}
    methods = [k for k in ece_rows[0] if k not in ("pair", "seed")]
    per_pair = {
        m: {
            pr: float(np.mean([r[m] for r in ece_rows if r["pair"] == pr]))
            for pr in dict.fromkeys(r["pair"] for r in ece_rows)
        }
        for m in methods
    }
    result = {
        "noise": args.noise,
        "seeds": args.seeds,
        "slide_accuracy_correlation": correlations,
        "slides": slide_rows,
        "ece_per_pair": per_pair,
        "ece_mean": {m: float(np.mean([r[m] for r in ece_rows])) for m in methods},
        "runs": ece_rows,
        "maps": map_summary(held),
        "confusions": confusions(held, classes),
    }
    names = {
        "confidence": "mean confidence",
        "disagreement": "ensemble disagreement (mean log MI)",
        "ood": "OOD score (mean log)",
        "similarity": "similarity to the 10 nearest training tiles",
    }
    lines = [
        "# Limits of calibration learned on other slides (generated by `benchmarks/calibration_limits.py`)",
        "",
        f"Training labels with `{args.noise}` noise, {args.seeds} seeds per held-out pair; default slide ensemble; "
        "cross-slide predictions as in `training/train.py`. Clean labels are used here only to measure.",
        "",
        f"## Slide accuracy vs label-free signals ({len(slide_rows)} left-out slides of the cross-slide predictions)",
        "",
        f"Slide accuracy ranges from {acc.min():.1%} to {acc.max():.1%}.",
        "",
        "| signal (slide mean) | correlation with the slide's accuracy |",
        "|---|---|",
        *[f"| {names[k]} | {v:+.2f} |" for k, v in correlations.items()],
        "",
        "| slide | runs | accuracy | mean confidence |",
        "|---|---|---|---|",
    ]
    for slide in sorted({r["slide"] for r in slide_rows}):
        rs = [r for r in slide_rows if r["slide"] == slide]
        lines.append(
            f"| {slide} | {len(rs)} | {min(r['accuracy'] for r in rs):.1%} to {max(r['accuracy'] for r in rs):.1%} "
            f"| {min(r['confidence'] for r in rs):.1%} to {max(r['confidence'] for r in rs):.1%} |"
        )
    pair_names = list(per_pair[methods[0]])
    lines += [
        "",
        "## ECE on the held-out pair, temperatures fitted on the clean labels of the cross-slide predictions",
        "",
        "| temperature | " + " | ".join(pair_names) + " | mean |",
        "|---|" + "---|" * (len(pair_names) + 1),
        *[
            f"| {m} | "
            + " | ".join(f"{per_pair[m][pr]:.3f}" for pr in pair_names)
            + f" | {result['ece_mean'][m]:.3f} |"
            for m in methods
        ],
    ]
    maps = result["maps"]
    lines += [
        "",
        "## ECE of richer calibration maps, fitted on the cross-slide predictions",
        "",
        "Per pair: mean over seeds. Pooled: every pair's held-out tiles together, each scored by the model it "
        "was held out from (one ECE per seed; mean, then the range).",
        "",
        "| calibration map | held-out accuracy | " + " | ".join(pair_names) + " | pooled |",
        "|---|---|" + "---|" * (len(pair_names) + 1),
        *[
            f"| {MAPS[k]} | {maps[k]['accuracy']:.1%} | "
            + " | ".join(f"{maps[k]['per_pair'][pr]:.3f}" for pr in pair_names)
            + f" | **{maps[k]['pooled']:.3f}** ({min(maps[k]['pooled_per_seed']):.3f}-"
            f"{max(maps[k]['pooled_per_seed']):.3f}) |"
            for k in MAPS
        ],
        "",
        "Fitted temperatures, per seed (one-temperature maps):",
        "",
        "| calibration map | " + " | ".join(pair_names) + " |",
        "|---|" + "---|" * len(pair_names),
        *[
            f"| {MAPS[k]} | "
            + " | ".join(" ".join(f"{t:.2f}" for t in maps[k]["temperature_per_pair"][pr]) for pr in pair_names)
            + " |"
            for k in MAPS
            if "temperature_per_pair" in maps[k]
        ],
        "",
        "## Where the held-out errors are (served temperature, all seeds)",
        "",
        "| held-out slide | true class | predicted as | share of the class's tiles | mean confidence |",
        "|---|---|---|---|---|",
        *[
            f"| {c['slide']} | {c['true']} | {c['predicted']} | {c['share_of_true_class']:.0%} "
            f"| {c['mean_confidence']:.2f} |"
            for c in result["confusions"]
        ],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
