"""Contrastive self-supervised pre-training (SimCLR) of a registry encoder on unlabelled tiles.

    python training/pretrain.py --tiles TILES --out encoders/mine [--init efficientnet_lite0_ms]

Every team has piles of unlabelled tiles from its own slides. SimCLR (Chen et al. 2020) with
histology augmentations — crops, flips, 90° rotations, H&E stain jitter in HED space, colour
jitter, blur — teaches the encoder to ignore stain and scanner differences between slides, the
shift that costs frozen ImageNet features most on unseen slides. Labels are never read.

The result, ``OUT/encoder.safetensors`` + ``OUT/encoder.json``, is a registry encoder:
``training/train.py --encoder OUT`` and the ONNX export use it unchanged. Training checkpoints
every epoch to ``OUT/checkpoint.pt`` and resumes from it after a kill.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from models.card import write_atomic
from training.data import IMAGE_SUFFIXES, DataError
from training.encoders import STACK_SEPARATOR, EncoderError, build_encoder, sha256_file, spec_for

log = logging.getLogger("histo_robust.pretrain")

# Ruifrok & Johnston (2001) stain vectors: rows are haematoxylin, eosin, DAB optical densities.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class HEDJitter(nn.Module):
    """Perturb haematoxylin/eosin/DAB concentrations: ``c' = c·α + β`` per stain (Tellez et al. 2018)."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.02) -> None:
        super().__init__()
        self.sigma, self.bias = sigma, bias

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # float [3, H, W] in 0..1
        od = -torch.log(image.clamp_min(1e-6)).permute(1, 2, 0) @ _HED_FROM_RGB
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.bias
        rgb = torch.exp(-((od * alpha + beta) @ _RGB_FROM_HED))
        return rgb.permute(2, 0, 1).clamp(0, 1)


class Rot90(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(0, 4, ())), dims=(-2, -1))


def histology_views(size: int) -> v2.Compose:
    """One random view of a tile; two calls give the SimCLR positive pair."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.4, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            Rot90(),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([HEDJitter(0.05, 0.02)], p=0.8),
            v2.RandomApply([v2.ColorJitter(0.25, 0.25, 0.15, 0.03)], p=0.8),
            v2.RandomGrayscale(p=0.1),
            v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 1.5))], p=0.3),
        ]
    )


def list_tiles(source: Path, min_side: int) -> list[Path]:
    """Every readable image under ``source`` (a folder, searched recursively, or a CSV's path column)."""
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    if source.is_dir():
        candidates = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        import csv

        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            if "path" not in (reader.fieldnames or []):
                raise DataError(f"{source}: CSV needs a path column")
            candidates = [(source.parent / row["path"]).resolve() for row in reader]
    tiles, small, unreadable = [], [], []
    for path in candidates:
        try:
            with Image.open(path) as image:
                image.load()
                if min(image.size) < min_side:
                    small.append(path)
                    continue
        except OSError:
            unreadable.append(path)
            continue
        tiles.append(path)
    for path in unreadable[:5]:
        log.warning("skipping unreadable image %s", path)
    if small and not tiles:
        raise DataError(
            f"{source}: all {len(small)} images are smaller than the {min_side}px minimum side "
            f"(e.g. {small[0]}); lower --image-size or use larger tiles"
        )
    if not tiles:
        raise DataError(f"{source}: no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if small:
        log.warning("skipping %d images smaller than %dpx (e.g. %s)", len(small), min_side, small[0])
    return tiles


class TileViews(torch.utils.data.Dataset):
    def __init__(self, tiles: list[Path], size: int, mean, std) -> None:
        self.tiles = tiles
        self.views = histology_views(size)
        self.normalize = v2.Normalize(mean, std)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.tiles[i]) as image:
            image = image.convert("RGB")
            return self.normalize(self.views(image)), self.normalize(self.views(image))


class SimCLR(nn.Module):
    def __init__(self, features: nn.Module, dim: int, proj_dim: int = 128) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.features = features
        self.projection = SimCLRProjectionHead(dim, 512, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(x))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training/pretrain.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tiles", required=True, help="folder of tiles (recursive) or CSV with a path column")
    p.add_argument("--out", required=True, help="output folder: encoder.safetensors, encoder.json, checkpoint.pt")
    p.add_argument("--init", default="efficientnet_lite0_ms", help="registry encoder to start from")
    p.add_argument("--weights", help="weights file for --init (default: the entry's built-in weights)")
    p.add_argument("--from-scratch", action="store_true", help="random initialisation instead of --init weights")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=0, help="stop cleanly after this long (0: no cap)")
    p.add_argument("--image-size", type=int, default=160, help="crop size; also the encoder's input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="encoder name (default: OUT folder name)")
    p.add_argument("--mpp", type=float, default=None, help="µm/px of the tiles (default: the --init entry's)")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if STACK_SEPARATOR in args.init:
            raise EncoderError(f"--init {args.init}: pre-training starts from one encoder, not a stack")
        spec = spec_for(args.init)
        tiles = list_tiles(Path(args.tiles), min_side=min(args.image_size, 64) // 2)
        start = build_encoder(args.init, args.weights, random_init=args.from_scratch)
    except (DataError, EncoderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    features = start.features
    for p in features.parameters():
        p.requires_grad_(True)
    torch.manual_seed(args.seed)
    model = SimCLR(features, start.embedding_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tiles) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / (args.epochs * steps_per_epoch))))
    )
    first_epoch, history = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        first_epoch, history = _resume(ckpt, args, model, optimizer, scheduler)
    from lightly.loss import NTXentLoss

    criterion = NTXentLoss(temperature=args.temperature)
    dataset = TileViews(tiles, args.image_size, spec.mean, spec.std)
    generator = torch.Generator().manual_seed(args.seed + first_epoch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=generator,
        persistent_workers=args.workers > 0,
    )
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(first_epoch, args.epochs):
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for a, b in bar:
            loss = criterion(model(a), model(b))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.monotonic() - started})
        _checkpoint(ckpt, args, model, optimizer, scheduler, epoch + 1, history)
        _save_encoder(out, args, spec, model, len(tiles), history)
        if time.monotonic() > deadline:
            log.info("time cap reached after epoch %d", epoch + 1)
            break
    if not history:
        _save_encoder(out, args, spec, model, len(tiles), history)
    print(f"done: {out}/encoder.json ({len(history)} epochs, last loss {history[-1]['loss'] if history else 'n/a'})")
    return {"history": history, "out": str(out)}


def _checkpoint(path: Path, args, model, optimizer, scheduler, epoch: int, history: list[dict]) -> None:
    state = {
        "init": args.init,
        "image_size": args.image_size,
        "epoch": epoch,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a kill mid-write leaves the previous checkpoint intact


def _resume(path: Path, args, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which and why
        print(f"error: {path}: cannot read checkpoint ({exc})", file=sys.stderr)
        raise SystemExit(2) from None
    if state.get("init") != args.init or state["model"].keys() != model.state_dict().keys():
        print(
            f"error: {path}: checkpoint is from encoder {state.get('init')!r}, not {args.init!r} "
            "(delete it or pick another --out)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def _save_encoder(out: Path, args, spec, model: SimCLR, n_tiles: int, history: list[dict]) -> None:
    from safetensors.torch import save_file

    net = model.features.net if hasattr(model.features, "net") else model.features
    weights = out / "encoder.safetensors"
    tmp = out / ".encoder.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(weights)
    description = {
        "name": args.name or out.resolve().name,
        "base": args.init,
        "weights": weights.name,
        "weights_sha256": sha256_file(weights),
        "input_size": args.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "mpp": args.mpp if args.mpp is not None else spec.mpp,
        "pretraining": (
            f"SimCLR (NT-Xent t={args.temperature}) on {n_tiles} unlabelled tiles from {args.tiles}, "
            f"{len(history)} epochs, init {'random' if args.from_scratch else args.init}, seed {args.seed}"
        ),
        "description": f"{spec.description} Contrastively pre-trained in-domain (training/pretrain.py).",
        "history": history,
        "created": datetime.now(UTC).isoformat(),
        "command": "python training/pretrain.py " + " ".join(sys.argv[1:]),
    }
    write_atomic(out / "encoder.json", json.dumps(description, indent=2) + "\n")


if __name__ == "__main__":
    main()
