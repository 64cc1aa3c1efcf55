"""A model trained here, run by the real wsinfer: per-patch classes against this project's slide job.

    .venv/bin/python benchmarks/wsinfer.py [--model models/default] [--slide tests/fixtures/CMU-1-Small-Region.svs]

1. wsinfer 0.6.1 gets an environment of its own, ``.cache/wsinfer-venv`` (made on first run):
   ``pip install wsinfer==0.6.1 'tiffslide<3' 'zarr<3' torch==2.14.1 torchvision==0.29.1``. wsinfer
   0.6.1's own pins do not resolve on current Python without the two caps, and the project's pins
   are not bent for it; torch and torchvision are the project's versions (local wheels here).
2. ``python -m training.export`` writes ``model.ts.pt`` into a copy of the model directory (parity
   against its ``model.onnx`` printed): the export path a user runs.
3. ``wsinfer run --model-path model.ts.pt --config config.json`` on a folder holding only the slide,
   offline: wsinfer reads its model-zoo registry at start-up, so it runs with a private ``HOME``
   holding an empty registry and ``HF_HUB_OFFLINE=1``; CPU only (``WSINFER_FORCE_CPU=1``).
4. ``python -m service.wsi`` on the same slide with the same model directory.
5. Both grids start at the slide's origin with the same level-0 step (``round(patch px × model µm/px /
   slide µm/px)``), so patches are matched on their exact (x, y); each tool keeps the patches its own
   tissue detection finds, and the classes are compared where both classified a patch.

Prints the agreement of the top class and the largest probability difference, and writes
``benchmarks/results/wsinfer.json`` and ``wsinfer.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "wsinfer-venv"
WORK = ROOT / ".cache" / "wsinfer-run"
WSINFER_REQUIREMENTS = ["wsinfer==0.6.1", "tiffslide<3", "zarr<3", "torch==2.14.1", "torchvision==0.29.1"]


def run(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: {cmd[0]} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result, elapsed


def ensure_wsinfer() -> str:
    """wsinfer's own venv; returns its version string."""
    wsinfer = VENV / "bin" / "wsinfer"
    if not wsinfer.exists():
        run([sys.executable, "-m", "venv", VENV])
        run([VENV / "bin" / "python", "-m", "pip", "install", "-q", *WSINFER_REQUIREMENTS])
    result, _ = run(
        [
            VENV / "bin" / "python",
            "-c",
            "import wsinfer, torch, tiffslide; print(wsinfer.__version__, torch.__version__)",
        ]
    )
    return result.stdout.strip()


def offline_home() -> Path:
    """A HOME whose wsinfer-zoo registry is an empty, valid one: wsinfer starts without the network."""
    home = WORK / "home"
    registry = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text(json.dumps({"models": {}}))
    return home


def read_wsinfer_csv(path: Path) -> dict[tuple[int, int], list[float]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    return {(int(float(r["minx"])), int(float(r["miny"]))): [float(r[c]) for c in prob_cols] for r in rows}


def read_tiles_csv(path: Path, classes: list[str]) -> tuple[dict[tuple[int, int], list[float]], int]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {(int(r["x"]), int(r["y"])): [float(r[f"prob_{c}"]) for c in classes] for r in rows}, int(rows[0]["width"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--slide", type=Path, default=ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs")
    parser.add_argument("--tiles", type=Path, default=ROOT / "tests" / "fixtures" / "kather", help="parity tiles")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    versions = ensure_wsinfer()
    if WORK.exists():
        shutil.rmtree(WORK / "model", ignore_errors=True)
        shutil.rmtree(WORK / "wsinfer", ignore_errors=True)
        shutil.rmtree(WORK / "project", ignore_errors=True)
    model_dir = WORK / "model"
    shutil.copytree(args.model, model_dir, ignore=shutil.ignore_patterns("model.ts.pt"))
    export, export_s = run([sys.executable, "-m", "training.export", model_dir, "--tiles", args.tiles], cwd=ROOT)
    print(export.stdout.strip())
    slides = WORK / "slides"  # wsinfer wants a folder holding only slides
    slides.mkdir(parents=True, exist_ok=True)
    slide = slides / args.slide.name
    if not slide.exists():
        shutil.copy2(args.slide, slide)

    env = os.environ | {"HOME": str(offline_home()), "HF_HUB_OFFLINE": "1", "WSINFER_FORCE_CPU": "1"}
    wsinfer_out = WORK / "wsinfer"
    _, wsinfer_s = run(
        [
            VENV / "bin" / "wsinfer",
            "run",
            "--wsi-dir",
            slides,
            "--results-dir",
            wsinfer_out,
            "--model-path",
            model_dir / "model.ts.pt",
            "--config",
            model_dir / "config.json",
            "--num-workers",
            "1",  # 0 crashes wsinfer 0.6.1's GeoJSON step (ProcessPoolExecutor(max_workers=0))
            "--batch-size",
            "32",
        ],
        env=env,
    )
    project_out = WORK / "project"
    _, project_s = run(
        [sys.executable, "-m", "service.wsi", slide, "--out", project_out, "--model", model_dir, "--no-progress"],
        cwd=ROOT,
        env=os.environ | {"HISTO_DEVICE": "cpu"},
    )

    card = json.loads((model_dir / "card.json").read_text())
    classes = card["classes"]
    theirs = read_wsinfer_csv(wsinfer_out / "model-outputs-csv" / f"{slide.stem}.csv")
    ours, side = read_tiles_csv(project_out / slide.stem / "tiles.csv", classes)
    common = sorted(set(theirs) & set(ours))
    if not common:
        sys.exit("error: wsinfer and the slide job share no patch coordinates")
    agree = sum(
        max(range(len(classes)), key=theirs[k].__getitem__) == max(range(len(classes)), key=ours[k].__getitem__)
        for k in common
    )
    max_dp = max(abs(a - b) for k in common for a, b in zip(theirs[k], ours[k], strict=True))
    disagreements = [
        {
            "x": k[0],
            "y": k[1],
            "wsinfer": classes[max(range(len(classes)), key=theirs[k].__getitem__)],
            "slide_job": classes[max(range(len(classes)), key=ours[k].__getitem__)],
            "wsinfer_top_prob": round(max(theirs[k]), 4),
            "slide_job_top_prob": round(max(ours[k]), 4),
        }
        for k in common
        if max(range(len(classes)), key=theirs[k].__getitem__) != max(range(len(classes)), key=ours[k].__getitem__)
    ]
    result = {
        "slide": str(args.slide.relative_to(ROOT)) if args.slide.is_relative_to(ROOT) else str(args.slide),
        "model": card["name"],
        "wsinfer_and_torch": versions,
        "wsinfer_reader": "tiffslide (wsinfer's default without openslide-python)",
        "patch_side_level0_px": side,
        "patches_wsinfer": len(theirs),
        "patches_slide_job": len(ours),
        "patches_both": len(common),
        "top1_agreement": agree / len(common),
        "max_abs_prob_diff": max_dp,
        "disagreements": disagreements,
        "torchscript_export": export.stdout.strip().splitlines()[-1],
        "seconds": {"export": round(export_s, 1), "wsinfer_run": round(wsinfer_s, 1), "slide_job": round(project_s, 1)},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    print(
        f"\nwsinfer {versions.split()[0]} vs service.wsi on {slide.name}: {len(common)} common patches "
        f"(wsinfer {len(theirs)}, slide job {len(ours)}), top-1 agreement {result['top1_agreement']:.4f}, "
        f"max |Δp| {max_dp:.2e}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wsinfer.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# wsinfer 0.6.1 vs the slide job, same model, same slide",
        "",
        f"`benchmarks/wsinfer.py` on {result['machine']}: `{result['model']}` exported to TorchScript "
        f"(`python -m training.export`; {result['torchscript_export'].split(': ', 1)[-1]}), run by "
        f"`wsinfer run` (wsinfer, torch: {versions}; reader {result['wsinfer_reader']}) and by "
        f"`python -m service.wsi` (OpenSlide, ONNX Runtime) on `{result['slide']}`.",
        "",
        "| | value |",
        "|---|---|",
        f"| patches classified by wsinfer | {len(theirs)} |",
        f"| patches classified by the slide job | {len(ours)} |",
        f"| same (x, y) in both (level-0 side {side} px) | {len(common)} |",
        f"| **top-1 class agreement** | **{result['top1_agreement']:.4f}** ({agree}/{len(common)}) |",
        f"| largest probability difference | {max_dp:.2e} |",
        f"| seconds: export / wsinfer run / slide job | {export_s:.0f} / {wsinfer_s:.0f} / {project_s:.0f} |",
        "",
        "Patch counts differ because each tool detects tissue its own way; classes are compared where both "
        "classified the same patch.",
    ]
    if disagreements:
        lines += ["", "Patches whose top class differs:", "", "| x | y | wsinfer | slide job | p (wsinfer) | p (job) |"]
        lines += ["|---|---|---|---|---|---|"]
        lines += [
            f"| {d['x']} | {d['y']} | {d['wsinfer']} | {d['slide_job']} | {d['wsinfer_top_prob']} | "
            f"{d['slide_job_top_prob']} |"
            for d in disagreements
        ]
    (args.out / "wsinfer.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'wsinfer.json'} and wsinfer.md")


if __name__ == "__main__":
    main()
