"""Per-slide outputs: tiles.csv, QuPath GeoJSON, heatmap PNG and summary.json.

Every file is written to a temporary name beside its destination, fsync'ed and renamed, so a job
killed at any moment leaves either the previous file or the complete new one, never half a file.
CSV and GeoJSON are streamed row by row from arrays, so a slide with a million tiles does not
build a million dicts. A new output format is one more writer here.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from models.card import atomic_file, write_atomic

# Distinct colours (Okabe-Ito + extras), repeated if a model has more classes.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (120, 120, 120),
    (153, 51, 0),
    (102, 0, 153),
    (0, 102, 102),
    (255, 102, 153),
]
OOD_NAME = "OOD"
OOD_COLOUR = (20, 20, 20)


def class_colours(classes: list[str]) -> dict[str, tuple[int, int, int]]:
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}


@dataclass(frozen=True)
class TileTable:
    """One slide's tile results, in grid (row-major) order.

    ``ood_scores`` is NaN where the model has no OOD scorer; thresholds are None where the model
    (or the deployment) defines none, and the matching columns are then left empty.
    """

    classes: list[str]
    side: int
    coords: np.ndarray  # [N, 2] level-0 x, y
    probabilities: np.ndarray  # [N, C]
    ood_scores: np.ndarray  # [N]
    abstain_threshold: float | None = None
    ood_threshold: float | None = None

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def label_index(self) -> np.ndarray:
        return self.probabilities.argmax(1) if len(self) else np.zeros(0, np.int64)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(1) if len(self) else np.zeros(0, np.float32)

    @property
    def abstained(self) -> np.ndarray | None:
        return None if self.abstain_threshold is None else self.confidence < self.abstain_threshold

    @property
    def ood(self) -> np.ndarray | None:
        if self.ood_threshold is None or not np.isfinite(self.ood_scores).any():
            return None
        return np.isfinite(self.ood_scores) & (self.ood_scores > self.ood_threshold)

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.label_index, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


def atomic_text(path: Path) -> contextlib.AbstractContextManager[IO[str]]:
    """A text file written atomically (temporary file, fsync, rename)."""
    return atomic_file(path, "w", encoding="utf-8", newline="")


def _flag(values: np.ndarray | None, i: int) -> str | bool:
    return "" if values is None else bool(values[i])


def write_tiles_csv(path: Path, table: TileTable) -> None:
    """One row per tissue tile: level-0 box, every class probability, label, confidence, flags."""
    columns = [
        "x",
        "y",
        "width",
        "height",
        *[f"prob_{c}" for c in table.classes],
        "label",
        "confidence",
        "abstained",
        "ood_score",
        "ood",
    ]
    labels, confidence, abstained, ood = table.label_index, table.confidence, table.abstained, table.ood
    with atomic_text(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for i, ((x, y), probs) in enumerate(zip(table.coords, table.probabilities, strict=True)):
            score = table.ood_scores[i]
            writer.writerow(
                [
                    int(x),
                    int(y),
                    table.side,
                    table.side,
                    *(f"{p:.6f}" for p in probs),
                    table.classes[labels[i]],
                    f"{confidence[i]:.6f}",
                    _flag(abstained, i),
                    f"{score:.4f}" if np.isfinite(score) else "",
                    _flag(ood, i),
                ]
            )


def write_geojson(path: Path, table: TileTable) -> None:
    """A FeatureCollection QuPath imports (File ▸ Import objects): one tile polygon per row.

    Each feature carries ``objectType: tile``, a classification (the predicted class and its colour,
    or ``OOD`` in near-black where the tile is out of distribution) and numeric measurements (every
    class probability, confidence, OOD score), which QuPath shows in its measurement tables.
    """
    colours = class_colours(table.classes)
    labels, confidence, ood = table.label_index, table.confidence, table.ood
    with atomic_text(path) as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        for i, ((x, y), probs) in enumerate(zip(table.coords.tolist(), table.probabilities, strict=True)):
            s = table.side
            label = table.classes[labels[i]]
            is_ood = ood is not None and bool(ood[i])
            measurements: dict[str, float] = {c: round(float(p), 6) for c, p in zip(table.classes, probs, strict=True)}
            measurements["confidence"] = round(float(confidence[i]), 6)
            if np.isfinite(table.ood_scores[i]):
                measurements["ood_score"] = round(float(table.ood_scores[i]), 4)
            feature: dict[str, Any] = {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "classification": {
                        "name": OOD_NAME if is_ood else label,
                        "color": list(OOD_COLOUR if is_ood else colours[label]),
                    },
                    "measurements": measurements,
                },
            }
            handle.write(("\n" if i == 0 else ",\n") + json.dumps(feature))
        handle.write("\n]}\n")


def write_heatmap(path: Path, thumbnail: Image.Image, downsample: float, table: TileTable, title: str) -> None:
    """Class colours blended over the thumbnail (OOD tiles near-black), a title and a legend of tile counts.

    Drawn with Pillow alone: matplotlib cost every slide job about 0.5 s of import and rendering
    and a large dependency in the serving image, for one picture with a legend.
    """
    from PIL import ImageDraw, ImageFont

    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float32)
    overlay = base.copy()
    colours = class_colours(table.classes)
    palette = np.array([colours[c] for c in table.classes] + [OOD_COLOUR], np.float32)
    ood = table.ood if table.ood is not None else np.zeros(len(table), bool)
    colour_index = np.where(ood, len(table.classes), table.label_index)
    lo = np.floor(table.coords / downsample).astype(np.int64)
    hi = np.ceil((table.coords + table.side) / downsample).astype(np.int64)
    for (x0, y0), (x1, y1), k in zip(lo, hi, colour_index, strict=True):
        overlay[y0:y1, x0:x1] = palette[k]
    blended = Image.fromarray((0.45 * base + 0.55 * overlay).astype(np.uint8))

    shown = np.bincount(colour_index, minlength=len(table.classes) + 1)
    entries = [(colours[c], f"{c} ({shown[k]})") for k, c in enumerate(table.classes)]
    if shown[-1]:
        entries.append((OOD_COLOUR, f"out of distribution ({shown[-1]})"))
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=15)
    pad, swatch, line = 12, 14, 22
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = 2 * pad + swatch + 8 + max(int(measure.textlength(text, font=font)) for _, text in entries)
    title_h = 2 * pad + line
    w, h = blended.size
    width = max(w + legend_w, int(measure.textlength(title, font=title_font)) + 2 * pad)
    canvas = Image.new("RGB", (width, title_h + max(h, len(entries) * line + pad)), "white")
    canvas.paste(blended, (0, title_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=title_font)
    x = w + pad
    for i, (colour, text) in enumerate(entries):
        y = title_h + i * line
        draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=tuple(colour), outline=(60, 60, 60))
        draw.text((x + swatch + 8, y), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    write_atomic(path, buffer.getvalue())


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(summary, indent=2) + "\n")
