"""Retrain the classifier on in-house patches with noisy labels.

    python training/train.py --data PATCHES --out runs/mine [--test CLEAN_PATCHES]

PATCHES is a folder with one sub-folder per class, or a CSV with ``path,label`` (and optional
``slide``) columns, paths relative to the CSV. The run embeds every tile once with a frozen
encoder (cached on disk), fits a noise-robust head, ranks suspected mislabels, and writes a
servable model directory: ``OUT/model.onnx`` + ``OUT/card.json`` (serve it with
``HISTO_MODEL_DIR=OUT bentoml serve``), plus ``report.json``, ``confusion.png``,
``suspects.csv`` and ``suspects.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python training/train.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from models.card import (
    Abstention,
    Calibration,
    CorrectionsFile,
    DataSummary,
    EncoderInfo,
    HeadInfo,
    ModelCard,
    Normalization,
    OodScorer,
    Reproduce,
    save_model_dir,
    write_atomic,
)
from training.calibration import (
    anchor_transition,
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
    selective_threshold,
    softmax,
)
from training.corrections import CorrectionsError, data_root, load_corrections, tile_key
from training.data import (
    DEFAULT_SLIDE_REGEX,
    DataError,
    PatchSet,
    data_sha256,
    export_tiles,
    load_patches,
    load_slide_patches,
    slide_split,
)
from training.embed import default_cache_dir, embed_files
from training.encoders import EncoderError, build_encoder, spec_for, training_mpp
from training.export import ExportError, export_model
from training.heads import HEADS
from training.metrics import auroc, classification_report, plot_confusion
from training.noise import inject, parse_noise
from training.ood import MahalanobisScore
from training.robust import ENSEMBLES, LOSSES, METHODS, TrainConfig, cross_slide_logits, fit_head, knn_votes
from training.slide_shift import describe as describe_shift
from training.slide_shift import slide_disagreements
from training.suspects import contact_sheet, suspect_scores, write_suspects
from training.transition import candidate_config, estimate_noise, fit_chosen

log = logging.getLogger("histo_robust.train")

OOD_QUANTILE = 0.99
DEFAULT_ENCODER = "efficientnet_lite0_ms"
CALIBRATIONS = ("cross-slide", "cleaned", "transition", "none")
CALIBRATION_METHODS = {
    "cross-slide": "temperature through the anchor-point noise transition, fitted on cross-slide predictions",
    "cleaned": "temperature scaling on kNN-cleaned validation labels",
    "transition": "temperature through the anchor-point noise transition, fitted on the validation split",
    "none": "none (temperature 1)",
}

KATHER_CREDIT = (
    "Kather JN, Weis CA, Bianconi F, et al. Multi-class texture analysis in colorectal cancer histology. "
    "Sci Rep 6, 27988 (2016). doi:10.5281/zenodo.53169. CC BY 4.0."
)


@dataclass
class RunData:
    """The labelled tiles of one run, as the confidence fits read them (indices into ``x``)."""

    x: np.ndarray  # embeddings of every labelled tile
    y_noisy: np.ndarray  # the labels as given (after --inject-noise): all the fits may use
    y_original: np.ndarray | None  # before --inject-noise: measures only
    slides: np.ndarray
    votes: np.ndarray  # leave-one-out kNN vote shares of y_noisy
    train_idx: np.ndarray
    val_idx: np.ndarray
    train_labels: np.ndarray  # what the head stands for on train_idx (kNN-cleaned): the OOD class means


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="training/train.py",
        description="Fit a noise-robust classifier on frozen encoder embeddings and export a servable model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", help="training patches: class-folder tree or CSV (path,label[,slide])")
    p.add_argument("--slides", nargs="+", metavar="SLIDE", help="instead of --data: slide files or folders")
    p.add_argument(
        "--annotations",
        help="with --slides: folder of QuPath GeoJSON exports named <slide stem>.geojson, or CSV slide,annotations",
    )
    p.add_argument(
        "--min-cover", type=float, default=0.5, help="a tile takes the class whose annotations cover this share of it"
    )
    p.add_argument("--tile-pixels", type=int, default=150, help="with --slides: tile side in pixels at --mpp")
    p.add_argument("--export-tiles", type=Path, help="with --slides: also write the tiles as DIR/<class>/*.png")
    p.add_argument("--out", required=True, help="output model directory (model.onnx, card.json, reports)")
    p.add_argument("--test", help="clean held-out patches (folder or CSV) for test metrics; never noised")
    p.add_argument(
        "--holdout-slides",
        default="",
        metavar="ID,ID",
        help="slide ids to move from --data into a clean test set (labels as given, never noised)",
    )
    p.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help="registry name, timm model name, or a pretrain.py output folder; join several with '+' to stack "
        "them in one graph (one head per encoder, probabilities averaged; e.g. "
        "efficientnet_lite0_ms+efficientnet_lite2_ms, which measured no better calibrated than the default "
        "over 10 seeds, README)",
    )
    p.add_argument("--weights", help="local weights file for the encoder (safetensors or torch checkpoint)")
    p.add_argument("--head", choices=HEADS, default=defaults.head, help="classification head")
    p.add_argument(
        "--method",
        choices=(*METHODS, "auto"),
        default="auto",
        help="noise-robust method. auto: from the noise transition estimated without clean labels, the "
        "forward-corrected loss where the noise favours particular classes and T is well conditioned, else "
        "knn_clean (training/transition.py, docs/noise.md); the choice, its inputs and its reason go into "
        "report.json. transition_clean: labels cleaned by the de-mixed class model through the estimated T",
    )
    p.add_argument("--loss", choices=sorted(LOSSES), default=defaults.loss, help="training loss")
    p.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default=defaults.ensemble,
        help="slides: average one head per group of training slides, each early-stopped on the slides it "
        "left out (a third to two thirds less calibration error on unseen slides, benchmarks/noise.py); "
        "single: one head",
    )
    p.add_argument(
        "--inject-noise",
        default=None,
        metavar="KIND:RATE",
        help="experiments only: flip training labels, e.g. uniform:0.4, asym:0.4 or instance:0.4 (confusable tiles)",
    )
    p.add_argument(
        "--corrections",
        action="append",
        default=[],
        metavar="FILE",
        help="a reviewer's corrections.csv (training/review.py), repeatable, later files win: corrected labels "
        "replace the given ones (after --inject-noise), 'unusable' tiles are dropped",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for noise, split and training")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="maximum epochs (early stopping on noisy val)")
    p.add_argument("--patience", type=int, default=defaults.patience, help="early-stopping patience in epochs")
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    p.add_argument("--knn-k", type=int, default=defaults.knn_k, help="neighbours for kNN cleaning and suspects")
    p.add_argument(
        "--clean-margin",
        type=float,
        default=defaults.clean_margin,
        help="kNN cleaning relabels a tile only when the neighbours' top class leads its label by this",
    )
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of tiles (whole slides) held for noisy val")
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="micrometres per pixel of the training patches (default: the encoder's intended µm/px, "
        "docs/encoders.md; a warning when the tiles are declared at another)",
    )
    p.add_argument("--slide-regex", default=DEFAULT_SLIDE_REGEX, help="regex whose group 1 is the slide id in a name")
    p.add_argument("--batch-size", type=int, default=64, help="batch size for embedding extraction")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default ~/.cache/histo-robust)")
    p.add_argument("--no-cache", action="store_true", help="recompute embeddings, do not read or write the cache")
    p.add_argument("--variants", default="", help="extra ONNX variants, comma-separated: fp16,int8")
    p.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default="cross-slide",
        help="temperature put into the graph, fitted without clean labels. cross-slide: every labelled slide "
        "predicted by an ensemble that never saw it, fitted through the anchor-point noise transition "
        "(falls back to the validation split with fewer than 3 slides); cleaned / transition: on the "
        "validation split, against kNN-cleaned labels / through the transition; none: temperature 1. "
        "The validation-split fits are always reported in report.json",
    )
    p.add_argument(
        "--target-selective-accuracy",
        type=float,
        default=0.90,
        help="abstain below the confidence at which kept predictions reach this accuracy",
    )
    p.add_argument("--name", default=None, help="model name in the card (default: OUT folder name)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export (reports only)")
    return p


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.out)

    # ---- every check that can fail fast runs before the encoder touches a tile
    try:
        noise = parse_noise(args.inject_noise)
    except ValueError as exc:
        _fail(f"--inject-noise: {exc}")
    variants = tuple(v for v in args.variants.split(",") if v)
    if bad := [v for v in variants if v not in ("fp16", "int8")]:
        _fail(f"--variants: unknown {bad}; choose from fp16, int8")
    try:
        args.mpp = training_mpp(spec_for(args.encoder), args.mpp)
        if bool(args.data) == bool(args.slides) or bool(args.slides) != bool(args.annotations):
            _fail("give either --data PATCHES, or --slides SLIDES with --annotations ANNOTATIONS")
        patches = _annotated_patches(args) if args.slides else load_patches(args.data, slide_regex=args.slide_regex)
        test = load_patches(args.test, slide_regex=args.slide_regex) if args.test else None
    except (DataError, EncoderError) as exc:
        _fail(str(exc))
    if args.holdout_slides:
        if test is not None:
            _fail("use either --test or --holdout-slides, not both")
        wanted = {s.strip() for s in args.holdout_slides.split(",") if s.strip()}
        if missing := sorted(wanted - set(patches.slides)):
            _fail(
                f"--holdout-slides: no tiles of {missing} in {args.data} "
                f"(slide ids found: {sorted(set(patches.slides))})"
            )
        held = np.array([s in wanted for s in patches.slides])
        test = patches.subset(np.flatnonzero(held))
        test.source = f"{args.data} slides {','.join(sorted(wanted))}"
        patches = patches.subset(np.flatnonzero(~held))
    classes = patches.classes
    if len(classes) < 2:
        _fail(f"{args.data}: need at least 2 classes, found {classes}")
    if test is not None and (unknown := sorted(set(test.classes) - set(classes))):
        _fail(f"{args.test}: labels {unknown} do not occur in the training data {args.data} ({classes})")
    root = data_root(args.data or patches.tiles.root)
    keys = [tile_key(p, root) for p in patches.paths]
    try:
        test_keys = [tile_key(p, root) for p in test.paths] if test is not None else []
        corrections = load_corrections(args.corrections, classes, keys, test_keys) if args.corrections else None
    except CorrectionsError as exc:
        _fail(str(exc))
    try:
        encoder = build_encoder(args.encoder, args.weights)
    except EncoderError as exc:
        _fail(str(exc))
    for path, reason in patches.skipped + (test.skipped if test else []):
        print(f"warning: skipped unreadable image {path}: {reason}", file=sys.stderr)
    timings["load"] = time.perf_counter() - started

    # ---- embeddings (cached)
    t = time.perf_counter()
    hashes = patches.content_keys()
    emb_kwargs = dict(batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    x_all, n_computed = embed_files(encoder, patches.paths, hashes, load=patches.load, **emb_kwargs)
    test_hashes = test.content_keys() if test else []
    x_test, n_test_computed = (
        embed_files(encoder, test.paths, test_hashes, load=test.load, **emb_kwargs) if test else (None, 0)
    )
    timings["embed"] = time.perf_counter() - t

    out.mkdir(parents=True, exist_ok=True)

    # ---- labels, noise, slide-aware split
    y_given = np.array([classes.index(label) for label in patches.labels])
    y_noisy = inject(y_given, args.inject_noise, len(classes), args.seed, embeddings=x_all)
    if corrections is not None:  # after --inject-noise: an experiment corrects the labels it trained on
        y_noisy, kept, corrections_report = corrections.apply(keys, y_noisy, classes)
        skipped, patches = patches.skipped, patches.subset(kept)
        patches.skipped = skipped
        hashes, x_all, y_given, y_noisy = [hashes[i] for i in kept], x_all[kept], y_given[kept], y_noisy[kept]
    train_idx, val_idx = slide_split(patches.slides, y_noisy, args.val_fraction, args.seed)
    config = TrainConfig(
        head=args.head,
        method=args.method,
        loss=args.loss,
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        knn_k=args.knn_k,
        clean_margin=args.clean_margin,
        ensemble=args.ensemble,
        seed=args.seed,
        feature_groups=encoder.feature_groups,
    )
    t = time.perf_counter()
    fit_args = (
        x_all[train_idx],
        y_noisy[train_idx],
        [patches.slides[i] for i in train_idx],
        x_all[val_idx],
        y_noisy[val_idx],
        len(classes),
    )
    method_choice = None
    if args.method in ("auto", "transition_clean"):  # the noise model, from the given labels only
        noise_model = estimate_noise(x_all, y_noisy, len(classes), args.knn_k)
        if args.method == "auto":
            result, config, method_choice = fit_chosen(*fit_args, config, noise_model)
        else:
            config = candidate_config("transition_clean", config, noise_model.transition)
            result = fit_head(*fit_args, config)
            method_choice = {**noise_model.describe(), "chosen": "transition_clean", "reason": "--method"}
    else:
        result = fit_head(*fit_args, config)
    timings["train_head"] = time.perf_counter() - t
    head = result.model

    # ---- noise-aware calibration, abstention threshold and OOD scorer: noisy labels only
    votes = knn_votes(x_all, y_noisy, len(classes), args.knn_k)
    t = time.perf_counter()
    data = RunData(
        x=x_all,
        y_noisy=y_noisy,
        y_original=y_given if noise is not None else None,
        slides=np.asarray(patches.slides),
        votes=votes,
        train_idx=train_idx,
        val_idx=val_idx,
        train_labels=result.train_labels,
    )
    y_test = np.array([classes.index(label) for label in test.labels]) if test is not None else None
    confidence = _fit_confidence(args, config, head, data, classes, x_test, y_test, out)
    timings["calibrate"] = time.perf_counter() - t
    probs_all = confidence.pop("probs_all")
    report: dict = {
        "classes": classes,
        "encoder": encoder.spec.name,
        "config": {**vars(config), "inject_noise": args.inject_noise},
        "data": {
            "source": str(patches.source),
            "n": len(patches),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "val_slides": sorted({patches.slides[i] for i in val_idx}),
            "skipped": patches.skipped,
            "embeddings_computed": n_computed + n_test_computed,
        },
        "best_epoch": result.best_epoch,
        "ensemble": (
            {
                "members": len(result.member_epochs),
                "left_out_slides": result.member_slides,
                "best_epochs": result.member_epochs,
            }
            if result.member_epochs
            else None
        ),
        "estimated_noise_rate": result.estimated_noise,
        "method_choice": method_choice,
        "val": classification_report(y_noisy[val_idx], probs_all[val_idx].argmax(1), classes),
        "confidence": {k: v for k, v in confidence.items() if k not in ("ood", "ood_scorer")},
    }
    if corrections is not None:
        report["corrections"] = corrections_report
    report["val"]["note"] = "against the (noisy) labels as given: the only labels in-house data has"
    if noise is not None:
        report["injected_noise"] = {
            "spec": args.inject_noise,
            "flipped_fraction": float((y_noisy != y_given).mean()),
            "val_accuracy_vs_original_labels": float((probs_all[val_idx].argmax(1) == y_given[val_idx]).mean()),
        }

    # ---- suspected mislabels over every labelled tile
    rows = np.arange(len(y_noisy))
    scores = suspect_scores(votes[rows, y_noisy], probs_all[rows, y_noisy])
    suggested = probs_all.argmax(1)
    order = write_suspects(
        out / "suspects.csv",
        [p.resolve() for p in patches.paths],
        y_noisy,
        suggested,
        scores,
        classes,
        root=root,
        probs=probs_all,
    )
    contact_sheet(out / "suspects.png", patches.paths, y_noisy, suggested, scores, classes, order, load=patches.load)
    # data_root: where the review page (training/review.py) finds the tiles suspects.csv names
    report["suspects"] = {
        "n_flagged": int((suggested != y_noisy).sum()),
        "file": "suspects.csv",
        "data_root": str(root),
    }
    if patches.tiles is not None:  # annotation-based: suspects back to QuPath, one file per slide
        folder = out / "suspects"
        report["suspects"]["geojson"] = patches.tiles.write_suspects(folder, y_noisy, suggested, scores, classes)
        report["slides"] = patches.slide_report
    if noise is not None:
        flipped = y_noisy != y_given
        top = order[: int(flipped.sum())]
        report["suspects"]["auroc_vs_injected_flips"] = auroc(scores, flipped)
        report["suspects"]["precision_at_n_flipped"] = float(flipped[top].mean()) if len(top) else None

    # ---- clean test metrics
    if test is not None:
        with torch.no_grad():
            test_pred = head(torch.from_numpy(x_test)).argmax(1).numpy()
        report["test"] = classification_report(y_test, test_pred, classes)
        report["test"]["source"] = str(test.source)
        plot_confusion(
            out / "confusion_test.png",
            report["test"]["confusion"],
            classes,
            f"clean test: accuracy {report['test']['accuracy']:.3f} (n={len(y_test)})",
        )
    plot_confusion(
        out / "confusion.png",
        report["val"]["confusion"],
        classes,
        f"noisy validation: accuracy {report['val']['accuracy']:.3f} (n={len(val_idx)})",
    )

    # ---- one ONNX graph + card: OUT is directly servable
    if not args.no_export:
        t = time.perf_counter()
        report["model"] = _export(
            args, encoder, head, patches, hashes, classes, train_idx, val_idx, y_noisy, report, confidence
        )
        timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    report["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    summary = f"noisy-val accuracy {report['val']['accuracy']:.3f}"
    if test is not None:
        summary += f", clean test accuracy {report['test']['accuracy']:.3f}"
    print(f"done in {timings['total']:.1f}s: {summary}; wrote {out}/")
    return report


def _annotated_patches(args) -> PatchSet:
    """Tiles of ``--slides`` labelled by ``--annotations`` (training/annotations.py), warnings printed."""
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir()) / "grids"
    patches, warnings = load_slide_patches(
        args.slides,
        args.annotations,
        mpp=args.mpp,
        patch_pixels=args.tile_pixels,
        input_size=spec_for(args.encoder).input_size,
        min_cover=args.min_cover,
        grid_cache=cache,
    )
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    if len(patches.classes) < 2:
        _fail(f"{args.annotations}: need tiles of at least 2 classes, found {patches.classes}")
    if args.export_tiles:
        n = export_tiles(patches, args.export_tiles, patches.tiles.input_size)
        print(f"wrote {n} tiles to {args.export_tiles}")
    return patches


def _fit_confidence(
    args, config: TrainConfig, head, data: RunData, classes: list[str], x_test, y_test, out: Path
) -> dict:
    """Temperature (noise-aware), abstention threshold and OOD scorer, fitted without clean labels.

    Nothing here is fitted on clean labels. kNN-cleaned labels stand in for the truth only in the
    ECE reported for data without clean labels; clean ``--test`` labels (``y_test``), and the
    original labels of an ``--inject-noise`` experiment (``data.y_original``), only measure.
    """
    n, val_idx = len(classes), data.val_idx
    with torch.no_grad():
        logits = head(torch.from_numpy(data.x)).numpy()
        test_logits = head(torch.from_numpy(x_test)).numpy() if x_test is not None else None
    cleaned = data.votes.argmax(1)
    transition = anchor_transition(data.votes, data.y_noisy, n)
    # The validation-split fits carry that one slide group's difficulty: they help on unseen
    # slides harder than it and hurt on easier ones (benchmarks/confidence.py, README).
    cleaned_temperature = fit_temperature(logits[val_idx], cleaned[val_idx])
    transition_temperature = fit_temperature(logits[val_idx], data.y_noisy[val_idx], transition)
    naive_temperature = fit_temperature(logits[val_idx], data.y_noisy[val_idx])
    calibration = args.calibration
    cross = _cross_slide(config, data, classes, cleaned, transition) if calibration == "cross-slide" else None
    if calibration == "cross-slide" and cross is None:
        print(
            "warning: cross-slide calibration needs tiles of at least 3 slides; "
            "fitting the temperature through the noise transition on the validation split",
            file=sys.stderr,
        )
        calibration = "transition"
    info: dict = {
        "calibration": calibration,
        "cleaned_label_temperature": cleaned_temperature,
        "naive_temperature_on_noisy_labels": naive_temperature,
        "transition_adjusted_temperature": transition_temperature,
        "transition_estimate": np.round(transition, 3).tolist(),
        "estimated_noise_rate_from_transition": float(
            1 - np.average(np.diag(transition), weights=np.bincount(cleaned, minlength=n) + 1)
        ),
    }
    if cross is not None:
        cross_idx, fit_logits, info["cross_slide"] = cross
        temperature = info["cross_slide"]["temperature"]
        fit_labels = cleaned[cross_idx]
        split = "cross-slide predictions vs kNN-cleaned labels"
    else:
        temperature = {"cleaned": cleaned_temperature, "transition": transition_temperature, "none": 1.0}[calibration]
        fit_logits, fit_labels = logits[val_idx], cleaned[val_idx]
        split = "validation split vs kNN-cleaned labels"
    info["temperature"] = temperature
    probs_all = softmax(logits, temperature)
    raw_fit, cal_fit = softmax(fit_logits), softmax(fit_logits, temperature)
    info["ece_vs_cleaned"] = {
        "split": split,
        "before": expected_calibration_error(raw_fit, fit_labels),
        "after": expected_calibration_error(cal_fit, fit_labels),
    }
    name = "cross-slide predictions" if cross is not None else "validation"
    curves = {
        f"{name}, uncalibrated (vs kNN-cleaned labels)": (raw_fit, fit_labels),
        f"{name}, calibrated (vs kNN-cleaned labels)": (cal_fit, fit_labels),
    }
    # Expected accuracy of each tile = its confidence after a noise-aware fit: counting hits
    # against cleaned labels would make a 90 % target unreachable even for a perfect model.
    if cross is not None:
        threshold, sel_acc, coverage = selective_threshold(cal_fit, None, args.target_selective_accuracy)
        measured_on = "cross-slide predictions, expected accuracy = calibrated confidence"
    else:
        expected = softmax(logits[val_idx], cleaned_temperature).max(1)
        threshold, sel_acc, coverage = selective_threshold(
            probs_all[val_idx], None, args.target_selective_accuracy, expected
        )
        measured_on = "validation split, expected accuracy = confidence after the kNN-cleaned temperature fit"
    info["abstention"] = {
        "threshold": threshold,
        "target_selective_accuracy": args.target_selective_accuracy,
        "selective_accuracy": sel_acc,
        "coverage": coverage,
        "measured_on": measured_on,
    }
    if test_logits is not None:
        raw_t, cal_t = softmax(test_logits), softmax(test_logits, temperature)
        kept = cal_t.max(1) >= threshold
        info["test"] = {
            "ece_uncalibrated": expected_calibration_error(raw_t, y_test),
            "ece_calibrated": expected_calibration_error(cal_t, y_test),
            "ece_naive_temperature": expected_calibration_error(softmax(test_logits, naive_temperature), y_test),
            "ece_transition_temperature": expected_calibration_error(
                softmax(test_logits, transition_temperature), y_test
            ),
            "ece_cleaned_temperature": expected_calibration_error(softmax(test_logits, cleaned_temperature), y_test),
            "selective_accuracy": float((cal_t.argmax(1) == y_test)[kept].mean()) if kept.any() else None,
            "coverage": float(kept.mean()),
        }
        if cross is not None and data.y_original is not None:
            info["test"]["ece_cross_slide_original_labels_temperature"] = expected_calibration_error(
                softmax(test_logits, info["cross_slide"]["temperature_vs_original_labels"]), y_test
            )
        curves["clean test, uncalibrated"] = (raw_t, y_test)
        curves["clean test, calibrated"] = (cal_t, y_test)
    reliability_diagram(out / "reliability.png", curves)
    scorer = MahalanobisScore(data.x[data.train_idx], data.train_labels, n, k=128)
    val_scores = scorer.score(data.x[val_idx]) if len(val_idx) else scorer.score(data.x[data.train_idx])
    info["ood"] = {
        "method": "mahalanobis-pca128+residual (embedding)",
        "quantile": OOD_QUANTILE,
        "threshold": float(np.quantile(val_scores, OOD_QUANTILE)),
    }
    info["ood_scorer"] = scorer
    info["probs_all"] = probs_all
    return info


def _cross_slide(
    config: TrainConfig, data: RunData, classes: list[str], cleaned: np.ndarray, transition: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(tile indices, log-probabilities, report) of the cross-slide predictions, or None with < 3 slides.

    Every labelled slide is predicted by an ensemble that never saw it; the temperature is fitted
    through the noise transition on those predictions. Where they call most of a slide's
    (kNN-cleaned) class another class, the classes look different on a slide the heads never saw,
    which no temperature fixes: train.py warns.
    """
    labelled = np.sort(np.r_[data.train_idx, data.val_idx])
    cross = cross_slide_logits(
        data.x[labelled], data.y_noisy[labelled], data.slides[labelled], len(classes), config, cleaned[labelled]
    )
    if cross is None:
        return None
    cross_idx, cross_logits = labelled[cross[0]], cross[1]
    shifted = slide_disagreements(cross_logits.argmax(1), cleaned[cross_idx], data.slides[cross_idx], classes)
    for row in shifted[:5]:
        print(f"warning: {describe_shift(row)}; expect this confusion on new slides", file=sys.stderr)
    report = {
        "n": len(cross_idx),
        "temperature": fit_temperature(cross_logits, data.y_noisy[cross_idx], transition),
        "disagreements": shifted,
    }
    if data.y_original is not None:  # experiments: what the clean labels of the same predictions ask for
        report["temperature_vs_original_labels"] = fit_temperature(cross_logits, data.y_original[cross_idx])
    return cross_idx, cross_logits, report


def _heads_description(kind: str, report: dict, encoder) -> str:
    """'linear heads (slide ensemble of 4 per encoder, 2 encoders averaged)' and the simpler cases."""
    groups = len(encoder.feature_groups)
    parts = []
    if report["ensemble"]:
        per_encoder = report["ensemble"]["members"] // groups
        parts.append(f"slide ensemble of {per_encoder}" + (" per encoder" if groups > 1 else ""))
    if groups > 1:
        parts.append(f"{groups} encoders averaged")
    return f"{kind} head" + (f"s ({', '.join(parts)})" if parts else "")


def _export(
    args, encoder, head, patches: PatchSet, hashes, classes, train_idx, val_idx, y_noisy, report, confidence: dict
) -> dict:
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(
        val_idx if len(val_idx) else train_idx, size=min(64, len(val_idx) or len(train_idx)), replace=False
    )
    size = encoder.spec.input_size
    parity_images = np.stack([patches.load(i, size) for i in pick])
    val_images = val_labels = None
    if args.variants and len(val_idx):
        val_images = np.stack([patches.load(i, size) for i in val_idx])
        val_labels = y_noisy[val_idx]
    try:
        parity, variants = export_model(
            encoder,
            head,
            Path(args.out),
            parity_images,
            temperature=confidence["temperature"],
            ood=confidence["ood_scorer"],
            variants=tuple(v for v in args.variants.split(",") if v),
            val_images=val_images,
            val_labels=val_labels,
        )
    except ExportError as exc:
        _fail(str(exc))
    patch_px = patches.patch_pixels()
    metrics = {"noisy_val": {k: report["val"][k] for k in ("accuracy", "balanced_accuracy")}}
    if "test" in report:
        metrics["test"] = {k: report["test"][k] for k in ("accuracy", "balanced_accuracy", "n")}
    is_kather = "kather" in str(patches.source).lower()
    card = ModelCard(
        name=args.name or Path(args.out).resolve().name,
        description=f"{encoder.spec.description} + {_heads_description(args.head, report, encoder)}"
        + f" trained with {report['config']['method']}+{args.loss}",
        classes=classes,
        input_size=size,
        patch_size_pixels=patch_px,
        mpp=args.mpp,
        normalization=Normalization(mean=encoder.spec.mean, std=encoder.spec.std),
        encoder=EncoderInfo(
            id=encoder.spec.name,
            weights_sha256=encoder.weights_sha256,
            embedding_dim=encoder.embedding_dim,
            pretraining=encoder.spec.pretraining,
        ),
        head=HeadInfo(
            kind=args.head,
            method=f"{report['config']['method']}+{args.loss}",
            members=report["ensemble"]["members"] if report["ensemble"] else 1,
            hyperparameters={
                "epochs_max": args.epochs,
                "best_epoch": report["best_epoch"],
                "lr": args.lr,
                "knn_k": args.knn_k,
                "clean_margin": args.clean_margin,
                "patience": args.patience,
            },
        ),
        data=DataSummary(
            source=str(patches.source),
            n_train=len(train_idx),
            n_val=len(val_idx),
            class_counts={c: int((y_noisy == i).sum()) for i, c in enumerate(classes)},
            injected_noise=args.inject_noise,
            data_sha256=data_sha256(patches, hashes),
            licence="CC BY 4.0" if is_kather else None,
            corrections=[CorrectionsFile(**f) for f in report.get("corrections", {}).get("files", [])],
        ),
        metrics=metrics,
        parity=parity,
        calibration=Calibration(
            temperature=confidence["temperature"],
            method=CALIBRATION_METHODS[confidence["calibration"]],
            ece_before=confidence["ece_vs_cleaned"]["before"],
            ece_after=confidence["ece_vs_cleaned"]["after"],
            ece_split=confidence["ece_vs_cleaned"]["split"],
        ),
        abstention=Abstention(**confidence["abstention"]),
        ood=OodScorer(**confidence["ood"]),
        variants=variants,
        reproduce=Reproduce(command="python training/train.py " + shlex.join(sys.argv[1:]), seed=args.seed),
        credits=[KATHER_CREDIT] if is_kather else [],
    )
    card = save_model_dir(args.out, card)
    return {
        "onnx_sha256": card.onnx_sha256,
        "parity_max_abs_diff": parity.max_abs_diff,
        "variants": {k: v.model_dump() for k, v in variants.items()},
    }


if __name__ == "__main__":
    main()
