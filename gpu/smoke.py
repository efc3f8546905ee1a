"""First look on a GPU machine: versions, each attention kernel's availability, and each available kernel
against stock SDPA on one small random attention (catches a wheel that imports but cannot launch)."""
from __future__ import annotations

import torch

from engines.attention.kernels import attend, kernel_available
from harness.compare import rel_l2
from harness.kernels import KERNELS
from harness.machine import machine_info
from harness.timing import summarize, timed_call


def main() -> None:
    for key, value in machine_info().items():
        print(f"{key:20} {value}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8192, 40, 128, generator=gen, device="cuda").bfloat16() for _ in range(3))
    reference = attend(q.float(), k.float(), v.float(), "sdpa")
    for kernel in KERNELS:
        ok, reason = kernel_available(kernel)
        if not ok:
            print(f"{kernel:11} unavailable: {reason}")
            continue
        out = attend(q, k, v, kernel)
        times = summarize(kernel, [timed_call(attend, q, k, v, kernel, device="cuda")[1] for _ in range(5)], "cuda")
        print(f"{kernel:11} rel L2 vs fp32 SDPA {rel_l2(out, reference):.4f}, {times.median_ms:.2f} ms eager, "
              f"finite {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
