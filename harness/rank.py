"""One rank of a parallel run: `python -m harness.rank FOLDER`, started by harness.parallel.launch.

It joins the process group (NCCL on its own GPU, gloo on the CPU), makes the layout's mesh, builds a Session
from the run's settings (no recorder: the parent writes the run folder) and runs the job's task. Rank 0
saves what the task returns into FOLDER, renamed into place so the parent never reads half a file. A
backend that cannot be built here is reported as such (the parent skips the case); anything else fails
the rank with its traceback, which the parent shows.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from harness.backends import load
from harness.cache import atomic_write_text
from harness.errors import BackendUnavailable
from harness.parallel import RESULT, UNAVAILABLE, Job
from harness.session import Session
from harness.settings import Settings

# Inside a collective a rank waits for the slowest one; past this a hang becomes an error on every rank.
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)


def join(settings: Settings) -> None:
    """Join the process group torchrun-style, from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in the environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if settings.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        # Every GPU stays visible and each rank takes its own by index, as torchrun does: diffusers picks a
        # rank's device as rank % device_count (ModelMixin._resolve_parallel_config).
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def run(folder: Path) -> None:
    job: Job = torch.load(folder / "job.pt", weights_only=False)  # the parent's own file
    join(job.settings)
    try:
        from harness.distributed import start

        start(job.settings.parallel)  # collective: made here, by every rank at once
        result = load(job.task)(Session(job.settings), **job.arguments)
        if dist.get_rank() == 0:
            partial = folder / f"{RESULT}.partial"
            torch.save(result, partial)
            os.replace(partial, folder / RESULT)
        dist.barrier()  # no rank leaves while another still needs a collective from it
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    try:
        run(folder)
    except BackendUnavailable as exc:
        atomic_write_text(folder / UNAVAILABLE, str(exc))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
