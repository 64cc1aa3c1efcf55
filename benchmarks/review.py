"""What reviewing the top suspects buys: labels fixed and held-out accuracy after retraining.

    python benchmarks/review.py --data ../shared/data/kather2016

For each noise level and seed: ``training/train.py`` on the noisy labels (test slides held out by
slide, never noised), then a simulated careful reviewer decides the top 5 % and 10 % of
``suspects.csv`` from the true labels (one ``corrections.csv`` each, written with the review
page's own writer), and ``train.py --corrections`` retrains. Beside it, the same number of tiles
reviewed at random (what the ranking adds), and what a reviewer who accepts every suggestion of
the top N would have done to the labels (no retraining). Every run reuses the embedding cache and
is kept under ``--work``, so a rerun measures only what is missing.
Writes ``benchmarks/results/review.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from models.card import write_atomic
from training import train
from training.corrections import Decision, data_root, tile_key, write_corrections
from training.data import load_patches

RESULTS = Path(__file__).resolve().parent / "results"
HOLDOUT = "CRC-Prim-HE-01,CRC-Prim-HE-07"  # as benchmarks/noise.py: the test slides, clean labels


def run_train(out: Path, base_args: list[str], *extra: str) -> dict:
    """train.main once; the report is reused when ``out`` already holds one from the same arguments."""
    argv = ["--out", str(out), *base_args, *extra]
    stamp = out / "argv.json"
    if (out / "report.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == argv:
        print(f"reusing {out}")
        return json.loads((out / "report.json").read_text())
    started = time.perf_counter()
    report = train.main(argv)
    report["benchmark_seconds"] = time.perf_counter() - started
    write_atomic(stamp, json.dumps(argv))
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def review(suspects: list[dict], rows: list[int], truth: dict[str, str], reviewer: str) -> list[Decision]:
    """Decisions on ``rows`` of suspects.csv: ``careful`` decides the true label, ``accept`` the suggestion."""
    decisions = []
    for r in rows:
        row = suspects[r]
        decided = truth[row["path"]] if reviewer == "careful" else row["suggested_label"]
        decisions.append(Decision(row["path"], row["given_label"], row["suggested_label"], decided, reviewer, "-"))
    return decisions


def label_effect(decisions: list[Decision], truth: dict[str, str]) -> dict:
    """How many wrong labels the decisions fix, and how many right ones they break."""
    fixed = sum(d.given != truth[d.path] and d.decided == truth[d.path] for d in decisions)
    broken = sum(d.given == truth[d.path] and d.decided != truth[d.path] for d in decisions)
    wrong = sum(d.given != truth[d.path] for d in decisions)
    return {"reviewed": len(decisions), "wrong_among_reviewed": wrong, "fixed": fixed, "broken": broken}


def measure(args: argparse.Namespace, noise: str, seed: int) -> dict:
    work = args.work / f"{noise.replace(':', '')}_seed{seed}"
    base_args = ["--data", str(args.data), "--holdout-slides", args.holdout_slides, "--inject-noise", noise]
    base_args += ["--seed", str(seed), "--no-export"]
    if args.cache_dir:
        base_args += ["--cache-dir", str(args.cache_dir)]
    before = run_train(work / "noisy", base_args)
    root = data_root(args.data)
    truth = {tile_key(p, root): label for p, label in zip(args.patches.paths, args.patches.labels, strict=True)}
    with open(work / "noisy" / "suspects.csv", newline="") as handle:
        suspects = list(csv.DictReader(handle))
    n = len(suspects)
    wrong_before = sum(r["given_label"] != truth[r["path"]] for r in suspects)
    result = {
        "noise": noise,
        "seed": seed,
        "n_labelled": n,
        "wrong_labels_before": wrong_before,
        "test_accuracy_before": before["test"]["accuracy"],
        "test_balanced_accuracy_before": before["test"]["balanced_accuracy"],
        "suspects_auroc": before["suspects"]["auroc_vs_injected_flips"],
        "runs": [],
    }
    rng = np.random.default_rng(1000 + seed)
    for fraction in args.fractions:
        budget = int(round(fraction * n))
        picks = {"top": list(range(budget))}
        if fraction in args.random_control:
            picks["random"] = sorted(rng.choice(n, size=budget, replace=False).tolist())
        for pick, rows in picks.items():
            decisions = review(suspects, rows, truth, "careful")
            name = f"{pick}{int(round(fraction * 100))}"
            file = work / f"corrections_{name}.csv"
            write_corrections(file, decisions)
            # held-out accuracy is the head's argmax, which no temperature changes: skip the calibration fits
            after = run_train(work / name, base_args, "--corrections", str(file), "--calibration", "none")
            entry = {
                "pick": pick,
                "fraction": fraction,
                **label_effect(decisions, truth),
                "wrong_labels_after": wrong_before - label_effect(decisions, truth)["fixed"],
                "test_accuracy_after": after["test"]["accuracy"],
                "test_balanced_accuracy_after": after["test"]["balanced_accuracy"],
                "applied": after["corrections"],
            }
            if pick == "top":
                entry["accept_all_suggestions"] = label_effect(review(suspects, rows, truth, "accept"), truth)
            result["runs"].append(entry)
            print(
                f"{noise} seed {seed} {name}: fixed {entry['fixed']}/{budget}, test accuracy "
                f"{result['test_accuracy_before']:.3f} -> {entry['test_accuracy_after']:.3f}"
            )
    return result


def mean_std(values: list[float]) -> str:
    """Percent, mean ± std over seeds; one seed is shown alone (a ± 0.0 would claim a spread never measured)."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def delta(before: list[float], after: list[float]) -> str:
    """Points gained, paired seed by seed (the seeds differ far more from each other than the pairs do)."""
    gains = 100 * np.subtract(after, before)
    return f"{np.mean(gains):+.1f}" + (f" ± {np.std(gains):.1f}" if len(gains) > 1 else "")


def markdown(summary: dict) -> str:
    results = summary["results"]
    lines = [
        "# Reviewing the top suspects, then retraining (generated by `benchmarks/review.py`)",
        "",
        f"Data: `{summary['data']}`, test slides {summary['holdout_slides']} (clean labels, n={summary['n_test']}); "
        f"{results[0]['n_labelled']} labelled tiles on the other slides, uniform noise injected into them. "
        f"A simulated careful reviewer decides the top N of `suspects.csv` from the true labels; "
        f"`train.py --corrections` retrains (`--calibration none`: the accuracy is the head's argmax, which no "
        f"temperature changes). Seeds {summary['seeds']}"
        f"{', mean ± std' if len(summary['seeds']) > 1 else ''}. Machine: {summary['machine']}; "
        f"{summary['seconds']:.0f} s in all.",
        "",
        "| noise | reviewed | wrong labels among them | fixed | wrong labels left | test accuracy before | after |"
        " Δ (points, paired by seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for noise in summary["noise"]:
        rows = [r for r in results if r["noise"] == noise]
        keys = [(e["pick"], e["fraction"]) for e in rows[0]["runs"]]
        for pick, fraction in keys:
            entries = [next(e for e in r["runs"] if (e["pick"], e["fraction"]) == (pick, fraction)) for r in rows]
            before = [r["test_accuracy_before"] for r in rows]
            after = [e["test_accuracy_after"] for e in entries]
            label = f"{'top' if pick == 'top' else 'random'} {100 * fraction:.0f} % ({entries[0]['reviewed']})"
            lines.append(
                f"| {noise} | {label} | {np.mean([e['wrong_among_reviewed'] for e in entries]):.0f} "
                f"| {np.mean([e['fixed'] for e in entries]):.0f} "
                f"| {np.mean([e['wrong_labels_after'] for e in entries]):.0f} of "
                f"{np.mean([r['wrong_labels_before'] for r in rows]):.0f} "
                f"| {mean_std(before)} | {mean_std(after)} "
                f"| {delta(before, after)} |"
            )
    aurocs = ", ".join(
        f"{noise}: {np.mean([r['suspects_auroc'] for r in results if r['noise'] == noise]):.3f}"
        for noise in summary["noise"]
    )
    lines += [
        "",
        f"How well `suspects.csv` ranks the flipped labels first (AUROC): {aurocs}. 'random' reviews as many "
        "tiles drawn at random: what the ranking adds.",
        "",
        "A reviewer who accepts every suggestion of the top N instead (labels only, no retraining):",
        "",
        "| noise | reviewed | wrong labels fixed | right labels broken |",
        "|---|---|---|---|",
    ]
    for noise in summary["noise"]:
        rows = [r for r in results if r["noise"] == noise]
        for fraction in summary["fractions"]:
            entries = [
                next(e for e in r["runs"] if e["pick"] == "top" and e["fraction"] == fraction)["accept_all_suggestions"]
                for r in rows
            ]
            lines.append(
                f"| {noise} | top {100 * fraction:.0f} % ({entries[0]['reviewed']}) "
                f"| {np.mean([e['fixed'] for e in entries]):.0f} | {np.mean([e['broken'] for e in entries]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/kather2016"))
    p.add_argument("--noise", default="uniform:0.4,uniform:0.6")
    p.add_argument("--fractions", default="0.05,0.1", help="shares of the suspects reviewed, most suspicious first")
    p.add_argument("--random-control", default="0.1", help="fractions also reviewed at random, as a control")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--holdout-slides", default=HOLDOUT)
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: train.py's)")
    p.add_argument("--work", type=Path, default=Path("runs/review_benchmark"), help="the runs, kept for reuse")
    p.add_argument("--name", default="review", help="results stem in benchmarks/results")
    p.add_argument("--markdown-only", action="store_true", help="rewrite NAME.md from NAME.json, measure nothing")
    args = p.parse_args(argv)
    if args.markdown_only:
        summary = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_atomic(RESULTS / f"{args.name}.md", markdown(summary))
        return summary
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    args.random_control = {float(f) for f in args.random_control.split(",") if f}
    args.patches = load_patches(args.data, check_images=False)
    noises = [n for n in args.noise.split(",") if n]
    started = time.perf_counter()
    held = set(args.holdout_slides.split(","))
    results: list[dict] = []
    # seed by seed, every noise level: the results written after each seed are complete tables
    for seed in range(args.seeds):
        results += [measure(args, noise, seed) for noise in noises]
        summary = {
            "data": str(args.data),
            "holdout_slides": args.holdout_slides,
            "n_test": sum(s in held for s in args.patches.slides),
            "noise": noises,
            "fractions": args.fractions,
            "seeds": list(range(seed + 1)),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, no GPU",
            "seconds": time.perf_counter() - started,
            "results": results,
        }
        RESULTS.mkdir(exist_ok=True)
        write_atomic(RESULTS / f"{args.name}.json", json.dumps(summary, indent=2) + "\n")
        write_atomic(RESULTS / f"{args.name}.md", markdown(summary))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
