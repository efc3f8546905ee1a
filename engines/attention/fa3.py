"""FlashAttention-3's Hopper forward (the `fa3-fwd` wheel) over diffusers' [B, S, H, D] layout, bf16 and fp8.

fa3-fwd 0.0.3 is a forward-only build of FA3 (modules `fa3_fwd_interface`, `fa3_fwd_config`, extension
`fa3_fwd._C`), not an official Dao-AILab or NVIDIA release; README.md says where it comes from and
requirements-fa3.txt pins it by hash. What this module relies on, read from the wheel's sources:
- `flash_attn_func(q, k, v, softmax_scale=None, causal=False, ..., q_descale=None, k_descale=None,
  v_descale=None)` over [B, S, H, D] with unit last stride; bf16 or e4m3 inputs (fp16 is compiled out), and
  e4m3 inputs give a bf16 output already multiplied by the descales;
- the descales are float32 CUDA tensors of shape (batch, kv heads); the extension reads them as float32
  without checking, so recipe.quantize_qkv(per_head=True) always makes float32;
- the forward is a torch custom op with a fake implementation, so torch.compile traces around it.
"""
from __future__ import annotations

import importlib
import importlib.metadata

import torch

from engines.attention.recipe import QuantizedQKV
from harness.kernels import KERNELS

VERSION = "0.0.3"  # the build whose flags and API were read; another one must be checked again
_KERNEL = KERNELS["fa3"]  # fa3-fp8 runs from the same module
INSTALL = f"install {_KERNEL.install}"


_interface_module = None  # set by the first _interface() call, which available() makes before any compile


def _interface():
    """fa3_fwd_interface, imported once. Inside torch.compile the lookup must be a plain global read: Dynamo
    cannot trace importlib, and a graph break there is an error inside a nested compile region."""
    global _interface_module
    if _interface_module is None:
        _interface_module = importlib.import_module(_KERNEL.module)
    return _interface_module


def available(fp8: bool) -> tuple[bool, str]:
    """(True, '') when this machine runs the FA3 forward (with e4m3 kernels, if `fp8`), else the reason."""
    if not torch.cuda.is_available():
        return False, "FlashAttention-3 needs a CUDA GPU; torch sees none"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return False, f"FlashAttention-3's kernels are Hopper's (compute capability 9.0); this GPU is {major}.{minor}"
    try:
        installed = importlib.metadata.version("fa3_fwd")
        flags = importlib.import_module("fa3_fwd_config").CONFIG["build_flags"]
        _interface()
    except Exception as exc:  # not installed, or its extension failed to load (ABI, CUDA runtime)
        return False, f"fa3-fwd not importable ({type(exc).__name__}: {exc}); {INSTALL}"
    if installed != VERSION:
        return False, f"fa3-fwd {installed} is installed; this harness checked {VERSION} only: {INSTALL}"
    if flags.get("FLASHATTENTION_DISABLE_HDIM128", True):
        return False, "this fa3-fwd build has no head-dim-128 kernels (fa3_fwd_config build_flags)"
    if fp8 and flags.get("FLASHATTENTION_DISABLE_FP8", True):
        return False, "this fa3-fwd build was compiled with FLASHATTENTION_DISABLE_FP8: it has no e4m3 kernels"
    return True, ""


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attend_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal bf16 attention, [B, S, H, D] in and out."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _interface().flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)


def attend_fp8(x: QuantizedQKV, softmax_scale: float) -> torch.Tensor:
    """Attention over per-(batch, head) quantized e4m3 Q/K/V; the kernel applies the descales, O is bf16."""
    q, k, v = (_unit_last_stride(t) for t in (x.q, x.k, x.v))
    return _interface().flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False,
                                        q_descale=x.descale_q, k_descale=x.descale_k, v_descale=x.descale_v)
