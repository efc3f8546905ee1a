"""What the ranks of a parallel case compute (inside harness.rank); rank 0's return value goes to the parent.

Every rank calls the same functions in the same order, so the collectives inside (the CFG exchange,
diffusers' all-to-alls, the barriers here) always meet. The layout is the session's: Settings.parallel.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from harness.case import DIT_COMPONENTS, Case, eager_precision
from harness.pipeline import Precisions
from harness.session import Session
from harness.shapes import VideoShape
from harness.timing import RoundRecorder, alternate


def outputs(session: Session, backend: str, precision: str, shape: VideoShape, video: bool) -> dict:
    """The layout's expert forwards (where it splits them) and its CFG step, on the inputs the single-GPU
    cases use; with `video`, also its video of prompt 0 with every step's latents."""
    layout = session.settings.parallel
    forwards = {}
    if layout.sequence > 1:
        for expert in DIT_COMPONENTS:
            case = Case(expert, shape, precision, source=session.settings.source, layout=layout.forward)
            forwards[expert] = session.runner(backend, case)(*session.inputs(case)).cpu()
    out = {"forward": forwards, "cfg_step": session.cfg_step(backend, precision, shape, layout)().cpu()}
    if video:
        run = session.generation(backend, Precisions.judged(precision), shape, layout=layout)
        out.update(latents=run.step_latents, frames=run.frames)
    return out


def cfg_step_times(session: Session, backend: str, precision: str, shape: VideoShape, rounds: int,
                   warmup: int) -> dict:
    """The layout's CFG step against one GPU's (eager at the base precision, and `backend` itself), in
    alternating rounds (harness.timing.alternate): the one-GPU sides run on rank 0 while the other ranks wait at a
    barrier. Returns rank 0's TimingResults by side and every rank's peak memory in the parallel step (CUDA only)."""
    layout, device = session.settings.parallel, session.settings.device
    lead = dist.get_rank() == 0
    parallel = RoundRecorder(backend, session.cfg_step(backend, precision, shape, layout), device=device)
    eager = one_gpu = None  # built on rank 0 only: the other ranks never run one GPU's step
    if lead:
        eager = RoundRecorder("torch", session.cfg_step("torch", eager_precision(precision), shape), device=device)
        if backend != "torch":
            one_gpu = RoundRecorder(backend, session.cfg_step(backend, precision, shape), device=device)
    sides = {"eager": eager, "one_gpu": one_gpu, "parallel": parallel}
    alternate(tuple(sides.values()), rounds, warmup=warmup, between=dist.barrier)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, parallel.peak_mem_bytes)
    return {"times": {name: side.result() for name, side in sides.items() if side is not None},
            "peak_mem_bytes": peaks}
