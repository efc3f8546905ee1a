"""Timing-only GPU cases: one full 40-layer A14B expert in bf16 against the extrapolation from a
2-layer slice, and the real-config VAE decode at 480p x 81 frames.

The whole expert is 28.6 GB in bf16, so it runs alone (no second expert, no fp32 reference).
Writes timing_only.csv into the given folder and prints a short table.
"""
from __future__ import annotations

import argparse
import csv
import gc
from pathlib import Path

import torch

from harness.components import DiT, dit_inputs
from harness.machine import device_name
from harness.models import load_expert
from harness.shapes import A14B_LAYERS, parse_shape
from harness.timing import summarize, timed_call


def time_forward(layers: int, shape, rounds: int) -> tuple[float, float]:
    """Median and IQR (ms) of one bf16 eager forward of a `layers`-deep expert at `shape`."""
    expert = load_expert(layers)
    module = DiT(expert)
    latents, t, text = dit_inputs(expert, shape, device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            module(latents, t, text)
        times = [timed_call(module, latents, t, text, device="cuda")[1] for _ in range(rounds)]
    del module
    gc.collect()
    torch.cuda.empty_cache()
    result = summarize(f"{layers} layers", times, "cuda")
    return result.median_ms, result.iqr_ms


def time_vae_decode(shape, rounds: int) -> tuple[float, float, float]:
    """Median and IQR (ms) and peak GiB of the eager bf16 decode of the real-config Wan VAE."""
    from diffusers import AutoencoderKLWan

    from harness.components import VaeDecoder
    from harness.models import _build

    module = VaeDecoder(_build(AutoencoderKLWan, {}, 2, "cuda", torch.bfloat16))
    latents = torch.randn(shape.latent_shape(), generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    with torch.inference_mode():
        module(latents)
        torch.cuda.reset_peak_memory_stats()
        times = [timed_call(module, latents, device="cuda")[1] for _ in range(rounds)]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    del module
    torch.cuda.empty_cache()
    result = summarize("vae", times, "cuda")
    return result.median_ms, result.iqr_ms, peak


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
    vae_shape = parse_shape("480p")
    vae_ms, vae_iqr, vae_peak = time_vae_decode(vae_shape, args.rounds)
    print(f"vae_decode {vae_shape.id} bf16 eager: {vae_ms:.0f} ms (IQR {vae_iqr:.0f}), peak {vae_peak:.1f} GiB")
    for row in rows:
        row.update(vae_decode_480p_bf16_ms=round(vae_ms, 1), vae_peak_gib=round(vae_peak, 2))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "timing_only.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
