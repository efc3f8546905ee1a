"""Each Wan component as a plain module with tensor-in, tensor-out forward and seeded example inputs.

These wrappers are what every backend runs and what export writes to ONNX, so the eager baseline,
ONNX Runtime and TensorRT all see the same function with the same input names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.case import Case
from harness.models import WanModel
from harness.shapes import TEXT_TOKENS, VideoShape

# Timesteps on either side of the 875 boundary, so each expert is fed a value it really sees.
EXPERT_TIMESTEP = {"transformer": 937, "transformer_2": 500}


class DiT(torch.nn.Module):
    """One expert's forward: noisy latents, int64 timestep, text embeddings -> flow prediction."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """Un-normalised latents -> video in [-1, 1]; the only VAE half a text-to-video run needs."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class TextEncoder(torch.nn.Module):
    """UMT5 encoder with padded positions zeroed, as WanPipeline does after encoding."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)


@dataclass
class Component:
    """A runnable component: the module, its input names, and which input axes may vary."""

    name: str
    module: torch.nn.Module
    input_names: tuple[str, ...]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def dit_component(expert, name: str = "transformer") -> Component:
    """One DiT expert as a Component; also for GPU scripts that hold a bare expert and no WanModel."""
    latent = {0: "batch", 2: "latent_frames", 3: "latent_height", 4: "latent_width"}
    return Component(name, DiT(expert), ("hidden_states", "timestep", "encoder_hidden_states"),
                     "noise_pred", {"hidden_states": latent, "timestep": {0: "batch"},
                                    "encoder_hidden_states": {0: "batch", 1: "text_tokens"},
                                    "noise_pred": latent})


def make_component(model: WanModel, name: str) -> Component:
    """Wrap one named part of `model`; the module shares the model's weights."""
    if name in ("transformer", "transformer_2"):
        return dit_component(getattr(model, name), name)
    if name == "vae_decoder":
        return Component(name, VaeDecoder(model.vae), ("latents",), "video",
                         {"latents": {0: "batch", 3: "latent_height", 4: "latent_width"},
                          "video": {0: "batch", 3: "height", 4: "width"}})
    if name == "text_encoder":
        return Component(name, TextEncoder(model.text_encoder), ("input_ids", "attention_mask"),
                         "prompt_embeds", {"input_ids": {0: "batch", 1: "text_tokens"},
                                           "attention_mask": {0: "batch", 1: "text_tokens"},
                                           "prompt_embeds": {0: "batch", 1: "text_tokens"}})
    from harness.case import check_component
    check_component(name)
    raise AssertionError(name)


def example_inputs(model: WanModel, case: Case, device: str | torch.device = "cpu", seed: int = 0,
                   shape: VideoShape | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded inputs for `case` (optionally at another `shape`), floats in the case's dtype.

    Drawn in fp32 on the CPU and then cast, so every precision and device sees the same values.
    """
    shape = shape or case.shape
    gen = torch.Generator().manual_seed(seed)
    b, text_len = case.batch, model.max_sequence_length
    if case.component in ("transformer", "transformer_2"):
        out = dit_inputs(getattr(model, case.component), shape, case.component, batch=b, text_len=text_len,
                         dtype=case.dtype, seed=seed)
    elif case.component == "vae_decoder":
        out = (torch.randn(shape.latent_shape(b), generator=gen).to(case.dtype),)
    else:
        vocab = min(model.text_encoder.config.vocab_size, len(model.tokenizer))
        lengths = torch.randint(4, text_len // 2 + 5, (b,), generator=gen)
        mask = (torch.arange(text_len)[None, :] < lengths[:, None]).to(torch.int64)
        ids = torch.randint(3, vocab, (b, text_len), generator=gen) * mask
        out = (ids, mask)
    return tuple(t.to(device) for t in out)


def dit_inputs(expert, shape: VideoShape, component: str = "transformer", *, batch: int = 1,
               text_len: int = TEXT_TOKENS, dtype: torch.dtype = torch.bfloat16, device="cpu",
               seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of one expert forward: latents, the expert's timestep, text embeddings.

    Also for GPU scripts that hold a bare expert and no WanModel (the 40-layer one fills the card alone).
    """
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape.latent_shape(batch), generator=gen)
    timestep = torch.full((batch,), EXPERT_TIMESTEP[component], dtype=torch.int64)
    text = torch.randn((batch, text_len, expert.config.text_dim), generator=gen)
    return tuple(t.to(device) for t in (latents.to(dtype), timestep, text.to(dtype)))
