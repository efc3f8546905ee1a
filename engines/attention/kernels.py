"""What calls each self-attention kernel of harness.kernels.KERNELS, and one attention function over them.

The table says what each kernel is (its precision, head sizes, module); this module runs it:
- sdpa: torch's stock scaled_dot_product_attention.
- fa3, fa3-fp8: the fa3-fwd wheel, called by engines/attention/fa3.py (not through diffusers' "_flash_3" backend,
  whose `flash_attn_3` distribution does not install here).
- cudnn-fp8: engines/attention/cudnn_fp8.py; triton-fp8: engines/attention/triton_fp8.py.
The fp8 kernels take Q/K/V quantized by engines/attention/recipe.py (K and V centred unless told not to).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engines.attention import cudnn_fp8, fa3, triton_fp8
from engines.attention.recipe import quantize_qkv
from harness.errors import HarnessError
from harness.kernels import check_kernel


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


# Each kernel's call: a bf16 one takes (q, k, v) in [B, S, H, D]; an fp8 one takes (QuantizedQKV, softmax scale).
CALLS = {"sdpa": _sdpa, "fa3": fa3.attend_bf16, "cudnn-fp8": cudnn_fp8.attend, "fa3-fp8": fa3.attend_fp8,
         "triton-fp8": triton_fp8.attend}


def _import_error(module: str) -> str:
    """'' when `module` imports, else the reason."""
    try:
        __import__(module)
    except Exception as exc:  # an ImportError, or a broken native library underneath
        return f"{module} not importable: {exc}"
    return ""


def kernel_available(name: str) -> tuple[bool, str]:
    """(True, '') when kernel `name` can run on this machine, else (False, the reason and what to install)."""
    kernel = check_kernel(name)
    if name == "sdpa":
        return True, ""
    if name in ("fa3", "fa3-fp8"):
        return fa3.available(fp8=kernel.precision == "fp8")
    if not torch.cuda.is_available():
        return False, f"{name} needs a CUDA GPU; torch sees none"
    if torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return False, f"{name} needs compute capability >= 8.9 (Ada/Hopper) for fp8; this GPU is {major}.{minor}"
    reason = _import_error(kernel.module)
    return (False, f"{name}: {reason}; install {kernel.install}") if reason else (True, "")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, *, smooth_k: bool = True,
           smooth_v: bool = True, pv_fp8: bool = True) -> torch.Tensor:
    """Attention over diffusers' [B, S, H, D] layout with the named kernel; returns q's dtype and layout.

    smooth_k / smooth_v centre K / V before fp8 quantization; pv_fp8=False keeps V, P and P·V in bf16
    (triton-fp8 only; the cuDNN and FA3 fp8 kernels are fp8 end to end)."""
    if check_kernel(kernel).precision == "bf16":
        return CALLS[kernel](q, k, v)
    if not pv_fp8 and kernel != "triton-fp8":
        raise HarnessError(f"attention kernel {kernel} is fp8 end to end; only triton-fp8 can keep P·V in bf16")
    x = quantize_qkv(q, k, v, smooth_k=smooth_k, smooth_v=smooth_v, v_fp8=pv_fp8, per_head=kernel == "fa3-fp8")
    out = CALLS[kernel](x, 1.0 / math.sqrt(q.shape[-1])).float()
    if x.v_mean is not None:
        out = out + x.v_mean
    return out.to(q.dtype)
