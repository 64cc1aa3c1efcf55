"""A reviewer's decisions on suspected mislabels: ``RUN_DIR/corrections.csv``.

The review page (``training/review.py``) writes one row per reviewed tile; ``train.py --corrections
FILE`` reads them back: a corrected label replaces the given one, an ``unusable`` tile (blur,
artefact) is dropped, a confirmed label stays. Tiles are keyed by their path relative to the
data root, exactly as ``suspects.csv`` names them, so a file stays valid when the dataset moves.

This module imports neither torch nor onnxruntime: the review page uses it too.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from models.card import sha256_file, write_atomic

log = logging.getLogger("histo_robust.corrections")

FILE = "corrections.csv"
UNUSABLE = "unusable"  # the decision for a tile no label fits: blurred, folded, pen, out of focus


class CorrectionsError(ValueError):
    """A corrections file that cannot be applied; the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class Decision:
    """One reviewed tile: what it was labelled, what the model suggested, what the reviewer decided."""

    path: str  # relative to the data root, as in suspects.csv
    given: str
    suggested: str
    decided: str  # a class name or UNUSABLE
    who: str
    when: str  # ISO 8601, UTC


COLUMNS = tuple(f.name for f in fields(Decision))
REQUIRED = ("path", "given", "decided")  # what train.py needs; the rest is provenance


def tile_key(path: Path, root: Path) -> str:
    """The name ``suspects.csv`` and ``corrections.csv`` give a tile: relative to ``root`` when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def data_root(source: str | Path) -> Path:
    """The folder tile names are relative to: the class-folder tree itself, or the CSV's folder."""
    root = Path(source).resolve()
    return root if root.is_dir() else root.parent


def read_corrections(path: str | Path, classes: Sequence[str] | None = None) -> dict[str, Decision]:
    """Tile name → decision. A tile listed twice keeps its last row (a later reviewer's word).

    With ``classes``, every decision must name one of them or ``unusable``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet may have added a BOM
    except FileNotFoundError:
        raise CorrectionsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorrectionsError(f"{path}: cannot read ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if missing := [c for c in REQUIRED if c not in columns]:
        raise CorrectionsError(f"{path}: missing columns {missing}; a corrections file has {', '.join(COLUMNS)}")
    decisions: dict[str, Decision] = {}
    for line, row in enumerate(reader, start=2):
        values = {c: (row.get(c) or "").strip() for c in COLUMNS}
        if not values["path"] or not values["decided"]:
            raise CorrectionsError(f"{path}:{line}: empty path or decided")
        if classes is not None and values["decided"] not in (*classes, UNUSABLE):
            raise CorrectionsError(
                f"{path}:{line}: decided {values['decided']!r} is neither a class of this run "
                f"({', '.join(classes)}) nor {UNUSABLE!r}"
            )
        decisions[values["path"]] = Decision(**values)
    return decisions


def write_corrections(path: str | Path, decisions: Iterable[Decision]) -> None:
    """Write every decision at once, atomically: a crash leaves the previous file, never half of one."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for decision in decisions:
        writer.writerow(asdict(decision))
    write_atomic(path, buffer.getvalue())


@dataclass
class Corrections:
    """Decisions from one or more files, checked against the classes and tiles of a run."""

    decisions: dict[str, Decision]
    files: list[dict] = field(default_factory=list)  # file, sha256, rows
    not_found: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)

    def apply(self, keys: Sequence[str], labels: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
        """(corrected labels, indices of the tiles kept, report) for the tiles named ``keys``.

        ``labels`` are the labels the run would train on (after any ``--inject-noise``): the
        decisions replace them; ``unusable`` tiles are left out of the kept indices.
        """
        corrected = labels.copy()
        keep = np.ones(len(keys), bool)
        relabelled = confirmed = given_changed = 0
        for i, key in enumerate(keys):
            decision = self.decisions.get(key)
            if decision is None:
                continue
            if decision.given and decision.given != classes[labels[i]]:
                given_changed += 1  # the label changed since the review; the reviewer's decision still wins
            if decision.decided == UNUSABLE:
                keep[i] = False
            elif classes.index(decision.decided) == labels[i]:
                confirmed += 1
            else:
                corrected[i] = classes.index(decision.decided)
                relabelled += 1
        if given_changed:
            log.warning("%d corrected tiles had another label when they were reviewed", given_changed)
        report = {
            "files": self.files,
            "decisions": len(self.decisions),
            "relabelled": relabelled,
            "confirmed": confirmed,
            "unusable_dropped": int((~keep).sum()),
            "given_label_changed_since_review": given_changed,
            "held_out_not_applied": len(self.held_out),
            "not_found": len(self.not_found),
        }
        return corrected, np.flatnonzero(keep), report


def load_corrections(
    files: Sequence[str | Path], classes: list[str], keys: Iterable[str], held_out: Iterable[str] = ()
) -> Corrections:
    """Read ``files`` (later ones override earlier ones tile by tile) and check them against the run.

    Every decision must name a class of the run or ``unusable``. Decisions on tiles the run does not
    have are counted and warned about (a file removed since the review); if none of them names a
    tile of the run, the file belongs to another dataset and that is an error. Decisions on held-out
    test tiles are not applied: the test labels stay as given.
    """
    merged: dict[str, Decision] = {}
    summary = []
    for file in files:
        decisions = read_corrections(file, classes)
        merged.update(decisions)
        summary.append({"file": str(file), "sha256": sha256_file(file), "rows": len(decisions)})
    known, test = set(keys), set(held_out)
    held = sorted(k for k in merged if k in test)
    missing = sorted(k for k in merged if k not in known and k not in test)
    if merged and len(missing) == len(merged):
        raise CorrectionsError(
            f"{', '.join(map(str, files))}: none of the {len(merged)} corrected tiles is in this run's data "
            f"(first: {missing[0]!r}); corrections name tiles relative to the --data folder they were reviewed on"
        )
    for key in missing[:5]:
        log.warning("corrected tile %s is not in the data; ignored", key)
    for key in held:
        merged.pop(key)
    for key in missing:
        merged.pop(key)
    return Corrections(merged, summary, missing, held)
