"""Can the served confidences be trusted? Calibration, abstention and OOD flags on held-out slides.

    python benchmarks/confidence.py --data ../shared/data/kather2016 [--noise uniform:0.4]

Trains with ``training/train.py`` (noise injected into training labels, two slides held out),
then measures the *served* model through ``service.runtime.Runtime`` (onnxruntime, as in
production) on the held-out slides: expected calibration error before/after calibration,
selective accuracy and coverage at the stored abstention threshold, and OOD AUROC between
held-out H&E tiles and non-H&E images (scikit-image's IHC image and natural photographs,
blurred and pen-marked H&E tiles generated here). Each of ``--seeds`` runs draws its own noise
and trains its own model. Also reported: the ECE a temperature fitted on the clean test labels
themselves reaches (what no label-free calibration can beat), and the ECE a perfectly calibrated
model would show on this many tiles (the binned estimator's bias). Writes
``benchmarks/results/confidence.{md,json}`` and ``confidence.png`` (reliability diagrams, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.card import write_atomic
from service.runtime import Runtime
from training import train
from training.calibration import ece_floor, expected_calibration_error, fit_temperature, reliability_diagram, softmax
from training.data import load_patches
from training.metrics import auroc

RESULTS = Path(__file__).resolve().parent / "results"
NATURAL = [
    "ihc.png",
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "retina.jpg",
    "motorcycle_left.png",
    "color.png",
    "hubble_deep_field.jpg",
    "brick.png",
    "grass.png",
    "gravel.png",
]


def pixels(images: list[Image.Image], size: int) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB").resize((size, size), Image.BILINEAR)) for i in images])


def ood_sets(tiles: list[Path], seed: int) -> dict[str, list[Image.Image]]:
    """Non-H&E images: scikit-image photos and IHC (random crops), blurred and pen-marked H&E tiles."""
    import skimage

    rng = np.random.default_rng(seed)
    data = Path(skimage.__file__).parent / "data"
    natural, ihc = [], []
    for name in NATURAL:
        image = Image.open(data / name).convert("RGB")
        w, h = image.size
        for _ in range(8):
            side = int(min(w, h) * rng.uniform(0.3, 0.8))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            (ihc if name == "ihc.png" else natural).append(image.crop((x0, y0, x0 + side, y0 + side)))
    picked = [tiles[i] for i in rng.choice(len(tiles), size=min(200, len(tiles)), replace=False)]
    blurred = [Image.open(p).convert("RGB").filter(ImageFilter.GaussianBlur(4)) for p in picked[:100]]
    pen = []
    for p in picked[100:200]:
        image = Image.open(p).convert("RGB")
        draw = ImageDraw.Draw(image)
        colour = [(20, 40, 160), (20, 120, 40), (10, 10, 10)][int(rng.integers(3))]
        for _ in range(3):
            a, b = tuple(map(int, rng.integers(0, image.width, 2))), tuple(map(int, rng.integers(0, image.width, 2)))
            draw.line([a, b], fill=colour, width=int(rng.integers(12, 30)))
        pen.append(image)
    return {"ihc": ihc, "natural photographs": natural, "blurred H&E": blurred, "pen-marked H&E": pen}


def measure(args: argparse.Namespace, seed: int, model_dir: Path, picture: Path | None) -> dict:
    """Train at ``seed`` (noise draw, split, heads), then measure the served model on the held-out slides."""
    report = train.main(
        [
            "--data",
            args.data,
            "--out",
            str(model_dir),
            "--holdout-slides",
            args.holdout_slides,
            "--inject-noise",
            args.noise,
            "--seed",
            str(seed),
            "--mpp",
            "0.495",
        ]
    )
    runtime = Runtime(model_dir)
    card = runtime.card
    held = set(args.holdout_slides.split(","))
    patches = load_patches(args.data, check_images=False)
    idx = [i for i, s in enumerate(patches.slides) if s in held]
    tiles = [patches.paths[i] for i in idx]
    y = np.array([card.classes.index(patches.labels[i]) for i in idx])
    size = card.input_size
    preds = [
        runtime.predict(pixels([Image.open(t) for t in tiles[s : s + 64]], size)) for s in range(0, len(tiles), 64)
    ]
    probs = np.concatenate([q.probabilities for q in preds])
    ind_scores = np.concatenate([q.ood_scores for q in preds])
    # undo the in-graph temperature to recover the uncalibrated probabilities (and logits up to a shift)
    t = card.calibration.temperature
    z = np.log(np.clip(probs, 1e-12, 1)) * t
    raw = softmax(z)
    kept = probs.max(1) >= runtime.abstain_threshold
    oracle_t = fit_temperature(z, y)
    floor_mean, floor_p95 = ece_floor(probs.max(1))
    test_conf = report["confidence"]["test"]
    result = {
        "seed": seed,
        "n_test": len(y),
        "head_members": card.head.members,
        "temperature": t,
        "calibration": card.calibration.method,
        "accuracy": float((probs.argmax(1) == y).mean()),
        "ece_before": expected_calibration_error(raw, y),
        "ece_after": expected_calibration_error(probs, y),
        "ece_naive_temperature": test_conf["ece_naive_temperature"],
        "ece_cleaned_temperature": test_conf["ece_cleaned_temperature"],
        "ece_transition_temperature": test_conf["ece_transition_temperature"],
        "oracle_temperature": oracle_t,
        "ece_oracle_temperature": expected_calibration_error(softmax(z, oracle_t), y),
        "ece_floor_mean": floor_mean,
        "ece_floor_p95": floor_p95,
        "abstain_threshold": runtime.abstain_threshold,
        "selective_accuracy": float((probs.argmax(1) == y)[kept].mean()) if kept.any() else None,
        "coverage": float(kept.mean()),
        "ood_threshold": runtime.ood_threshold,
        "in_distribution_flagged": float((ind_scores > runtime.ood_threshold).mean()),
        "ood": {},
    }
    all_ood = []
    for name, images in ood_sets(tiles, seed).items():
        scores = np.concatenate(
            [runtime.predict(pixels(images[s : s + 64], size)).ood_scores for s in range(0, len(images), 64)]
        )
        all_ood.append(scores)
        labels = np.r_[np.zeros(len(ind_scores)), np.ones(len(scores))]
        result["ood"][name] = {
            "n": len(scores),
            "auroc": auroc(np.r_[ind_scores, scores], labels),
            "flagged": float((scores > runtime.ood_threshold).mean()),
        }
    every = np.concatenate(all_ood)
    result["ood"]["all non-H&E"] = {
        "n": len(every),
        "auroc": auroc(np.r_[ind_scores, every], np.r_[np.zeros(len(ind_scores)), np.ones(len(every))]),
        "flagged": float((every > runtime.ood_threshold).mean()),
    }
    if picture is not None:
        reliability_diagram(
            picture,
            {
                f"served (calibration {card.calibration.method!r}, temperature {t:.2f})": (probs, y),
                f"oracle temperature {oracle_t:.2f} (fitted on the test labels)": (softmax(z, oracle_t), y),
            },
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kather2016"))
    p.add_argument("--holdout-slides", default="CRC-Prim-HE-01,CRC-Prim-HE-07")
    p.add_argument("--noise", default="uniform:0.4")
    p.add_argument("--seeds", type=int, default=3, help="noise draws / training seeds (0..N-1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="confidence", help="stem of the result files (e.g. for other held-out slides)")
    p.add_argument("--model-dir", type=Path, default=None, help="keep the seed-0 model here (default: temp)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            model_dir = args.model_dir if (args.model_dir and seed == 0) else Path(tmp) / f"model-{seed}"
            runs.append(measure(args, seed, model_dir, args.out / f"{args.name}.png" if seed == 0 else None))
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    mean = {k: float(np.mean([r[k] for r in runs if r[k] is not None])) for k in keys}
    result = {
        "data": args.data,
        "holdout_slides": sorted(args.holdout_slides.split(",")),
        "noise": args.noise,
        "seeds": args.seeds,
        "mean": mean,
        "ood_auroc_all_mean": float(np.mean([r["ood"]["all non-H&E"]["auroc"] for r in runs])),
        "runs": runs,
    }
    first = runs[0]

    def row(name: str, key: str, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
        cells = [fmt.format(scale * r[key]) if r[key] is not None else "-" for r in runs]
        return f"| {name} | " + " | ".join(cells) + f" | {fmt.format(scale * mean[key])} |"

    lines = [
        "# Confidence benchmark (generated by `benchmarks/confidence.py`)",
        "",
        f"Training labels with `{args.noise}` noise (one draw per seed); measured on held-out slides "
        f"{', '.join(result['holdout_slides'])} (n={first['n_test']}, clean labels) through onnxruntime, as served. "
        f"Head: slide ensemble of {first['head_members']} linear heads (the default). ECE: 15 equal-width bins.",
        "",
        "| measure | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean |",
        "|---|" + "---|" * (len(runs) + 1),
        row("accuracy (%)", "accuracy", "{:.1f}", 100),
        row(f"**ECE as served** (calibration `{first['calibration']}`)", "ece_after"),
        row("ECE, temperature fitted on kNN-cleaned validation labels", "ece_cleaned_temperature"),
        row("ECE, temperature fitted through the estimated noise transition", "ece_transition_temperature"),
        row("ECE, naive temperature fitted on the noisy labels", "ece_naive_temperature"),
        row("ECE, *oracle* temperature fitted on the clean test labels", "ece_oracle_temperature"),
        row("ECE a perfectly calibrated model would show here (mean)", "ece_floor_mean"),
        row("same, 95th percentile", "ece_floor_p95"),
        row("abstention threshold (target 90 % selective accuracy)", "abstain_threshold"),
        row("selective accuracy at threshold (%)", "selective_accuracy", "{:.1f}", 100),
        row("coverage at threshold (%)", "coverage", "{:.1f}", 100),
        row("OOD threshold", "ood_threshold", "{:.2f}"),
        row("held-out H&E tiles flagged OOD (%)", "in_distribution_flagged", "{:.1f}", 100),
        "",
        "| out-of-distribution set | n | AUROC vs held-out H&E (mean over seeds) | flagged at threshold |",
        "|---|---|---|---|",
    ]
    for name in first["ood"]:
        auc = np.mean([r["ood"][name]["auroc"] for r in runs])
        flagged = np.mean([r["ood"][name]["flagged"] for r in runs])
        lines.append(f"| {name} | {first['ood'][name]['n']} | {auc:.3f} | {100 * flagged:.1f} % |")
    write_atomic(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
