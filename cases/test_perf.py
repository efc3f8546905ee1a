"""Speed of each backend against eager PyTorch, alternating rounds in one test; the speed-up gate.

The harness times both sides itself: harness.timing.alternate runs --perf-rounds rounds, the order reversed
every round, so the two share thermal and clock conditions; on the GPU each call is timed with CUDA events.
harness.timing.judge_speedup compares those medians and owns the gate; pytest-benchmark is then handed the
candidate's rounds (HarnessClock) for its table, --benchmark-json and --benchmark-compare.
"""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.backends import BACKENDS
from harness.case import Case, eager_precision, is_dit, is_quantized
from harness.plan import perf_precision_of
from harness.shapes import A14B_LAYERS, forward_flops
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
    untimed = BACKENDS[candidate].untimed
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
    sides = (RoundRecorder("torch", base_fn, device=s.device, flops=flops),
             RoundRecorder(candidate, cand_fn, device=s.device, flops=flops))
    moves = session.residency.moves if session.residency else 0
    alternate(sides, s.perf_rounds)
    assert (session.residency.moves if session.residency else 0) == moves, (
        f"{stage} at {shape.id}: a component came onto the device during the timed rounds; the times include the move")
    CLOCK.report(benchmark, sides[1])
    gate = s.speedup_gate if candidate == s.candidate and stage == "cfg_step" else None
    result = judge_speedup(sides[0].result(), sides[1].result(), gate)
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


# --------------------------------------------------------------- the gated path's rounds, seen from outside

# A pytest plugin for the run below: it logs every timed round (side, ms) and the rounds each speed-up judgement was
# given, one JSON line each, by wrapping harness.timing before cases/test_perf.py imports from it.
ROUND_LOG = '''
import json, os
import harness.timing as timing

def log(**entry):
    with open(os.environ["WAN_ROUND_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

timed, judge = timing.RoundRecorder.__call__, timing.judge_speedup

def call(self):
    timed(self)
    log(side=self.label, ms=self.times_ms[-1])

def judged(baseline, candidate, gate):
    log(judged=[baseline.rounds, candidate.rounds])
    return judge(baseline, candidate, gate)

timing.RoundRecorder.__call__, timing.judge_speedup = call, judged
'''


@pytest.fixture(scope="module")
def perf_cache(tmp_path_factory) -> Path:
    """One cache for the runs below: the second reuses the first's ONNX export."""
    return tmp_path_factory.mktemp("perf-cache")


@pytest.mark.parametrize("benchmark_option", ["--benchmark-json", "--benchmark-disable"])
def test_the_gated_rounds_alternate_and_pytest_benchmark_cannot_change_them(benchmark_option, perf_cache, tmp_path):
    """The CFG-step perf case of the tiny source with --perf-rounds=4, in its own pytest: its timed rounds
    alternate with the order flipped every round, the gate judges all 4 of each side whether pytest-benchmark is
    on or off, and pytest-benchmark's JSON carries exactly the candidate's rounds that were judged."""
    (tmp_path / "round_log.py").write_text(ROUND_LOG)
    log, report = tmp_path / "rounds.jsonl", tmp_path / "benchmark.json"
    option = f"{benchmark_option}={report}" if benchmark_option == "--benchmark-json" else benchmark_option
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a plain session, not a worker
    env.update(PYTHONPATH=os.pathsep.join(filter(None, (str(tmp_path), env.get("PYTHONPATH")))),
               WAN_ROUND_LOG=str(log), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "round_log", "-q",
                           __file__, "-m", "perf", "-k", "test_speed and cfg_step", "--device=cpu",
                           "--backends=torch,onnxruntime", "--perf-rounds=4", f"--results-dir={tmp_path / 'results'}",
                           f"--cache-dir={perf_cache}", option],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    rounds = [e for e in entries if "side" in e]
    assert [e["side"] for e in rounds] == ["torch", "onnxruntime", "onnxruntime", "torch"] * 2
    assert [e["judged"] for e in entries if "judged" in e] == [[4, 4]]
    if benchmark_option == "--benchmark-json":
        (bench,) = json.loads(report.read_text())["benchmarks"]
        candidate_s = [e["ms"] / 1e3 for e in rounds if e["side"] == "onnxruntime"]
        assert bench["stats"]["data"] == pytest.approx(candidate_s, rel=1e-9) and bench["stats"]["rounds"] == 4
        assert bench["options"]["timer"] == "harness.timing.alternate"
        assert bench["extra_info"]["candidate_median_ms"] == pytest.approx(statistics.median(candidate_s) * 1e3)
    else:
        assert not report.exists()
