"""The `histo-robust` command: help everywhere, the slide job identical to `python -m service.wsi` and
free of torch, `serve` from any working directory, and a serving install without torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from histo_robust.cli import COMMANDS, Command, main
from service.local_server import free_port, stop_server

ROOT = Path(__file__).resolve().parent.parent
SLIDE = ROOT / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
CLI = Path(sys.executable).with_name("histo-robust")  # the [project.scripts] entry point pip installed
TILE = next((ROOT / "tests" / "fixtures" / "kather" / "01_TUMOR").iterdir())


def _run(args: list[str], cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_every_command() -> None:
    assert CLI.exists(), f"{CLI} missing: reinstall with `pip install -e .`"
    for args in ([str(CLI), "--help"], [sys.executable, "-m", "histo_robust", "-h"]):
        result = _run(args)
        assert result.returncode == 0, result.stderr
        for name, command in COMMANDS.items():
            assert re.search(rf"^\s+{name}\s+{re.escape(command.summary)}$", result.stdout, flags=re.M), name
    bare = _run([str(CLI)])
    assert bare.returncode == 2 and "commands:" in bare.stdout


def test_unknown_command_is_an_error_naming_it() -> None:
    result = _run([str(CLI), "tarin"])
    assert result.returncode == 2
    assert "unknown command 'tarin'" in result.stderr and "train" in result.stderr


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: train and pretrain import torch, which this test session has loaded once already.
    expected = {
        "train": "--data",
        "slides": "--min-tissue",
        "serve": "--port",
        "pretrain": "--tiles",
        "review": "--retrained",
    }
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code in (0, None), name
        assert "usage" in out.lower(), name
        if name in expected:
            assert expected[name] in out, name


def _argv_probe(argv: list[str]) -> int:
    return 0 if sys.argv[1:] == argv == ["--data", "x y"] else 1


def test_a_command_sees_its_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py records `sys.argv[1:]` in the card as the command to reproduce a model: it must not
    carry the dispatcher's command name."""
    monkeypatch.setattr(sys, "argv", ["histo-robust", "probe", "--data", "x y"])
    monkeypatch.setitem(COMMANDS, "probe", Command(__name__, "_argv_probe", "test"))
    assert main() == 0


def test_slides_matches_service_wsi_and_never_imports_torch(tmp_path: Path) -> None:
    """`histo-robust slides` (run with torch made unimportable) writes the same files as `python -m service.wsi`."""
    args = [str(SLIDE), "--no-progress", "--readers", "threads", "--workers", "2"]
    direct = _run([sys.executable, "-m", "service.wsi", *args, "--out", str(tmp_path / "direct")])
    assert direct.returncode == 0, direct.stderr[-2000:]
    no_torch = (
        "import sys; sys.modules['torch'] = None; from histo_robust.cli import main; "
        "code = main(sys.argv[1:]); assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(code)"
    )
    cli = _run([sys.executable, "-c", no_torch, "slides", *args, "--out", str(tmp_path / "cli")])
    assert cli.returncode == 0, cli.stderr[-2000:]

    a, b = tmp_path / "direct" / SLIDE.stem, tmp_path / "cli" / SLIDE.stem
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"tiles.csv", "predictions.geojson", "heatmap.png", "summary.json"} <= set(names)
    for name in ("tiles.csv", "predictions.geojson", "heatmap.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    volatile = {"timings_s", "tiles_per_s", "job"}  # wall-clock times and the output path
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in volatile} == {k: v for k, v in sb.items() if k not in volatile}
    assert sa["tiles"] > 0


def test_serve_runs_from_any_directory(tmp_path: Path) -> None:
    """From a directory without `service/`, `histo-robust serve` still finds and serves the shipped model."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HISTO_MODEL_DIR"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(CLI), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready after 120 s:\n" + log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        with TILE.open("rb") as f:
            answer = requests.post(f"{url}/classify", files={"images": (TILE.name, f)}, timeout=60)
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        assert result["label"] in result["probabilities"]
    finally:
        stop_server(proc)


def _closure(name: str, extras: set[str], seen: dict[str, set[str]]) -> None:
    """Every distribution `name[extras]` pulls in, from the installed metadata (markers evaluated)."""
    key = name.lower().replace("_", "-")
    if key in seen and extras <= seen[key]:
        return
    seen.setdefault(key, set()).update(extras)
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        _closure(req.name, set(req.extras), seen)


def test_serving_install_pulls_no_torch() -> None:
    """`bash setup.sh` installs `.[serve]`: its whole dependency tree must be free of torch."""
    seen: dict[str, set[str]] = {}
    _closure("histo-robust", {"serve"}, seen)
    assert {"onnxruntime", "bentoml", "openslide-python", "pillow"} <= set(seen)
    heavy = {"torch", "torchvision", "timm", "lightly", "ray"} & set(seen)
    assert not heavy, f"the serving install would pull in {sorted(heavy)}"
