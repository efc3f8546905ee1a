"""Speed of each backend against eager PyTorch, alternating rounds in one test; the speed-up gate.

The harness times both sides itself: harness.timing.alternate runs --perf-rounds rounds, the order reversed
every round, so the two share thermal and clock conditions; on the GPU each call is timed with CUDA events.
harness.timing.judge_speedup compares those medians and owns the gate; pytest-benchmark is then handed the
candidate's rounds (HarnessClock) for its table, --benchmark-json and --benchmark-compare. What each stage times,
and at which precision, is harness.perf's.
"""
import math

import pytest

from harness.backends import BACKENDS
from harness.case import eager_precision, is_quantized
from harness.perf import (VIDEO_WARMUP, WARMUP, WORKLOADS, extrapolation, nonfinite, perf_precision_of, stage_case,
                          workload)
from harness.results import Measured
from harness.timing import RoundRecorder, SpeedupResult, alternate, judge_speedup


class HarnessClock:
    """pytest-benchmark's timer for this module's cases (its benchmark marker below): a clock that stands still except
    when `tick` moves it on by the next round the harness timed.

    Why: the rounds the gate judges are the harness's own (alternating, CUDA events, --perf-rounds of them whatever
    pytest-benchmark's options say); `report` replays the candidate's rounds through benchmark.pedantic, one `tick`
    per round, so pytest-benchmark's table, --benchmark-json and --benchmark-compare describe those very rounds.
    Letting pedantic drive the rounds instead would time the candidate with its own clock, always after its `setup`
    (the baseline), and under --benchmark-disable just once. A custom timer is pytest-benchmark's documented
    extension point; writing times into its stats object would reach into its internals.
    """

    def __init__(self):
        self.__name__ = "harness.timing.alternate"  # how pytest-benchmark names a timer (its JSON's options.timer)
        self.now = 0.0
        self._rounds = iter(())

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += next(self._rounds, 0.0)  # 0 past the last round: --benchmark-cprofile calls the target again

    def report(self, benchmark, side: RoundRecorder) -> None:
        """Hand pytest-benchmark `side`'s timed rounds, in seconds (it times nothing itself)."""
        self._rounds = iter([ms / 1e3 for ms in side.times_ms])
        benchmark.pedantic(self.tick, rounds=len(side.times_ms))


CLOCK = HarnessClock()
pytestmark = [pytest.mark.perf, pytest.mark.benchmark(timer=CLOCK)]


def pytest_generate_tests(metafunc):
    s = metafunc.config.wan_session.settings
    if "candidate" in metafunc.fixturenames:
        metafunc.parametrize("candidate", [b for b in s.backends if b != "torch"])


@pytest.mark.parametrize("stage", WORKLOADS)
def test_speed(stage, shape, candidate, session, benchmark):
    s = session.settings
    untimed = BACKENDS[candidate].untimed
    if untimed:  # a simulation: its numerics stand for an engine's, its timings for nothing
        pytest.skip(untimed)
    session.backend(candidate)  # one this machine cannot run skips before any model is built for it
    precision = perf_precision_of(candidate, s)
    if is_quantized(precision) and stage in ("vae_decoder", "text_encoder"):
        pytest.skip(f"{candidate} quantizes the DiT experts only; the {stage} stays bf16 eager")
    base_precision = eager_precision(precision)
    cand_fn, flops = workload(session, stage, candidate, precision, shape)
    base_fn, _ = workload(session, stage, "torch", base_precision, shape)
    video = stage == "end_to_end"
    for _ in range(VIDEO_WARMUP if video else WARMUP):
        outputs = base_fn(), cand_fn()
    bad = {side: n for side, n in zip((f"torch {base_precision}", f"{candidate} {precision}"), map(nonfinite, outputs)) if n}
    assert not bad, f"{stage} at {shape.id}: " + ", ".join(f"{side} returns {n:,} non-finite values" for side, n in bad.items()) + (
        "; no time is recorded for a result that is not a number")
    sides = (RoundRecorder("torch", base_fn, device=s.device, flops=flops),
             RoundRecorder(candidate, cand_fn, device=s.device, flops=flops))
    moves = session.residency.moves if session.residency else 0
    alternate(sides, s.perf_rounds)
    # A whole video moves its components as a user's offloading does, and reports the moves; nothing else may move.
    assert video or (session.residency.moves if session.residency else 0) == moves, (
        f"{stage} at {shape.id}: a component came onto the device during the timed rounds; the times include the move")
    CLOCK.report(benchmark, sides[1])
    gates = {"cfg_step": s.speedup_gate, "end_to_end": s.video_gate}
    result = judge_speedup(sides[0].result(), sides[1].result(), gates.get(stage) if candidate == s.candidate else None)
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
    if video:
        record_videos(session, case, (base_fn, cand_fn), base_precision)
    assert math.isfinite(result.speedup) and result.speedup > 0, result.message()


def record_videos(session, case, sides, base_precision: str) -> None:
    """Each side's video breakdown (its parts, its moves, the 40-step video composed from them), and the composed
    40-step speed-up beside the measured one: reported, not gated."""
    boundary = session.model(base_precision).boundary_ratio
    base, cand = (side.breakdown(session.settings.perf_rounds, boundary) for side in sides)
    session.record("perf", case, "torch", base, precision=base_precision)
    session.record("perf", case, sides[1].backend, cand)
    composed = base.composed_40_steps() / cand.composed_40_steps()
    session.record("perf", case, sides[1].backend, Measured({"speedup_40_steps_composed": composed}))


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
