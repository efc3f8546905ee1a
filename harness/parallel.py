"""Several GPUs for one video: start one process per rank, wait for them, bring back what rank 0 returns.

Each rank is `python -m harness.rank JOB`, with the parent's whole environment plus torchrun's variables
(MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK); it takes GPU LOCAL_RANK and talks NCCL on CUDA, gloo on the
CPU (harness.rank). Only rank 0 returns anything, through a file it renames into place; the parent (the
pytest process or the CLI) is the only writer of the run folder. A rank that fails ends the launch at once:
the others are killed (every rank leads its own process group, so compile workers it started go too) and
one HarnessError carries that rank's traceback tail. No process outlives `launch`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.case import QUANTIZED, Layout
from harness.errors import BackendUnavailable, HarnessError

REPO = Path(__file__).resolve().parents[1]
# Multicast (NVLink SHARP) stays off: a program using it can put a shared host's GPUs out of service, so
# on hosts lent to several users it is disabled unless the user set these themselves.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
UNAVAILABLE = "unavailable.txt"  # a rank that cannot build its backend writes the reason here: a skip, not a failure
RESULT = "result.pt"
TIMEOUT_S = 7200.0  # a 40-step 720p proxy video per rank fits well inside; a hang does not run for ever
TAIL_LINES = 40


@dataclass(frozen=True)
class Job:
    """What every rank runs: the run's settings (with the layout), a task of harness.parallel_tasks, its arguments."""

    settings: object  # harness.settings.Settings: typed loosely, settings imports this module's neighbours
    task: str
    arguments: dict


def unsupported(layout: Layout, device: str, gpus: int, precision: str, tokens: int, heads: int) -> str:
    """Why this machine cannot run `layout` for a case (the reason a case is skipped with), or ''."""
    if device == "cuda" and layout.world > gpus:
        return f"--parallel {layout.spec} needs {layout.world} GPUs; {gpus} visible"
    if tokens % layout.sequence:
        return (f"{tokens} tokens do not split evenly over {layout.sequence} ranks (diffusers' context-parallel "
                f"split needs equal shards); choose a shape whose token count divides")
    if heads % layout.ulysses:
        return f"Ulysses splits attention heads: {heads} heads do not divide over ulysses{layout.ulysses}"
    if layout.ring > 1 and device != "cuda":
        return ("ring attention merges partial results by their log-sum-exp, and diffusers' attention backend that "
                "returns it (_native_flash: aten::_scaled_dot_product_flash_attention) runs on CUDA only")
    if layout.ring > 1 and precision not in ("fp16", "bf16", *QUANTIZED):  # fp8 and int8 keep bf16 activations
        return f"ring attention runs diffusers' _native_flash backend, which takes bf16/fp16, not {precision}"
    return ""


def rank_environment(parent: Mapping[str, str], rank: int, world: int, port: int, device: str) -> dict[str, str]:
    """The parent's environment, passed through whole (CUDA_VISIBLE_DEVICES, caches, tokens, PATH), plus the
    rendezvous variables torchrun would set and multicast off where the user did not say otherwise."""
    env = dict(parent)
    for name, value in MULTICAST_OFF.items():
        env.setdefault(name, value)
    if device != "cuda":  # CPU ranks share the cores: torchrun's habit of one thread each unless told
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), parent.get("PYTHONPATH", "")) if p)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    return env


def free_port() -> int:
    """A TCP port free on the loopback interface now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: Job, world: int, timeout_s: float = TIMEOUT_S, environ: Mapping[str, str] | None = None):
    """Run `job` on `world` ranks and return what rank 0 returned.

    BackendUnavailable when a rank could not build its backend (its reason); HarnessError when a rank failed
    (its exit status and traceback tail) or the ranks ran past `timeout_s`.
    """
    environ = os.environ if environ is None else environ
    with tempfile.TemporaryDirectory(prefix="wan-ranks-") as tmp:
        folder = Path(tmp)
        torch.save(job, folder / "job.pt")
        port = free_port()
        ranks = [_start(folder, rank, rank_environment(environ, rank, world, port, job.settings.device))
                 for rank in range(world)]
        try:
            _wait(ranks, folder, timeout_s)
        finally:
            _stop(ranks)
        return torch.load(folder / RESULT, weights_only=False)  # written by our own rank 0 a moment ago


@dataclass
class _Rank:
    rank: int
    process: subprocess.Popen
    log: Path


def _start(folder: Path, rank: int, env: dict[str, str]) -> _Rank:
    log = folder / f"rank{rank}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "harness.rank", str(folder)], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return _Rank(rank, process, log)


def _wait(ranks: list[_Rank], folder: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [r.process.poll() for r in ranks]
        failed = next((r for r, code in zip(ranks, codes) if code not in (None, 0)), None)
        if failed is not None:
            _raise_failure(failed, folder)
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            running = [r.rank for r, code in zip(ranks, codes) if code is None]
            raise HarnessError(f"ranks {running} of {len(ranks)} still running after {timeout_s:g} s; stopped them. "
                               f"rank {running[0]} last wrote:\n{_tail(ranks[running[0]].log)}")
        time.sleep(0.05)


def _raise_failure(rank: _Rank, folder: Path) -> None:
    reason = folder / UNAVAILABLE
    if reason.is_file():
        raise BackendUnavailable(reason.read_text())
    raise HarnessError(f"rank {rank.rank} exited with status {rank.process.returncode}; the other ranks were "
                       f"stopped. Its last lines:\n{_tail(rank.log)}")


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:]) or "(nothing)"


def _stop(ranks: list[_Rank]) -> None:
    """End every rank still running, with whatever it started: TERM, a grace period, then KILL."""
    alive = [r for r in ranks if r.process.poll() is None]
    for r in alive:
        _signal_group(r.process, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for r in alive:
        try:
            r.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(r.process, signal.SIGKILL)
            r.process.wait()
    for r in ranks:  # a rank that exited may have left children in its group
        _signal_group(r.process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the rank's own group (start_new_session): it and its children only
    except ProcessLookupError:
        pass
