"""The diffusers attention processor that runs Wan's self-attention through a chosen kernel route."""
from __future__ import annotations

import logging

import torch

from engines.attention.kernels import HEAD_DIMS, default_route, fp8_attention_available, fp8_sdpa

log = logging.getLogger(__name__)


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
