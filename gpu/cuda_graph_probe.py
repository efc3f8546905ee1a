"""Does a CUDA graph of the whole forward speed up a CFG step? Eager bf16 and torch-fp8, each with and without.

Prediction (issue 8, written before the run): no. A 2-layer proxy forward launches a few hundred
kernels of ~0.1-30 ms each; the CPU issues them far ahead of the GPU unless something synchronises,
so launch overhead hides behind the kernels. Expect gains under 1%, inside the rounds' IQR.

One A14B-width expert (2 layers, random weights, bf16); one CFG step = the conditional and the
unconditional forward. Each variant is timed against its graph twin in alternating rounds (CUDA
events, medians). Rows go to cuda_graph.csv as they come; a short table is printed last.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from engines.cuda_graph import GraphedRunner
from engines.torch_eager import TorchEager
from engines.torch_fp8 import TorchFp8
from harness.case import Case
from harness.compare import compare
from harness.components import dit_component, dit_inputs
from harness.models import load_expert
from harness.shapes import parse_shape
from harness.timing import time_alternating

VARIANTS = {"eager bf16": (TorchEager, "bf16"), "torch-fp8": (TorchFp8, "fp8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    expert = load_expert(args.layers)
    component = dit_component(expert)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cuda_graph.csv"
    fields = ["shape", "variant", "plain_ms", "plain_iqr_ms", "graph_ms", "graph_iqr_ms", "graph_speedup",
              "speedup_q1", "speedup_q3", "graph_vs_plain_rel_l2"]
    with open(path, "w", newline="") as fh:
        csv.DictWriter(fh, fieldnames=fields).writeheader()
    rows = []
    for spec in args.shapes.split(","):
        shape = parse_shape(spec)
        latents, t, cond = dit_inputs(expert, shape, device="cuda")
        uncond = dit_inputs(expert, shape, device="cuda", seed=1)[2]
        for label, (cls, precision) in VARIANTS.items():
            plain = cls().build(component, Case("transformer", shape, precision, source="proxy"))
            graphed = GraphedRunner(plain)  # the same compiled code, replayed as one graph

            def step(runner):
                return lambda: (runner(latents, t, cond), runner(latents, t, uncond))

            result = time_alternating(step(plain), step(graphed), device="cuda", warmup=2, rounds=args.rounds,
                                      labels=(label, f"{label} + CUDA graph"))
            error = compare(graphed(latents, t, cond), plain(latents, t, cond), tolerance=float("inf")).rel_l2
            row = {"shape": shape.id, "variant": label,
                   "plain_ms": round(result.baseline.median_ms, 2), "plain_iqr_ms": round(result.baseline.iqr_ms, 2),
                   "graph_ms": round(result.candidate.median_ms, 2), "graph_iqr_ms": round(result.candidate.iqr_ms, 2),
                   "graph_speedup": round(result.speedup, 4), "speedup_q1": round(result.speedup_q1, 4),
                   "speedup_q3": round(result.speedup_q3, 4), "graph_vs_plain_rel_l2": f"{error:.2e}"}
            rows.append(row)
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=fields).writerow(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del plain, graphed
            torch.cuda.empty_cache()
    print("| shape | variant | CFG step ms | + CUDA graph ms | graph speed-up (IQR of ratios) | graph vs plain rel L2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['plain_ms']} (IQR {r['plain_iqr_ms']}) | {r['graph_ms']} "
              f"(IQR {r['graph_iqr_ms']}) | {r['graph_speedup']}× ({r['speedup_q1']}–{r['speedup_q3']}) "
              f"| {r['graph_vs_plain_rel_l2']} |")


if __name__ == "__main__":
    main()
