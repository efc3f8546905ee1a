"""The self-attention kernels the torch backends can put in Wan's blocks, and one attention function over them.

A kernel is asked for by name (harness.backends.ATTENTION_KERNELS) and never swapped for another: one that
cannot run here makes its backend unavailable, with the package to install in the reason.
- sdpa: torch's stock scaled_dot_product_attention (what diffusers' "native" backend runs), bf16.
- fa3: FlashAttention-3's Hopper forward in bf16 (engines/attention/fa3.py). diffusers' own "_flash_3"
  backend imports `flash_attn_interface` from a `flash_attn_3` distribution, which the only FA3 wheel that
  installs here (fa3-fwd) does not provide, so the harness calls fa3-fwd itself.
- cudnn-fp8: cuDNN's fp8 SDPA, per-tensor scales (engines/attention/cudnn_fp8.py).
- fa3-fp8: FlashAttention-3's e4m3 forward with per-(batch, head) scales.
- triton-fp8: this project's Triton fp8 flash attention (engines/attention/triton_fp8.py).
The fp8 kernels take Q/K/V quantized by engines/attention/recipe.py (K and V centred unless told not to).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engines.attention import cudnn_fp8, fa3, triton_fp8
from engines.attention.recipe import quantize_qkv
from harness.backends import ATTENTION_KERNELS
from harness.errors import HarnessError, check_choice

# Head sizes each kernel was written and checked for.
HEAD_DIMS = {"sdpa": None, "fa3": fa3.HEAD_DIMS, "fa3-fp8": fa3.HEAD_DIMS, "cudnn-fp8": (64, 128),
             "triton-fp8": (64, 128)}
_MODULES = {"cudnn-fp8": "cudnn", "triton-fp8": "triton"}
_INSTALL = {"cudnn-fp8": "install nvidia-cudnn-frontend==1.32.0 (requirements-gpu.txt)",
            "triton-fp8": "install triton (it comes with torch's CUDA wheels)"}


def check_kernel(name: str) -> str:
    return check_choice("attention kernel", name, ATTENTION_KERNELS)


def _import_error(module: str) -> str:
    """'' when `module` imports, else the reason."""
    try:
        __import__(module)
    except Exception as exc:  # an ImportError, or a broken native library underneath
        return f"{module} not importable: {exc}"
    return ""


def kernel_available(name: str) -> tuple[bool, str]:
    """(True, '') when kernel `name` can run on this machine, else (False, the reason and what to install)."""
    check_kernel(name)
    if name == "sdpa":
        return True, ""
    if name in ("fa3", "fa3-fp8"):
        return fa3.available(fp8=name == "fa3-fp8")
    if not torch.cuda.is_available():
        return False, f"{name} needs a CUDA GPU; torch sees none"
    if torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return False, f"{name} needs compute capability >= 8.9 (Ada/Hopper) for fp8; this GPU is {major}.{minor}"
    reason = _import_error(_MODULES[name])
    return (False, f"{name}: {reason}; {_INSTALL[name]}") if reason else (True, "")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, *, smooth_k: bool = True,
           smooth_v: bool = True, pv_fp8: bool = True) -> torch.Tensor:
    """Attention over diffusers' [B, S, H, D] layout with the named kernel; returns q's dtype and layout.

    smooth_k / smooth_v centre K / V before fp8 quantization; pv_fp8=False keeps V, P and P·V in bf16
    (triton-fp8 only; the cuDNN and FA3 fp8 kernels are fp8 end to end)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    if kernel == "fa3":
        return fa3.attend_bf16(q, k, v)
    if not pv_fp8 and kernel != "triton-fp8":
        raise HarnessError(f"attention kernel {kernel} is fp8 end to end; only triton-fp8 can keep P·V in bf16")
    x = quantize_qkv(q, k, v, smooth_k=smooth_k, smooth_v=smooth_v, v_fp8=pv_fp8, per_head=kernel == "fa3-fp8")
    attn_scale = 1.0 / math.sqrt(q.shape[-1])
    route = {"cudnn-fp8": cudnn_fp8.attend, "triton-fp8": triton_fp8.attend, "fa3-fp8": fa3.attend_fp8}[check_kernel(kernel)]
    out = route(x, attn_scale).float()
    if x.v_mean is not None:
        out = out + x.v_mean
    return out.to(q.dtype)
