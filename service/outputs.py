"""Per-slide outputs: tiles.csv, QuPath GeoJSON, heatmap PNG and summary.json, all written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.card import write_atomic

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
OOD_COLOUR = (20, 20, 20)


def class_colours(classes: list[str]) -> dict[str, tuple[int, int, int]]:
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}


def tile_rows(
    records: np.ndarray, classes: list[str], side: int, abstain: float | None, ood: float | None
) -> list[dict]:
    """Rows from ``records`` [N, 3 + C + 1] = (index, x, y, probabilities..., ood_score)."""
    rows = []
    for rec in records:
        probs = rec[3 : 3 + len(classes)]
        score = float(rec[-1])
        top = int(np.argmax(probs))
        rows.append(
            {
                "x": int(rec[1]),
                "y": int(rec[2]),
                "width": side,
                "height": side,
                **{f"prob_{c}": round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
                "label": classes[top],
                "confidence": round(float(probs[top]), 6),
                "abstained": "" if abstain is None else bool(probs[top] < abstain),
                "ood_score": "" if not np.isfinite(score) else round(score, 4),
                "ood": "" if ood is None or not np.isfinite(score) else bool(score > ood),
            }
        )
    return rows


def write_tiles_csv(path: Path, rows: list[dict], classes: list[str]) -> None:
    columns = [
        "x",
        "y",
        "width",
        "height",
        *[f"prob_{c}" for c in classes],
        "label",
        "confidence",
        "abstained",
        "ood_score",
        "ood",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def write_geojson(path: Path, rows: list[dict], classes: list[str]) -> dict:
    """A FeatureCollection QuPath imports: one tile polygon per row with its class, colour and measurements."""
    colours = class_colours(classes)
    features = []
    for r in rows:
        x, y, w, h = r["x"], r["y"], r["width"], r["height"]
        name = "OOD" if r["ood"] is True else r["label"]
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "classification": {
                        "name": name,
                        "color": list(OOD_COLOUR if name == "OOD" else colours[r["label"]]),
                    },
                    "measurements": {
                        **{c: r[f"prob_{c}"] for c in classes},
                        "confidence": r["confidence"],
                        **({"ood_score": r["ood_score"]} if r["ood_score"] != "" else {}),
                    },
                },
            }
        )
    collection = {"type": "FeatureCollection", "features": features}
    write_atomic(path, json.dumps(collection))
    return collection


def write_heatmap(
    path: Path, thumbnail: Image.Image, downsample: float, rows: list[dict], classes: list[str], title: str
) -> None:
    """Class colours blended over the thumbnail (OOD tiles in their own colour), with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float32)
    overlay = base.copy()
    colours = class_colours(classes)
    for r in rows:
        colour = OOD_COLOUR if r["ood"] is True else colours[r["label"]]
        x0, y0 = int(r["x"] / downsample), int(r["y"] / downsample)
        x1, y1 = int(np.ceil((r["x"] + r["width"]) / downsample)), int(np.ceil((r["y"] + r["height"]) / downsample))
        overlay[y0:y1, x0:x1] = colour
    blended = (0.45 * base + 0.55 * overlay).astype(np.uint8)
    h, w = blended.shape[:2]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 8 * w / max(h, w)), min(12, 1.5 + 8 * h / max(h, w))))
    ax.imshow(blended)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    counts = {c: sum(r["label"] == c and r["ood"] is not True for r in rows) for c in classes}
    handles = [Patch(color=np.array(colours[c]) / 255, label=f"{c} ({counts[c]})") for c in classes]
    n_ood = sum(r["ood"] is True for r in rows)
    if n_ood:
        handles.append(Patch(color=np.array(OOD_COLOUR) / 255, label=f"out of distribution ({n_ood})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def write_summary(path: Path, summary: dict) -> None:
    write_atomic(path, json.dumps(summary, indent=2) + "\n")
