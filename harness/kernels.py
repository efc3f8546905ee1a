"""The self-attention kernels the torch backends can put in Wan's blocks: one table of what each kernel is.

The settings check an --attention choice against it, a backend's shared checks and the engines read it; what calls
each kernel lives in engines/attention/kernels.py under the same names (the library never imports engines/). A
kernel is asked for by name and never swapped for another: one that cannot run here makes its backend
unavailable, with what to install in the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import check_choice


@dataclass(frozen=True)
class Kernel:
    precision: str  # the arithmetic of Q·K and P·V: bf16, or fp8 (Q/K/V quantized by engines/attention/recipe.py)
    head_dims: tuple[int, ...] | None  # the head sizes it was written and checked for; None: any
    module: str  # the Python module that runs it
    install: str  # what provides that module, named in the reason where it does not import


# The head sizes the fa3-fwd build has kernels for; Wan2.2-A14B's are 128.
_FA3_HEAD_DIMS = (64, 96, 128, 192, 256)
# fa3-fwd is a forward-only FA3 build, not an official release (README.md); engines/attention/fa3.py checks its version.
_FA3_INSTALL = "fa3-fwd (pip install --no-deps -r requirements-fa3.txt, pinned by hash)"

KERNELS = {
    # torch's stock scaled_dot_product_attention, what diffusers' "native" backend runs.
    "sdpa": Kernel("bf16", None, "torch", "torch"),
    # FlashAttention-3's Hopper forward. diffusers' own "_flash_3" backend imports `flash_attn_interface` from a
    # `flash_attn_3` distribution, which the only FA3 wheel that installs here (fa3-fwd) does not provide.
    "fa3": Kernel("bf16", _FA3_HEAD_DIMS, "fa3_fwd_interface", _FA3_INSTALL),
    # cuDNN's fp8 SDPA, per-tensor scales.
    "cudnn-fp8": Kernel("fp8", (64, 128), "cudnn", "nvidia-cudnn-frontend==1.32.0 (requirements-gpu.txt)"),
    # FlashAttention-3's e4m3 forward, per-(batch, head) scales.
    "fa3-fp8": Kernel("fp8", _FA3_HEAD_DIMS, "fa3_fwd_interface", _FA3_INSTALL),
    # This project's Triton fp8 flash attention.
    "triton-fp8": Kernel("fp8", (64, 128), "triton", "triton (it comes with torch's CUDA wheels)"),
}
# Whether a kernel runs on this machine: name -> (True, '') or (False, why not and what to install).
KERNEL_CHECK = "engines.attention.kernels:kernel_available"


def check_kernel(name: str) -> Kernel:
    """The table's entry for `name`; an unknown name is a user error that lists the kernels."""
    return KERNELS[check_choice("attention kernel", name, KERNELS)]
