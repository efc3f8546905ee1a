"""pytest-xdist on several GPUs: one GPU per worker, one shared run folder, perf kept out of workers.

No torch here: `pin_worker` must run before anything initialises CUDA, which reads
CUDA_VISIBLE_DEVICES once, at initialisation. So the GPU list travels in the environment (workers
inherit the controller's, and xdist sets PYTEST_XDIST_WORKER before conftest loads); the run id
travels in xdist's `workerinput`, which a test's own subprocesses do not inherit.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from harness.errors import HarnessError
from harness.results import RUN_ID_ENV, RunRecorder, new_run_id

RUN_ID_KEY = "wan_run_id"  # the controller's run id in each worker's workerinput
GPUS_ENV = "WAN_BENCH_GPUS"  # the GPUs the controller saw, comma-separated, in worker order
WORKER_ENV = "PYTEST_XDIST_WORKER"  # set by xdist in each worker: gw0, gw1, ...
WORKER_COUNT_ENV = "PYTEST_XDIST_WORKER_COUNT"


def worker_index(worker_id: str) -> int:
    """gw3 -> 3."""
    m = re.fullmatch(r"gw(\d+)", worker_id)
    if not m:
        raise HarnessError(f"unexpected xdist worker id {worker_id!r} (expected gw<N>); run with `-n <gpus>`")
    return int(m.group(1))


def visible_gpus(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The GPU ids workers are spread over: the user's CUDA_VISIBLE_DEVICES if set, else 0..count-1."""
    listed = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:device_count] if "CUDA_VISIBLE_DEVICES" in environ else [str(i) for i in range(device_count)]


def gpu_for_worker(worker_id: str, gpus: list[str]) -> str | None:
    """gw<N> gets gpus[N], wrapping round when there are more workers than GPUs; None without GPUs."""
    return gpus[worker_index(worker_id) % len(gpus)] if gpus else None


def export_gpus(environ: MutableMapping[str, str], gpus: list[str]) -> None:
    """Controller side, before workers start: the GPU list they pin themselves from."""
    environ[GPUS_ENV] = ",".join(gpus)


def pin_worker(environ: MutableMapping[str, str]) -> str | None:
    """Worker side, at conftest import: set CUDA_VISIBLE_DEVICES to this worker's GPU; returns it."""
    worker = environ.get(WORKER_ENV)
    if not worker or GPUS_ENV not in environ:
        return None  # not an xdist worker, or a controller that exported nothing: leave CUDA alone
    gpu = gpu_for_worker(worker, [g for g in environ[GPUS_ENV].split(",") if g])
    if gpu is not None:
        environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def perf_skip_reason(environ: Mapping[str, str]) -> str | None:
    """Why perf cases do not run in this process (an xdist worker), or None when they may.

    Timing beside other workers would measure contention (they share the host's CPU, PCIe and memory
    even with a GPU each), and pytest-benchmark turns itself off under xdist in any case
    (pytest_benchmark/session.py: "Benchmarks are automatically disabled because xdist plugin is active").
    """
    if WORKER_ENV not in environ:
        return None
    return (f"perf cases run without -n ({environ.get(WORKER_COUNT_ENV, 'several')} xdist workers share this "
            "machine, and pytest-benchmark disables itself under xdist): run `pytest -m perf` on its own")


def session_recorder(results_dir: Path, workerinput: Mapping | None, environ: MutableMapping[str, str],
                     device_count: int, command: str = "", settings: dict | None = None) -> RunRecorder:
    """The run folder for this process: a worker's part of the controller's run, or a new run.

    Call it in pytest_configure: the controller runs no fixtures under xdist. `workerinput` is the
    worker's `config.workerinput` (None on the controller); it carries the controller's run id,
    put there by `pytest_configure_node` with `worker_input()`.
    """
    if workerinput is not None:
        if RUN_ID_KEY not in workerinput:
            raise HarnessError(f"xdist worker {workerinput.get('workerid')} got no run id from its controller; "
                               "is conftest.py's pytest_configure_node hook in place?")
        return RunRecorder(results_dir, workerinput[RUN_ID_KEY], command, settings, part=workerinput["workerid"])
    export_gpus(environ, visible_gpus(environ, device_count))
    return RunRecorder(results_dir, _run_id(Path(results_dir), environ.get(RUN_ID_ENV)), command, settings)


def worker_input(recorder: RunRecorder) -> dict:
    """What the controller adds to each worker's `workerinput`: its run id."""
    return {RUN_ID_KEY: recorder.run_id}


def _run_id(results_dir: Path, preset: str | None) -> str:
    """A preset id (CI names its run) must be new; a timestamp id is suffixed when taken."""
    if preset:
        if (results_dir / preset).exists():
            raise HarnessError(f"{results_dir / preset} already exists; unset {RUN_ID_ENV} or give a new run id")
        return preset
    base = run_id = new_run_id()
    n = 1
    while (results_dir / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id
