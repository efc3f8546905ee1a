"""cuDNN's fp8 SDPA (`nvidia-cudnn-frontend`) as a torch custom op; on Hopper it writes O in fp8.

Being a custom op, torch.compile traces around it and fuses the quantization before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.attention.recipe import E4M3_MAX, FP8, QuantizedQKV


@dataclass
class _CudnnPlan:
    graph: object
    tensors: dict
    workspace: torch.Tensor


_HANDLES: dict[int, object] = {}
_PLANS: dict[tuple, _CudnnPlan] = {}


def _cudnn_handle(device: torch.device):
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        _HANDLES[index] = cudnn.create_handle()
    return _HANDLES[index]


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """cuDNN's [B, H, S, D] dims and strides of a [B, S, H, D] tensor, without moving data."""
    b, s, h, d = t.shape
    sb, ss, sh, sd = t.stride()
    return [b, h, s, d], [sb, sh, ss, sd]


def _build_cudnn_plan(q8, k8, v8, o8, attn_scale: float) -> _CudnnPlan:
    """One fp8 SDPA graph for these shapes and strides, planned and built once."""
    import cudnn

    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                          handle=_cudnn_handle(q8.device))
    t = {n: graph.tensor(name=n, dim=_bhsd(x)[0], stride=_bhsd(x)[1], data_type=e4m3)
         for n, x in (("q", q8), ("k", k8), ("v", v8))}
    for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[n] = graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
        descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        attn_scale=attn_scale, generate_stats=False, use_causal_mask=False, name="wan_fp8_sdpa")
    dims, strides = _bhsd(o8)
    o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)  # Hopper writes fp8 O
    # amax_s stays virtual (cuDNN: set scale_s from its bound instead); amax_o is not needed either.
    for amax in (amax_s, amax_o):
        amax.set_output(False).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device=q8.device, dtype=torch.uint8)
    return _CudnnPlan(graph, {**t, "o": o}, workspace)


def _cudnn_plan(q8, k8, v8, o8, attn_scale: float) -> _CudnnPlan:
    """The cached plan for these shapes/strides/device: building one takes ~100 ms, running it ~26 ms."""
    key = (q8.device, q8.shape, q8.stride(), k8.shape, k8.stride(), v8.stride(), o8.stride(), attn_scale)
    if key not in _PLANS:
        _PLANS[key] = _build_cudnn_plan(q8, k8, v8, o8, attn_scale)
    return _PLANS[key]


@torch.library.custom_op("wan_fp8::cudnn_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                   descale_k: torch.Tensor, descale_v: torch.Tensor, descale_s: torch.Tensor,
                   scale_s: torch.Tensor, scale_o: torch.Tensor, attn_scale: float) -> torch.Tensor:
    """cuDNN fp8 SDPA over [B, S, H, D] e4m3 tensors; returns O in e4m3, scaled by scale_o."""
    import cudnn

    o8 = torch.empty(q8.shape[:-1] + (v8.shape[-1],), device=q8.device, dtype=FP8)
    plan = _cudnn_plan(q8, k8, v8, o8, attn_scale)
    handle = _cudnn_handle(q8.device)
    cudnn.set_stream(handle, torch.cuda.current_stream(q8.device).cuda_stream)
    buffers = dict(q=q8, k=k8, v=v8, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
                   descale_s=descale_s, scale_s=scale_s, scale_o=scale_o, o=o8)
    plan.graph.execute({plan.tensors[n]: x for n, x in buffers.items()}, plan.workspace, handle=handle)
    return o8


@cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, attn_scale):
    return q8.new_empty(q8.shape[:-1] + (v8.shape[-1],))


def attend(x: QuantizedQKV, attn_scale: float) -> torch.Tensor:
    """fp8 O from cuDNN, dequantized to fp32 (scale_o = scale_v: |O - mean V| <= amax(V - mean V))."""
    descale_s = torch.full_like(x.descale_q, 1.0 / E4M3_MAX)
    scale_s = torch.full_like(x.descale_q, E4M3_MAX)
    o8 = cudnn_fp8_sdpa(x.q, x.k, x.v, x.descale_q, x.descale_k, x.descale_v, descale_s, scale_s,
                        1.0 / x.descale_v, attn_scale)
    return o8.float() * x.descale_v
