"""Can the served confidences be trusted? Calibration, abstention and OOD flags on held-out slides.

    python benchmarks/confidence.py --data ../shared/data/kather2016 [--noise uniform:0.4] [--seeds 5]

For each held-out slide pair (default: three pairs, each slide held out once, slide 06 never since
it holds every empty-background tile) and each of ``--seeds`` noise draws, trains with
``training/train.py`` (noise injected into the training labels only), then measures the *served*
model through ``service.runtime.Runtime`` (onnxruntime, as in production) on the held-out slides:
expected calibration error (ECE) of the served probabilities and of the other calibrations the run
reports, selective accuracy and coverage at the stored abstention threshold, and OOD AUROC between
held-out H&E tiles and non-H&E images (scikit-image's IHC image and natural photographs, blurred and
pen-marked H&E tiles generated here). And which classes do not transfer: the held-out slides' confusions
(a class mostly predicted as another), against the ones ``training/train.py`` warned about from its
cross-slide predictions without clean labels (``training/slide_shift.py``).

ECE is given per pair and pooled over the pairs (every slide held out once, about 3,000 tiles per
seed). References beside it: the ECE of the temperature fitted on the *clean* labels of the same
cross-slide predictions (the best any temperature learned on the training slides can do), of a
temperature fitted on the clean test labels themselves (what no calibration learned elsewhere can
beat), and of a *perfectly* calibrated model on this many tiles (the binned estimator's own bias).
Writes ``benchmarks/results/confidence.{md,json}`` and ``confidence.png`` (reliability diagrams);
``--name`` changes the stem, ``--encoder`` the encoder trained (default: ``training/train.py``'s).
"""

from __future__ import annotations

import argparse
import hashlib
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
from training.embed import default_cache_dir
from training.metrics import auroc
from training.slide_shift import slide_disagreements

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
    half = len(picked) // 2
    blurred = [Image.open(p).convert("RGB").filter(ImageFilter.GaussianBlur(4)) for p in picked[:half]]
    pen = []
    for p in picked[half:]:
        image = Image.open(p).convert("RGB")
        draw = ImageDraw.Draw(image)
        colour = [(20, 40, 160), (20, 120, 40), (10, 10, 10)][int(rng.integers(3))]
        for _ in range(3):
            a, b = tuple(map(int, rng.integers(0, image.width, 2))), tuple(map(int, rng.integers(0, image.width, 2)))
            draw.line([a, b], fill=colour, width=int(rng.integers(12, 30)))
        pen.append(image)
    return {"ihc": ihc, "natural photographs": natural, "blurred H&E": blurred, "pen-marked H&E": pen}


def measure_once(args: argparse.Namespace, holdout: str, seed: int, model_dir: Path) -> dict:
    """:func:`measure`, each run kept beside the embedding cache (``confidence-runs/``).

    A rerun, after a crash or with more seeds, reuses every run already measured with the same data,
    encoder, noise, pair and seed by the same code; any edit to the project's Python sources measures
    anew.
    """
    key = json.dumps([str(Path(args.data).resolve()), args.encoder, args.noise, holdout, seed, _code_version()])
    stem = default_cache_dir().parent / "confidence-runs" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".npz").is_file():
        run = json.loads(stem.with_suffix(".json").read_text())
        with np.load(stem.with_suffix(".npz")) as arrays:
            run["_arrays"] = (arrays["logits"], arrays["labels"])
        print(f"reusing the measured run {holdout} seed {seed} ({stem.with_suffix('.json')})")
        return run
    run = measure(args, holdout, seed, model_dir)
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez(stem.with_suffix(".npz"), logits=run["_arrays"][0], labels=run["_arrays"][1])
    write_atomic(stem.with_suffix(".json"), json.dumps({k: v for k, v in run.items() if k != "_arrays"}) + "\n")
    return run


def _code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("training/*.py"), *root.glob("models/*.py"), *root.glob("service/*.py")]):
        digest.update(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def measure(args: argparse.Namespace, holdout: str, seed: int, model_dir: Path) -> dict:
    """Train at ``seed`` (noise draw, split, heads), then measure the served model on the held-out slides."""
    report = train.main(
        [
            "--data",
            args.data,
            "--out",
            str(model_dir),
            "--holdout-slides",
            holdout,
            "--inject-noise",
            args.noise,
            "--seed",
            str(seed),
            "--mpp",
            "0.495",
            "--encoder",
            args.encoder,
        ]
    )
    runtime = Runtime(model_dir)
    card = runtime.card
    held = set(holdout.split(","))
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
    kept = probs.max(1) >= runtime.abstain_threshold
    oracle_t = fit_temperature(z, y)
    floor_mean, floor_p95 = ece_floor(probs.max(1))
    conf = report["confidence"]
    temperatures = {
        "served": t,
        "none": 1.0,
        "cleaned": conf["cleaned_label_temperature"],
        "transition": conf["transition_adjusted_temperature"],
        "naive": conf["naive_temperature_on_noisy_labels"],
        "clean_cross_slide": (conf.get("cross_slide") or {}).get("temperature_vs_original_labels"),
        "oracle": oracle_t,
    }
    result = {
        "holdout": holdout,
        "seed": seed,
        "n_test": len(y),
        "head_members": card.head.members,
        "temperature": t,
        "calibration": card.calibration.method,
        "injected_noise": report["injected_noise"]["flipped_fraction"],
        "estimated_noise": conf["estimated_noise_rate_from_transition"],
        "temperatures": temperatures,
        "accuracy": float((probs.argmax(1) == y).mean()),
        "ece": {k: (expected_calibration_error(softmax(z, v), y) if v else None) for k, v in temperatures.items()},
        "ece_floor_mean": floor_mean,
        "ece_floor_p95": floor_p95,
        "abstain_threshold": runtime.abstain_threshold,
        "selective_accuracy": float((probs.argmax(1) == y)[kept].mean()) if kept.any() else None,
        "coverage": float(kept.mean()),
        "ood_threshold": runtime.ood_threshold,
        "in_distribution_flagged": float((ind_scores > runtime.ood_threshold).mean()),
        "ood": {},
        "_arrays": (z, y),
    }
    result["ece"]["served"] = expected_calibration_error(probs, y)  # the served probabilities themselves
    # classes that shift on the held-out slides (clean labels) vs those train.py warned about (none)
    held_slides = np.array([patches.slides[i] for i in idx])
    result["held_out_shifts"] = slide_disagreements(probs.argmax(1), y, held_slides, card.classes)
    warned = (conf.get("cross_slide") or {}).get("disagreements", [])
    result["warned"] = [list(pair) for pair in sorted({(r["label"], r["predicted"]) for r in warned})]
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
    return result


CALIBRATIONS = {  # key in a run's "ece" → what the row says
    "served": "**as served** (temperature fitted on cross-slide predictions through the anchor-point transition)",
    "none": "no temperature (the slide ensemble's own probabilities)",
    "cleaned": "temperature on kNN-cleaned labels of the validation slide",
    "transition": "temperature through the transition on the validation slide",
    "naive": "naive temperature on the noisy labels of the validation slide",
    "clean_cross_slide": "*reference:* temperature fitted on the clean labels of the cross-slide predictions",
    "oracle": "*reference:* oracle temperature fitted on the clean test labels",
}


def pooled_ece(runs: list[dict], key: str) -> float | None:
    """ECE over every held-out pair of one seed together, each tile scored by the model it was held out from."""
    if any(r["temperatures"][key] is None for r in runs):
        return None
    probs = np.concatenate([softmax(r["_arrays"][0], r["temperatures"][key]) for r in runs])
    return expected_calibration_error(probs, np.concatenate([r["_arrays"][1] for r in runs]))


def shift_summary(runs: list[dict]) -> list[dict]:
    """Held-out confusions (slide, class → predicted) over runs, and in how many the training warned of them."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        warned = {tuple(w) for w in run["warned"]}
        for shift in run["held_out_shifts"]:
            key = (shift["slide"], shift["label"], shift["predicted"])
            row = rows.setdefault(key, {"shares": [], "warned_in": 0})
            row["shares"].append(shift["share"])
            row["warned_in"] += (shift["label"], shift["predicted"]) in warned
    out = [
        {"slide": k[0], "label": k[1], "predicted": k[2], "share": float(np.mean(v["shares"]))}
        | {"runs": len(v["shares"]), "warned_in": v["warned_in"]}
        for k, v in rows.items()
    ]
    return sorted(out, key=lambda r: (-r["runs"], -r["share"]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kather2016"))
    p.add_argument(
        "--holdout-slides",
        default="CRC-Prim-HE-01,CRC-Prim-HE-07;CRC-Prim-HE-03,CRC-Prim-HE-08;CRC-Prim-HE-04,CRC-Prim-HE-05",
        help="held-out slide sets, ';' between sets, ',' between the slides of one set",
    )
    p.add_argument("--noise", default="uniform:0.4")
    p.add_argument("--encoder", default=train.DEFAULT_ENCODER, help="training/train.py --encoder")
    p.add_argument("--seeds", type=int, default=3, help="noise draws / training seeds (F..F+N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="F: more seeds without repeating earlier ones")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="confidence", help="stem of the result files")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = [h for h in args.holdout_slides.split(";") if h]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in pairs:
            for seed in seeds:
                runs.append(measure_once(args, pair, seed, Path(tmp) / f"model-{len(runs)}"))
    by_pair = {pair: [r for r in runs if r["holdout"] == pair] for pair in pairs}
    by_seed = {seed: [r for r in runs if r["seed"] == seed] for seed in seeds}
    pooled = {key: [pooled_ece(rs, key) for rs in by_seed.values()] for key in CALIBRATIONS}
    pooled_floor = [
        ece_floor(np.concatenate([softmax(r["_arrays"][0], r["temperature"]).max(1) for r in rs]))[0]
        for rs in by_seed.values()
    ]

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    summary = {
        key: {
            "per_pair": {pair: mean([r["ece"][key] for r in rs]) for pair, rs in by_pair.items()},
            "mean_of_pairs": mean([r["ece"][key] for r in runs]),
            "pooled_per_seed": pooled[key],
            "pooled": mean(pooled[key]),
        }
        for key in CALIBRATIONS
    }
    summary["floor"] = {
        "per_pair": {pair: mean([r["ece_floor_mean"] for r in rs]) for pair, rs in by_pair.items()},
        "mean_of_pairs": mean([r["ece_floor_mean"] for r in runs]),
        "pooled_per_seed": pooled_floor,
        "pooled": mean(pooled_floor),
    }
    shifts = shift_summary(runs)
    result = {
        "data": args.data,
        "holdout_slides": pairs,
        "shifts": shifts,
        "noise": args.noise,
        "encoder": args.encoder,
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        "ece_summary": summary,
        "ood_auroc_all_mean": mean([r["ood"]["all non-H&E"]["auroc"] for r in runs]),
        "runs": [{k: v for k, v in r.items() if k != "_arrays"} for r in runs],
    }
    short = {pair: "/".join(s.rsplit("-", 1)[-1] for s in pair.split(",")) for pair in pairs}

    def fmt(value: float | None, spec: str = "{:.3f}", scale: float = 1.0) -> str:
        return "-" if value is None else spec.format(scale * value)

    lines = [
        "# Confidence benchmark (generated by `benchmarks/confidence.py`)",
        "",
        f"Training labels with `{args.noise}` noise, one draw and one model per seed ({args.seeds} seeds"
        + (f", {args.first_seed} to {args.first_seed + args.seeds - 1}" if args.first_seed else "")
        + ") and per "
        f"held-out slide pair; measured on the held-out slides (clean labels) through onnxruntime, as served. "
        f"Encoder: `{args.encoder}`. Head: slide ensemble of {runs[0]['head_members']} linear heads"
        + (" (the default)" if args.encoder == train.DEFAULT_ENCODER else "")
        + ". ECE: 15 equal-width bins.",
        "",
        "## Expected calibration error",
        "",
        "Per pair: mean over seeds. Pooled: every pair's held-out tiles together, each scored by the model "
        "it was held out from (one ECE per seed, then the mean).",
        "",
        "| calibration | "
        + " | ".join(f"{short[p]} (n={by_pair[p][0]['n_test']})" for p in pairs)
        + " | mean of pairs | pooled (per seed) |",
        "|---|" + "---|" * (len(pairs) + 2),
    ]
    for key, label in [*CALIBRATIONS.items(), ("floor", "ECE of a *perfectly* calibrated model, this many tiles")]:
        row = summary[key]
        per_seed = ", ".join(fmt(v) for v in row["pooled_per_seed"])
        lines.append(
            f"| {label} | "
            + " | ".join(fmt(row["per_pair"][p]) for p in pairs)
            + f" | {fmt(row['mean_of_pairs'])} | **{fmt(row['pooled'])}** ({per_seed}) |"
        )
    lines += [
        "",
        "## Per run",
        "",
        "| held out | seed | accuracy (%) | noise injected / estimated "
        "| temperature served / clean cross-slide / oracle | ECE served | abstention threshold "
        "| selective accuracy (%) | coverage (%) | held-out H&E flagged OOD (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        t = r["temperatures"]
        lines.append(
            f"| {short[r['holdout']]} | {r['seed']} | {fmt(r['accuracy'], '{:.1f}', 100)} "
            f"| {r['injected_noise']:.3f} / {r['estimated_noise']:.3f} "
            f"| {t['served']:.2f} / {fmt(t['clean_cross_slide'], '{:.2f}')} / {t['oracle']:.2f} "
            f"| {r['ece']['served']:.3f} | {r['abstain_threshold']:.3f} "
            f"| {fmt(r['selective_accuracy'], '{:.1f}', 100)} | {100 * r['coverage']:.1f} "
            f"| {100 * r['in_distribution_flagged']:.1f} |"
        )
    lines += [
        "",
        "## Out of distribution",
        "",
        "| out-of-distribution set | n | AUROC vs held-out H&E (mean over runs) | flagged at threshold |",
        "|---|---|---|---|",
    ]
    for name in runs[0]["ood"]:
        auc = np.mean([r["ood"][name]["auroc"] for r in runs])
        flagged = np.mean([r["ood"][name]["flagged"] for r in runs])
        lines.append(f"| {name} | {runs[0]['ood'][name]['n']} | {auc:.3f} | {100 * flagged:.1f} % |")
    named = sum(r["warned_in"] for r in shifts)
    warnings = [  # per warning: did the held-out slides of its run show it?
        tuple(w) in {(h["label"], h["predicted"]) for h in r["held_out_shifts"]} for r in runs for w in r["warned"]
    ]
    lines += [
        "",
        "## Classes that do not transfer: warned at training time, seen on the held-out slides",
        "",
        "A row: a held-out slide on which one class (clean labels) is mostly predicted as another (share >= 30 % "
        "of at least 20 tiles), in how many runs, and in how many of them `training/train.py` had warned about "
        "that confusion from its cross-slide predictions (kNN-cleaned labels, no clean label used).",
        "",
        f"{named} of {sum(r['runs'] for r in shifts)} held-out confusions were warned about in advance. "
        f"The training runs warned about {len(warnings)} confusions ({len(warnings) / len(runs):.1f} per run), "
        "each seen on at least one training slide; "
        f"{sum(warnings)} of them also showed on the held-out slides of their run.",
        "",
        "| held-out slide | class | predicted as | share (mean over runs) | runs | warned in |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['slide']} | {r['label']} | {r['predicted']} | {r['share']:.0%} | {r['runs']} | {r['warned_in']} |"
            for r in shifts
        ],
    ]
    seed0 = by_seed[seeds[0]]
    y0 = np.concatenate([r["_arrays"][1] for r in seed0])
    pictures = {}
    for key, title in (("none", "no temperature"), ("served", "as served"), ("oracle", "oracle temperature per pair")):
        pictures[f"{title}, pooled held-out pairs, seed {seeds[0]}"] = (
            np.concatenate([softmax(r["_arrays"][0], r["temperatures"][key]) for r in seed0]),
            y0,
        )
    reliability_diagram(args.out / f"{args.name}.png", pictures)
    write_atomic(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
