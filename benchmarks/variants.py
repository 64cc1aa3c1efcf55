"""CPU throughput of the shipped model: fp32 / fp16 / int8 ONNX vs torch eager, batch 32, one run.

    python benchmarks/variants.py [--seconds 10] [--compare runs/other-model]

Builds the fp16 and int8 variants of ``models/default`` in a temporary folder with the same code
``training/train.py --variants`` uses, checks their parity against fp32 on real fixture tiles,
and prints images/s for each beside torch eager (encoder + head) on the same batch. ``--compare``
times another model directory's fp32 graph on the same batch in the same run (e.g. a model trained
with the default stacked encoders, against the shipped single-encoder one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime as ort
import torch

from models.card import load_model_dir, write_atomic
from training.embed import Normalize, load_rgb_resized
from training.encoders import build_encoder
from training.export import HEAD_FILE, fp16_variant, int8_variant, load_head

ROOT = Path(__file__).resolve().parent.parent


def throughput(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "variants.json")
    p.add_argument("--compare", type=Path, help="another model directory: its fp32 graph, same batch")
    args = p.parse_args(argv)
    model = load_model_dir(ROOT / "models" / "default")
    card = model.card
    tiles = sorted((ROOT / "tests" / "fixtures" / "kather").glob("*/*.webp"))
    images = np.stack([load_rgb_resized(t, card.input_size) for t in tiles])
    batch = images[: args.batch]
    result: dict = {"batch": args.batch, "threads": torch.get_num_threads(), "images_per_s": {}, "parity": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": model.onnx_path, "fp16": Path(tmp) / "fp16.onnx", "int8": Path(tmp) / "int8.onnx"}
        fp16_variant(paths["fp32"], paths["fp16"])
        int8_variant(paths["fp32"], paths["int8"], images)
        reference = None
        for name, path in paths.items():
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            probs = session.run(["probabilities"], {"images": images})[0]
            if reference is None:
                reference = probs
            result["parity"][name] = {
                "max_abs_diff": float(np.abs(probs - reference).max()),
                "top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
                "size_mb": path.stat().st_size / 1e6,
            }
            result["images_per_s"][f"onnxruntime {name}"] = throughput(
                lambda b, s=session: s.run(["probabilities"], {"images": b}), batch, args.seconds
            )
    encoder = build_encoder(card.encoder.id)
    head = load_head(ROOT / "models" / "default" / HEAD_FILE, card.head.kind, len(card.classes))
    normalize = Normalize(encoder.spec.mean, encoder.spec.std)

    @torch.inference_mode()
    def eager(b: np.ndarray) -> torch.Tensor:
        return torch.softmax(head(encoder(normalize(torch.from_numpy(b)))), 1)

    result["images_per_s"]["torch eager fp32"] = throughput(eager, batch, args.seconds)
    torch_ips = result["images_per_s"]["torch eager fp32"]
    if args.compare:
        other = load_model_dir(args.compare)
        session = ort.InferenceSession(str(other.onnx_path), providers=["CPUExecutionProvider"])
        other_ips = throughput(lambda b: session.run(["probabilities"], {"images": b}), batch, args.seconds)
        fp32_ips = result["images_per_s"]["onnxruntime fp32"]
        result["compare"] = {
            "model_dir": str(args.compare),
            "encoder": other.card.encoder.id,
            "size_mb": other.onnx_path.stat().st_size / 1e6,
            "images_per_s": other_ips,
            "time_ratio_vs_default_fp32": fp32_ips / other_ips,
        }
    lines = [f"CPU, batch {args.batch}, {torch.get_num_threads()} threads, model {card.name}"]
    for name, ips in result["images_per_s"].items():
        extra = ""
        key = name.split()[-1]
        if name.startswith("onnxruntime"):
            par = result["parity"][key]
            extra = (
                f"  ({ips / torch_ips:.2f}x torch; {par['size_mb']:.1f} MB; max|dp| {par['max_abs_diff']:.1e}, "
                f"top-1 agreement {100 * par['top1_agreement']:.1f} %)"
            )
        lines.append(f"  {name:22s}: {ips:7.1f} images/s{extra}")
    if args.compare:
        lines.append(
            f"  {other.card.name} ({other.card.encoder.id}, fp32, {result['compare']['size_mb']:.1f} MB): "
            f"{other_ips:.1f} images/s, {result['compare']['time_ratio_vs_default_fp32']:.2f}x the time per image "
            f"of {card.name} fp32"
        )
    print("\n".join(lines))
    result["report"] = lines
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
