"""The diffusers attention processor that runs Wan's self-attention through a named kernel, and its installers.

Only self-attention takes the kernel: cross-attention attends over 512 text tokens (0.6 ms of a 480p
block in bf16), where quantizing Q costs more than fp8 saves (notes/fp8-attention.md).
"""
from __future__ import annotations

import copy
from typing import Collection

import torch

from engines.attention.kernels import attend, kernel_available
from harness.errors import BackendUnavailable
from harness.kernels import KERNELS


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE: rotate each (even, odd) channel pair; cos/sin hold each angle twice, so take every other."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2].float(), sin[..., 0::2].float()
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


class SelfAttnProcessor:
    """Wan self-attention whose attention core is `kernel`; cross-attention and masked calls go to `stock`.

    Under context parallelism (harness.distributed) diffusers hands every processor that has a
    `_parallel_config` the run's config; the kernel then runs inside diffusers' own Ulysses exchange, on the
    full sequence of this rank's heads. A processor made after that inherits the config of the one it wraps.
    """

    _attention_backend = None  # what enable_parallelism checks: None is diffusers' native backend, which has a CP path

    def __init__(self, kernel: str, stock, **options):
        self.kernel, self.stock, self.options = kernel, stock, options
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        out = self._attention(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._parallel_config is None:
            return attend(q, k, v, self.kernel, **self.options)
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        return _templated_context_parallel_attention(q, k, v, forward_op=self._forward_op, backward_op=None,
                                                     _parallel_config=self._parallel_config)

    def _forward_op(self, ctx, q, k, v, *_, **__):
        """diffusers' forward-op signature, called on the heads this rank holds after the all-to-all (Ulysses
        only: harness.backends.Backend.build keeps kernels, which return no log-sum-exp, out of ring attention)."""
        return attend(q, k, v, self.kernel, **self.options)


def _unsupported(attn, kernel: str) -> str:
    """Why this attention module cannot take `kernel`, or ''."""
    head_dim, supported = attn.inner_dim // attn.heads, KERNELS[kernel].head_dims
    if supported is not None and head_dim not in supported:
        return f"head size {head_dim} is not one {kernel} supports ({supported})"
    if attn.add_k_proj is not None:
        return "image-conditioned (I2V) attention adds a second key/value set; not handled"
    if type(attn.processor).__name__ != "WanAttnProcessor":
        return f"it already has a custom processor ({type(attn.processor).__name__})"
    return ""


def install(transformer: torch.nn.Module, kernel: str, blocks: Collection[int] | None = None, **options) -> None:
    """Put `kernel` in the self-attention of the blocks numbered in `blocks` (None: every block), in place (callers
    pass their own copy).

    Raises BackendUnavailable when the kernel cannot run here or a block cannot take it: a kernel that was
    asked for is never quietly replaced by another. `options` go to kernels.attend (smooth_k, smooth_v, pv_fp8).
    """
    ok, reason = kernel_available(kernel)
    if not ok:
        raise BackendUnavailable(reason)
    chosen = [(i, b) for i, b in enumerate(transformer.blocks) if blocks is None or i in blocks]
    for index, block in chosen:
        why = _unsupported(block.attn1, kernel)
        if why:
            raise BackendUnavailable(f"{kernel} attention: blocks.{index}.attn1: {why}")
    for _, block in chosen:
        block.attn1.set_processor(SelfAttnProcessor(kernel, block.attn1.processor, **options))


def with_kernel(transformer: torch.nn.Module, kernel: str, **options) -> torch.nn.Module:
    """A shallow clone of `transformer` whose blocks' self-attention runs `kernel`; the weights are shared
    and the original (which the eager baseline runs) keeps its stock processors."""
    clone = copy.copy(transformer)
    clone._modules = dict(transformer._modules)
    blocks = []
    for block in transformer.blocks:
        block_clone = copy.copy(block)
        block_clone._modules = dict(block._modules)
        attn = copy.copy(block.attn1)  # its own processor slot, the same weights
        attn._modules = dict(block.attn1._modules)
        block_clone._modules["attn1"] = attn
        blocks.append(block_clone)
    clone._modules["blocks"] = torch.nn.ModuleList(blocks)
    install(clone, kernel, **options)
    return clone
