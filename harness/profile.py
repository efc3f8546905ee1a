"""Where a forward's GPU time goes: CUDA kernel time per region (attention, GEMMs, the rest) from torch.profiler.

Each kernel is sorted into a region by its name; a region's time over its FLOPs is its achieved rate, which
the block-profile case states against the best rate measured for that kind of work (thresholds.toml [floors],
docs/hardware.md).
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from harness.thresholds import thresholds

REGIONS = ("attention", "gemm", "rest")
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|_attend|_flash_fwd|mha", re.I)
# cuDNN's convolutions (the patch embedding) and their layout transforms: embedding work outside the block's
# FLOP count. Their names carry "cudnn" and "implicit_gemm", so without this they would pass for attention or GEMMs.
_CONVOLUTION = re.compile(r"fprop_implicit_gemm|nhwcToNchw|nchwToNhwc|convolution|conv[23]d", re.I)
# Inductor's generated pointwise and reduction kernels, named after every op fused into them: a row-wise fp8
# quantization fused ahead of a matmul is "triton_red_fused__scaled_mm_..._amax_...", bandwidth work of the rest.
_GENERATED = re.compile(r"^triton_(poi|red|per)_")
_GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|scaled_mm|matmul|triton_tem|sm90_|wgmma|_mm_", re.I)


def region_of(kernel: str) -> str:
    """attention, gemm or rest, by the CUDA kernel's name (attention first: its kernels also contain GEMMs)."""
    if _GENERATED.search(kernel) or _CONVOLUTION.search(kernel):
        return "rest"
    if _ATTENTION.search(kernel):
        return "attention"
    return "gemm" if _GEMM.search(kernel) else "rest"


@dataclass
class Profile:
    """Kernel time of `rounds` calls: per region, one total per call; per kernel, its median total per call."""

    regions: dict[str, list[float]]
    kernels: dict[str, float]

    def top(self, count: int) -> list[tuple[str, str, float]]:
        """The `count` kernels with the most time per call: (region, name, ms), slowest first."""
        ranked = sorted(self.kernels.items(), key=lambda item: -item[1])[:count]
        return [(region_of(name), name, ms) for name, ms in ranked]

    def markdown(self, title: str, count: int = 15) -> str:
        """The slowest kernels as a table: what to fuse or replace next."""
        total = sum(self.kernels.values())
        lines = [f"# {title}", "", f"Kernel time per call: {total:.2f} ms. The {count} slowest kernels:", "",
                 "| region | kernel | ms per call | share |", "|---|---|---|---|"]
        lines += [f"| {region} | `{name[:120]}` | {ms:.3f} | {100 * ms / total:.1f}% |"
                  for region, name, ms in self.top(count)]
        return "\n".join(lines) + "\n"


def region_times(fn: Callable[[], object], rounds: int) -> Profile:
    """CUDA kernel time of `rounds` calls of `fn`, per region and per kernel name."""
    from torch.profiler import ProfilerActivity, profile

    regions: dict[str, list[float]] = {region: [] for region in REGIONS}
    kernels: dict[str, list[float]] = {}
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        totals = dict.fromkeys(REGIONS, 0.0)
        for event in prof.key_averages():
            if event.device_time_total > 0:
                ms = event.device_time_total / 1e3
                totals[region_of(event.key)] += ms
                kernels.setdefault(event.key, []).append(ms)
        for region, ms in totals.items():
            regions[region].append(ms)
    return Profile(regions, {name: statistics.median(times + [0.0] * (rounds - len(times)))
                             for name, times in kernels.items()})


def floor_tflops(region: str, precision: str) -> float | None:
    """The best rate measured for this region's work at `precision` (fp8, or bf16 for every other)."""
    kind = "fp8" if precision == "fp8" else "bf16"
    return thresholds()["floors"].get(f"{region}_{kind}")
