"""One command line for histo-robust: ``histo-robust <command> [arguments]``.

Each command is one row of ``COMMANDS``: its name, the module and function that run it, and the line
``histo-robust --help`` shows. The module is imported only when its command runs, so ``histo-robust
slides`` and ``histo-robust serve`` never import torch. Adding a command is one row; its function
takes the arguments after the command name (``--help`` included) and returns an exit code, or
anything else for success (``training.train.main`` returns its summary dict).

The commands are the project's existing entry points, which keep working under their own names:
``histo-robust train`` is ``python training/train.py``, ``histo-robust slides`` is ``python -m
service.wsi``, ``histo-robust serve`` is ``bentoml serve service.service:HistoClassifier``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROG = "histo-robust"
SERVICE = "service.service:HistoClassifier"


@dataclass(frozen=True)
class Command:
    module: str
    function: str
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("training.train", "main", "retrain on your own (noisy) labels; writes a servable model directory"),
    "slides": Command("service.wsi", "main", "classify whole slides: tiles.csv, QuPath GeoJSON, heatmap, summary"),
    "serve": Command("histo_robust.cli", "serve", "serve the HTTP API (bentoml serve; its options pass through)"),
    "pretrain": Command("training.pretrain", "main", "contrastive (SimCLR) pre-training of an encoder on your tiles"),
    "review": Command("training.review", "main", "review a run's suspected mislabels in the browser (corrections.csv)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    return (
        f"usage: {PROG} <command> [arguments]\n\n"
        "Label-noise-resilient histopathology patch classifier.\n\n"
        f"commands:\n{rows}\n\n"
        f"`{PROG} <command> --help` lists a command's options."
    )


def serve(argv: Sequence[str]) -> int:
    """``bentoml serve service.service:HistoClassifier ARGS`` from the directory that holds ``service/``,
    so it works from any working directory (``--working-dir`` given again overrides it)."""
    spec = importlib.util.find_spec("service")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        print(f"{PROG} serve: the `service` package is not importable; install the project first", file=sys.stderr)
        return 2
    root = Path(next(iter(spec.submodule_search_locations))).parent
    try:
        from bentoml_cli.cli import cli
    except ImportError:
        print(f"{PROG} serve: BentoML is not installed; run `bash setup.sh`", file=sys.stderr)
        return 2
    if any(arg in ("-h", "--help") for arg in argv):
        print(
            f"{PROG} serve [OPTIONS]: serves {SERVICE} (port 3000 by default); the model comes from\n"
            "$HISTO_MODEL_DIR (default models/default). The options are bentoml serve's:\n"
        )
    return cli.main(
        args=["serve", SERVICE, "--working-dir", str(root), *argv],
        prog_name=PROG,
        standalone_mode=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"{PROG}: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    function = getattr(importlib.import_module(command.module), command.function)
    # The mains record `sys.argv[1:]` as the command that made an artifact (card.json's reproduce):
    # give them their own arguments, not this dispatcher's.
    sys.argv = [f"{PROG} {name}", *rest]
    result = function(rest)
    return result if isinstance(result, int) else 0
