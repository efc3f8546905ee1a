"""Device-correct timing: warm-up, synchronize, CUDA events on the GPU, alternating rounds, medians.

GPU work is asynchronous: a host clock around a launch measures the launch, not the kernel. So on CUDA
each call is bracketed by CUDA events and synchronized; on the CPU `time.perf_counter` is exact enough.
Baseline and candidate alternate round by round, with the order flipped every round, so clock and
thermal drift hit both sides alike (the habit of pytorch's benchmarks/dynamo/common.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def timed_call(fn: Callable[..., Any], *args, device: str | torch.device = "cpu") -> tuple[Any, float]:
    """Run `fn(*args)` once and return (output, milliseconds), timed with CUDA events on a CUDA device.

    Work queued before the call is drained first so it is not billed to `fn`.
    """
    if not _is_cuda(device):
        start = time.perf_counter()
        out = fn(*args)
        return out, (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn(*args)
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


@dataclass(frozen=True)
class TimingResult:
    """Times of one side of a measurement and their robust summary (median and interquartile range)."""

    label: str
    times_ms: tuple[float, ...]
    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    min_ms: float
    rounds: int
    method: str
    device: str
    peak_mem_bytes: int | None = None

    def tflops(self, flops: float) -> float:
        """Achieved TFLOP/s at the median time for a workload of `flops` floating-point operations."""
        return flops / (self.median_ms * 1e-3) / 1e12

    @property
    def peak_mem_gib(self) -> float | None:
        return None if self.peak_mem_bytes is None else self.peak_mem_bytes / 2 ** 30


def summarize(label: str, times_ms, device: str | torch.device = "cpu",
              peak_mem_bytes: int | None = None) -> TimingResult:
    """Median and quartiles (numpy's linear interpolation) of a list of per-round times."""
    times = tuple(float(t) for t in times_ms)
    if not times:
        raise ValueError(f"no timings recorded for {label!r}")
    q1, median, q3 = (float(v) for v in np.percentile(times, [25, 50, 75]))
    return TimingResult(label=label, times_ms=times, median_ms=median, q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1,
                        min_ms=min(times), rounds=len(times),
                        method="cuda-events" if _is_cuda(device) else "perf_counter",
                        device=str(device), peak_mem_bytes=peak_mem_bytes)


@dataclass
class RoundRecorder:
    """A zero-argument callable that times `fn(*args)` once per call and keeps the times.

    It fits pytest-benchmark's `benchmark.pedantic(target=candidate, setup=baseline, ...)`: it returns
    None, which `setup` must, so the baseline round runs (and is timed) before every candidate round.
    """

    label: str
    fn: Callable[..., Any]
    args: tuple = ()
    device: str | torch.device = "cpu"
    times_ms: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None

    def __call__(self) -> None:
        cuda = _is_cuda(self.device)
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        _, ms = timed_call(self.fn, *self.args, device=self.device)
        self.times_ms.append(ms)
        if cuda:
            self.peak_mem_bytes = max(self.peak_mem_bytes or 0, torch.cuda.max_memory_allocated(self.device))

    def result(self) -> TimingResult:
        return summarize(self.label, self.times_ms, self.device, self.peak_mem_bytes)


@dataclass(frozen=True)
class Comparison:
    """Baseline and candidate timings of one alternating run, and the speed-up with its spread."""

    baseline: TimingResult
    candidate: TimingResult
    speedup: float  # baseline median / candidate median
    speedup_q1: float  # quartiles of the per-round ratios baseline_i / candidate_i
    speedup_q3: float


def time_alternating(baseline: Callable[[], Any], candidate: Callable[[], Any], *,
                     device: str | torch.device = "cpu", warmup: int = 2, rounds: int = 10,
                     labels: tuple[str, str] = ("baseline", "candidate")) -> Comparison:
    """Time two zero-argument callables in alternating rounds (B,C then C,B, ...) after `warmup` calls each."""
    sides = (RoundRecorder(labels[0], baseline, device=device), RoundRecorder(labels[1], candidate, device=device))
    for _ in range(warmup):  # compilation, autotuning and allocator growth stay out of the numbers
        baseline(), candidate()
    for i in range(rounds):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            side()
    base, cand = sides[0].result(), sides[1].result()
    ratios = np.asarray(base.times_ms) / np.asarray(cand.times_ms)
    q1, q3 = (float(v) for v in np.percentile(ratios, [25, 75]))
    return Comparison(base, cand, base.median_ms / cand.median_ms, q1, q3)
