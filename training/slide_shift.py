"""Which classes will not transfer to new slides: disagreements of the cross-slide predictions.

No calibration fitted on other slides can fix a class that looks different on an unseen slide
(``benchmarks/results/calibration_limits.md``: on Kather, debris is called stroma on 45-80 % of
three held-out slides' debris tiles, at 0.46-0.62 confidence, with clean labels as with noisy
ones). The cross-slide predictions already show it on the training slides, without clean labels:
every labelled slide is predicted by heads that never saw it, and where most of a slide's tiles of
one class are predicted as another, new slides will see the same confusion.

The tiles are grouped by their **kNN-cleaned** labels, not the given ones. With 40 % noise, a slide
with no adipose tissue still has dozens of tiles *labelled* adipose, all of them noise, and the
heads rightly call them something else; the neighbours' vote mostly follows the slide's own tissue
(on Kather with 40 % noise, 75-100 % of the tiles in the groups flagged most often were truly of
their cleaned class).
"""

from __future__ import annotations

import numpy as np


def slide_disagreements(
    predicted: np.ndarray,
    reference: np.ndarray,
    slides: np.ndarray | list[str],
    classes: list[str],
    min_tiles: int = 20,
    min_share: float = 0.3,
) -> list[dict]:
    """(slide, class) groups whose tiles are mostly predicted as one other class, largest share first.

    ``predicted``: cross-slide predictions; ``reference``: the labels to group by (kNN-cleaned).
    A group counts with at least ``min_tiles`` tiles; a row is kept when one other class takes at
    least ``min_share`` of the group. Each row: slide, label, predicted, share, n.
    """
    predicted, reference, slides = np.asarray(predicted), np.asarray(reference), np.asarray(slides)
    rows = []
    for slide in np.unique(slides):
        for label in range(len(classes)):
            group = (slides == slide) & (reference == label)
            n = int(group.sum())
            if n < min_tiles:
                continue
            counts = np.bincount(predicted[group], minlength=len(classes))
            counts[label] = 0
            other = int(counts.argmax())
            share = counts[other] / n
            if share >= min_share:
                rows.append(
                    {
                        "slide": str(slide),
                        "label": classes[label],
                        "predicted": classes[other],
                        "share": float(share),
                        "n": n,
                    }
                )
    return sorted(rows, key=lambda r: -r["share"])


def describe(row: dict) -> str:
    """One line for the console: what the heads that never saw the slide did with one class."""
    return (
        f"slide {row['slide']}: {row['share']:.0%} of its {row['n']} tiles labelled {row['label']} "
        f"(kNN-cleaned) are predicted {row['predicted']} by heads that never saw that slide"
    )
