"""What a perf case times and at which precision: the workload of each stage (one expert forward, one CFG step,
one decode, one prompt encoding, or a whole video), the case a timing is recorded under, the check that a timed
call returned numbers, and the proxy source's extrapolation to 40 layers. The timing itself is harness.timing's.
"""
from __future__ import annotations

import torch

from harness.backends import BACKENDS
from harness.case import Case, is_dit, is_quantized
from harness.pipeline import Precisions
from harness.shapes import A14B_LAYERS, forward_flops
from harness.timing import SpeedupResult

# What one timed call does: one CFG step (two forwards), one expert forward, one decode, one prompt encoding, or a
# whole video. The CFG step first: the high-noise expert's forward after it runs on the same candidate runner, which
# a candidate taking turns keeps only for the case right after (harness.plan).
WORKLOADS = ("cfg_step", "transformer", "transformer_2", "vae_decoder", "text_encoder", "end_to_end")
# Calls of each side before the timed rounds: compile, autotune and allocator warm-up stay out of the numbers.
WARMUP = 2


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
        return (lambda: session.generate(backend, Precisions.as_run(precision), shape, "a timing run")), None
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
