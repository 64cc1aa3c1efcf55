"""Ranking of suspected mislabels, and a contact sheet for re-review by a pathologist.

The score mixes two views that do not share the same failure modes: the leave-one-out vote of
the tile's nearest neighbours in embedding space (never trained on the tile's own label) and
the trained head's probability of the given label. High score = the given label is unlikely.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.card import write_atomic


def suspect_scores(knn_share_of_given: np.ndarray, prob_of_given: np.ndarray) -> np.ndarray:
    return 0.5 * (1 - knn_share_of_given) + 0.5 * (1 - prob_of_given)


def write_suspects(
    path: Path,
    paths: list[Path],
    given: np.ndarray,
    suggested: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    root: Path | None = None,
    probs: np.ndarray | None = None,
) -> np.ndarray:
    """Write ``suspects.csv`` sorted by score (highest first); returns the order.

    Paths are written relative to ``root`` (the dataset folder or CSV's folder) when given, so
    the file stays valid when the dataset moves and leaks no local directory layout. ``probs``
    adds one ``p:<class>`` column per class (the calibrated probabilities the review page shows).
    """
    order = np.argsort(-scores, kind="stable")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    prob_columns = [f"p:{c}" for c in classes] if probs is not None else []
    writer.writerow(["rank", "path", "given_label", "suggested_label", "score", *prob_columns])
    for rank, i in enumerate(order, start=1):
        shown = paths[i].relative_to(root) if root is not None and paths[i].is_relative_to(root) else paths[i]
        p = [f"{v:.4f}" for v in probs[i]] if probs is not None else []
        writer.writerow([rank, str(shown), classes[given[i]], classes[suggested[i]], f"{scores[i]:.4f}", *p])
    write_atomic(path, buffer.getvalue())
    return order


def contact_sheet(
    path: Path,
    paths: list[Path],
    given: np.ndarray,
    suggested: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    order: np.ndarray,
    top: int = 48,
    columns: int = 8,
    thumb: int = 128,
    load: Callable[[int, int], np.ndarray] | None = None,
) -> None:
    """A PNG grid of the top suspects, each captioned "given → suggested (score)".

    ``load(i, size)`` gives the pixels of item ``i`` where there is no image file (slide tiles).
    """
    chosen = [i for i in order[:top] if given[i] != suggested[i]] or list(order[:top])
    rows = max(1, (len(chosen) + columns - 1) // columns)
    caption = 28
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(chosen):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + caption)
        if load is not None:
            sheet.paste(Image.fromarray(load(i, thumb)), (x, y))
        else:
            with Image.open(paths[i]) as image:
                sheet.paste(image.convert("RGB").resize((thumb, thumb)), (x, y))
        draw.text((x + 2, y + thumb + 1), f"{classes[given[i]][:16]}", fill=(180, 0, 0))
        draw.text((x + 2, y + thumb + 14), f"-> {classes[suggested[i]][:13]} {scores[i]:.2f}", fill=(0, 110, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
