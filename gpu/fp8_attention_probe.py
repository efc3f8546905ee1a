"""GPU probe for fp8 self-attention at Wan2.2-A14B shapes: accuracy against fp32 and speed, per route.

Run on the GPU machine from the repo root (diffusers and nvidia-cudnn-frontend installed from .whl/):
    python3 gpu/fp8_attention_probe.py --out $OUT [--shapes 480p,720p]
Writes <out>/attention-probe.csv (harness Row schema), <out>/attention-probe.md and prints the table last.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines import fp8_attention as fa
from harness.case import Case
from harness.components import example_inputs
from harness.machine import device_name, version
from harness.models import load_model
from harness.results import Row, atomic_write_text
from harness.shapes import parse_shape

HEADS, HEAD_D, TEXT_TOKENS = 40, 128, 512
ROWS: list[Row] = []
# The lead's torch-fp8 backend compiles the block: inductor fuses the quantization around the opaque op.
COMPILED = torch.compile(fa.fp8_sdpa, dynamic=False)
COMPILED_QUANT = torch.compile(fa.quantize_qkv, dynamic=False)
VERSIONS = ""


def record(case: str, component: str, variant: str, shape: str, tokens: int, metric: str, value) -> None:
    ROWS.append(Row(case, component, variant, "fp8" if "fp8" in variant else "bf16", shape, tokens, metric,
                    None if value is None else float(value), None, None, device_name(), VERSIONS))


def time_ms(fn, reps: int = 10, warmup: int = 3) -> list[float]:
    """Per-call milliseconds by CUDA events after warm-up (module load, autotune, plan build)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """rel L2, cosine and max abs of `out` against the fp32 reference; NaN stays visible."""
    diff = out.float() - ref
    flat_o, flat_r = out.float().flatten(), ref.flatten()
    return {"rel_l2": (diff.norm() / ref.norm()).item(),
            "cosine": F.cosine_similarity(flat_o, flat_r, dim=0).item(),
            "max_abs": diff.abs().max().item()}


def sdpa_bshd(q, k, v):
    """Stock SDPA (default backend choice) over diffusers' [B, S, H, D] layout."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def fp32_reference(q, k, v):
    """fp32 attention by the memory-efficient kernel (the math kernel would need L^2 x heads memory)."""
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return sdpa_bshd(q.float(), k.float(), v.float())


def synthetic_qkv(tokens: int, kv_tokens: int, seed: int):
    """Q/K/V with the statistics of RMS-normed, rotated projections: per-channel gains and offsets."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(n, offset):
        gain = torch.exp(0.5 * torch.randn(HEADS, HEAD_D, generator=gen, device="cuda"))
        bias = offset * torch.randn(HEADS, HEAD_D, generator=gen, device="cuda")
        return (torch.randn(1, n, HEADS, HEAD_D, generator=gen, device="cuda") * gain + bias).bfloat16()

    return draw(tokens, 0.0), draw(kv_tokens, 1.0), draw(kv_tokens, 0.5)


def randn_qkv(tokens: int, kv_tokens: int, seed: int):
    """Plain N(0, 1), as the issue's first probe used."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, n, HEADS, HEAD_D, generator=gen, device="cuda").bfloat16()
                 for n in (tokens, kv_tokens, kv_tokens))


VARIANTS = {  # name -> fp8_sdpa options (route 'sdpa' is the bf16 baseline)
    "sdpa-bf16": dict(route="sdpa"),
    "cudnn-fp8": dict(route="cudnn"),
    "cudnn-fp8-nosmooth": dict(route="cudnn", smooth_k=False, smooth_v=False),
    "triton-fp8": dict(route="triton"),
    "triton-fp8qk-bf16pv": dict(route="triton", pv_fp8=False),
}


def accuracy(case: str, component: str, shape: str, q, k, v, variants=VARIANTS) -> None:
    ref = fp32_reference(q, k, v)
    for name, options in variants.items():
        try:
            out = fa.fp8_sdpa(q, k, v, **options)
            for metric, value in errors(out, ref).items():
                record(case, component, name, shape, q.shape[1], metric, value)
        except Exception as exc:  # a route that fails here is a finding: record it and go on
            print(f"[{case} {shape} {name}] FAILED: {exc!r}")
            traceback.print_exc()
            record(case, component, name, shape, q.shape[1], "error", None)
    del ref


def kernel_only(q, k, v):
    """Pre-quantized inputs for timing the kernels alone: {name: callable}."""
    x = fa.quantize_qkv(q, k, v)
    xb = fa.quantize_qkv(q, k, v, v_fp8=False)
    scale = 1.0 / math.sqrt(q.shape[-1])
    bhsd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x.q, x.k, x.v)]
    xh = fa.QuantizedQKV(*bhsd, x.descale_q, x.descale_k, x.descale_v, x.v_mean)
    return {"cudnn-fp8 kernel (BSHD)": lambda: fa._cudnn_route(x, scale),
            "cudnn-fp8 kernel (BHSD memory)": lambda: fa._cudnn_route(xh, scale),
            "triton-fp8 kernel": lambda: fa._triton_route(x, scale),
            "triton-fp8qk-bf16pv kernel": lambda: fa._triton_route(xb, scale),
            "quantize Q/K/V (eager)": lambda: fa.quantize_qkv(q, k, v),
            "quantize Q/K/V (torch.compile)": lambda: COMPILED_QUANT(q, k, v)}


def timing(component: str, shape: str, q, k, v, reps: int) -> None:
    flops = 4 * q.shape[1] * k.shape[1] * HEAD_D * HEADS
    calls = {name: (lambda o=o: fa.fp8_sdpa(q, k, v, **o)) for name, o in VARIANTS.items()
             if "nosmooth" not in name}
    calls["cudnn-fp8 (torch.compile around the op)"] = lambda: COMPILED(q, k, v, route="cudnn")
    calls.update(kernel_only(q, k, v))
    for name, fn in calls.items():
        try:
            ms = statistics.median(time_ms(fn, reps))
        except Exception as exc:
            print(f"[timing {component} {shape} {name}] FAILED: {exc!r}")
            record("timing", component, name, shape, q.shape[1], "error", None)
            continue
        record("timing", component, name, shape, q.shape[1], "median_ms", ms)
        if "quantize" not in name:
            record("timing", component, name, shape, q.shape[1], "tflops", flops / ms / 1e9)


def set_route(transformer, stock: list, route: str) -> list[str]:
    """Put the stock processors back, then install the fp8 processor for `route` ('stock': none)."""
    for block, processor in zip(transformer.blocks, stock):
        block.attn1.set_processor(processor)
    return [] if route == "stock" else fa.enable_fp8_attention(transformer, route=route)


class Capture:
    """Records the Q/K/V the proxy's self-attention sees and the first block's call arguments."""

    def __init__(self, model, stock: list):
        self.qkv, self.block_args, self.transformer, self.stock = None, None, model.transformer, stock
        self._sdpa = fa.fp8_sdpa
        set_route(self.transformer, stock, "sdpa")  # our processor around the stock bf16 kernel
        self._hook = self.transformer.blocks[0].register_forward_pre_hook(self._hook_block, with_kwargs=True)
        fa.fp8_sdpa = self._record

    def _record(self, q, k, v, **options):
        self.qkv = (q.clone(), k.clone(), v.clone())
        return self._sdpa(q, k, v, **options)

    def _hook_block(self, module, args, kwargs):
        self.block_args = (args, kwargs)

    def close(self):
        fa.fp8_sdpa = self._sdpa
        self._hook.remove()
        set_route(self.transformer, self.stock, "stock")


def proxy_run(model, stock: list, shape_name: str):
    """One forward of the 1-layer proxy DiT at `shape_name`; returns its inputs and the captures."""
    case = Case("transformer", parse_shape(shape_name), "bf16", source="proxy")
    inputs = example_inputs(model, case, device="cuda", seed=0)
    capture = Capture(model, stock)
    with torch.inference_mode():
        model.transformer(hidden_states=inputs[0], timestep=inputs[1], encoder_hidden_states=inputs[2],
                          return_dict=False)
    capture.close()
    return inputs, capture


def dit_forward(transformer, inputs):
    with torch.inference_mode():
        return transformer(hidden_states=inputs[0], timestep=inputs[1], encoder_hidden_states=inputs[2],
                           return_dict=False)[0]


def block_level(model, stock: list, shape_name: str, reps: int) -> None:
    """One proxy block forward: eager bf16 vs bf16 + fp8 self-attention (time, and error vs fp32)."""
    inputs, capture = proxy_run(model, stock, shape_name)
    tokens = capture.qkv[0].shape[1]
    accuracy("proxy-qkv", "self-attention", shape_name, *capture.qkv)
    for name, t in zip("qkv", capture.qkv):  # per-head amax spread: does one scale per tensor suffice?
        a = t.float().abs().amax(dim=(0, 1, 3))
        record("proxy-qkv", "self-attention", f"amax-{name}", shape_name, tokens, "per_head_max_over_min",
               (a.max() / a.min()).item())
    args, kwargs = capture.block_args
    fp32_transformer = copy.deepcopy(model.transformer).float()  # same weights, upcast: the fp32 reference
    ref = dit_forward(fp32_transformer, tuple(t.float() if t.is_floating_point() else t for t in inputs))
    del fp32_transformer
    eager_sdpa = fa.fp8_sdpa
    for route in ("stock", "cudnn", "triton", "cudnn+compile"):
        name = "eager-bf16" if route == "stock" else f"{route}-fp8-attention"
        fa.fp8_sdpa = COMPILED if route == "cudnn+compile" else eager_sdpa
        try:
            reasons = set_route(model.transformer, stock, route.split("+")[0])
            if reasons:
                raise RuntimeError("; ".join(reasons))
            for metric, value in errors(dit_forward(model.transformer, inputs), ref).items():
                record("proxy-forward", "transformer(1 layer)", name, shape_name, tokens, metric, value)
            with torch.inference_mode():
                ms = statistics.median(time_ms(lambda: model.transformer.blocks[0](*args, **kwargs), reps))
            record("proxy-block", "block", name, shape_name, tokens, "median_ms", ms)
        except Exception as exc:
            print(f"[block {shape_name} {name}] FAILED: {exc!r}")
            traceback.print_exc()
            record("proxy-block", "block", name, shape_name, tokens, "error", None)
    fa.fp8_sdpa = eager_sdpa
    set_route(model.transformer, stock, "stock")
    del ref


def summary_table() -> str:
    """One line per (case, component, shape, variant) with its metrics side by side."""
    cells: dict[tuple, dict[str, float | None]] = {}
    for r in ROWS:
        cells.setdefault((r.case, r.component, r.shape, r.backend), {})[r.metric] = r.value
    metrics = ["rel_l2", "cosine", "max_abs", "median_ms", "tflops", "per_head_max_over_min", "error"]
    lines = ["| case | component | shape | variant | " + " | ".join(metrics) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for key, vals in cells.items():
        shown = ["" if m not in vals else ("FAILED" if vals[m] is None else f"{vals[m]:.5g}") for m in metrics]
        lines.append("| " + " | ".join(key) + " | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def write(out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=Row.columns())
    writer.writeheader()
    writer.writerows(r.as_dict() for r in ROWS)
    atomic_write_text(out / "attention-probe.csv", buf.getvalue())
    header = (f"# fp8 attention probe\n\nDevice: {device_name()}  \nVersions: {VERSIONS}  \n"
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \nCommand: `{command}`\n\n")
    atomic_write_text(out / "attention-probe.md", header + summary_table() + "\n")


def main() -> None:
    global VERSIONS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    VERSIONS = ";".join(f"{n}={version(n)}" for n in ("torch", "diffusers", "nvidia-cudnn-frontend", "triton"))
    VERSIONS += f";cudnn={torch.backends.cudnn.version()}"
    print(device_name(), VERSIONS, fa.fp8_attention_available("cudnn"), fa.fp8_attention_available("triton"))
    command = "python3 gpu/fp8_attention_probe.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    model = load_model("proxy", device="cuda", dtype=torch.bfloat16, layers=1)
    stock = [block.attn1.processor for block in model.transformer.blocks]
    for shape_name in args.shapes.split(","):
        tokens = parse_shape(shape_name).tokens
        for case, make in (("randn", randn_qkv), ("synthetic", synthetic_qkv)):
            accuracy(case, "self-attention", shape_name, *make(tokens, tokens, seed=1))
        q, k, v = synthetic_qkv(tokens, tokens, seed=2)
        timing("self-attention", shape_name, q, k, v, args.reps)
        print("triton autotune picked:", {key[:4]: str(cfg) for key, cfg in getattr(fa._flash_fwd, "cache", {}).items()})
        q, k, v = synthetic_qkv(tokens, TEXT_TOKENS, seed=3)
        accuracy("synthetic", "cross-attention", shape_name, q, k, v)
        timing("cross-attention", shape_name, q, k, v, args.reps)
        del q, k, v
        block_level(model, stock, shape_name, args.reps)
        write(args.out, command)  # after each shape, so a timeout still leaves numbers
        torch.cuda.empty_cache()
    print(summary_table())


if __name__ == "__main__":
    main()
