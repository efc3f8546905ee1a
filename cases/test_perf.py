"""Speed of each backend against eager PyTorch, alternating rounds in one test; the speed-up gate.

pytest-benchmark times the candidate; its `setup` runs one baseline round before every candidate
round, so the two alternate under the same thermal and clock conditions. Both sides are also timed
with CUDA events on the GPU; harness.timing.judge_speedup compares those medians and owns the gate.
"""
import math

import pytest
import torch

from harness.backends import BACKENDS, load
from harness.case import Case, eager_precision, is_dit, is_quantized
from harness.plan import perf_precision_of
from harness.shapes import A14B_LAYERS, forward_flops
from harness.timing import RoundRecorder, SpeedupResult, judge_speedup

pytestmark = pytest.mark.perf
# What one timed call does: one expert forward, one CFG step (two forwards), one decode, one prompt
# encoding, or a whole video.
WORKLOADS = ("transformer", "transformer_2", "cfg_step", "vae_decoder", "text_encoder", "end_to_end")
WARMUP = 2


def pytest_generate_tests(metafunc):
    s = metafunc.config.wan_session.settings
    if "candidate" in metafunc.fixturenames:
        metafunc.parametrize("candidate", [b for b in s.backends if b != "torch"])


def workload(session, stage, backend, precision, shape):
    """A zero-argument callable doing one unit of `stage`, and its FLOPs where they are known."""
    model = session.model(precision)
    if stage == "end_to_end":
        return (lambda: session.generate(backend, precision, shape, "a timing run")), None
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


@pytest.mark.parametrize("stage", WORKLOADS)
def test_speed(stage, shape, candidate, session, benchmark):
    s = session.settings
    untimed = getattr(load(BACKENDS[candidate]), "untimed", "")
    if untimed:  # a simulation: its numerics stand for an engine's, its timings for nothing
        pytest.skip(untimed)
    precision = perf_precision_of(candidate, s)
    if is_quantized(precision) and stage in ("vae_decoder", "text_encoder"):
        pytest.skip(f"{candidate} quantizes the DiT experts only; the {stage} stays bf16 eager")
    base_precision = eager_precision(precision)
    cand_fn, flops = workload(session, stage, candidate, precision, shape)
    base_fn, _ = workload(session, stage, "torch", base_precision, shape)
    for _ in range(WARMUP):  # compile, autotune and allocator warm-up stay out of the numbers
        outputs = base_fn(), cand_fn()
    bad = {side: n for side, n in zip((f"torch {base_precision}", f"{candidate} {precision}"), map(nonfinite, outputs)) if n}
    assert not bad, f"{stage} at {shape.id}: " + ", ".join(f"{side} returns {n:,} non-finite values" for side, n in bad.items()) + (
        "; no time is recorded for a result that is not a number")
    base_rounds = RoundRecorder("torch", base_fn, device=s.device, flops=flops)
    cand_rounds = RoundRecorder(candidate, cand_fn, device=s.device, flops=flops)
    moves = session.residency.moves if session.residency else 0
    benchmark.pedantic(cand_rounds, setup=base_rounds, rounds=s.perf_rounds, iterations=1)
    assert (session.residency.moves if session.residency else 0) == moves, (
        f"{stage} at {shape.id}: a component came onto the device during the timed rounds; the times include the move")
    gate = s.speedup_gate if candidate == s.candidate and stage == "cfg_step" else None
    result = judge_speedup(base_rounds.result(), cand_rounds.result(), gate)
    case = stage_case(stage, shape, precision, session, candidate)
    base, cand = result.baseline, result.candidate
    benchmark.extra_info.update(
        case=case.id, tokens=shape.tokens, precision=precision, baseline=f"torch {base_precision}",
        timer=cand.method, baseline_median_ms=base.median_ms, baseline_iqr_ms=base.iqr_ms,
        candidate_median_ms=cand.median_ms, candidate_iqr_ms=cand.iqr_ms, speedup=result.speedup,
        peak_mem_gib_baseline=base.peak_mem_gib, peak_mem_gib_candidate=cand.peak_mem_gib,
        tflops_baseline=base.tflops, tflops_candidate=cand.tflops,
        **(extrapolation(result, stage, session) if flops and s.source == "proxy" else {}))
    session.record("perf", case, "torch", base, precision=base_precision)
    session.record("perf", case, candidate, cand)
    session.record("perf", case, candidate, result)
    assert math.isfinite(result.speedup) and result.speedup > 0, result.message()


def test_speedup_gate(shape, session):
    """The mission's question: one CFG denoising step with the candidate is >= gate x eager on CUDA."""
    s = session.settings
    if s.device != "cuda":
        pytest.skip("the speed-up gate judges CUDA timings only; CPU numbers are recorded, not gated")
    if s.candidate is None:
        pytest.skip("no candidate: --backends names no backend besides torch")
    case = stage_case("cfg_step", shape, perf_precision_of(s.candidate, s), session, s.candidate)
    result = session.recorded("perf", case, s.candidate, SpeedupResult)
    if result is None:
        pytest.skip(f"no cfg_step timing of {s.candidate} at {shape.id} in this session (its perf case failed, was "
                    f"skipped or was deselected; see above)")
    assert result, result.message()
