"""fp8 (e4m3) self-attention for diffusers' Wan blocks on Hopper: attention is half a block's FLOPs.

Scaling recipe (per tensor, current amax, computed on the fly; notes/fp8-attention.md argues it):
- K is centred on its mean over tokens (exact: softmax is shift-invariant along a query's row) and V
  too (exact: the rows of P sum to one, so O = P(V - mean) + mean); centring takes a common offset
  out of the values that fp8 must represent.
- Q, K, V are scaled by 448 / amax to fill e4m3's range; descale = amax / 448.
- S = QK^T is descaled by descale_q * descale_k, with the softmax scale 1/sqrt(d) folded in.
- P̃ = exp(S - running max) lies in [0, 1]: scale_s = 448, descale_s = 1/448 (cuDNN's own bound).
- |O - mean(V)| <= amax(V - mean(V)), so O is quantized with scale_o = scale_v and cannot overflow.
Two kernels: cuDNN's fp8 SDPA (`nvidia-cudnn-frontend`; fp8 O on Hopper) and our own Triton fp8
flash attention (bf16 O). Both are torch custom ops, so torch.compile traces around them and fuses
the quantization with the RoPE and norms before them.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
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


# ---------------------------------------------------------------- quantization (plain torch ops)

@dataclass
class QuantizedQKV:
    """fp8 Q/K/V in the caller's layout, their fp32 descales ([1,1,1,1]) and V's token mean."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    descale_q: torch.Tensor
    descale_k: torch.Tensor
    descale_v: torch.Tensor
    v_mean: torch.Tensor | None


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in e4m3 scaled by 448/amax(x) (current amax, per tensor), and its descale amax/448."""
    amax = x.abs().amax().float().clamp_min(1e-12)  # an all-zero tensor must not give an inf scale
    scale = E4M3_MAX / amax
    return (x * scale).to(FP8), (1.0 / scale).reshape(1, 1, 1, 1)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, smooth_k: bool = True,
                 smooth_v: bool = True, v_fp8: bool = True) -> QuantizedQKV:
    """Centre K and V over tokens (dim 1 of [B, S, H, D]) where asked, then quantize (V only if v_fp8).

    Centring subtracts an fp32 mean and quantizes straight from fp32. Subtracting in bf16 rounds each
    large element back onto the bf16 grid it already sits on, so a mean under half a bf16 step is
    dropped there while it is added back to every output: a bias (6% rel L2 at 480p and 10% at 720p on
    N(0, 1) data, measured on the H100). A bf16 V (v_fp8=False) is left uncentred for the same reason.
    """
    if smooth_k:
        k = k - k.mean(dim=1, keepdim=True, dtype=torch.float32)  # fp32 by type promotion
    v_mean = v.mean(dim=1, keepdim=True, dtype=torch.float32) if smooth_v and v_fp8 else None
    if v_mean is not None:
        v = v - v_mean
    (q8, dq), (k8, dk) = quantize_e4m3(q), quantize_e4m3(k)
    v8, dv = quantize_e4m3(v) if v_fp8 else (v, torch.ones_like(dq))
    return QuantizedQKV(q8, k8, v8, dq, dk, dv, v_mean)


# ---------------------------------------------------------------- cuDNN fp8 SDPA

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


def _cudnn_route(x: QuantizedQKV, attn_scale: float) -> torch.Tensor:
    """fp8 O from cuDNN, dequantized to fp32 (scale_o = scale_v: |O - mean V| <= amax(V - mean V))."""
    descale_s = torch.full_like(x.descale_q, 1.0 / E4M3_MAX)
    scale_s = torch.full_like(x.descale_q, E4M3_MAX)
    o8 = cudnn_fp8_sdpa(x.q, x.k, x.v, x.descale_q, x.descale_k, x.descale_v, descale_s, scale_s,
                        1.0 / x.descale_v, attn_scale)
    return o8.float() * x.descale_v


# ---------------------------------------------------------------- Triton fp8 flash attention

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
    stride, which cost Triton its wide loads (the kernel ran at 356 TFLOP/s there, 677 at 720p)."""
    b, s, h, d = v.shape
    vt = v.new_empty(b, h, d, s + (-s % 16))[..., :s]
    return vt.copy_(v.permute(0, 2, 3, 1))


def _triton_route(x: QuantizedQKV, attn_scale: float) -> torch.Tensor:
    """bf16 O from the Triton kernel; P·V runs in V's dtype (e4m3, or bf16 when V was left unquantized)."""
    qk = x.descale_q * x.descale_k * (attn_scale * math.log2(math.e))
    vt = _transposed(x.v)
    return triton_fp8_sdpa(x.q, x.k, vt, torch.cat([qk.flatten(), x.descale_v.flatten()])).float()

# ---------------------------------------------------------------- the attention function

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
    out = _cudnn_route(x, attn_scale) if route == "cudnn" else _triton_route(x, attn_scale)
    if x.v_mean is not None:
        out = out + x.v_mean
    return out.to(q.dtype)


# ---------------------------------------------------------------- the diffusers processor

def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE: rotate each (even, odd) channel pair; cos/sin hold each angle twice, so take every other."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2].float(), sin[..., 0::2].float()
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


class Fp8SelfAttnProcessor:
    """Wan self-attention whose attention core is `fp8_sdpa`; anything else goes to the stock processor."""

    def __init__(self, route: str, fallback, **options):
        self.route, self.fallback, self.options = route, fallback, options
        self._warned: set[str] = set()

    @staticmethod
    def _fallback_reason(encoder_hidden_states, attention_mask) -> str:
        if encoder_hidden_states is not None:
            return "cross-attention (encoder_hidden_states given) stays on the stock processor"
        if attention_mask is not None:
            return "an attention mask was given; the fp8 kernels take none"
        return ""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        reason = self._fallback_reason(encoder_hidden_states, attention_mask)
        if reason:
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("fp8 attention falls back to bf16 SDPA: %s", reason)
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        out = fp8_sdpa(q, k, v, route=self.route, **self.options).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _unsupported(attn, route: str) -> str:
    """Why this attention module cannot take the fp8 processor, or ''."""
    head_dim = attn.inner_dim // attn.heads
    if route != "sdpa" and head_dim not in HEAD_DIMS:
        return f"head size {head_dim} is not one the fp8 kernels support ({HEAD_DIMS})"
    if attn.add_k_proj is not None:
        return "image-conditioned (I2V) attention adds a second key/value set; not handled"
    if type(attn.processor).__name__ != "WanAttnProcessor":
        return f"it already has a custom processor ({type(attn.processor).__name__})"
    return ""


def enable_fp8_attention(transformer: torch.nn.Module, route: str | None = None, **options) -> list[str]:
    """Install the fp8 processor on every block's self-attention; returns why any stayed on bf16 SDPA.

    With fp8 unavailable here (no CUDA, compute capability < 8.9, no kernel library) nothing is
    installed and the reason is returned. `options` go to `fp8_sdpa` (smooth_k, smooth_v, pv_fp8)."""
    if route is None:
        route, reason = default_route()
    else:
        reason = fp8_attention_available(route)[1] if route != "sdpa" else ""
    if reason:
        log.warning("fp8 attention not enabled: %s", reason)
        return [reason]
    reasons = []
    for index, block in enumerate(transformer.blocks):
        why = _unsupported(block.attn1, route)
        if why:
            reasons.append(f"blocks.{index}.attn1: {why}")
            log.warning("fp8 attention falls back to bf16 SDPA: %s", reasons[-1])
            continue
        block.attn1.set_processor(Fp8SelfAttnProcessor(route, block.attn1.processor, **options))
    return reasons
