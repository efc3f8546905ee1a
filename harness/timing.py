"""Device-correct timing: warm-up, synchronize, CUDA events on the GPU, alternating rounds, medians.

GPU work is asynchronous: a host clock around a launch measures the launch, not the kernel. So on CUDA
each call is bracketed by CUDA events and synchronized; on the CPU `time.perf_counter` is exact enough.
The sides of a measurement (a baseline and any number of candidates) alternate round by round in one loop,
`alternate`, with the order reversed every round, so clock and thermal drift hit every side alike (the habit of
pytorch's benchmarks/dynamo/common.py). The perf cases, the parallel ranks and the tests all time through it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from harness.memory import reset_gpu_peak


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
    flops: float | None = None  # of one call, where known: gives achieved TFLOP/s
    floor_tflops: float | None = None  # the rate this work is judged against (docs/hardware.md)

    @property
    def tflops(self) -> float | None:
        """Achieved TFLOP/s at the median time, where the workload's FLOPs are known."""
        return None if not self.flops else self.flops / (self.median_ms * 1e-3) / 1e12

    @property
    def peak_mem_gib(self) -> float | None:
        return None if self.peak_mem_bytes is None else self.peak_mem_bytes / 2 ** 30

    def metrics(self) -> dict[str, float]:
        """median_ms and iqr_ms, and peak_mem_gib and tflops where measured."""
        out = {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "peak_mem_gib": self.peak_mem_gib,
               "tflops": self.tflops}
        return {k: v for k, v in out.items() if v is not None}

    def thresholds(self) -> dict[str, float | None]:
        return {"tflops": self.floor_tflops}

    def checks(self) -> dict[str, bool | None]:
        return {}


def summarize(label: str, times_ms, device: str | torch.device = "cpu", peak_mem_bytes: int | None = None,
              flops: float | None = None, floor_tflops: float | None = None) -> TimingResult:
    """Median and quartiles (numpy's linear interpolation) of a list of per-round times."""
    times = tuple(float(t) for t in times_ms)
    if not times:
        raise ValueError(f"no timings recorded for {label!r}")
    q1, median, q3 = (float(v) for v in np.percentile(times, [25, 50, 75]))
    return TimingResult(label=label, times_ms=times, median_ms=median, q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1,
                        min_ms=min(times), rounds=len(times),
                        method="cuda-events" if _is_cuda(device) else "perf_counter",
                        device=str(device), peak_mem_bytes=peak_mem_bytes, flops=flops, floor_tflops=floor_tflops)


@dataclass
class RoundRecorder:
    """One side of a measurement: a zero-argument callable that times `fn(*args)` once per call and keeps the
    times, and on CUDA the peak memory of its timed calls."""

    label: str
    fn: Callable[..., Any]
    args: tuple = ()
    device: str | torch.device = "cpu"
    flops: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None

    def __call__(self) -> None:
        cuda = _is_cuda(self.device)
        if cuda:
            torch.cuda.synchronize(self.device)
            reset_gpu_peak(self.device)  # the timed rounds' own peak; the case's survives it (harness.memory)
        _, ms = timed_call(self.fn, *self.args, device=self.device)
        self.times_ms.append(ms)
        if cuda:
            self.peak_mem_bytes = max(self.peak_mem_bytes or 0, torch.cuda.max_memory_allocated(self.device))

    def result(self, floor_tflops: float | None = None) -> TimingResult:
        return summarize(self.label, self.times_ms, self.device, self.peak_mem_bytes, self.flops, floor_tflops)


@dataclass(frozen=True)
class SpeedupResult:
    """Baseline and candidate timings of one alternating run, the speed-up of medians with the spread of the
    per-round ratios, and the gate's verdict; truthy when it passes (or when no gate applies)."""

    baseline: TimingResult
    candidate: TimingResult
    speedup: float  # baseline median / candidate median
    speedup_q1: float  # quartiles of the per-round ratios baseline_i / candidate_i
    speedup_q3: float
    gate: float | None  # the minimum speed-up asked for, or None: measured, not gated
    passed: bool | None  # None when not gated (no gate, or CPU timings)

    def __bool__(self) -> bool:
        return self.passed is not False

    def metrics(self) -> dict[str, float]:
        return {"speedup": self.speedup, "speedup_q1": self.speedup_q1, "speedup_q3": self.speedup_q3}

    def thresholds(self) -> dict[str, float | None]:
        return {"speedup": self.gate}

    def checks(self) -> dict[str, bool | None]:
        return {"speedup": self.passed}

    def message(self) -> str:
        verdict = {True: "passes", False: "FAILS", None: "is not gated"}[self.passed]
        gate = "" if self.gate is None else f" the {self.gate:g}x gate"
        return (f"{self.candidate.label} {self.speedup:.3f}x over {self.baseline.label} "
                f"({self.baseline.median_ms:.4g} -> {self.candidate.median_ms:.4g} ms median, per-round ratios "
                f"{self.speedup_q1:.3f}-{self.speedup_q3:.3f}, {self.candidate.method}); {verdict}{gate}")


def judge_speedup(baseline: TimingResult, candidate: TimingResult, gate: float | None) -> SpeedupResult:
    """The speed-up gate, in one place: median over median >= gate, on CUDA timings only; NaN never passes.

    CPU timings on a shared machine are informational: recorded, never gated.
    """
    ratios = np.asarray(baseline.times_ms) / np.asarray(candidate.times_ms)
    q1, q3 = (float(v) for v in np.percentile(ratios, [25, 75]))
    speedup = baseline.median_ms / candidate.median_ms if candidate.median_ms > 0 else float("nan")
    gated = gate is not None and _is_cuda(candidate.device) and _is_cuda(baseline.device)
    passed = meets_gate(speedup, gate) if gated else None
    return SpeedupResult(baseline, candidate, speedup, q1, q3, gate, passed)


def meets_gate(speedup: float, gate: float) -> bool:
    """The gate's rule: a speed-up of at least `gate`; a NaN or Inf never passes."""
    return bool(np.isfinite(speedup)) and speedup >= gate


def alternate(sides: Sequence[RoundRecorder | None], rounds: int, *, warmup: int = 0,
              between: Callable[[], Any] | None = None) -> None:
    """Call every side once per round, `warmup` untimed rounds and then `rounds` timed ones, reversing the order
    every round: A,B then B,A for two sides, A,B,C then C,B,A for three. The first timed round runs `sides` in the
    order given.

    Reversal puts side i at positions i and N-1-i of each pair of rounds, the same mean position for every side, so
    a drift that is linear over a pair of rounds costs every side the same. `between` runs before every slot (the
    parallel ranks' barrier, outside the timings); a None side keeps its slot without running, so that a rank that
    sits a side out still meets every barrier the others meet.
    """
    for i in range(-warmup, rounds):  # i < 0: warm-up, its order flipping too, so round 0 runs `sides` as given
        for side in sides if i % 2 == 0 else sides[::-1]:
            if between is not None:
                between()
            if side is None:
                continue
            if i < 0:  # compilation, autotuning and allocator growth stay out of the numbers
                side.fn(*side.args)
            else:
                side()
