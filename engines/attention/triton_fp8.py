"""Our own Triton fp8 flash attention (bf16 O) as a torch custom op, for GPUs without cuDNN's fp8 SDPA.

Checked on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
import os

import torch

from engines.attention.recipe import E4M3_MAX, FP8, QuantizedQKV

try:  # optional: the CPU CI machine may lack it, and the cuDNN route does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:

    @triton.jit
    def _attend(q, kt, v, m_i, l_i, acc, qk_scale, keep, MASKED: tl.constexpr, P_SCALE: tl.constexpr):
        """One key block of online softmax: S in fp32 from fp8 Q·K^T, P̃ = exp2(S - max) in [0, 1]."""
        s = tl.dot(q, kt) * qk_scale
        if MASKED:
            s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot((p * P_SCALE).to(v.dtype), v, acc * alpha[:, None])
        return m_new, l_i, acc

    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                 for m, n, w, st in ((128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2), (64, 128, 4, 3))],
        key=["seq_q", "seq_k", "HEAD_D", "P_SCALE"])
    @triton.jit
    def _flash_fwd(Q, K, VT, O, SCALES, seq_q, seq_k, heads,
                   sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_h, sv_d, so_b, so_s, so_h,
                   HEAD_D: tl.constexpr, P_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One (query block, batch x head) program. V comes transposed ([D, S] per head) because
        Hopper's fp8 matrix instruction wants its B operand contiguous along the reduction axis."""
        b = (tl.program_id(1) // heads).to(tl.int64)
        h = (tl.program_id(1) % heads).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_D)
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + dims[None, :],
                    mask=rows[:, None] < seq_q, other=0.0)
        kt_ptrs = K + b * sk_b + h * sk_h + cols[None, :] * sk_s + dims[:, None]
        v_ptrs = VT + b * sv_b + h * sv_h + dims[None, :] * sv_d + cols[:, None]
        qk_scale = tl.load(SCALES)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
        full = seq_k - seq_k % BLOCK_N
        for start in range(0, full, BLOCK_N):  # unmasked blocks: the hot loop carries no bounds checks
            m_i, l_i, acc = _attend(q, tl.load(kt_ptrs + start * sk_s), tl.load(v_ptrs + start),
                                    m_i, l_i, acc, qk_scale, cols, False, P_SCALE)
        if full < seq_k:
            keep = full + cols < seq_k
            kt = tl.load(kt_ptrs + full * sk_s, mask=keep[None, :], other=0.0)
            v = tl.load(v_ptrs + full, mask=keep[:, None], other=0.0)
            m_i, l_i, acc = _attend(q, kt, v, m_i, l_i, acc, qk_scale, keep, True, P_SCALE)
        out = acc * (tl.load(SCALES + 1) / P_SCALE / l_i)[:, None]
        tl.store(O + b * so_b + h * so_h + rows[:, None] * so_s + dims[None, :],
                 out.to(O.dtype.element_ty), mask=rows[:, None] < seq_q)


def _triton_flash_attention(q8: torch.Tensor, k8: torch.Tensor, vt: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Launch `_flash_fwd` over [B, S, H, D] Q/K (unit last stride) and V^T [B, H, D, S] (contiguous)."""
    batch, seq_q, heads, head_d = q8.shape
    q8, k8, vt = (t if t.stride(-1) == 1 else t.contiguous() for t in (q8, k8, vt))
    out = torch.empty((batch, seq_q, heads, vt.shape[2]), device=q8.device, dtype=torch.bfloat16)
    p_scale = E4M3_MAX if vt.dtype == FP8 else 1.0  # P̃ ∈ [0, 1] fills e4m3 at 448; bf16 needs no scale

    def grid(meta):
        return triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads

    # Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) cannot autotune: fix one config.
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kernel, fixed = (_flash_fwd.fn, dict(BLOCK_M=64, BLOCK_N=64)) if interpret else (_flash_fwd, {})
    kernel[grid](q8, k8, vt, out, scales, seq_q, k8.shape[1], heads, *q8.stride()[:3], *k8.stride()[:3],
                 *vt.stride()[:3], *out.stride()[:3], HEAD_D=head_d, P_SCALE=p_scale, **fixed)
    return out


@torch.library.custom_op("wan_fp8::triton_sdpa", mutates_args=())
def triton_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, vt: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Our Triton flash attention: e4m3 Q/K [B, S, H, D], V^T [B, H, D, S] (e4m3 or bf16), bf16 O.

    scales (fp32, 2) = [descale_q * descale_k * softmax scale * log2(e), descale_v]."""
    return _triton_flash_attention(q8, k8, vt, scales)


@triton_fp8_sdpa.register_fake
def _(q8, k8, vt, scales):
    return q8.new_empty(q8.shape[:-1] + (vt.shape[2],), dtype=torch.bfloat16)


def _transposed(v: torch.Tensor) -> torch.Tensor:
    """V^T [B, H, D, S] whose rows start 16-byte aligned: 480p's 32,760 tokens make an unaligned row
    stride, which cost Triton its wide loads (the kernel ran at 356 TFLOP/s there, 677 at 720p).
    The pad is zeros, not an empty buffer: Inductor fills a compiled empty's unwritten part with NaN, and
    Triton has no fp8 NaN constant (`builder.get_fp8e4nv`), so the fused quantization failed to compile."""
    pad = -v.shape[1] % 16
    return torch.nn.functional.pad(v.permute(0, 2, 3, 1), (0, pad))[..., :v.shape[1]]


def attend(x: QuantizedQKV, attn_scale: float) -> torch.Tensor:
    """bf16 O from the Triton kernel; P·V runs in V's dtype (e4m3, or bf16 when V was left unquantized)."""
    qk = x.descale_q * x.descale_k * (attn_scale * math.log2(math.e))
    vt = _transposed(x.v)
    return triton_fp8_sdpa(x.q, x.k, vt, torch.cat([qk.flatten(), x.descale_v.flatten()])).float()
