"""Several GPUs per video: CFG-parallel and Ulysses/ring context parallelism against one GPU.

With `--parallel cfg2|ulysses<N>|ring<N>|cfg2,ulysses<N>` the parity, quality and perf cases here launch the
layout's ranks (harness.parallel) and judge what rank 0 returns against the same backend on one GPU: the
expert forwards and the CFG step within reduction-order noise (thresholds.toml [parallel]), the loop's latents
likewise, the video with the precision's quality bands, and the CFG step's time against one GPU's eager
baseline and one GPU's same backend, with the scaling efficiency. A layout the machine cannot run is a skip
with the reason. Without --parallel they skip, and the `parallel` case below proves rank-0 writing and the
parity plumbing on 2 gloo processes on the CPU in every default run (tests/test_parallel.py proves the launch).
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from harness.backends import BACKENDS
from harness.case import DIT_COMPONENTS, Case
from harness.compare import judge_parallel, judge_parallel_loop
from harness.pipeline import REFERENCE, Precisions
from harness.quality import judge_video
from harness.report import write_summary
from harness.results import Measured, RunRecorder, load_run
from harness.session import Session
from harness.settings import settings_from
from harness.timing import judge_speedup

# What a parity case compares: one expert forward (the layouts that split tokens) or one CFG step (all).
UNITS = (*DIT_COMPONENTS, "cfg_step")
WARMUP = 2


def pytest_generate_tests(metafunc):
    s = metafunc.config.wan_session.settings
    if "parallel_precision" in metafunc.fixturenames:
        metafunc.parametrize("parallel_precision", s.precisions)


# ---------------------------------------------------------------------------------- judging a layout's run

def outputs(session: Session, backend: str, precision: str, shape) -> dict:
    """The ranks' forwards and CFG step at `shape`, with the video at the run's first shape (one launch)."""
    return session.parallel("outputs", backend, precision, shape, video=shape == session.settings.shapes[0])


def judge_unit(session: Session, unit: str, backend: str, precision: str, shape) -> tuple[Case, object]:
    """The layout's expert forward or CFG step against one GPU's, same backend and precision."""
    s = session.settings
    got = outputs(session, backend, precision, shape)
    if unit != "cfg_step" and s.parallel.sequence == 1:
        pytest.skip(f"--parallel {s.parallel.spec} splits the CFG step, not one forward: the cfg_step case judges it")
    if unit == "cfg_step":
        case = Case(unit, shape, precision, batch=session.cfg_batch(backend), source=s.source, layout=s.parallel)
        single, reference = session.cfg_step(backend, precision, shape)(), session.cfg_step("torch", "fp32", shape)()
        return case, judge_parallel(got["cfg_step"], single, reference, precision)
    one = Case(unit, shape, precision, source=s.source)
    single, reference = session.output(backend, one), session.output("torch", one.with_precision("fp32"))
    return dataclasses.replace(one, layout=s.parallel), judge_parallel(got["forward"][unit], single, reference, precision)


def judge_run(session: Session, backend: str, precision: str) -> tuple[Case, object, Case, object]:
    """The layout's loop latents and video (prompt 0, the run's first shape) against one GPU's."""
    s = session.settings
    shape = s.shapes[0]
    got = outputs(session, backend, precision, shape)
    single = session.generation(backend, Precisions.judged(precision), shape)
    reference = session.generation("torch", REFERENCE, shape)
    base = Case("denoising_loop", shape, precision, batch=session.cfg_batch(backend), source=s.source, layout=s.parallel)
    loop = judge_parallel_loop(got["latents"], single.step_latents, reference.step_latents, precision)
    video = judge_video(got["frames"], single.frames, reference.frames, precision)  # one GPU's video sets the band
    return base, loop, dataclasses.replace(base, component="video", variant="prompt0"), video


def time_layout(session: Session, backend: str, shape) -> tuple[Case, list[tuple[str, object]]]:
    """The layout's CFG step against one GPU's eager baseline and one GPU's `backend`, alternating rounds;
    the results to record for the candidate (CPU timings are recorded, never gated: judge_speedup)."""
    s = session.settings
    precision = "fp8" if backend == "torch-fp8" else s.perf_precision
    got = session.parallel("cfg_step_times", backend, precision, shape, rounds=s.perf_rounds, warmup=WARMUP)
    times = got["times"]
    eager, parallel = times["eager"], times["parallel"]
    one_gpu = times.get("one_gpu", eager)  # eager torch is its own one-GPU side
    versus_eager, versus_one = judge_speedup(eager, parallel, None), judge_speedup(one_gpu, parallel, None)
    scaling = {"speedup_vs_one_gpu": versus_one.speedup, "scaling_efficiency": versus_one.speedup / s.parallel.world,
               "one_gpu_median_ms": one_gpu.median_ms, "one_gpu_iqr_ms": one_gpu.iqr_ms,
               "eager_median_ms": eager.median_ms, "eager_iqr_ms": eager.iqr_ms}
    scaling.update({f"peak_mem_gib_rank{r}": b / 2 ** 30 for r, b in enumerate(got["peak_mem_bytes"]) if b is not None})
    case = Case("cfg_step", shape, precision, batch=session.cfg_batch(backend), source=s.source, layout=s.parallel)
    return case, [("parallel", parallel), ("versus_eager", versus_eager), ("scaling", Measured(scaling))]


# ------------------------------------------------------------------------- the cases, under --parallel

@pytest.mark.parity
@pytest.mark.parametrize("unit", UNITS)
def test_parallel_parity(unit, backend, parallel_precision, shape, session):
    case, result = judge_unit(session, unit, backend, parallel_precision, shape)
    session.record("parity", case, backend, result)
    assert result, result.message()


@pytest.mark.parity
def test_parallel_loop_parity(backend, parallel_precision, session):
    case, result, _, _ = judge_run(session, backend, parallel_precision)
    session.record("parity", case, backend, result)
    assert result, result.message()


@pytest.mark.quality
def test_parallel_video_quality(backend, parallel_precision, session):
    _, _, case, result = judge_run(session, backend, parallel_precision)
    session.record("quality", case, backend, result)
    assert result, result.message()


@pytest.mark.perf
def test_parallel_speed(backend, shape, session):
    untimed = BACKENDS[backend].untimed
    if untimed:  # a simulation: its numerics stand for an engine's, its timings for nothing
        pytest.skip(untimed)
    case, results = time_layout(session, backend, shape)
    for _, result in results:
        session.record("perf", case, backend, result)
    versus_eager = dict(results)["versus_eager"]
    assert math.isfinite(versus_eager.speedup) and versus_eager.speedup > 0, versus_eager.message()


# ------------------------------------------ the cases above on 2 gloo processes, in every default run

# One precision per layout keeps the default run short; `pytest -m "parity or quality" --parallel <layout>
# --shapes 32x32x9 --precisions fp32,bf16` measures every pair (thresholds.toml [parallel] has the numbers).
GLOO_RUNS = {"cfg2": "fp32", "ulysses2": "bf16"}


@pytest.fixture(scope="module", params=list(GLOO_RUNS))
def gloo_session(request, tmp_path_factory):
    """A tiny-source session on the CPU whose cases run on 2 gloo ranks; 32x32x9 has 12 tokens to split."""
    results = tmp_path_factory.mktemp(f"results-{request.param}")
    settings = settings_from({"parallel": request.param, "backends": "torch", "device": "cpu", "shapes": "32x32x9",
                              "precisions": GLOO_RUNS[request.param], "perf_rounds": 2, "results_dir": str(results)})
    return Session(settings, RunRecorder(results, f"run-{request.param}", "pytest", settings.summary()))


@pytest.mark.parallel
def test_gloo_ranks_match_one_process_and_the_parent_alone_writes(gloo_session):
    """The parity plumbing end to end (launch, rank 0's return, the parent's verdicts and rows), then the run
    folder: written by the parent alone, every row under a case id that names the layout."""
    session = gloo_session
    s = session.settings
    shape, precision = s.shapes[0], s.precisions[0]
    for unit in UNITS if s.parallel.sequence > 1 else ("cfg_step",):
        case, result = judge_unit(session, unit, "torch", precision, shape)
        session.record("parity", case, "torch", result)
        assert result, result.message()
    loop, loop_result, video, video_result = judge_run(session, "torch", precision)
    session.record("parity", loop, "torch", loop_result)
    session.record("quality", video, "torch", video_result)
    assert loop_result and video_result, loop_result.message() + "; " + video_result.message()
    assert len(loop_result.step_errors) == s.steps
    if s.parallel.cfg == 2:  # the perf plumbing once: alternating rounds on rank 0, barriers on every rank
        case, results = time_layout(session, "torch", shape)
        for _, result in results:
            session.record("perf", case, "torch", result)
        scaling = dict(results)["scaling"].values
        assert scaling["scaling_efficiency"] == pytest.approx(scaling["speedup_vs_one_gpu"] / 2)
        assert not any(k.startswith("peak_mem") for k in scaling)  # no CUDA allocator to ask on the CPU
    summary = write_summary(session.recorder)
    rows = load_run(session.recorder.path)
    assert rows and all(r.case.endswith("-" + s.parallel.spec) for r in rows)
    assert {p.name for p in session.recorder.path.iterdir()} <= {"parity.csv", "quality.csv", "perf.csv", "summary.md",
                                                                   "speedup.png", "error_vs_step.png"}
    text = summary.read_text()
    assert f"- parallel: {s.parallel.spec}" in text and "| interconnect | n/a |" in text
