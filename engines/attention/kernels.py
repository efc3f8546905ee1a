"""The self-attention kernels the torch backends can put in Wan's blocks, and one attention function over them.

Routes: "cudnn" (cuDNN fp8 SDPA), "triton" (our Triton fp8 flash attention) and "sdpa" (the stock bf16
kernel). Each fp8 route takes Q/K/V quantized by engines/attention/recipe.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engines.attention import cudnn_fp8, triton_fp8
from engines.attention.recipe import quantize_qkv
from harness.errors import HarnessError

ROUTES = ("cudnn", "triton", "sdpa")  # "sdpa" is the bf16 fallback: the stock kernel
HEAD_DIMS = (64, 128)  # head sizes both fp8 kernels were written and checked for


def _import_error(module: str) -> str:
    """'' when `module` imports, else the reason."""
    try:
        __import__(module)
    except Exception as exc:  # an ImportError, or a broken native library underneath
        return f"{module} not importable: {exc}"
    return ""


def fp8_attention_available(route: str = "cudnn") -> tuple[bool, str]:
    """(True, '') when `route` can run fp8 attention here, else (False, the concrete reason)."""
    if route not in ROUTES[:2]:
        return False, f"unknown fp8 attention route {route!r}; choose one of {', '.join(ROUTES[:2])}"
    if not torch.cuda.is_available():
        return False, "fp8 attention needs a CUDA GPU; torch sees none"
    if torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return False, f"fp8 attention needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}"
    reason = _import_error("cudnn" if route == "cudnn" else "triton")
    return (not reason), reason


def default_route() -> tuple[str | None, str]:
    """(the preferred fp8 route that runs here, '') or (None, why none does). cuDNN first: see the probe."""
    reasons = []
    for route in ("cudnn", "triton"):
        ok, reason = fp8_attention_available(route)
        if ok:
            return route, ""
        reasons.append(f"{route}: {reason}")
    return None, "; ".join(dict.fromkeys(reasons))


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, route: str = "cudnn",
             smooth_k: bool = True, smooth_v: bool = True, pv_fp8: bool = True) -> torch.Tensor:
    """Attention over diffusers' [B, S, H, D] layout with fp8 Q/K(/V); returns q's dtype and layout.

    route 'sdpa' is the stock bf16 kernel (the fallback). pv_fp8=False keeps V, P and P·V in bf16
    (Triton only; cuDNN's fp8 graph is fp8 end to end)."""
    if route == "sdpa":
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    if route not in ROUTES or (route == "cudnn" and not pv_fp8):
        raise HarnessError(f"fp8 attention route {route!r} with pv_fp8={pv_fp8} does not exist; routes are "
                           f"{', '.join(ROUTES)} and only 'triton' can keep P·V in bf16")
    x = quantize_qkv(q, k, v, smooth_k=smooth_k, smooth_v=smooth_v, v_fp8=pv_fp8)
    attn_scale = 1.0 / math.sqrt(q.shape[-1])
    out = (cudnn_fp8 if route == "cudnn" else triton_fp8).attend(x, attn_scale)
    if x.v_mean is not None:
        out = out + x.v_mean
    return out.to(q.dtype)
