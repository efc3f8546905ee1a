"""Where one A14B block's time goes: attention, GEMMs and the rest, per backend, from CUDA kernel times.

Profiles a 1-layer proxy expert forward (one block plus the patch embedding, time embedding and
unpatchify around it) with torch.profiler, sorts every CUDA kernel into a region by its name, and
states each region's achieved TFLOP/s against the floors in FACTS.md §5. Whole-forward medians come
from CUDA events. Rows are appended to block_profile.csv as they come, so a cut-off run keeps them.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import torch

from engines.inductor import Inductor
from engines.torch_eager import TorchEager
from engines.torch_fp8 import TorchFp8
from harness.case import Case
from harness.components import dit_component, dit_inputs
from harness.models import load_expert
from harness.shapes import A14B_DIM, A14B_FFN, TEXT_TOKENS, parse_shape
from harness.timing import summarize, timed_call

# FACTS.md §5, one H100: the ceilings each region is judged against.
FLOORS_TFLOPS = {"attention": {"bf16": 598, "fp8": 1239}, "gemm": {"bf16": 785, "fp8": 1239}}
ATTENTION = re.compile(r"flash|fmha|attention|sdpa|cudnn|_attend|_flash_fwd", re.I)
GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|scaled_mm|matmul|triton_tem|sm90_|wgmma|_mm_", re.I)
VARIANTS = {
    "eager bf16": (TorchEager, {}, "bf16"),
    "inductor bf16": (Inductor, {}, "bf16"),
    "torch-fp8, bf16 attention": (TorchFp8, {"attention": "bf16"}, "fp8"),
    "torch-fp8": (TorchFp8, {}, "fp8"),
}


def region_flops(tokens: int) -> dict[str, float]:
    """FLOPs of one block by region (FACTS.md §5's formula split in two)."""
    d = A14B_DIM
    attention = 4 * tokens ** 2 * d + 4 * tokens * TEXT_TOKENS * d
    gemm = 12 * tokens * d ** 2 + 4 * tokens * d * A14B_FFN
    return {"attention": attention, "gemm": gemm}


def region_of(kernel: str) -> str:
    if ATTENTION.search(kernel):
        return "attention"
    return "gemm" if GEMM.search(kernel) else "rest"


def profile(runner, inputs, iterations: int = 5) -> dict[str, float]:
    """Milliseconds of CUDA kernel time per region, averaged over `iterations` forwards."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            runner(*inputs)
        torch.cuda.synchronize()
    totals = {"attention": 0.0, "gemm": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[region_of(event.key)] += event.device_time_total / 1e3 / iterations
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--rounds", type=int, default=10)
    # Labels hold commas and spaces, so each is one quoted argument: --variants "eager bf16" torch-fp8
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    expert = load_expert(1)
    component = dit_component(expert)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "block_profile.csv"
    fields = ["shape", "variant", "forward_ms", "forward_iqr_ms", "region", "kernel_ms", "tflops", "floor_tflops"]
    with open(path, "w", newline="") as fh:
        csv.DictWriter(fh, fieldnames=fields).writeheader()
    for spec in args.shapes.split(","):
        shape = parse_shape(spec)
        inputs = dit_inputs(expert, shape, device="cuda")
        flops = region_flops(shape.tokens)
        for label in args.variants:
            cls, options, precision = VARIANTS[label]
            runner = cls(**options).build(component, Case("transformer", shape, precision, source="proxy"))
            for _ in range(3):  # compile, autotune, cuDNN graph build
                runner(*inputs)
            times = summarize(label, [timed_call(runner, *inputs, device="cuda")[1] for _ in range(args.rounds)],
                              "cuda")
            regions = profile(runner, inputs)
            kind = "fp8" if precision == "fp8" else "bf16"
            rows = []
            for region, ms in regions.items():
                tflops = flops[region] / (ms * 1e-3) / 1e12 if region in flops and ms > 0 else None
                attention_kind = "bf16" if "bf16 attention" in label else kind
                floor = FLOORS_TFLOPS.get(region, {}).get(attention_kind if region == "attention" else kind)
                rows.append({"shape": shape.id, "variant": label, "forward_ms": round(times.median_ms, 2),
                             "forward_iqr_ms": round(times.iqr_ms, 2), "region": region, "kernel_ms": round(ms, 2),
                             "tflops": None if tflops is None else round(tflops), "floor_tflops": floor})
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=fields).writerows(rows)
            print(f"{shape.id:11} {label:27} forward {times.median_ms:7.1f} ms | " + " | ".join(
                f"{r['region']} {r['kernel_ms']:.1f} ms" + (f" ({r['tflops']} TFLOP/s)" if r["tflops"] else "")
                for r in rows), flush=True)
            del runner
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
