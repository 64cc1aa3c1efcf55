"""Can the served confidences be trusted? Calibration, abstention and OOD flags on held-out slides.

    python benchmarks/confidence.py --data ../shared/data/kather2016 [--noise uniform:0.4]

Trains with ``training/train.py`` (noise injected into training labels, two slides held out),
then measures the *served* model through ``service.runtime.Runtime`` (onnxruntime, as in
production) on the held-out slides: expected calibration error before/after calibration,
selective accuracy and coverage at the stored abstention threshold, and OOD AUROC between
held-out H&E tiles and non-H&E images (scikit-image's IHC image and natural photographs,
blurred and pen-marked H&E tiles generated here). Writes ``benchmarks/results/confidence.{md,json}``
and ``confidence.png`` (reliability diagrams).
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
from training.calibration import expected_calibration_error, reliability_diagram
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kather2016"))
    p.add_argument("--holdout-slides", default="CRC-Prim-HE-01,CRC-Prim-HE-07")
    p.add_argument("--noise", default="uniform:0.4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--model-dir", type=Path, default=None, help="keep the trained model here (default: temp)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
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
                str(args.seed),
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
        # undo the in-graph temperature to recover the uncalibrated probabilities
        t = card.calibration.temperature
        z = np.log(np.clip(probs, 1e-12, 1)) * t
        raw = np.exp(z - z.max(1, keepdims=True))
        raw /= raw.sum(1, keepdims=True)
        kept = probs.max(1) >= runtime.abstain_threshold
        result = {
            "data": args.data,
            "holdout_slides": sorted(held),
            "noise": args.noise,
            "n_test": len(y),
            "temperature": t,
            "accuracy": float((probs.argmax(1) == y).mean()),
            "ece_before": expected_calibration_error(raw, y),
            "ece_after": expected_calibration_error(probs, y),
            "ece_naive_temperature": report["confidence"]["test"]["ece_naive_temperature"],
            "ece_cleaned_temperature": report["confidence"]["test"]["ece_cleaned_temperature"],
            "ece_transition_temperature": report["confidence"]["test"]["ece_transition_temperature"],
            "abstain_threshold": runtime.abstain_threshold,
            "selective_accuracy": float((probs.argmax(1) == y)[kept].mean()) if kept.any() else None,
            "coverage": float(kept.mean()),
            "ood_threshold": runtime.ood_threshold,
            "in_distribution_flagged": float((ind_scores > runtime.ood_threshold).mean()),
            "ood": {},
        }
        all_ood = []
        for name, images in ood_sets(tiles, args.seed).items():
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
        args.out.mkdir(parents=True, exist_ok=True)
        reliability_diagram(
            args.out / "confidence.png", {"served, before calibration": (raw, y), "served, calibrated": (probs, y)}
        )
    lines = [
        "# Confidence benchmark (generated by `benchmarks/confidence.py`)",
        "",
        f"Training labels with `{args.noise}` noise; measured on held-out slides {', '.join(sorted(held))} "
        f"(n={len(y)}, clean labels) through onnxruntime, as served.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| accuracy | {100 * result['accuracy']:.1f} % |",
        f"| ECE of the raw head (temperature 1) | {result['ece_before']:.3f} |",
        f"| ECE as served (temperature {t:.2f}, `--calibration` of the run) | {result['ece_after']:.3f} |",
        f"| ECE, temperature fitted on kNN-cleaned labels | {result['ece_cleaned_temperature']:.3f} |",
        f"| ECE, temperature fitted through the estimated noise transition | "
        f"{result['ece_transition_temperature']:.3f} |",
        f"| ECE, naive temperature fitted on the noisy labels | {result['ece_naive_temperature']:.3f} |",
        f"| abstention threshold (target 90 % selective accuracy) | {result['abstain_threshold']:.3f} |",
        f"| selective accuracy at threshold | {100 * (result['selective_accuracy'] or 0):.1f} % |",
        f"| coverage at threshold | {100 * result['coverage']:.1f} % |",
        f"| OOD threshold / in-distribution tiles flagged | {result['ood_threshold']:.2f} / "
        f"{100 * result['in_distribution_flagged']:.1f} % |",
        "",
        "| out-of-distribution set | n | AUROC vs held-out H&E | flagged at threshold |",
        "|---|---|---|---|",
    ]
    for name, r in result["ood"].items():
        lines.append(f"| {name} | {r['n']} | {r['auroc']:.3f} | {100 * r['flagged']:.1f} % |")
    write_atomic(args.out / "confidence.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out / "confidence.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
