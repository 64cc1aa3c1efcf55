"""The review page: a run's suspected mislabels in the browser, decisions saved to ``corrections.csv``.

    python -m training.review RUN_DIR [--port 8765] [--who NAME] [--retrained NEW_RUN_DIR]

RUN_DIR is a ``training/train.py`` output. The page shows its suspects most suspicious first (tile,
given label, suggested label, score, class probabilities); each decision (accept the suggestion,
keep the given label, another class, or unusable) is written at once and atomically to
``RUN_DIR/corrections.csv``, so closing the page loses nothing and reopening it resumes. Retrain
with ``train.py --corrections RUN_DIR/corrections.csv``; then ``--retrained NEW_RUN_DIR`` adds the
"what changed" page (metrics before and after, the tiles whose prediction changed).

The server answers on 127.0.0.1 unless told otherwise, and reads only the files of the run: tiles
are addressed by their index in ``suspects.csv``, never by a path from the browser. Neither torch
nor onnxruntime is imported; Starlette and uvicorn come with BentoML.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import logging
import math
import re
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/review.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from training.corrections import FILE as CORRECTIONS_FILE
from training.corrections import UNUSABLE, CorrectionsError, Decision, read_corrections, write_corrections

log = logging.getLogger("histo_robust.review")

PAGE_DIR = Path(__file__).resolve().parent / "review_page"
PAGES = {"index.html", "changes.html", "review.css", "review.js", "changes.js"}
MAX_BODY = 16 * 1024  # a decision is a few dozen bytes
MAX_WHO = 64
DEFAULT_PORT = 8765
# Tiles of an annotation-based run (train.py --slides): "<slide file>/x<X>_y<Y>", level-0 coordinates
SLIDE_TILE = re.compile(r"^(?P<slide>.+)/x(?P<x>\d+)_y(?P<y>\d+)$")
CONTEXT_TILES = 3  # the context crop is this many tiles wide, the tile in the middle
CONTEXT_PIXELS = 480


class ReviewError(ValueError):
    """A run directory the page cannot show; the message names the file and the problem."""


@dataclass(frozen=True)
class Suspect:
    id: int  # row of suspects.csv, most suspicious first: the only handle the browser has on a tile
    path: str  # relative to the data root, as in suspects.csv and corrections.csv
    given: str
    suggested: str
    score: float
    probs: list[float] | None


@dataclass(frozen=True)
class SlideTile:
    slide: Path
    x: int  # level-0 pixels
    y: int
    side: int


@dataclass
class Run:
    """What a train.py output directory says about its tiles."""

    directory: Path
    classes: list[str]
    suspects: list[Suspect]
    data_root: Path
    report: dict
    slide_tiles: dict[int, SlideTile]  # suspect id -> where on its slide (annotation-based runs)

    @property
    def by_path(self) -> dict[str, Suspect]:
        return {s.path: s for s in self.suspects}

    def tile_file(self, suspect: Suspect) -> Path:
        return self.data_root / suspect.path

    def tile_png(self, suspect: Suspect) -> bytes:
        where = self.slide_tiles.get(suspect.id)
        if where is None:
            return _png(self.tile_file(suspect))
        return _slide_png(where.slide, where.x, where.y, where.side, 1)

    def context_png(self, suspect: Suspect) -> bytes:
        where = self.slide_tiles[suspect.id]
        return _slide_png(where.slide, where.x, where.y, where.side, CONTEXT_TILES)


def _slide_tiles(suspects: list[Suspect], data_root: Path) -> dict[int, SlideTile]:
    """Slide coordinates of the suspects that are tiles of a slide under ``data_root``, not files.

    The grid is regular from (0, 0) in steps of the tile side (service.slides.TileGrid), so the side
    is the greatest common divisor of a slide's coordinates.
    """
    found: dict[int, tuple[Path, int, int]] = {}
    for s in suspects:
        match = SLIDE_TILE.match(s.path)
        if match and not (data_root / s.path).is_file() and (data_root / match["slide"]).is_file():
            found[s.id] = (data_root / match["slide"], int(match["x"]), int(match["y"]))
    sides: dict[Path, int] = {}
    for slide, x, y in found.values():
        sides[slide] = math.gcd(sides.get(slide, 0), x, y)
    return {i: SlideTile(slide, x, y, sides[slide] or 256) for i, (slide, x, y) in found.items()}


def load_run(directory: str | Path, data_root: str | Path | None = None) -> Run:
    """Read ``suspects.csv`` and ``report.json`` of a train.py run; errors name the file."""
    directory = Path(directory).resolve()
    suspects_file, report_file = directory / "suspects.csv", directory / "report.json"
    for file in (suspects_file, report_file):
        if not file.is_file():
            raise ReviewError(f"{file}: missing; RUN_DIR must be a training/train.py output directory")
    try:
        report = json.loads(report_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReviewError(f"{report_file}: not valid JSON ({exc})") from None
    classes = report.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise ReviewError(f"{report_file}: no 'classes' list")
    with open(suspects_file, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        needed = ["path", "given_label", "suggested_label", "score"]
        if missing := [c for c in needed if c not in columns]:
            raise ReviewError(f"{suspects_file}: missing columns {missing}")
        prob_columns = [f"p:{c}" for c in classes]
        has_probs = all(c in columns for c in prob_columns)
        suspects = []
        for line, row in enumerate(reader, start=2):
            if row["given_label"] not in classes or row["suggested_label"] not in classes:
                raise ReviewError(f"{suspects_file}:{line}: a label that is not one of the classes {classes}")
            probs = [float(row[c]) for c in prob_columns] if has_probs else None
            given, suggested, score = row["given_label"], row["suggested_label"], float(row["score"])
            suspects.append(Suspect(len(suspects), row["path"], given, suggested, score, probs))
    if data_root is None:  # train.py records it; older runs only name the data source
        recorded = report.get("suspects", {}).get("data_root") or report.get("data", {}).get("source", "")
        data_root = Path(recorded) if Path(recorded).is_dir() else Path(recorded).parent
    data_root = Path(data_root).resolve()
    slide_tiles = _slide_tiles(suspects, data_root)
    if suspects and not (data_root / suspects[0].path).is_file() and 0 not in slide_tiles:
        raise ReviewError(
            f"{suspects_file}: tile {suspects[0].path!r} not found under {data_root}; "
            "give the data folder with --data-root"
        )
    return Run(directory, classes, suspects, data_root, report, slide_tiles)


class DecisionBody(BaseModel):
    """What the page sends for one decision."""

    model_config = ConfigDict(extra="forbid")

    tile: int | str = Field(description="the tile's id (its row in suspects.csv)")
    decided: str = Field(description="a class of the run, or 'unusable'")
    who: str = Field(min_length=1, max_length=MAX_WHO, description="the reviewer's name")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Review:
    """The decisions of one run, kept in memory and written through to ``corrections.csv``."""

    def __init__(self, run: Run, who: str, retrained: Run | None = None) -> None:
        self.run, self.who, self.retrained = run, who, retrained
        self.file = run.directory / CORRECTIONS_FILE
        self.lock = threading.Lock()  # handlers run in a thread pool; one writer at a time
        try:
            # decisions on tiles this run does not list are kept in the file, never shown
            self.decisions = read_corrections(self.file, run.classes) if self.file.is_file() else {}
        except CorrectionsError as exc:
            raise ReviewError(str(exc)) from None

    def tile(self, raw: Any) -> Suspect:
        """The suspect a browser-given id names; ``LookupError`` with a message otherwise."""
        text = str(raw)
        if not (text.isascii() and text.isdigit()) or int(text) >= len(self.run.suspects):
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise LookupError(f"unknown tile id {shown!r}: tile ids are 0 to {len(self.run.suspects) - 1}")
        return self.run.suspects[int(text)]

    def state(self) -> dict:
        ids = self.run.by_path
        return {
            "run": self.run.directory.name,
            "classes": self.run.classes,
            "unusable": UNUSABLE,
            "who": self.who,
            "retrained": self.retrained.directory.name if self.retrained else None,
            "suspects": [
                {
                    "id": s.id,
                    "given": s.given,
                    "suggested": s.suggested,
                    "score": s.score,
                    "probs": s.probs,
                    "context": s.id in self.run.slide_tiles,
                }
                for s in self.run.suspects
            ],
            "decisions": {
                str(ids[d.path].id): {"decided": d.decided, "who": d.who, "when": d.when}
                for d in self.decisions.values()
                if d.path in ids
            },
        }

    def decide(self, suspect: Suspect, decided: str, who: str) -> Decision:
        decision = Decision(
            suspect.path,
            suspect.given,
            suspect.suggested,
            decided,
            who,
            datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self.lock:
            previous = self.decisions.get(suspect.path)
            self.decisions[suspect.path] = decision
            try:
                write_corrections(self.file, self.decisions.values())
            except OSError:
                self._restore(suspect.path, previous)  # memory never claims what the file does not hold
                raise
        return decision

    def undo(self, suspect: Suspect) -> bool:
        with self.lock:
            previous = self.decisions.pop(suspect.path, None)
            if previous is None:
                return False
            try:
                write_corrections(self.file, self.decisions.values())
            except OSError:
                self._restore(suspect.path, previous)
                raise
        return True

    def _restore(self, path: str, previous: Decision | None) -> None:
        if previous is None:
            self.decisions.pop(path, None)
        else:
            self.decisions[path] = previous

    def progress(self) -> dict:
        ids = self.run.by_path
        return {"reviewed": sum(p in ids for p in self.decisions), "total": len(self.run.suspects)}

    def changes(self) -> dict:
        """Metrics of the run and of its retrained successor, and the tiles whose prediction changed."""
        if self.retrained is None:
            raise LookupError("no retrained run: start the page with --retrained NEW_RUN_DIR")
        before, after = self.run, self.retrained
        after_by_path = after.by_path
        changed = []
        for s in before.suspects:
            new = after_by_path.get(s.path)
            if new is None or new.suggested == s.suggested:
                continue
            decision = self.decisions.get(s.path)
            changed.append(
                {
                    "id": s.id,
                    "given": s.given,
                    "decided": decision.decided if decision else None,
                    "label_after": new.given,  # the label the retrained run trained on
                    "before": s.suggested,
                    "after": new.suggested,
                }
            )
        dropped = sum(s.path not in after_by_path for s in before.suspects)
        return {
            "before": before.directory.name,
            "after": after.directory.name,
            "metrics": _metric_rows(before.report, after.report),
            "corrections": after.report.get("corrections"),
            "n_compared": len(before.suspects) - dropped,
            "dropped": dropped,
            "changed": changed,
        }


def _metric_rows(before: dict, after: dict) -> list[dict]:
    """The measures both reports carry, as (name, before, after, note) rows."""
    rows = []

    def add(name: str, get, note: str = "") -> None:
        try:
            a, b = get(before), get(after)
        except (KeyError, TypeError):
            return
        if a is not None and b is not None:
            rows.append({"name": name, "before": a, "after": b, "note": note})

    add("held-out test accuracy", lambda r: r["test"]["accuracy"], "clean labels, unseen slides")
    add("held-out test balanced accuracy", lambda r: r["test"]["balanced_accuracy"], "clean labels, unseen slides")
    add(
        "validation accuracy vs the original labels",
        lambda r: r["injected_noise"]["val_accuracy_vs_original_labels"],
        "noise-injection experiments only",
    )
    add(
        "noisy-validation accuracy",
        lambda r: r["val"]["accuracy"],
        "against each run's own labels: the corrections changed some of them",
    )
    add("suspects the head disagrees with", lambda r: r["suspects"]["n_flagged"], "")
    add("labelled tiles", lambda r: r["data"]["n"], "unusable tiles are dropped")
    return rows


def create_app(review: Review, host: str = "127.0.0.1") -> Starlette:
    """The page, its static files and the JSON API over one :class:`Review`."""

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in PAGES:
            return _error(404, f"no such page {name!r}")
        return FileResponse(PAGE_DIR / name, headers={"Cache-Control": "no-cache"})

    async def changes_page(request: Request) -> Response:
        return FileResponse(PAGE_DIR / "changes.html", headers={"Cache-Control": "no-cache"})

    async def state(request: Request) -> Response:
        return JSONResponse({**review.state(), "progress": review.progress()})

    def image(request: Request) -> Response:
        try:
            suspect = review.tile(request.path_params["tile"])
        except LookupError as exc:
            return _error(404, str(exc.args[0]))
        try:
            return Response(review.run.tile_png(suspect), media_type="image/png")
        except (OSError, UnidentifiedImageError) as exc:
            return _error(410, f"tile {suspect.id}: its image can no longer be read ({type(exc).__name__})")

    def context(request: Request) -> Response:
        try:
            suspect = review.tile(request.path_params["tile"])
        except LookupError as exc:
            return _error(404, str(exc.args[0]))
        if suspect.id not in review.run.slide_tiles:
            return _error(404, f"tile {suspect.id} is a patch file, not a tile of a slide: no context to show")
        try:
            return Response(review.run.context_png(suspect), media_type="image/png")
        except (OSError, UnidentifiedImageError) as exc:
            return _error(410, f"tile {suspect.id}: its slide can no longer be read ({type(exc).__name__})")

    async def decide(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # also what keeps other web sites out: a cross-origin JSON post needs a preflight we never allow
            return _error(415, "send the decision as application/json")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, f"body of {len(body)} bytes; a decision is at most {MAX_BODY}")
        try:
            parsed = DecisionBody.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            status = 400 if any(e["type"] == "json_invalid" for e in exc.errors()) else 422
            return _error(status, f"malformed decision: {problems}")
        try:
            suspect = review.tile(parsed.tile)
        except LookupError as exc:
            return _error(404, str(exc.args[0]))
        if parsed.decided not in (*review.run.classes, UNUSABLE):
            return _error(
                422,
                f"unknown class {parsed.decided!r}: choose one of {', '.join(review.run.classes)} or {UNUSABLE!r}",
            )
        who = parsed.who.strip()
        if not who or not who.isprintable():
            return _error(422, "who: give the reviewer's name (printable characters)")
        decision = await _in_thread(review.decide, suspect, parsed.decided, who)
        return JSONResponse(
            {
                "tile": suspect.id,
                "decided": decision.decided,
                "who": decision.who,
                "when": decision.when,
                "progress": review.progress(),
            }
        )

    async def undo(request: Request) -> Response:
        try:
            suspect = review.tile(request.path_params["tile"])
        except LookupError as exc:
            return _error(404, str(exc.args[0]))
        removed = await _in_thread(review.undo, suspect)
        if not removed:
            return _error(404, f"tile {suspect.id} has no decision to undo")
        return JSONResponse({"tile": suspect.id, "progress": review.progress()})

    async def changes(request: Request) -> Response:
        try:
            return JSONResponse(review.changes())
        except LookupError as exc:
            return _error(404, str(exc.args[0]))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no such page or API: {request.url.path}")

    allowed_hosts = sorted({host, "127.0.0.1", "localhost", "[::1]"})
    return Starlette(
        exception_handlers={404: not_found},
        routes=[
            Route("/", page),
            Route("/changes", changes_page),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Route("/static/{name}", page),
            Route("/api/state", state),
            Route("/api/tiles/{tile:path}/image", image),
            Route("/api/tiles/{tile:path}/context", context),
            Route("/api/decisions", decide, methods=["POST"]),
            Route("/api/decisions/{tile:path}", undo, methods=["DELETE"]),
            Route("/api/changes", changes),
        ],
        # a page on 127.0.0.1 is still reachable by DNS rebinding unless the Host header is checked
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=["*"] if host == "0.0.0.0" else allowed_hosts)],
    )


async def _in_thread(function, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


@lru_cache(maxsize=512)
def _png(path: Path) -> bytes:
    """Any tile format Pillow reads (TIFF included, which browsers do not show) as PNG."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@lru_cache(maxsize=256)
def _slide_png(slide: Path, x: int, y: int, side: int, tiles: int) -> bytes:
    """``tiles`` × ``tiles`` grid tiles of ``slide`` centred on the one at (x, y), outlined; as PNG.

    Read at the coarsest level that keeps the crop at least CONTEXT_PIXELS wide (OpenSlide pads
    outside the slide with transparent pixels, shown white).
    """
    import openslide  # only annotation-based runs need it; the serving install has it

    margin = side * (tiles - 1) // 2
    width = side * tiles
    with openslide.OpenSlide(str(slide)) as handle:
        level = handle.get_best_level_for_downsample(max(1.0, width / CONTEXT_PIXELS))
        down = handle.level_downsamples[level]
        size = max(1, round(width / down))
        region = handle.read_region((x - margin, y - margin), level, (size, size))
    canvas = Image.new("RGB", region.size, "white")
    canvas.paste(region, mask=region.getchannel("A"))
    if tiles > 1:
        if canvas.width > CONTEXT_PIXELS:
            canvas = canvas.resize((CONTEXT_PIXELS, CONTEXT_PIXELS), Image.BILINEAR)
        scale = canvas.width / width
        low, high = round(margin * scale), round((margin + side) * scale) - 1  # the tile, in the middle
        ImageDraw.Draw(canvas).rectangle([low, low, high, high], outline=(20, 20, 20), width=3)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.review",
        description="Review a run's suspected mislabels in the browser; decisions go to RUN_DIR/corrections.csv "
        "(retrain with training/train.py --corrections RUN_DIR/corrections.csv).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training/train.py output (suspects.csv, report.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to answer on; 0.0.0.0 opens the page to the network")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    p.add_argument("--who", default=None, help="reviewer name the page starts with (default: your login name)")
    p.add_argument("--retrained", metavar="NEW_RUN_DIR", help="the run retrained on the corrections: adds /changes")
    p.add_argument("--data-root", help="folder the tile paths in suspects.csv are relative to (default: from report)")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        run = load_run(args.run_dir, args.data_root)
        retrained = load_run(args.retrained, args.data_root) if args.retrained else None
        if retrained is not None and retrained.classes != run.classes:
            raise ReviewError(f"{args.retrained}: classes {retrained.classes} differ from {args.run_dir}'s")
        review = Review(run, args.who or _login(), retrained)
    except ReviewError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = review.progress()
    print(
        f"reviewing {run.directory} ({progress['reviewed']} of {progress['total']} tiles decided): "
        f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}/  (Ctrl-C to stop)",
        flush=True,
    )
    uvicorn.run(create_app(review, args.host), host=args.host, port=args.port, log_level="warning")
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


if __name__ == "__main__":
    raise SystemExit(main())
