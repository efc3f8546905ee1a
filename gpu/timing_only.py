"""Timing-only: one full 40-layer A14B expert in bf16 against the extrapolation from a 2-layer slice.

The whole expert is 28.6 GB in bf16, so it runs alone (no second expert, no fp32 reference).
Writes full_expert.csv into the given folder and prints a short table.
"""
from __future__ import annotations

import argparse
import csv
import gc
from pathlib import Path

import torch

from harness.components import DiT, EXPERT_TIMESTEP
from harness.machine import device_name
from harness.models import load_expert
from harness.shapes import A14B_LAYERS, parse_shape
from harness.timing import summarize, timed_call


def time_forward(layers: int, shape, rounds: int) -> tuple[float, float]:
    """Median and IQR (ms) of one bf16 eager forward of a `layers`-deep expert at `shape`."""
    module = DiT(load_expert(layers))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(shape.latent_shape(), generator=gen).to("cuda", torch.bfloat16)
    text = torch.randn((1, 512, 4096), generator=gen).to("cuda", torch.bfloat16)
    t = torch.tensor([EXPERT_TIMESTEP["transformer"]], device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            module(latents, t, text)
        times = [timed_call(module, latents, t, text, device="cuda")[1] for _ in range(rounds)]
    del module
    gc.collect()
    torch.cuda.empty_cache()
    result = summarize(f"{layers} layers", times, "cuda")
    return result.median_ms, result.iqr_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for spec in args.shapes.split(","):
        shape = parse_shape(spec)
        slice_ms, slice_iqr = time_forward(2, shape, args.rounds * 3)
        full_ms, full_iqr = time_forward(A14B_LAYERS, shape, args.rounds)
        extrapolated = slice_ms / 2 * A14B_LAYERS
        rows.append({"shape": shape.id, "tokens": shape.tokens, "device": device_name(),
                     "slice_2_layer_ms": round(slice_ms, 1), "slice_iqr_ms": round(slice_iqr, 1),
                     "extrapolated_40_layer_ms": round(extrapolated, 1),
                     "measured_40_layer_ms": round(full_ms, 1), "measured_iqr_ms": round(full_iqr, 1),
                     "measured_over_extrapolated": round(full_ms / extrapolated, 3)})
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "full_expert.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
