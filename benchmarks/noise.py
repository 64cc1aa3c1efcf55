"""Noise-resilience benchmark: accuracy on held-out slides as label noise grows.

    python benchmarks/noise.py --data ../shared/data/kather2016

Reproduces the experiment of Dedieu et al. 2024 (arXiv 2404.07605) on real slides: training and
(noisy) validation labels are flipped at a growing rate, test labels on unseen slides are always
clean. Every encoder × method × noise × seed runs on cached embeddings (the encoders run once).
Writes ``benchmarks/results/noise.{json,md,png}``. ``--finetune-minutes`` adds the conventional
baseline the paper argues against: end-to-end fine-tuning of the encoder on the noisy labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from models.card import write_atomic
from training.calibration import expected_calibration_error
from training.data import file_sha256, load_patches, slide_split
from training.embed import default_cache_dir, embed_files
from training.encoders import build_encoder
from training.noise import inject
from training.robust import TrainConfig, fit_head, train_head
from training.transition import (
    CANDIDATES,
    TRANSITION_METHODS,
    NoiseModel,
    choose_method,
    cross_slide_fit,
    estimate_noise,
    fit_transition,
)

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = ["none", "uniform:0.4", "uniform:0.6", "uniform:0.8", "asym:0.4", "instance:0.4"]
PAIRS = "CRC-Prim-HE-01,CRC-Prim-HE-07;CRC-Prim-HE-03,CRC-Prim-HE-08;CRC-Prim-HE-04,CRC-Prim-HE-05"
# name -> (kind, head, loss, ensemble, which T): what each row fits, on the given labels only.
# kind "robust": fit_head/train_head with that method; "lda" / "transition_clean": training/transition.py;
# "forward": a head trained with the forward-corrected loss. "true T" rows are references: they use the
# transition the injected noise actually made (counted against the clean labels), no run can.
METHODS = {
    "mlp+ce (paper)": ("standard", "mlp", "ce", "single", None),
    "linear+forward, estimated T": ("forward", "linear", "forward", "single", "estimated"),
    "linear+forward, true T": ("forward", "linear", "forward", "single", "true"),
    "forward (slide ensemble), estimated T": ("forward", "linear", "forward", "slides", "estimated"),
    "lda, estimated T": ("lda", "linear", "gce", "single", "estimated"),
    "lda, true T": ("lda", "linear", "gce", "single", "true"),
    "knn_clean (previous default)": ("knn_clean", "linear", "gce", "slides", None),
    "transition_clean, estimated T": ("transition_clean", "linear", "gce", "slides", "estimated"),
    "transition_clean, true T": ("transition_clean", "linear", "gce", "slides", "true"),
}
CANDIDATE_ROWS = {"knn_clean": "knn_clean (previous default)", "forward": "forward (slide ensemble), estimated T"}
DEFAULT = "default (chosen)"
CONTROL_METHODS = ["mlp+ce (paper)", "knn_clean (previous default)"]
# encoder label -> (registry name, random init?, which methods)
ENCODERS = {
    "imagenet-effnet-lite0-ms": ("efficientnet_lite0_ms", False, "all"),
    "imagenet-effnet-lite0": ("efficientnet_lite0", False, CONTROL_METHODS),
    "random-effnet-lite0-ms": ("efficientnet_lite0_ms", True, CONTROL_METHODS),
}
RUN_VERSION = "1"  # bump when a fit changes in a way the source hash below does not see


def default_method() -> tuple[str, str, str, str]:
    d = TrainConfig()
    return d.head, d.method, d.loss, d.ensemble


def all_methods() -> list[str]:
    return [*METHODS, DEFAULT]


def true_transition(clean: np.ndarray, noisy: np.ndarray, n_classes: int) -> np.ndarray:
    """The transition the injected noise made, counted against the clean labels (references only)."""
    counts = np.full((n_classes, n_classes), 1.0 / n_classes)
    np.add.at(counts, (clean, noisy), 1.0)
    return counts / counts.sum(1, keepdims=True)


def _source_hash() -> str:
    """Hash of the source of every function a measured run calls: an edit to any of them measures anew.

    Functions, not files: other work edits these modules all the time without touching the fits.
    """
    import inspect

    from training import calibration, data, heads, noise, robust, transition

    used = [
        noise.inject,
        noise.instance_noise,
        noise.uniform_noise,
        noise.asymmetric_noise,
        data.slide_split,
        robust.fit_head,
        robust.train_head,
        robust.knn_clean,
        robust.knn_votes,
        robust.corrected_loss,
        robust.slide_groups,
        robust.TrainConfig,
        robust.SlideEnsemble,
        heads.make_head,
        calibration.anchor_transition,
        transition.fit_demixed_gaussian,
        transition.demix_means,
        transition.clean_priors,
        transition.noisy_posteriors,
        transition.DemixedGaussian,
        transition.fit_transition,
        transition.estimate_noise,
        transition.uniform_rows,
        transition.noise_model,
        transition.cross_slide_fit,
        transition._shrunk_precision,
        transition._principal_axes,
        transition.transition_clean,
        robust._transition_clean,
    ]
    digest = hashlib.sha256(RUN_VERSION.encode())
    for fn in used:
        digest.update(inspect.getsource(fn).encode())
    return digest.hexdigest()[:16]


def run_condition(
    x: np.ndarray,
    y: np.ndarray,
    slides: np.ndarray,
    test_idx: np.ndarray,
    pool: np.ndarray,
    noise: str,
    seed: int,
    methods: list[str],
    n_classes: int,
    epochs: int,
) -> list[dict]:
    """Every method on one held-out pair, noise draw and seed; the chooser's pick from the candidates' fits."""
    y_noisy = y.copy()
    y_noisy[pool] = inject(y[pool], noise, n_classes, seed, embeddings=x[pool])
    tr_local, va_local = slide_split(list(slides[pool]), y_noisy[pool], 0.2, seed)  # as train.py splits
    train_idx, val_idx = pool[tr_local], pool[va_local]
    knn_k = min(TrainConfig().knn_k, max(3, len(train_idx) // 20))
    t = time.perf_counter()
    estimated = estimate_noise(x[pool], y_noisy[pool], n_classes, knn_k)
    noise_seconds = time.perf_counter() - t
    true_t = true_transition(y[pool], y_noisy[pool], n_classes)
    transitions = {"estimated": estimated.transition, "true": true_t}
    t_error = float(np.abs(estimated.transition - true_t).sum(1).mean())
    base = TrainConfig(seed=seed, epochs=epochs, knn_k=knn_k)
    records, scores = [], {}
    for name in methods:
        kind, head, loss, ensemble, which = METHODS[name]
        transition = transitions.get(which)
        config = dataclasses.replace(base, head=head, loss=loss, ensemble=ensemble)
        t = time.perf_counter()
        split = (x[train_idx], y_noisy[train_idx], slides[train_idx], x[val_idx], y_noisy[val_idx], n_classes)
        if kind == "forward":
            config = dataclasses.replace(config, method="standard", transition=tuple(map(tuple, transition)))
            if ensemble == "slides":  # exactly what training/train.py fits for this candidate
                result = fit_head(*split, config)
            else:
                result = train_head(split[0], split[1], split[3], split[4], n_classes, config)
        elif kind in TRANSITION_METHODS:
            result = fit_transition(kind, *split, config, transition)
        else:
            result = fit_head(*split, dataclasses.replace(config, method=kind))
        seconds = time.perf_counter() - t + (noise_seconds if which == "estimated" else 0.0)
        with torch.no_grad():
            probs = torch.softmax(result.model(torch.from_numpy(x[test_idx])), 1).numpy()
        record = {
            "method": name,
            "test_accuracy": float((probs.argmax(1) == y[test_idx]).mean()),
            "test_ece": expected_calibration_error(probs, y[test_idx]),
            "seconds": round(seconds, 2),
            "_probs": probs,
        }
        if kind in ("knn_clean", "transition_clean"):
            record["train_label_accuracy"] = float((result.train_labels == y[train_idx]).mean())
        if name in CANDIDATE_ROWS.values():
            scores[kind] = cross_slide_fit(
                result, x[train_idx], y_noisy[train_idx], slides[train_idx], estimated.transition
            )
            record["cross_slide"] = scores[kind]
        records.append(record)
    common = {
        "noise": noise,
        "seed": seed,
        "flipped": float((y_noisy[pool] != y[pool]).mean()),
        **estimated.describe(),
        "transition_l1_error": t_error,
        "estimated_transition": np.round(estimated.transition, 4).tolist(),
        "true_noise_rate": float((y_noisy[pool] != y[pool]).mean()),
    }
    return [{**common, **r} for r in records]


def chosen_record(records: list[dict]) -> dict | None:
    """The default's row: :func:`choose_method` applied to the candidates' fits of one condition."""
    by_name = {r["method"]: r for r in records}
    if not all(row in by_name for row in CANDIDATE_ROWS.values()):
        return None
    first = by_name[CANDIDATE_ROWS["knn_clean"]]
    transition = np.array(first["estimated_transition"])
    noise = NoiseModel(transition, first["estimated_noise_rate"], first["transition_condition_number"])
    scores = {kind: by_name[row]["cross_slide"] for kind, row in CANDIDATE_ROWS.items()}
    chosen, reason = choose_method(noise, scores)
    seconds = sum(by_name[row]["seconds"] for row in CANDIDATE_ROWS.values())
    return {
        **by_name[CANDIDATE_ROWS[chosen]],
        "method": DEFAULT,
        "chosen": chosen,
        "reason": reason,
        "seconds": seconds,
    }


def _load_runs(stem: Path) -> list[dict]:
    """The runs of one condition measured before (every method kept beside the embedding cache)."""
    if not (stem.with_suffix(".json").is_file() and stem.with_suffix(".npz").is_file()):
        return []
    records = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz")) as arrays:
        for r in records:
            r["_probs"] = arrays[r["method"]]
    return records


def _save_runs(stem: Path, records: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{r["method"]: r["_probs"] for r in records})
    write_atomic(stem.with_suffix(".npz"), buffer.getvalue())
    write_atomic(
        stem.with_suffix(".json"), json.dumps([{k: v for k, v in r.items() if k != "_probs"} for r in records]) + "\n"
    )


def run_sweep(args: argparse.Namespace) -> dict:
    patches = load_patches(args.data, check_images=False)
    if args.per_class:  # tiny subset for tests: the first N tiles of each class and slide
        keep, seen = [], {}
        for i, (label, slide) in enumerate(zip(patches.labels, patches.slides, strict=True)):
            if seen.get((label, slide), 0) < args.per_class:
                seen[(label, slide)] = seen.get((label, slide), 0) + 1
                keep.append(i)
        patches = patches.subset(keep)
    classes = patches.classes
    y = np.array([classes.index(label) for label in patches.labels])
    slides = np.array(patches.slides)
    pairs = [p.split(",") for p in args.holdout_slides.split(";") if p]
    for pair in pairs:
        if not np.isin(slides, pair).any():
            raise SystemExit(f"error: no tiles of held-out slides {pair} in {args.data}")
    hashes = [file_sha256(p) for p in patches.paths]
    encoders = {k: v for k, v in ENCODERS.items() if k in args.encoders}
    for extra in args.extra_encoder:
        encoders[Path(extra).name] = (extra, False, CONTROL_METHODS)
    runs: list[dict] = []
    held: dict[str, int] = {}
    started = time.perf_counter()
    version = _source_hash()
    run_dir = (args.cache_dir or default_cache_dir()).parent / "noise-runs"
    for enc_label, (enc_name, random_init, wanted) in encoders.items():
        torch.manual_seed(0)
        encoder = build_encoder(enc_name, random_init=random_init)
        x, _ = embed_files(encoder, patches.paths, hashes, cache_dir=args.cache_dir)
        methods = list(METHODS) if wanted == "all" else list(wanted)
        jobs = [(p, n, s) for n in args.noise for p in pairs for s in range(args.seeds)]
        for pair, noise, seed in tqdm(jobs, desc=enc_label, unit="condition"):
            test = np.isin(slides, pair)
            test_idx, pool = np.flatnonzero(test), np.flatnonzero(~test)
            held[",".join(pair)] = len(test_idx)
            key = [str(Path(args.data).resolve()), args.per_class, enc_label, ",".join(pair), noise, seed]
            stem = run_dir / hashlib.sha256(json.dumps([*key, args.epochs, version]).encode()).hexdigest()[:16]
            records = _load_runs(stem)
            if missing := [m for m in methods if m not in {r["method"] for r in records}]:
                records += run_condition(x, y, slides, test_idx, pool, noise, seed, missing, len(classes), args.epochs)
                _save_runs(stem, records)
            records = [r for r in records if r["method"] != DEFAULT]
            if (chosen := chosen_record(records)) is not None:
                records.append(chosen)
            for r in records:
                r.update(encoder=enc_label, pair=",".join(pair), _labels=y[test_idx])
            runs.extend(records)
    return {
        "data": str(args.data),
        "classes": classes,
        "holdout_pairs": [",".join(p) for p in pairs],
        "n_test": held,
        "n_labelled": len(y),
        "seeds": args.seeds,
        "default": f"{DEFAULT}: training/train.py --method auto (training/transition.py choose_method)",
        "sweep_seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }


def finetune_baseline(args: argparse.Namespace, result: dict) -> list[dict]:
    """End-to-end fine-tuning of the ImageNet EfficientNet-Lite0 with CE on noisy labels (time-capped)."""
    from training.embed import Normalize, load_rgb_resized

    patches = load_patches(args.data, check_images=False)
    classes = patches.classes
    y = np.array([classes.index(label) for label in patches.labels])
    slides = np.array(patches.slides)
    test_slides = args.holdout_slides.split(";")[0].split(",")  # the first held-out pair
    test_idx = np.flatnonzero(np.isin(slides, test_slides))
    pool = np.flatnonzero(~np.isin(slides, test_slides))
    train_idx = pool[slide_split(list(slides[pool]), y[pool], 0.2, 0)[0]]
    size = 150  # native tile size: 2.2x cheaper than 224 on two cores
    images = {i: load_rgb_resized(patches.paths[i], size) for i in np.concatenate([train_idx, test_idx])}
    out = []
    for noise in args.finetune_noise:
        torch.manual_seed(0)
        encoder = build_encoder("efficientnet_lite0")
        net = torch.nn.Sequential(
            Normalize(encoder.spec.mean, encoder.spec.std),
            encoder.features,
            torch.nn.Linear(encoder.embedding_dim, len(classes)),
        )
        for p in net.parameters():
            p.requires_grad_(True)
        net.train()
        encoder.features.train(True)
        y_noisy = inject(y[train_idx], noise, len(classes), 0)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=1e-4)
        rng = np.random.default_rng(0)
        deadline = time.perf_counter() + 60 * args.finetune_minutes
        seen = epochs = 0
        while time.perf_counter() < deadline:
            order = rng.permutation(len(train_idx))
            for s in range(0, len(order), 32):
                batch = order[s : s + 32]
                xb = torch.from_numpy(np.stack([images[train_idx[i]] for i in batch]))
                loss = torch.nn.functional.cross_entropy(net(xb), torch.from_numpy(y_noisy[batch]).long())
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += len(batch)
                if time.perf_counter() > deadline:
                    break
            epochs += 1
        net.eval()
        with torch.no_grad():
            pred = np.concatenate(
                [
                    net(torch.from_numpy(np.stack([images[i] for i in test_idx[s : s + 64]]))).argmax(1).numpy()
                    for s in range(0, len(test_idx), 64)
                ]
            )
        acc = float((pred == y[test_idx]).mean())
        out.append(
            {
                "noise": noise,
                "test_accuracy": acc,
                "images_seen": seen,
                "epochs": round(seen / len(train_idx), 2),
                "minutes": args.finetune_minutes,
            }
        )
        print(f"fine-tune {noise}: {acc:.3f} after {seen / len(train_idx):.1f} epochs", flush=True)
    return out


def summarise(result: dict) -> list[dict]:
    """Per (encoder, method, noise): per pair (mean over seeds) and pooled (all pairs' tiles per seed)."""
    groups: dict[tuple, list] = {}
    for r in result["runs"]:
        groups.setdefault((r["encoder"], r["method"], r["noise"]), []).append(r)
    table = []
    for (enc, method, noise), rs in groups.items():
        seeds = sorted({r["seed"] for r in rs})
        pooled_acc, pooled_ece = [], []
        for seed in seeds:
            mine = [r for r in rs if r["seed"] == seed]
            probs = np.concatenate([r["_probs"] for r in mine])
            labels = np.concatenate([r["_labels"] for r in mine])
            pooled_acc.append(float((probs.argmax(1) == labels).mean()))
            pooled_ece.append(expected_calibration_error(probs, labels))
        row = {
            "encoder": enc,
            "method": method,
            "noise": noise,
            "pooled_accuracy": pooled_acc,
            "mean": float(np.mean(pooled_acc)),
            "std": float(np.std(pooled_acc)),
            "ece_mean": float(np.mean(pooled_ece)),
            "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
            "per_pair": {
                pair: float(np.mean([r["test_accuracy"] for r in rs if r["pair"] == pair]))
                for pair in result["holdout_pairs"]
            },
            "per_pair_ece": {
                pair: float(np.mean([r["test_ece"] for r in rs if r["pair"] == pair]))
                for pair in result["holdout_pairs"]
            },
            "estimated_noise_rate": float(np.mean([r["estimated_noise_rate"] for r in rs])),
            "true_noise_rate": float(np.mean([r["true_noise_rate"] for r in rs])),
            "transition_l1_error": float(np.mean([r["transition_l1_error"] for r in rs])),
            "condition_number": float(np.median([r["transition_condition_number"] for r in rs])),
            "n": len(rs),
        }
        if method != DEFAULT and all("train_label_accuracy" in r for r in rs):
            row["train_label_accuracy"] = float(np.mean([r["train_label_accuracy"] for r in rs]))
        if "chosen" in rs[0]:
            row["chosen"] = {c: sum(r["chosen"] == c for r in rs) for c in CANDIDATES}
        table.append(row)
    return table


TARGETS = {"uniform:0.4": 2, "uniform:0.6": 2, "uniform:0.8": 10, "asym:0.4": 4, "instance:0.4": 5}


def drops(table: list[dict], encoder: str, method: str) -> dict[str, float]:
    """Pooled accuracy points lost from clean labels, per noise (mean over seeds of the per-seed drop)."""
    cells = {r["noise"]: r for r in table if r["encoder"] == encoder and r["method"] == method}
    if "none" not in cells:
        return {}
    clean = np.array(cells["none"]["pooled_accuracy"])
    return {
        n: float(100 * np.mean(clean - np.array(r["pooled_accuracy"])))
        for n, r in cells.items()
        if n != "none" and len(r["pooled_accuracy"]) == len(clean)
    }


def write_markdown(result: dict, table: list[dict], path: Path) -> None:
    noises = result["noise_levels"]
    pairs = result["holdout_pairs"]
    short = {p: "/".join(s.rsplit("-", 1)[-1] for s in p.split(",")) for p in pairs}
    cells = {(r["encoder"], r["method"], r["noise"]): r for r in table}
    rows = list(dict.fromkeys((r["encoder"], r["method"]) for r in table))
    main_enc = rows[0][0]
    fit_seconds = sum(r["seconds"] for r in result["runs"] if r["method"] != DEFAULT)

    def name(method: str) -> str:
        return f"**{method}**" if method == DEFAULT else method

    def grid(fmt) -> list[str]:
        out = ["| encoder | method | " + " | ".join(noises) + " |", "|---|---|" + "---|" * len(noises)]
        for enc, method in rows:
            vals = [fmt(cells[(enc, method, n)]) if (enc, method, n) in cells else "" for n in noises]
            out.append(f"| {enc} | {name(method)} | " + " | ".join(vals) + " |")
        return out

    lines = [
        "# Noise-resilience benchmark (generated by `benchmarks/noise.py`)",
        "",
        f"Data: `{result['data']}` ({result['n_labelled']} tiles). Held-out slide pairs, each in turn (clean labels): "
        + ", ".join(f"{short[p]} (n={result['n_test'][p]})" for p in pairs)
        + f"; the other slides are train + noisy validation (split by slide as `training/train.py` splits). "
        f"Noise on train + validation labels only; {result['seeds']} seeds (noise draw, split, heads). "
        "**Pooled**: every pair's held-out tiles together, each predicted by the model it was held out from, "
        "one accuracy per seed, then mean ± std over seeds. "
        f"Default: {result['default']}. The fits took {fit_seconds:.0f} s "
        f"in all on {result['machine']} (this invocation: {result['sweep_seconds']:.0f} s; runs already measured "
        "are reused from the run cache).",
        "",
        "`estimated T`: the anchor-point transition (`training/calibration.py`), from the given labels and "
        "the embeddings only. `true T`: the transition the injected noise made, counted against the clean "
        "labels: a reference no real run has, which measures what the estimation error of T costs.",
        "",
        "## Accuracy on the held-out slides, pooled over the pairs (%)",
        "",
        *grid(lambda r: f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"),
        "",
        "## Drop from clean accuracy (points, pooled), against the targets of issue 22",
        "",
        "| method | " + " | ".join(TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
        "| target | " + " | ".join(f"≤ {v}" for v in TARGETS.values()) + " |",
    ]
    for enc, method in rows:
        if enc != main_enc:
            continue
        d = drops(table, enc, method)
        lines.append(f"| {name(method)} | " + " | ".join(f"{d[n]:.1f}" if n in d else "" for n in TARGETS) + " |")
    lines += [
        "",
        "## Expected calibration error on the held-out slides, pooled (15 bins, mean over seeds)",
        "",
        "Raw probabilities (temperature 1), clean test labels.",
        "",
        *grid(lambda r: f"{r['ece_mean']:.3f}"),
        "",
        "## Per held-out pair: accuracy (%), mean over seeds",
        "",
    ]
    for n in noises:
        lines += [
            f"**{n}**",
            "",
            "| method | " + " | ".join(short[p] for p in pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        for enc, method in rows:
            if enc == main_enc and (enc, method, n) in cells:
                r = cells[(enc, method, n)]
                lines.append(f"| {name(method)} | " + " | ".join(f"{100 * r['per_pair'][p]:.1f}" for p in pairs) + " |")
        lines.append("")
    lines += [
        "## Time per fit (s, mean over pairs, seeds and noise; contended CPU)",
        "",
        "| method | seconds |",
        "|---|---|",
    ]
    for enc, method in rows:
        if enc == main_enc:
            secs = [cells[(enc, method, n)]["seconds_mean"] for n in noises if (enc, method, n) in cells]
            lines.append(f"| {name(method)} | {np.mean(secs):.1f} |")
    lines += [
        "",
        "## The noise model each run estimated (no clean label), and the choice it led to",
        "",
        "| noise | injected rate | estimated rate | T error (mean row L1) | condition number of T (median) "
        "| train labels right: kNN-cleaned | transition-cleaned (estimated T) | transition-cleaned (true T) "
        f"| chosen: {' / '.join(CANDIDATES)} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in noises:
        d = cells.get((main_enc, DEFAULT, n))
        if d is None:
            continue
        acc = {
            m: cells.get((main_enc, m, n), {}).get("train_label_accuracy")
            for m in ("knn_clean (previous default)", "transition_clean, estimated T", "transition_clean, true T")
        }
        lines.append(
            f"| {n} | {d['true_noise_rate']:.3f} | {d['estimated_noise_rate']:.3f} | {d['transition_l1_error']:.3f} "
            f"| {d['condition_number']:.1f} | "
            + " | ".join(f"{100 * v:.1f} %" if v is not None else "" for v in acc.values())
            + f" | {' / '.join(str(d['chosen'][c]) for c in CANDIDATES)} |"
        )
    if result.get("finetune"):
        lines += [
            "",
            "## End-to-end fine-tuning baseline (ImageNet EfficientNet-Lite0, CE, 150 px, time-capped)",
            "",
            "| noise | test accuracy | epochs in cap |",
            "|---|---|---|",
        ]
        for r in result["finetune"]:
            lines.append(f"| {r['noise']} | {100 * r['test_accuracy']:.1f} | {r['epochs']} ({r['minutes']} min) |")
    write_atomic(path, "\n".join(lines) + "\n")


def plot(result: dict, table: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = result["noise_levels"]
    fig, ax = plt.subplots(figsize=(11, 5))
    rows = list(dict.fromkeys((r["encoder"], r["method"]) for r in table))
    main_enc = rows[0][0]
    cells = {(r["encoder"], r["method"], r["noise"]): r for r in table}
    for enc, method in rows:
        if enc != main_enc:
            continue
        pts = [cells.get((enc, method, n)) for n in noises]
        xs = [i for i, p in enumerate(pts) if p]
        ax.errorbar(
            xs,
            [100 * pts[i]["mean"] for i in xs],
            yerr=[100 * pts[i]["std"] for i in xs],
            lw=3 if method == DEFAULT else 1.2,
            ls="--" if "true T" in method else "-",
            marker="o",
            ms=3,
            capsize=2,
            label=method,
        )
    ax.set_xticks(range(len(noises)), noises)
    ax.set_xlabel("label noise on train + validation")
    ax.set_ylabel("accuracy on held-out slides, pooled over 3 pairs (%)")
    ax.set_title(f"{main_enc}: held-out slide pairs rotated, {result['seeds']} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kather2016"))
    p.add_argument("--holdout-slides", default=PAIRS, help="held-out slide pairs, ';' between pairs, ',' within")
    p.add_argument("--noise", nargs="+", default=NOISE)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    p.add_argument("--encoders", nargs="+", default=["imagenet-effnet-lite0-ms"], choices=list(ENCODERS))
    p.add_argument("--extra-encoder", action="append", default=[], help="e.g. a pretrain.py output folder")
    p.add_argument("--per-class", type=int, default=0, help="tiny subset: N tiles per class and slide (tests)")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache; measured runs go beside it")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--finetune-minutes", type=float, default=0, help="per noise rate; 0 skips the baseline")
    p.add_argument("--finetune-noise", nargs="+", default=["none", "uniform:0.4", "uniform:0.8"])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run_sweep(args)
    result["noise_levels"] = args.noise
    result["machine"] = f"{torch.get_num_threads()} CPU threads, shared with other jobs"
    if args.finetune_minutes > 0:
        result["finetune"] = finetune_baseline(args, result)
    table = summarise(result)
    result["table"] = table
    result["drops"] = {m: drops(table, table[0]["encoder"], m) for m in dict.fromkeys(r["method"] for r in table)}
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {**result, "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["runs"]]}
    write_atomic(args.out / "noise.json", json.dumps(saved, indent=1) + "\n")
    write_markdown(result, table, args.out / "noise.md")
    plot(result, table, args.out / "noise.png")
    print((args.out / "noise.md").read_text())
    return result


if __name__ == "__main__":
    main()
