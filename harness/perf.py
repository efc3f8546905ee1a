"""What a perf case times and at which precision: the workload of each stage (one expert forward, one CFG step,
one decode, one prompt encoding, or a whole video), the case a timing is recorded under, the check that a timed
call returned numbers, and the proxy source's extrapolation to 40 layers. The timing itself is harness.timing's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.backends import BACKENDS
from harness.case import DIT_COMPONENTS, Case, is_dit, is_quantized
from harness.pipeline import Precisions
from harness.shapes import A14B_LAYERS, forward_flops, step_split
from harness.timing import SpeedupResult

# What one timed call does: one CFG step (two forwards), one expert forward, one decode, one prompt encoding, or a
# whole video. The CFG step first: the high-noise expert's forward after it runs on the same candidate runner, which
# a candidate taking turns keeps only for the case right after (harness.plan).
WORKLOADS = ("cfg_step", "transformer", "transformer_2", "vae_decoder", "text_encoder", "end_to_end")
# Calls of each side before the timed rounds: compile, autotune and allocator warm-up stay out of the numbers. A whole
# video warms up once: its runners are the ones the other stages warmed, and a 40-layer video at 4 steps takes a
# minute on an H100 (the 10-minute budget of one run holds a warm-up and three rounds of both sides).
WARMUP = 2
VIDEO_WARMUP = 1
MODEL_CARD_STEPS = 40  # Wan2.2-T2V-A14B's model card: what a user's video takes
# The parts of a whole video, as harness.pipeline.generate times them, and the component whose moves fall in each.
VIDEO_PARTS = {"text_encode": "text_encoder", "transformer_steps": "transformer", "transformer_2_steps": "transformer_2",
               "vae_decode": "vae"}


def perf_precision_of(backend: str, settings) -> str:
    """The precision a perf case times `backend` at: --perf-precision, unless the backend runs quantized precisions
    only (torch-fp8) or --precisions names only quantized ones it runs (`--candidate tensorrt --precisions fp8`
    times the fp8 engine): then the first of those."""
    runs = BACKENDS[backend].precisions
    asked = [p for p in settings.precisions if p in runs]
    if all(is_quantized(p) for p in runs) or (asked and all(is_quantized(p) for p in settings.precisions)):
        return (asked or list(runs))[0]
    return settings.perf_precision


def workload(session, stage, backend, precision, shape):
    """A zero-argument callable doing one unit of `stage`, and its FLOPs where they are known."""
    model = session.model(precision)
    if stage == "end_to_end":
        return Videos(session, backend, precision, shape), None
    component = "transformer" if stage == "cfg_step" else stage
    case = Case(component, shape, precision, source=session.settings.source)
    if stage != "cfg_step":
        runner, inputs = session.runner(backend, case), session.inputs(case)
        flops = forward_flops(getattr(model, component).config, shape.tokens) if is_dit(component) else None
        return (lambda: runner(*inputs)), flops
    return session.cfg_step(backend, precision, shape), 2 * forward_flops(model.transformer.config, shape.tokens)


def nonfinite(output) -> int:
    """NaN and Inf values in what one timed call returned: a tensor, a tuple of them, a diffusers output (`sample`)
    or a finished video (`frames`). A backend that computes garbage fast has no speed-up to report."""
    if isinstance(output, torch.Tensor):
        return int((~torch.isfinite(output)).sum())
    if isinstance(output, (tuple, list)):
        return sum(nonfinite(o) for o in output)
    for name in ("frames", "sample"):
        if isinstance(getattr(output, name, None), torch.Tensor):
            return nonfinite(getattr(output, name))
    raise TypeError(f"cannot look for non-finite values in a {type(output).__name__}")


def stage_case(stage: str, shape, precision: str, session, candidate: str) -> Case:
    """The case a perf row is recorded under; a CFG step's batch (1, or 2 with --cfg-batch 2) is in its id."""
    batch = session.cfg_batch(candidate) if stage == "cfg_step" else 1
    return Case(stage, shape, precision, batch=batch, source=session.settings.source)


def extrapolation(result: SpeedupResult, stage: str, session) -> dict:
    """For the proxy source: the eager time per layer, and what 40 layers would take (labelled as such)."""
    layers = session.settings.proxy_layers  # read, not built: an fp32 model of 20 layers fills an 80 GB card
    forwards = 2 if stage == "cfg_step" else 1
    per_layer = result.baseline.median_ms / layers / forwards
    return {"layers": f"proxy, {layers} of 40 layers", "baseline_per_layer_ms": per_layer,
            "baseline_40_layer_ms_extrapolated": per_layer * A14B_LAYERS * forwards}


class Videos:
    """One side's whole videos, as a user runs the pipeline on this card (`Precisions.as_run`: the experts in the
    precision, the text encoder and VAE in its eager one): where the components take turns, each comes onto the card
    when it runs, inside the timed video, as diffusers' model CPU offload moves them. Each call keeps what its parts
    and its moves took; `breakdown` gives the medians of the last `rounds` calls (the timed ones)."""

    def __init__(self, session, backend: str, precision: str, shape):
        self.session, self.backend, self.precision, self.shape = session, backend, precision, shape
        self.calls: list[dict[str, float]] = []

    def __call__(self):
        residency = self.session.residency
        before = residency.moves if residency is not None else 0
        run = self.session.generate(self.backend, Precisions.as_run(self.precision), self.shape, "a timing run")
        moves = residency.log[before:] if residency is not None else []
        parts = {part: run.stage_ms.get(part, 0.0) / 1e3 for part in VIDEO_PARTS}
        for move in moves:  # a move happens inside the part of the component it brings: count it apart
            part = next((p for p, c in VIDEO_PARTS.items() if move.label.split()[0] == c), None)
            if part is not None:
                parts[part] -= move.seconds
        self.calls.append({**parts, "moves_s": sum(m.seconds for m in moves), "moves": float(len(moves)),
                           "moved_gib": sum(m.nbytes for m in moves) / 2 ** 30,
                           "transformer_n": float(run.experts.count("transformer")),
                           "transformer_2_n": float(run.experts.count("transformer_2"))})
        return run

    def breakdown(self, rounds: int, boundary_ratio: float) -> "VideoBreakdown":
        return VideoBreakdown(tuple(self.calls[-rounds:]), boundary_ratio)


@dataclass(frozen=True)
class VideoBreakdown:
    """Where one side's video time goes: seconds of text encoding, each expert's steps and the decode (moves taken
    out), the moves (count, GiB, seconds), medians over the timed videos; and the model card's 40-step video composed
    from them (each expert's time per step x its steps of 40, plus the fixed parts), labelled as composed."""

    calls: tuple[dict[str, float], ...]
    boundary_ratio: float

    def _median(self, key: str) -> float:
        return float(np.median([c[key] for c in self.calls]))

    def composed_40_steps(self) -> float:
        high, low = step_split(MODEL_CARD_STEPS, self.boundary_ratio)
        per_step = {e: self._median(f"{e}_steps") / max(self._median(f"{e}_n"), 1) for e in DIT_COMPONENTS}
        fixed = sum(self._median(k) for k in ("text_encode", "vae_decode", "moves_s"))
        return fixed + high * per_step["transformer"] + low * per_step["transformer_2"]

    def metrics(self) -> dict[str, float]:
        out = {f"video_{part.removesuffix('_steps')}_s": self._median(part) for part in VIDEO_PARTS}
        out.update(video_moves_s=self._median("moves_s"), video_moves=self._median("moves"),
                   video_moved_gib=self._median("moved_gib"), video_s_40_steps_composed=self.composed_40_steps())
        return out

    def thresholds(self) -> dict[str, float | None]:
        return {}

    def checks(self) -> dict[str, bool | None]:
        return {}

    def notes(self) -> dict[str, str]:
        return {"video_s_40_steps_composed": f"composed, not measured: {MODEL_CARD_STEPS} steps at the measured time "
                                             "per step of each expert, plus the text encoding, the moves and the decode"}
