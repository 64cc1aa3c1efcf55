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
from training.embed import embed_files
from training.encoders import build_encoder
from training.metrics import auroc
from training.noise import inject
from training.robust import TrainConfig, fit_head, knn_votes, train_head
from training.suspects import suspect_scores

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = ["none", "uniform:0.2", "uniform:0.4", "uniform:0.6", "uniform:0.8", "asym:0.2", "asym:0.4"]
# name -> (head, method, loss, ensemble); "default" is whatever training/train.py uses by default
METHODS = {
    "mlp+ce (paper)": ("mlp", "standard", "ce", "single"),
    "linear+ce": ("linear", "standard", "ce", "single"),
    "mlp+gce": ("mlp", "standard", "gce", "single"),
    "mlp+sce": ("mlp", "standard", "sce", "single"),
    "mlp+nce_rce": ("mlp", "standard", "nce_rce", "single"),
    "coteach+ce": ("mlp", "coteach", "ce", "single"),
    "mlp+knn_clean+gce": ("mlp", "knn_clean", "gce", "single"),
}
CONTROL_METHODS = ["mlp+ce (paper)", "linear+ce", "default"]
ONE_HEAD = "default, one head"  # the default without the slide ensemble: what the ensemble adds
# encoder label -> (registry name, random init?, which methods)
ENCODERS = {
    "imagenet-effnet-lite0-ms": ("efficientnet_lite0_ms", False, "all"),
    "imagenet-effnet-lite0": ("efficientnet_lite0", False, CONTROL_METHODS),
    "random-effnet-lite0-ms": ("efficientnet_lite0_ms", True, CONTROL_METHODS),
}


def default_method() -> tuple[str, str, str, str]:
    d = TrainConfig()
    return d.head, d.method, d.loss, d.ensemble  # with TrainConfig's other defaults (k, margin, epochs)


def all_methods() -> dict[str, tuple[str, str, str, str]]:
    head, method, loss, _ = default_method()
    return {**METHODS, ONE_HEAD: (head, method, loss, "single"), "default": default_method()}


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
    test = np.isin(slides, args.test_slides)
    if not test.any():
        raise SystemExit(f"error: no tiles of test slides {args.test_slides} in {args.data}")
    pool = np.flatnonzero(~test)
    tr_local, va_local = slide_split(list(slides[pool]), y[pool], 0.2, seed=0)
    train_idx, val_idx, test_idx = pool[tr_local], pool[va_local], np.flatnonzero(test)
    hashes = [file_sha256(p) for p in patches.paths]

    encoders = {k: v for k, v in ENCODERS.items() if k in args.encoders}
    for extra in args.extra_encoder:
        encoders[Path(extra).name] = (extra, False, CONTROL_METHODS)
    methods = all_methods()
    runs: list[dict] = []
    started = time.perf_counter()
    for enc_label, (enc_name, random_init, wanted) in encoders.items():
        torch.manual_seed(0)
        encoder = build_encoder(enc_name, random_init=random_init)
        x, _ = embed_files(encoder, patches.paths, hashes, cache_dir=args.cache_dir)
        names = list(methods) if wanted == "all" else wanted
        jobs = [(m, n, s) for n in args.noise for m in names for s in range(args.seeds)]
        for method_name, noise, seed in tqdm(jobs, desc=enc_label, unit="run"):
            head, method, loss, ensemble = methods[method_name]
            y_noisy = y.copy()
            y_noisy[pool] = inject(y[pool], noise, len(classes), seed)
            config = TrainConfig(
                head=head,
                method=method,
                loss=loss,
                ensemble=ensemble,
                seed=seed,
                epochs=args.epochs,
                knn_k=min(TrainConfig().knn_k, max(3, len(train_idx) // 20)),
            )
            t = time.perf_counter()
            split = (x[train_idx], y_noisy[train_idx])
            if ensemble == "slides":  # exactly what training/train.py fits
                result = fit_head(*split, slides[train_idx], x[val_idx], y_noisy[val_idx], len(classes), config)
            else:  # one head, with per-epoch accuracies to compare noisy- and clean-label model selection
                monitor = {"clean_val": (x[val_idx], y[val_idx]), "test": (x[test_idx], y[test_idx])}
                result = train_head(*split, x[val_idx], y_noisy[val_idx], len(classes), config, monitor=monitor)
            with torch.no_grad():
                probs = torch.softmax(result.model(torch.from_numpy(x)), 1).numpy()
            record = {
                "encoder": enc_label,
                "method": method_name,
                "noise": noise,
                "seed": seed,
                "test_accuracy": float((probs[test_idx].argmax(1) == y[test_idx]).mean()),
                "test_ece": expected_calibration_error(probs[test_idx], y[test_idx]),
                "test_accuracy_clean_selected": None,
                "best_epoch": result.best_epoch,
                "seconds": round(time.perf_counter() - t, 2),
            }
            if result.history:
                best = result.history[result.best_epoch - 1]
                assert abs(best["test"] - record["test_accuracy"]) < 1e-6
                record["test_accuracy_clean_selected"] = max(result.history, key=lambda h: h["clean_val"])["test"]
            if noise != "none" and method_name == "default":
                flipped = (y_noisy != y)[train_idx]
                votes = knn_votes(x[train_idx], y_noisy[train_idx], len(classes), config.knn_k)
                rows = np.arange(len(train_idx))
                given = y_noisy[train_idx]
                scores = suspect_scores(votes[rows, given], probs[train_idx][rows, given])
                top = np.argsort(-scores)[: int(flipped.sum())]
                record["suspects_auroc"] = auroc(scores, flipped)
                record["suspects_precision_at_n"] = float(flipped[top].mean())
            runs.append(record)
    sweep_seconds = time.perf_counter() - started
    return {
        "data": str(args.data),
        "classes": classes,
        "test_slides": args.test_slides,
        "val_slides": sorted(set(slides[val_idx])),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(test_idx),
        "seeds": args.seeds,
        "default": "+".join(default_method()[:3])
        + f" (k={TrainConfig().knn_k}, margin={TrainConfig().clean_margin}, ensemble={TrainConfig().ensemble})",
        "sweep_seconds": round(sweep_seconds, 1),
        "runs": runs,
    }


def finetune_baseline(args: argparse.Namespace, result: dict) -> list[dict]:
    """End-to-end fine-tuning of the ImageNet EfficientNet-Lite0 with CE on noisy labels (time-capped)."""
    from training.embed import Normalize, load_rgb_resized

    patches = load_patches(args.data, check_images=False)
    classes = patches.classes
    y = np.array([classes.index(label) for label in patches.labels])
    slides = np.array(patches.slides)
    test_idx = np.flatnonzero(np.isin(slides, args.test_slides))
    train_idx = np.flatnonzero(~np.isin(slides, args.test_slides + result["val_slides"]))
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
    rows: dict[tuple, list] = {}
    for r in result["runs"]:
        rows.setdefault((r["encoder"], r["method"], r["noise"]), []).append(r)
    table = []
    for (enc, method, noise), rs in rows.items():
        acc = np.array([r["test_accuracy"] for r in rs])
        oracle = [r["test_accuracy_clean_selected"] for r in rs]
        row = {
            "encoder": enc,
            "method": method,
            "noise": noise,
            "mean": float(acc.mean()),
            "std": float(acc.std()),
            "ece_mean": float(np.mean([r["test_ece"] for r in rs])),
            "clean_selected_mean": float(np.mean(oracle)) if None not in oracle else None,
            "n": len(rs),
        }
        if "suspects_auroc" in rs[0]:
            row["suspects_auroc"] = float(np.mean([r["suspects_auroc"] for r in rs]))
            row["suspects_precision_at_n"] = float(np.mean([r["suspects_precision_at_n"] for r in rs]))
        table.append(row)
    return table


def write_markdown(result: dict, table: list[dict], path: Path) -> None:
    noises = result["noise_levels"]
    lines = [
        "# Noise-resilience benchmark (generated by `benchmarks/noise.py`)",
        "",
        f"Data: `{result['data']}`; test slides {', '.join(result['test_slides'])} "
        f"(clean labels, n={result['n_test']}); train n={result['n_train']}, "
        f"noisy-validation slides {', '.join(result['val_slides'])} (n={result['n_val']}). "
        f"Accuracy on the held-out slides, mean ± std over {result['seeds']} seeds; noise on train+val labels only. "
        f"Default of `training/train.py`: `{result['default']}`. Sweep time: {result['sweep_seconds']:.0f} s "
        f"on {result.get('machine', 'this machine')}.",
        "",
        "| encoder | method | " + " | ".join(noises) + " |",
        "|---|---|" + "---|" * len(noises),
    ]
    cells = {(r["encoder"], r["method"], r["noise"]): r for r in table}
    for enc, method in dict.fromkeys((r["encoder"], r["method"]) for r in table):
        vals = []
        for n in noises:
            r = cells.get((enc, method, n))
            vals.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" if r else "")
        name = f"**{method}**" if method == "default" else method
        lines.append(f"| {enc} | {name} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "## Calibration on the held-out slides: expected calibration error (15 bins), mean over seeds",
        "",
        "Raw probabilities (temperature 1), clean test labels. The slide ensemble is what the default adds to "
        f"`{ONE_HEAD}`.",
        "",
        "| encoder | method | " + " | ".join(noises) + " |",
        "|---|---|" + "---|" * len(noises),
    ]
    for enc, method in dict.fromkeys((r["encoder"], r["method"]) for r in table):
        vals = [f"{cells[(enc, method, n)]['ece_mean']:.3f}" if (enc, method, n) in cells else "" for n in noises]
        name = f"**{method}**" if method == "default" else method
        lines.append(f"| {enc} | {name} | " + " | ".join(vals) + " |")
    lines += [
        "",
        f"## Model selection on noisy vs clean validation labels (`{ONE_HEAD}`, per-epoch)",
        "",
        "| encoder | noise | selected on noisy val | selected on clean val | gap |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        if r["method"] == ONE_HEAD and r["clean_selected_mean"] is not None:
            gap = 100 * (r["clean_selected_mean"] - r["mean"])
            lines.append(
                f"| {r['encoder']} | {r['noise']} | {100 * r['mean']:.1f} | "
                f"{100 * r['clean_selected_mean']:.1f} | {gap:+.1f} |"
            )
    lines += [
        "",
        "## Suspected-mislabel ranking (default method, training tiles)",
        "",
        "| encoder | noise | AUROC vs true flips | precision at n flipped |",
        "|---|---|---|---|",
    ]
    for r in table:
        if "suspects_auroc" in r:
            lines.append(
                f"| {r['encoder']} | {r['noise']} | {r['suspects_auroc']:.3f} | {r['suspects_precision_at_n']:.3f} |"
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

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [5, 2]})
    for ax, kind in zip(axes, ("uniform", "asym"), strict=True):
        levels = [n for n in result["noise_levels"] if n == "none" or n.startswith(kind)]
        rates = [0.0 if n == "none" else float(n.split(":")[1]) for n in levels]
        for enc, method in dict.fromkeys((r["encoder"], r["method"]) for r in table):
            pts = [
                next((r for r in table if (r["encoder"], r["method"], r["noise"]) == (enc, method, n)), None)
                for n in levels
            ]
            if any(p is None for p in pts):
                continue
            style = "-" if enc.startswith("imagenet-effnet-lite0-ms") else ("--" if "random" not in enc else ":")
            width = 3 if method == "default" else 1.2
            ax.errorbar(
                rates,
                [100 * p["mean"] for p in pts],
                yerr=[100 * p["std"] for p in pts],
                ls=style,
                lw=width,
                marker="o",
                ms=3,
                capsize=2,
                label=f"{enc} · {method}",
            )
        ax.set_xlabel(f"{kind} label-noise rate (train + val)")
        ax.set_ylabel("accuracy on held-out slides (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("uniform noise")
    axes[1].set_title("asymmetric noise (c → c+1)")
    axes[0].legend(fontsize=6.5, ncol=2, loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kather2016"))
    p.add_argument("--test-slides", nargs="+", default=["CRC-Prim-HE-01", "CRC-Prim-HE-07"])
    p.add_argument("--noise", nargs="+", default=NOISE)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    p.add_argument("--extra-encoder", action="append", default=[], help="e.g. a pretrain.py output folder")
    p.add_argument("--per-class", type=int, default=0, help="tiny subset: N tiles per class and slide (tests)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--finetune-minutes", type=float, default=0, help="per noise rate; 0 skips the baseline")
    p.add_argument("--finetune-noise", nargs="+", default=["none", "uniform:0.4", "uniform:0.8"])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run_sweep(args)
    result["noise_levels"] = args.noise
    result["machine"] = f"{torch.get_num_threads()} CPU threads"
    if args.finetune_minutes > 0:
        result["finetune"] = finetune_baseline(args, result)
    table = summarise(result)
    result["table"] = table
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "noise.json", json.dumps(result, indent=1) + "\n")
    write_markdown(result, table, args.out / "noise.md")
    plot(result, table, args.out / "noise.png")
    print((args.out / "noise.md").read_text())
    return result


if __name__ == "__main__":
    main()
