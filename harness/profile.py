"""Where a forward's GPU time goes: CUDA kernel time per region (attention, GEMMs, the rest) from torch.profiler.

Each kernel is sorted into a region by its name; a region's time over its FLOPs is its achieved rate, which
the block-profile case states against the best rate measured for that kind of work (thresholds.toml [floors],
docs/hardware.md).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from harness.compare import thresholds

REGIONS = ("attention", "gemm", "rest")
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|cudnn|_attend|_flash_fwd|mha", re.I)
_GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|scaled_mm|matmul|triton_tem|sm90_|wgmma|_mm_", re.I)


def region_of(kernel: str) -> str:
    """attention, gemm or rest, by the CUDA kernel's name (attention first: its kernels also contain GEMMs)."""
    if _ATTENTION.search(kernel):
        return "attention"
    return "gemm" if _GEMM.search(kernel) else "rest"


def region_times(fn: Callable[[], object], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of CUDA kernel time per region, one value per call of `fn`, over `rounds` calls."""
    from torch.profiler import ProfilerActivity, profile

    times: dict[str, list[float]] = {region: [] for region in REGIONS}
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        totals = dict.fromkeys(REGIONS, 0.0)
        for event in prof.key_averages():
            if event.device_time_total > 0:
                totals[region_of(event.key)] += event.device_time_total / 1e3
        for region, ms in totals.items():
            times[region].append(ms)
    return times


def floor_tflops(region: str, precision: str) -> float | None:
    """The best rate measured for this region's work at `precision` (fp8, or bf16 for every other)."""
    kind = "fp8" if precision == "fp8" else "bf16"
    return thresholds()["floors"].get(f"{region}_{kind}")
