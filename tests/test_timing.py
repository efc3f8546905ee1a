"""Timing helpers: quartile maths, alternating order, real sleeps measured sensibly, the CUDA-event path."""
import time

import pytest
import torch

import math

from harness.timing import RoundRecorder, alternate, judge_speedup, summarize, timed_call

pytestmark = pytest.mark.unit
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_summary_statistics():
    result = summarize("x", [8, 1, 7, 2, 6, 3, 5, 4])
    assert (result.median_ms, result.q1_ms, result.q3_ms) == (4.5, 2.75, 6.25)
    assert result.iqr_ms == 3.5 and result.min_ms == 1 and result.rounds == 8
    assert result.method == "perf_counter" and result.tflops is None and "tflops" not in result.metrics()
    timed = summarize("x", [8, 1, 7, 2, 6, 3, 5, 4], flops=1e12, floor_tflops=785)
    assert timed.tflops == pytest.approx(222.222, rel=1e-5)  # 1 TFLOP in 4.5 ms
    assert timed.metrics()["tflops"] == timed.tflops and timed.thresholds() == {"tflops": 785}


def on(device: str, times) -> object:
    return summarize(device, times, device=device)


def test_the_gate_passes_fails_and_ignores_cpu_timings():
    base = [10.0, 10.2, 9.8, 10.1]
    assert judge_speedup(on("cuda", base), on("cuda", [5.0, 5.1, 4.9, 5.0]), 1.5).passed is True
    slow = judge_speedup(on("cuda", base), on("cuda", [8.0, 8.1, 7.9, 8.0]), 1.5)
    assert slow.passed is False and not slow and "FAILS the 1.5x gate" in slow.message()
    cpu = judge_speedup(on("cpu", base), on("cpu", [5.0] * 4), 1.5)
    assert cpu.passed is None and cpu and cpu.checks() == {"speedup": None}
    assert judge_speedup(on("cuda", base), on("cuda", [5.0] * 4), None).passed is None


@pytest.mark.parametrize("where", ["baseline", "candidate"])
def test_a_nan_timing_never_passes_the_gate(where):
    good, bad = [10.0, 10.0, 10.0], [math.nan, math.nan, math.nan]
    base, cand = (bad, [1.0] * 3) if where == "baseline" else (good, bad)
    result = judge_speedup(on("cuda", base), on("cuda", cand), 1.5)
    assert result.passed is False and not result


def test_summary_needs_times():
    with pytest.raises(ValueError, match="no timings recorded for 'x'"):
        summarize("x", [])


def sides_that_log(*names: str) -> tuple[list[str], tuple[RoundRecorder, ...]]:
    """Fake sides on the CPU: each appends its name to the log when called, timed or not."""
    calls: list[str] = []
    return calls, tuple(RoundRecorder(name, calls.append, (name,)) for name in names)


def test_two_sides_alternate_with_the_order_flipped_every_round():
    calls, sides = sides_that_log("B", "C")
    alternate(sides, 4, warmup=1)
    # The warm-up round flips too, so that the first timed round runs the sides as given.
    assert "".join(calls) == "CB" + "BC" + "CB" + "BC" + "CB"
    assert [side.result().rounds for side in sides] == [4, 4]  # the warm-up is not timed


def test_n_sides_reverse_every_round_and_a_placeholder_keeps_its_slot():
    calls, (a, b, c) = sides_that_log("A", "B", "C")
    alternate((a, b, c), 3)
    assert "".join(calls) == "ABC" + "CBA" + "ABC"
    calls.clear()
    # A rank that sits the middle side out: every slot still meets `between` (the barrier), in the same order.
    alternate((a, None, c), 2, between=lambda: calls.append("|"))
    assert "".join(calls) == "|A||C" + "|C||A"
    assert [side.result().rounds for side in (a, b, c)] == [5, 3, 5]


def test_real_sleeps_give_the_expected_ratio():
    sides = (RoundRecorder("baseline", time.sleep, (0.02,)), RoundRecorder("candidate", time.sleep, (0.005,)))
    alternate(sides, 5)
    comparison = judge_speedup(sides[0].result(), sides[1].result(), None)
    assert comparison.baseline.median_ms >= 20 and comparison.candidate.median_ms >= 5
    assert 2.0 < comparison.speedup < 4.5  # 4.0 nominal; sleeps overrun a little on a busy CI machine
    assert comparison.speedup_q1 <= comparison.speedup_q3


def test_timed_call_returns_the_output():
    out, ms = timed_call(torch.add, torch.ones(2), torch.ones(2), device="cpu")
    assert out.tolist() == [2.0, 2.0] and ms >= 0


def test_round_recorder_times_each_call():
    recorder = RoundRecorder("base", time.sleep, (0.001,))
    recorder()
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


@pytest.mark.unit
def test_profile_ranks_kernels_and_sorts_them_into_regions():
    from harness.profile import Profile, region_of

    names = ("flash_fwd_kernel", "sm90_xmma_gemm_e4m3", "triton_per_fused_gelu_0", "nvjet_sm90_qqtst_128x128_ovscale",
             "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_6",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
             # the patch embedding's cuDNN convolution, as an H200 names it
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x256x64_warpgroupsize2x1x1_g1",
             "void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>")
    assert [region_of(k) for k in names] == ["attention", "gemm", "rest", "gemm", "rest", "attention", "rest", "rest"]
    profile = Profile({"attention": [3.0], "gemm": [2.0], "rest": [1.0]},
                      {"triton_per_fused_gelu_0": 1.0, "flash_fwd_kernel": 3.0, "sm90_xmma_gemm_e4m3": 2.0})
    assert profile.top(2) == [("attention", "flash_fwd_kernel", 3.0), ("gemm", "sm90_xmma_gemm_e4m3", 2.0)]
    table = profile.markdown("block", count=3)
    assert "Kernel time per call: 6.00 ms" in table and "| rest | `triton_per_fused_gelu_0` | 1.000 | 16.7% |" in table


@pytest.mark.unit
def test_clocks_summarize_nvml_samples():
    from harness.clocks import Clocks, reason_names

    assert reason_names(0x4 | 0x40) == ["power cap", "hardware thermal"] and reason_names(0) == []
    clocks = Clocks.from_samples([(1980, 700_000, 0), (1755, 690_000, 0x4), (1830, 695_000, 0x4)])
    assert (clocks.sm_mhz, clocks.power_w, clocks.samples, clocks.reasons) == (1830.0, 695.0, 3, ("power cap",))
    assert clocks.metrics() == {"sm_clock_mhz": 1830.0, "power_w": 695.0} and clocks.checks() == {}
    assert "SM clock 1830 MHz, power 695 W (medians of 3 NVML samples); clock limits seen: power cap" == clocks.describe()
    with pytest.raises(ValueError):
        Clocks.from_samples([])


@pytest.mark.unit
def test_clock_sampler_reads_while_work_runs_and_says_why_when_it_cannot(monkeypatch):
    import harness.clocks as clocks_module

    if not torch.cuda.is_available():  # the real path on a machine without a GPU: no error, a reason
        with clocks_module.ClockSampler() as clocks:
            pass
        assert clocks.result is None and clocks.describe() == "SM clock not sampled: no CUDA device"

    class Card:  # stands in for the driver library: the sampler's own thread and bookkeeping are under test
        def __init__(self, device):
            self.reads = iter([(1000, 1, 0x1)] + [(1900, 650_000, 0x4)] * 1000)

        def sample(self):
            return next(self.reads)

        def close(self):
            pass

    monkeypatch.setattr(clocks_module, "_Nvml", Card)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with clocks_module.ClockSampler(period_s=0.001) as clocks:
        time.sleep(0.05)
    # The idle probe before the work is not counted.
    assert clocks.result.sm_mhz == 1900 and clocks.result.reasons == ("power cap",) and clocks.result.samples >= 1
    with clocks_module.ClockSampler(period_s=60) as clocks:  # work shorter than one period: read at its end
        pass
    assert clocks.result.samples == 1 and clocks.result.sm_mhz == 1900

    class Broken(Card):
        def __init__(self, device):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(clocks_module, "_Nvml", Broken)
    with clocks_module.ClockSampler() as clocks:
        pass
    assert clocks.result is None and "libnvidia-ml.so.1" in clocks.describe()
