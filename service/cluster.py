"""The slide job on a Ray cluster: one slide per task, read and classified on the node that runs it.

    python -m service.wsi SLIDES... --out OUT --engine ray [--ray-address ADDR] [--ray-cpus N]

The driver (this process) lists the slides largest first and hands them, one at a time, to a pool
of :class:`SlideWorker` actors: one per GPU with ``num_gpus=1`` when the cluster has GPUs (Ray sets
``CUDA_VISIBLE_DEVICES`` to that GPU alone, which ONNX Runtime sees as device 0), otherwise one per
``--ray-cpus`` CPUs. Each actor holds one :class:`Runtime` and runs the local job's per-slide steps
(:func:`service.wsi._slide_steps`) on its own node, so a slide's tiles never cross the network and
its outputs are the local job's, byte for byte (the timing fields of ``summary.json`` aside).

Delivery is at least once: a slide whose worker process or node dies is handed to another worker,
at most :data:`MAX_ATTEMPTS` times in all, and resumes from the partial results the dead one left on
the shared filesystem. The per-slide lock makes a second copy of a slide wait for the first (up to
:data:`LOCK_WAIT_S`) and then find its outputs done. A slide that fails with an error (unreadable,
no µm/px) is recorded once, not retried. The driver alone writes ``OUT/failures.json`` (the local
job's format) and ``OUT/run_manifest.json`` (per slide: status, node, seconds, attempts).

Only this module imports ray; ``python -m service.wsi`` without ``--engine ray`` never loads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from models.card import write_atomic
from service.reader_processes import ReaderProcesses
from service.runtime import Runtime, model_dir_from_env
from service.slides import SlideError
from service.wsi import FAILURES, _run_steps, _slide_steps, plan_slides

log = logging.getLogger("histo_robust.cluster")

MANIFEST = "run_manifest.json"
# A slide whose worker process or node dies runs again elsewhere; after this many attempts in all
# it is recorded as failed (rerunning the command resumes it).
MAX_ATTEMPTS = 3
# How long a copy of a slide waits for another copy that holds the slide's lock. Longer than NFS
# v4's default 90 s lease, after which the server drops the locks of a client (node) that died.
LOCK_WAIT_S = 120.0
# Slides still waiting when no worker has been able to start for this long are recorded as failed.
START_TIMEOUT_S = 300.0
# Slides travel as paths and results as small dicts, so an embedded Ray needs little object store.
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20
# A dead worker surfaces as one of these; an error inside the slide's code comes back as a result.
WORKER_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
)


class ClusterError(RuntimeError):
    """The job cannot run on the cluster at all (cannot connect, no worker can start)."""


@dataclass
class SlideTask:
    index: int  # position on the command line: failures.json keeps the local job's order
    path: Path
    size: int
    attempts: int = 0


class SlideWorker:
    """One Ray actor: a :class:`Runtime` and tile readers on one node, classifying one slide at a time."""

    def __init__(self, model_dir: str, device: str | None, env: dict[str, str], options: dict[str, Any]) -> None:
        self.cpu0 = time.process_time()  # this worker's CPU time from here on goes into the manifest
        # The driver's HISTO_* settings (thresholds, model variant) change the outputs: use the same here.
        os.environ.update(env)
        context = ray.get_runtime_context()
        cpus = max(1, int(context.get_assigned_resources().get("CPU", 1)))
        # Ray sets OMP_NUM_THREADS to the actor's CPUs; ONNX Runtime's own pool ignores it and would
        # take every core of the node, so its threads are set explicitly to this actor's share.
        self.runtime = Runtime(model_dir, device=device, intra_op_threads=cpus, spinning=False)
        # tile readers: the local job's rule (processes from 8 cores), applied to this actor's share
        kind, workers = options.pop("readers"), options.pop("workers") or cpus
        if kind == "auto":
            kind = "processes" if cpus >= 8 else "threads"
        self.readers = None
        if kind == "processes":  # started once for the actor; they exit when it dies
            self.readers = ReaderProcesses(workers, options["batch_size"], self.runtime.input_size)
            self.readers.__enter__()
        self.options = {**options, "workers": workers, "readers": self.readers}
        self.where = {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cpus": cpus,
            "provider": self.runtime.providers[0],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def ready(self) -> dict[str, Any]:
        return self.where

    def run(self, path: str, out_dir: str) -> dict[str, Any]:
        """Classify one slide (skip it when done, resume it when partial); errors come back as a result."""
        started = time.perf_counter()
        where = self.where
        result = {"node": where["node_ip"], "node_id": where["node_id"], "host": where["host"], "pid": where["pid"]}
        try:
            steps = _slide_steps(path, self.runtime, out_dir, progress=False, lock_wait=LOCK_WAIT_S, **self.options)
            try:
                next(steps)  # reads and classifies the tiles
            except StopIteration as done:
                result.update(status="skipped", tiles=done.value["tiles"])
            else:
                summary = _run_steps(steps)
                result.update(status="done", tiles=summary["tiles"], resumed_tiles=summary["resumed_tiles"])
        except Exception as exc:  # the local job records any error of one slide and goes on; so does this
            if not isinstance(exc, SlideError | OSError):
                log.error("%s: unexpected error", path, exc_info=exc)
            result.update(status="failed", error=str(exc) or type(exc).__name__)
        result["seconds"] = round(time.perf_counter() - started, 3)
        result["worker_cpu_seconds"] = round(time.process_time() - self.cpu0, 3)  # since it started, all threads
        return result


def _pool_shape(cpus_per_worker: int | None) -> tuple[dict[str, float], int]:
    """Resources of one slide worker, and how many fit on the cluster's live nodes.

    With GPUs: one GPU each, and the CPUs per GPU of the leanest GPU node (so that every GPU gets a
    worker); without: ``cpus_per_worker`` CPUs (default 1) each.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    if gpu_nodes:
        cpus = cpus_per_worker or max(1, min(int(r.get("CPU", 0) // r["GPU"]) for r in gpu_nodes))
        return {"num_gpus": 1, "num_cpus": cpus}, sum(int(r["GPU"]) for r in gpu_nodes)
    cpus = cpus_per_worker or 1
    return {"num_cpus": cpus}, sum(int(r.get("CPU", 0) // cpus) for r in nodes)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` that nothing answers: ray.init would retry for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray's own lookup
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc}); is `ray start --head` running there?") from exc


def _connect(address: str | None) -> None:
    if address:
        _check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # "local" and not None: None would join a cluster `ray start` left running on this machine
        ray.init(
            address="local",
            logging_level=logging.WARNING,
            include_dashboard=False,
            object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
        )


def run_cluster_job(
    slides: list[Path],
    out: Path,
    *,
    address: str | None = None,
    model_dir: Path | None = None,
    device: str | None = None,
    cpus_per_worker: int | None = None,
    readers: str = "auto",
    workers: int | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    start_timeout: float = START_TIMEOUT_S,
    **options: Any,
) -> list[dict[str, str]]:
    """Classify ``slides`` into ``out/<stem>/`` on a Ray cluster (``address``; None: an embedded Ray).

    ``options``: the per-slide arguments of :func:`service.wsi.classify_slide` (``mpp``,
    ``batch_size``, ``min_tissue``). Paths are made absolute, since workers run elsewhere: ``out``,
    the slides and the model must be at the same paths on every node (a shared filesystem).
    Returns the failures, as written to ``out/failures.json``.
    """
    began = time.perf_counter()
    out = out.absolute()
    model = str((model_dir or model_dir_from_env()).absolute())
    plan = plan_slides(slides, out)
    entries: list[dict[str, Any]] = [
        {"slide": str(path), "status": "failed", "error": str(error)} if error else {"slide": str(path)}
        for path, error in plan
    ]
    for error in (error for _, error in plan if error is not None):
        print(f"error: {error}", file=sys.stderr, flush=True)
    todo = sorted(
        (SlideTask(i, path, path.stat().st_size) for i, (path, error) in enumerate(plan) if error is None),
        key=lambda task: -task.size,  # largest first: the job should not end waiting on one big slide
    )
    resources: dict[str, float] = {}
    size, connected = 0, 0.0
    if todo:
        try:
            _connect(address)
        except Exception as exc:  # ConnectionError, AuthenticationError, a bad address, ...
            hint = ""
            if address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                # Ray sends a token to an explicit address only in token mode, and then reports only
                # "failed to connect"
                hint = (
                    " (a cluster with token authentication, Ray's default for `ray start`, needs "
                    "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH here too)"
                )
            raise ClusterError(f"cannot join the Ray cluster at {address or '(embedded)'}: {exc}{hint}") from exc
        try:
            resources, capacity = _pool_shape(cpus_per_worker)
            env = {k: v for k, v in os.environ.items() if k.startswith("HISTO_")}
            worker_options = {**options, "readers": readers, "workers": workers}
            actor_class = ray.remote(SlideWorker).options(
                **resources, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD"
            )
            size = max(1, min(len(todo), capacity))
            pool = _Pool(actor_class, (model, device, env, worker_options), size)
            pool.needs = f"each worker needs {resources}; the cluster has {ray.cluster_resources()}"
            log.info("%d slides on %d Ray workers of %s each", len(todo), size, resources)
            connected = time.perf_counter() - began
            pool.run(todo, out, entries, max_attempts, start_timeout)
        finally:
            ray.shutdown()
    failures = [{"slide": e["slide"], "error": e["error"]} for e in entries if e.get("status") == "failed"]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / FAILURES, json.dumps(failures, indent=2) + "\n")
    manifest = {
        "engine": "ray",
        "address": address,
        "workers": size,
        "worker_resources": resources,
        "seconds": round(time.perf_counter() - began, 3),
        "connect_seconds": round(connected, 3),
        "slides": entries,
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return failures


class _Pool:
    """Slide workers on the driver's side: hands out slides, replaces the workers that die."""

    def __init__(self, actor_class: Any, args: tuple[Any, ...], size: int) -> None:
        self.actor_class, self.args, self.size = actor_class, args, size
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor
        self.idle: list[Any] = []
        self.replacements = 0
        self.last_error = ""
        self.needs = ""
        self.out = Path()
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        actor = self.actor_class.remote(*self.args)
        self.starting[actor.ready.remote()] = actor

    def run(
        self, todo: list[SlideTask], out: Path, entries: list[dict[str, Any]], max_attempts: int, start_timeout: float
    ) -> None:
        self.out = out
        queue = deque(todo)
        running: dict[Any, tuple[Any, SlideTask, float]] = {}  # run() ref -> (actor, slide, start)
        progress_at = time.monotonic()
        dispatched = 0
        try:
            while queue or running:
                while queue and self.idle:
                    task, actor = queue.popleft(), self.idle.pop()
                    task.attempts += 1
                    dispatched += 1
                    entries[task.index].setdefault("order", dispatched)  # first hand-out: largest first
                    ref = actor.run.remote(str(task.path.absolute()), str(out / task.path.stem))
                    running[ref] = (actor, task, time.monotonic())
                refs = [*running, *self.starting]
                if not refs:  # every worker is gone and no replacement may start
                    break
                done, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                for ref in done:
                    progress_at = time.monotonic()
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._finished(ref, running.pop(ref), queue, entries, max_attempts)
                if queue and not running and not self.idle and time.monotonic() - progress_at > start_timeout:
                    self.last_error = (
                        f"no Ray worker could start within {start_timeout:.0f} s ({self.needs}). {self.last_error}"
                    )
                    break
            for task in queue:
                entry = entries[task.index]
                entry.update(status="failed", error=f"{task.path}: not run: {self.last_error}", attempts=task.attempts)
                print(f"error: {entry['error']}", file=sys.stderr, flush=True)
        finally:
            for actor in [*self.idle, *self.starting.values(), *(a for a, _, _ in running.values())]:
                ray.kill(actor, no_restart=True)

    def _started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            where = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the model would not load, the node died, ...
            self.last_error = f"a Ray worker failed to start: {exc}"
            log.warning("%s", self.last_error)
            self._replace()
            return
        log.info("Ray worker ready on %s (pid %s, %s)", where["node_ip"], where["pid"], where["provider"])
        self.idle.append(actor)

    def _replace(self) -> None:
        """Start another worker in place of a dead one, a bounded number of times for the whole job."""
        if self.replacements < MAX_ATTEMPTS * self.size:
            self.replacements += 1
            self._start()

    def _finished(
        self,
        ref: Any,
        running: tuple[Any, SlideTask, float],
        queue: deque[SlideTask],
        entries: list[dict[str, Any]],
        max_attempts: int,
    ) -> None:
        actor, task, started = running
        entry = entries[task.index]
        try:
            result = ray.get(ref)
        except WORKER_LOST as exc:
            ray.kill(actor, no_restart=True)  # a worker that is only unreachable must not come back
            self._replace()
            reason = f"its Ray worker was lost ({type(exc).__name__})"
            if task.attempts < max_attempts:
                print(f"{task.path.name}: {reason}; running it again", file=sys.stderr, flush=True)
                queue.appendleft(task)
            else:
                entry.update(
                    status="failed",
                    error=f"{task.path}: {reason} on each of {task.attempts} attempts",
                    attempts=task.attempts,
                    seconds=round(time.monotonic() - started, 3),
                )
                print(f"error: {entry['error']}", file=sys.stderr, flush=True)
            return
        except ray.exceptions.RayError as exc:  # not the slide's code (that returns a result): record it
            result = {"status": "failed", "error": f"{task.path}: {exc}"}
            self.idle.append(actor)
        else:
            self.idle.append(actor)
        # the driver's view: hand-out to result, so the difference to "seconds" is Ray's part
        entry.update(result, attempts=task.attempts, round_trip_seconds=round(time.monotonic() - started, 3))
        if result["status"] == "failed":
            print(f"error: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(
                f"{task.path.name}: {result['tiles']} tiles -> {self.out / task.path.stem}/ "
                f"({result['status']} on {result['node']} in {result['seconds']:.1f} s)",
                flush=True,
            )


def main_ray(args: argparse.Namespace, slides: list[Path]) -> int:
    """``python -m service.wsi --engine ray``: the CLI's arguments, the same exit codes as the local job."""
    if args.ray_cpus is not None and args.ray_cpus < 1:
        print("error: --ray-cpus must be >= 1", file=sys.stderr)
        return 2
    try:
        failures = run_cluster_job(
            slides,
            args.out,
            address=args.ray_address,
            model_dir=args.model,
            device=args.device,
            cpus_per_worker=args.ray_cpus,
            readers=args.readers,
            workers=args.workers,
            mpp=args.mpp,
            batch_size=args.batch_size,
            min_tissue=args.min_tissue,
        )
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if failures:
        print(f"{len(failures)} of {len(slides)} slides failed; see {args.out / FAILURES}", file=sys.stderr)
    return 1 if failures else 0
