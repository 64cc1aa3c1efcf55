"""The slide job on a real Ray cluster on 127.0.0.1: a head and two worker nodes started with ``ray start``.

The workers advertise one GPU each (there is none: Ray then schedules the slide workers there, one
per "GPU", and ONNX Runtime runs on the CPU). Every Ray output is compared with the local job's on
the same slides, byte for byte; the cluster is torn down by a finalizer whatever happens.
"""

from __future__ import annotations

import json
import lzma
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.ray_cluster import LocalRayCluster, free_port
from tests.slide_factory import tissue_image, write_pyramid

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ("tiles.csv", "predictions.geojson", "heatmap.png")
TIMING = ("timings_s", "tiles_per_s")
# the same arguments for both engines, so that summary.json's readers/workers fields agree too
ARGS = ["--no-progress", "--readers", "threads", "--workers", "1", "--batch-size", "8"]
# six slides of 4 to 20 tiles (150 px tiles at 0.495 µm/px), tile-aligned tissue boxes
BOXES = [(150, 150, 150 + 150 * w, 150 + 150 * h) for w, h in ((2, 2), (3, 2), (3, 3), (4, 3), (4, 4), (5, 4))]
LOCAL_JOB = """
import runpy, sys
sys.argv = ["service.wsi", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("service.wsi", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("RAY_IMPORTED", "ray" in sys.modules, flush=True)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A folder of six slides, smallest first by name (the job must still start with the largest)."""
    folder = tmp_path_factory.mktemp("slides")
    for k, box in enumerate(BOXES):
        write_pyramid(folder / f"s{k}.tiff", tissue_image(1024, 1024, [box], seed=k), 0.495)
    return folder


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "broken.svs"
    path.write_bytes(b"this is not a slide")
    return path


@pytest.fixture(scope="module")
def reference(slides, broken, tmp_path_factory) -> dict:
    """The local job on the same slides (and the bad file), in a process of its own."""
    out = tmp_path_factory.mktemp("local") / "out"
    proc = subprocess.run(
        [sys.executable, "-c", LOCAL_JOB, str(slides), str(broken), "--out", str(out), *ARGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {"out": out, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs for slide workers) and two worker nodes of one CPU and one advertised GPU each."""
    ray_cluster = LocalRayCluster(object_store_mb=100)
    try:
        ray_cluster.start_head(num_cpus=0)
        ray_cluster.add_worker(num_cpus=1, num_gpus=1)
        ray_cluster.add_worker(num_cpus=1, num_gpus=1)
        yield ray_cluster
    finally:
        ray_cluster.stop()


def _ray_job(cluster: LocalRayCluster, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.wsi", *args, *ARGS, "--engine", "ray"],
        cwd=ROOT,
        env=env or cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _summary(path: Path, *ignore: str) -> dict:
    summary = json.loads(path.read_text())
    for key in (*TIMING, *ignore):
        summary.pop(key)
    return summary


def _assert_same_outputs(out: Path, reference: Path, names: list[str], *ignore: str) -> None:
    for name in names:
        for output in OUTPUTS:
            assert (out / name / output).read_bytes() == (reference / name / output).read_bytes(), (name, output)
        assert _summary(out / name / "summary.json", *ignore) == _summary(reference / name / "summary.json", *ignore)
        assert sorted(p.name for p in (out / name).iterdir()) == sorted([*OUTPUTS, "summary.json"])  # no lock left
        rows = (out / name / "tiles.csv").read_text().splitlines()[1:]
        assert len(rows) == len(set(rows)) > 0  # no tile twice


def test_the_local_job_never_imports_ray(reference):
    assert reference["returncode"] == 1, reference["stderr"]  # the bad file
    assert "RAY_IMPORTED False" in reference["stdout"]


def test_cluster_job_matches_the_local_job_and_records_the_bad_file(cluster, slides, broken, reference, tmp_path):
    out = tmp_path / "out"
    proc = _ray_job(cluster, str(slides), str(broken), "--out", str(out), "--ray-address", cluster.address)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    names = [f"s{k}" for k in range(len(BOXES))]
    _assert_same_outputs(out, reference["out"], names)
    # the driver writes failures.json, in the local job's format, to the byte
    assert (out / "failures.json").read_bytes() == (reference["out"] / "failures.json").read_bytes()
    failures = json.loads((out / "failures.json").read_text())
    assert [Path(f["slide"]).name for f in failures] == ["broken.svs"]
    assert "cannot open with OpenSlide" in failures[0]["error"]
    assert "1 of 7 slides failed" in stderr
    manifest = json.loads((out / "run_manifest.json").read_text())
    entries = {Path(e["slide"]).name: e for e in manifest["slides"]}
    assert manifest["workers"] == 2 and manifest["worker_resources"] == {"num_gpus": 1, "num_cpus": 1}
    assert {e["status"] for n, e in entries.items() if n != "broken.svs"} == {"done"}
    assert entries["broken.svs"]["status"] == "failed" and entries["broken.svs"]["attempts"] == 1  # not retried
    assert len({e["node_id"] for e in entries.values()}) == 2  # both worker nodes took slides
    by_size = sorted(entries, key=lambda n: -(slides / n if n != "broken.svs" else broken).stat().st_size)
    assert sorted(entries, key=lambda n: entries[n]["order"]) == by_size  # largest first
    # resume is the same command: everything is done, nothing is recomputed
    again = _ray_job(cluster, str(slides), "--out", str(out), "--ray-address", cluster.address)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert {e["status"] for e in manifest["slides"]} == {"skipped"}
    _assert_same_outputs(out, reference["out"], names)


def test_a_driver_without_the_token_is_refused_and_told_why(cluster, slides, tmp_path):
    """Token authentication stays on: a driver that does not send the cluster's token cannot join."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = _ray_job(
        cluster, str(slides / "s0.tiff"), "--out", str(tmp_path / "out"), "--ray-address", cluster.address, env=env
    )
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "cannot join the Ray cluster" in stderr
    assert "RAY_AUTH_MODE=token" in stderr and not (tmp_path / "out" / "s0").exists()


def test_a_worker_node_killed_mid_job_loses_no_slide(cluster, slides, reference, tmp_path):
    out = tmp_path / "out"
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}  # the address from the environment this time
    proc = _ray_job(cluster, str(slides), "--out", str(out), env=env)
    workers = cluster.nodes[1:]
    victim, victim_pid = None, 0
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for lock in out.glob("*/.lock"):  # a slide being written names its holder: "host H pid P"
            try:
                holder = lock.read_text().split()
            except FileNotFoundError:
                continue
            if len(holder) == 4:
                victim_pid = int(holder[3])
                victim = next((node for node in workers if victim_pid in cluster.pids(node)), None)
                break
        time.sleep(0.02)
    assert victim is not None, "no slide was caught running on a worker node"
    cluster.kill(victim)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    names = [f"s{k}" for k in range(len(BOXES))]
    # the killed slide resumed from the partial results the dead worker left: resumed_tiles may differ
    _assert_same_outputs(out, reference["out"], names, "resumed_tiles")
    manifest = json.loads((out / "run_manifest.json").read_text())
    entries = {Path(e["slide"]).stem: e for e in manifest["slides"]}
    assert sorted(entries) == names and {e["status"] for e in entries.values()} == {"done"}
    # the slide the dead node held (the one caught, or, had it just finished, the node's next) ran again
    (lost,) = [name for name, e in entries.items() if e["attempts"] == 2]
    assert f"{lost}.tiff: its Ray worker was lost (" in stderr and "running it again" in stderr
    assert entries[lost]["pid"] != victim_pid and {e["attempts"] for e in entries.values()} == {1, 2}
    assert json.loads((out / "failures.json").read_text()) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "failures.json", "run_manifest.json"])


def test_an_address_nothing_answers_is_a_clear_error_at_once(slides, tmp_path):
    port = free_port()  # bound and released: nothing listens there
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "service.wsi", str(slides / "s0.tiff"), "--out", str(tmp_path / "out"), *ARGS]
        + ["--engine", "ray", "--ray-address", f"127.0.0.1:{port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"cannot join the Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert "nothing answers" in proc.stderr and time.monotonic() - t0 < 60


def test_embedded_ray_without_an_address(slides, reference, tmp_path):
    """``--engine ray`` with no address starts a Ray of this machine's own and stops it at the end."""
    with LocalRayCluster() as scoped:  # not started: lends its temp dir, token and process clean-up
        env = {k: v for k, v in scoped.env.items() if k != "RAY_AUTH_MODE"}  # as a user would run it
        out = tmp_path / "out"
        proc = _ray_job(scoped, str(slides / "s0.tiff"), "--out", str(out), env=env)
        try:
            _, stderr = proc.communicate(timeout=300)
        finally:
            scoped.kill_leftovers()
        assert proc.returncode == 0, stderr
        _assert_same_outputs(out, reference["out"], ["s0"])
        manifest = json.loads((out / "run_manifest.json").read_text())
        assert manifest["address"] is None and manifest["workers"] == 1
        assert [e["status"] for e in manifest["slides"]] == ["done"]
        assert not scoped.processes(), "the embedded Ray outlived the job"


def test_kuberay_rayjob_is_valid_against_kuberays_own_schema():
    """deploy/rayjob.yaml against the RayJob CRD's schema, as the API server would check it."""
    jsonschema = pytest.importorskip("jsonschema")
    with lzma.open(ROOT / "tests" / "fixtures" / "kuberay" / "rayjob-v1.schema.json.xz") as handle:
        schema = json.load(handle)
    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(job)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m service.wsi ") and "--engine ray" in spec["entrypoint"]
    cluster_spec = spec["rayClusterSpec"]
    pin = re.search(r'"ray\[data\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and cluster_spec["rayVersion"] == pin.group(1)  # the image's Ray, as the extra pins it
    assert cluster_spec["authOptions"] == {"mode": "token"}  # token auth on, never off
    head, workers = cluster_spec["headGroupSpec"], cluster_spec["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0" and workers
    for pod in [head["template"]["spec"], *(w["template"]["spec"] for w in workers)]:
        # every pod mounts the same shared volume at the same path: the outputs are written there
        assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/data"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "histo-slides"
    for group in workers:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1  # one GPU per pod: one slide worker per GPU


def test_kubernetes_service_manifest_probes_bentoml_health_endpoints():
    deployment, service = yaml.safe_load_all((ROOT / "deploy" / "service.yaml").read_text())
    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"http": 3000}  # the image's EXPOSE and CMD port
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 3000)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 3000)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HISTO_INFERENCE_WORKERS"] == "1"  # one inference process per GPU: batches stay whole
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 3000" in dockerfile and "/readyz" in dockerfile


def test_two_copies_of_a_slide_at_once_give_one_set_of_outputs(slides, reference, tmp_path):
    """At-least-once delivery: a second copy of a slide waits on its lock, then finds the outputs done."""
    from service.runtime import Runtime
    from service.wsi import _run_steps, _slide_steps

    runtime = Runtime(ROOT / "models" / "default", device="cpu", intra_op_threads=1)
    out = tmp_path / "out"

    def copy(_: int) -> bool:
        """One copy of the slide, as a Ray worker runs it; True when it found the slide done."""
        steps = _slide_steps(
            slides / "s5.tiff", runtime, out / "s5", progress=False, batch_size=8, workers=1, lock_wait=120
        )
        try:
            next(steps)
        except StopIteration:
            return True
        _run_steps(steps)
        return False

    with ThreadPoolExecutor(2) as pool:  # flock sets two open files of one process apart, as two processes
        first = pool.submit(copy, 0)
        while not (out / "s5" / ".lock").is_file() or not (out / "s5" / ".lock").read_text():
            time.sleep(0.01)
        assert not first.done()  # the second copy starts while the first holds the slide
        second = pool.submit(copy, 1)
        assert (first.result(), second.result()) == (False, True)
    _assert_same_outputs(out, reference["out"], ["s5"])


def test_a_lock_left_by_a_dead_process_does_not_block_and_a_live_one_is_named(slides, reference, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / "s0")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = _local_job(slides / "s0.tiff", out)
        assert busy.returncode == 1, busy.stderr
        (failure,) = json.loads((out / "failures.json").read_text())
        assert (
            "another job is writing this output folder" in failure["error"] and f"pid {holder.pid}" in failure["error"]
        )
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind; the kernel drops the lock itself
        holder.wait()
    assert (out / "s0" / ".lock").is_file()
    again = _local_job(slides / "s0.tiff", out)
    assert again.returncode == 0, again.stderr
    _assert_same_outputs(out, reference["out"], ["s0"])


HOLD_LOCK = """
import sys, time
from pathlib import Path
from service.wsi import _exclusive
Path(sys.argv[1]).mkdir(parents=True)
with _exclusive(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _local_job(slide: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.wsi", str(slide), "--out", str(out), *ARGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
