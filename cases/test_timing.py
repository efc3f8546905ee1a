"""Timing helpers: quartile maths, alternating order, real sleeps measured sensibly, the CUDA-event path."""
import time

import pytest
import torch

from harness.timing import RoundRecorder, summarize, time_alternating, timed_call

pytestmark = pytest.mark.unit
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_summary_statistics():
    result = summarize("x", [8, 1, 7, 2, 6, 3, 5, 4])
    assert (result.median_ms, result.q1_ms, result.q3_ms) == (4.5, 2.75, 6.25)
    assert result.iqr_ms == 3.5 and result.min_ms == 1 and result.rounds == 8
    assert result.method == "perf_counter" and result.tflops(1e12) == pytest.approx(222.222, rel=1e-5)  # 1 TFLOP in 4.5 ms


def test_summary_needs_times():
    with pytest.raises(ValueError, match="no timings recorded for 'x'"):
        summarize("x", [])


def test_rounds_alternate_and_flip_order():
    calls = []
    comparison = time_alternating(lambda: calls.append("B"), lambda: calls.append("C"), warmup=1, rounds=4)
    assert "".join(calls) == "BC" + "BC" + "CB" + "BC" + "CB"
    assert comparison.baseline.rounds == comparison.candidate.rounds == 4


def test_real_sleeps_give_the_expected_ratio():
    comparison = time_alternating(lambda: time.sleep(0.02), lambda: time.sleep(0.005), warmup=0, rounds=5)
    assert comparison.baseline.median_ms >= 20 and comparison.candidate.median_ms >= 5
    assert 2.0 < comparison.speedup < 4.5  # 4.0 nominal; sleeps overrun a little on a busy CI machine
    assert comparison.speedup_q1 <= comparison.speedup_q3


def test_timed_call_returns_the_output():
    out, ms = timed_call(torch.add, torch.ones(2), torch.ones(2), device="cpu")
    assert out.tolist() == [2.0, 2.0] and ms >= 0


def test_round_recorder_fits_pedantic_setup():
    recorder = RoundRecorder("base", time.sleep, (0.001,))
    assert recorder() is None  # pytest-benchmark treats a non-None setup result as (args, kwargs)
    recorder()
    result = recorder.result()
    assert result.rounds == 2 and result.min_ms >= 1 and result.peak_mem_bytes is None


@needs_cuda
def test_cuda_events_time_device_work():
    def spin():
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time, returns to the host at once

    _, ms = timed_call(spin, device="cuda")
    assert ms > 1
    recorder = RoundRecorder("spin", spin, device="cuda")
    recorder()
    assert recorder.result().method == "cuda-events" and recorder.result().peak_mem_bytes is not None
