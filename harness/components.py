"""Each Wan component as a plain module with tensor-in, tensor-out forward and seeded example inputs.

These wrappers are what every backend runs and what export writes to ONNX, so the eager baseline,
ONNX Runtime and TensorRT all see the same function with the same input names.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from harness.case import COMPONENTS, DIT_COMPONENTS, Case, check_component, is_dit, precision_of
from harness.models import A14B_TRANSFORMER, WanModel, expert_timestep, load_expert, random_fingerprint
from harness.residency import execution_device
from harness.shapes import TEXT_TOKENS, VideoShape


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


# Seeded example inputs of a component for a case: (case, seed, shape or None for the case's own) -> tensors.
Sampler = Callable[[Case, int, "VideoShape | None"], tuple[torch.Tensor, ...]]
# One expert call's inputs: latents, timestep, text embeddings.
Call = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LoopInputs:
    """The inputs an expert sees in the real denoising loop at a case's shape and dtype, one tuple per call (see
    loop_inputs), and what they depend on besides the case, known without running the loop: calibrated scales are
    keyed on it (harness.calibration), so a cached calibration runs no loop."""

    identity: dict
    calls: Callable[[Case, bool, int | None], list[Call]]  # (case, held_out, calibration prompts) -> calls

    def __call__(self, case: Case, held_out: bool = False, prompts: int | None = None) -> list[Call]:
        """The calls on the calibration prompts (the first `prompts` of them; None: all), or with `held_out` on the
        quality cases' prompts."""
        return self.calls(case, held_out, prompts)


@dataclass
class Component:
    """A runnable component: the module, its input names, which input axes may vary, what its weights are
    (the export cache keys on `fingerprint`) and how to draw its example inputs: all a backend needs.

    `recipe`, where set, builds the same component with its weights; it pickles, so another process can run it.
    A component whose module is a skeleton on the meta device holds no weights: export builds it from `recipe`
    in a process of its own, so the caller never holds a real-width expert's weights.
    """

    name: str
    module: torch.nn.Module
    input_names: tuple[str, ...]
    output_name: str
    fingerprint: str
    sampler: Sampler
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # What quantized backends calibrate on and are judged on; only a DiT expert of a whole WanModel has it
    # (the loop needs the text encoder, both experts and the scheduler).
    loop_inputs: LoopInputs | None = None
    recipe: Callable[[], "Component"] | None = None

    @property
    def device(self) -> torch.device:
        """Where the module runs: a component taking turns on the device may be waiting in host memory."""
        return execution_device(self.module) or next(self.module.parameters()).device

    @property
    def holds_weights(self) -> bool:
        return self.device.type != "meta"

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def inputs(self, case: Case, seed: int = 0, shape: VideoShape | None = None) -> tuple[torch.Tensor, ...]:
        """Seeded inputs for `case` (optionally at another shape) on the module's device."""
        return tuple(t.to(self.device) for t in self.sampler(case, seed, shape))


def dit_component(expert, fingerprint: str, name: str = "transformer", text_len: int = TEXT_TOKENS,
                  timestep: int | None = None) -> Component:
    """One DiT expert as a Component, also for an expert held without a WanModel (the 40-layer one): its example
    inputs are at `timestep`, by default the one expert `name` runs at under A14B's boundary."""
    latent = {0: "batch", 2: "latent_frames", 3: "latent_height", 4: "latent_width"}
    timestep = expert_timestep(name) if timestep is None else timestep

    def sample(case: Case, seed: int, shape: VideoShape | None) -> tuple[torch.Tensor, ...]:
        return dit_inputs(expert, shape or case.shape, timestep, batch=case.batch, text_len=text_len,
                          dtype=case.dtype, seed=seed)

    return Component(name, DiT(expert), ("hidden_states", "timestep", "encoder_hidden_states"), "noise_pred",
                     fingerprint, sample,
                     {"hidden_states": latent, "timestep": {0: "batch"},
                      "encoder_hidden_states": {0: "batch", 1: "text_tokens"}, "noise_pred": latent})


def proxy_expert(layers: int, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 skeleton: bool = False, name: str = "transformer") -> Component:
    """One A14B-width expert of `layers` layers alone, without the rest of a WanModel (the 40-layer expert is
    28.6 GB in bf16: it fits one card only without the second expert, the text encoder and an fp32 twin).

    With `skeleton`, the module is built on the meta device (no weights, no time) and export builds the real one
    on `device` from the recipe, in a process of its own. `name` is the expert it stands for (its inputs'
    timestep); with the proxy source's seed of that expert it is the same component as the WanModel's.
    """
    expert = load_expert(layers, device="meta" if skeleton else device, dtype=dtype, seed=seed)
    component = dit_component(expert, random_fingerprint({**A14B_TRANSFORMER, "num_layers": layers}, seed), name)
    component.recipe = partial(proxy_expert, layers, device=device, dtype=dtype, seed=seed, name=name)
    return component


def make_component(model: WanModel, name: str) -> Component:
    """Wrap one named part of `model`; the module shares the model's weights."""
    check_component(name)
    if is_dit(name):
        component = dit_component(getattr(model, name), model.fingerprints[name], name, model.max_sequence_length,
                                  model.expert_timestep(name))
        component.loop_inputs = LoopInputs(loop_identity(model), partial(loop_inputs, model, name))
        return component
    sample = partial(example_inputs, model)
    if name == "vae_decoder":
        return Component(name, VaeDecoder(model.vae), ("latents",), "video", model.fingerprints["vae"], sample,
                         {"latents": {0: "batch", 3: "latent_height", 4: "latent_width"},
                          "video": {0: "batch", 3: "height", 4: "width"}})
    return Component(name, TextEncoder(model.text_encoder), ("input_ids", "attention_mask"), "prompt_embeds",
                     model.fingerprints["text_encoder"], sample,
                     {"input_ids": {0: "batch", 1: "text_tokens"}, "attention_mask": {0: "batch", 1: "text_tokens"},
                      "prompt_embeds": {0: "batch", 1: "text_tokens"}})


def example_inputs(model: WanModel, case: Case, seed: int = 0, shape: VideoShape | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """Seeded inputs for `case` (optionally at another `shape`), floats in the case's dtype.

    Drawn in fp32 on the CPU and then cast, so every precision and device sees the same values.
    """
    shape = shape or case.shape
    gen = torch.Generator().manual_seed(seed)
    b, text_len = case.batch, model.max_sequence_length
    if is_dit(case.component):
        out = dit_inputs(getattr(model, case.component), shape, model.expert_timestep(case.component), batch=b,
                         text_len=text_len, dtype=case.dtype, seed=seed)
    elif case.component == "vae_decoder":
        out = (torch.randn(shape.latent_shape(b), generator=gen).to(case.dtype),)
    else:
        vocab = min(model.text_encoder.config.vocab_size, len(model.tokenizer))
        lengths = torch.randint(4, text_len // 2 + 5, (b,), generator=gen)
        mask = (torch.arange(text_len)[None, :] < lengths[:, None]).to(torch.int64)
        ids = torch.randint(3, vocab, (b, text_len), generator=gen) * mask
        out = (ids, mask)
    return tuple(t.to(device) for t in out)


def dit_inputs(expert, shape: VideoShape, timestep: int, *, batch: int = 1, text_len: int = TEXT_TOKENS,
               dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of one expert forward: latents, `timestep` (the expert's own: expert_timestep), text embeddings.

    Also for an expert held without a WanModel (the 40-layer one fills the card alone).
    """
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape.latent_shape(batch), generator=gen)
    steps = torch.full((batch,), timestep, dtype=torch.int64)
    text = torch.randn((batch, text_len, expert.config.text_dim), generator=gen)
    return tuple(t.to(device) for t in (latents.to(dtype), steps, text.to(dtype)))


def seeded_loop(component: Component, count: int) -> LoopInputs:
    """Stand-in loop inputs for an expert held without a WanModel, where the scale values do not matter (which
    kernels a build picks, how fast a block runs): its first `count` seeded example inputs, keyed apart from any
    real loop's calibration."""
    return LoopInputs({"seeded": component.fingerprint, "calls": count},
                      lambda case, held_out, prompts: [component.inputs(case, seed) for seed in range(count)])


def loop_identity(model: WanModel) -> dict:
    """What the loop's calls depend on besides the case: the model (harness.models.WanModel.identity) and the
    calibration prompts, negative prompt, seed and steps."""
    from harness.pipeline import CALIBRATION_PROMPTS, CALIBRATION_SEED, CALIBRATION_STEPS, NEGATIVE_PROMPT

    return {"model": model.identity(), "prompts": CALIBRATION_PROMPTS, "negative_prompt": NEGATIVE_PROMPT,
            "seed": CALIBRATION_SEED, "steps": CALIBRATION_STEPS}


# Loop records per model (keyed weakly on its high-noise expert, so they go with the model), then per
# (shape, dtype, prompts, seed): one capture serves both experts and every quantized backend of a session.
_LOOP_RECORDS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def loop_inputs(model: WanModel, name: str, case: Case, held_out: bool = False,
                prompts: int | None = None) -> list[Call]:
    """Expert `name`'s calls in the real loop at the case's shape and dtype, on the model's device: each expert
    on its own timesteps, CALIBRATION_STEPS steps with CFG.

    The first `prompts` calibration prompts (harness.pipeline.CALIBRATION_PROMPTS; None: all), or with `held_out`
    the quality cases' prompts and seeds (PROMPTS), on which statically calibrated precisions are judged: seeded
    random inputs (N(0, 1) text on all 512 positions, where the real loop has zeros past the prompt) drive the
    cross-attention output 3-4x past any range the loop shows, so a per-forward parity on them measures clipping,
    not fp8.
    Batch 1 always, as WanPipeline runs CFG: calibrated ranges do not depend on the batch, so one
    calibration serves engines built for --cfg-batch 1 and 2.
    """
    from harness.pipeline import CALIBRATION_PROMPTS, CALIBRATION_SEED, PROMPTS

    texts, seed = (PROMPTS, 0) if held_out else (CALIBRATION_PROMPTS[:prompts], CALIBRATION_SEED)
    records = _LOOP_RECORDS.setdefault(model.transformer, {})
    key = (case.shape, case.dtype, texts, seed)
    if key not in records:
        records[key] = capture_loop(model, case.shape, case.dtype, texts, seed)
    return records[key][name]


def capture_loop(model: WanModel, shape: VideoShape, dtype: torch.dtype, prompts: tuple[str, ...],
                 seed: int) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Run `prompts` (seeds seed, seed + 1, ...) through the eager loop, recording every expert call's inputs;
    the video is not decoded (the tiny VAE alone took 3-9 s per prompt at 128x128x9 on 2 cores).

    The runners are eager inference-mode calls of the model's own modules, so the shared model (the eager
    baseline) is only read.
    """
    from harness.pipeline import CALIBRATION_STEPS, Precisions, Runners, generate

    record: dict[str, list[tuple[torch.Tensor, ...]]] = {name: [] for name in DIT_COMPONENTS}
    runners = Runners(**{name: _eager(make_component(model, name).module, record.get(name)) for name in COMPONENTS})
    device = execution_device(model.transformer) or next(model.transformer.parameters()).device
    for i, prompt in enumerate(prompts):
        generate(model, runners, prompt, shape=shape, steps=CALIBRATION_STEPS, seed=seed + i,
                 precisions=Precisions.as_run(precision_of(dtype)), device=device, decode_video=False)
    return record


def _eager(module: torch.nn.Module, record: list | None) -> Callable[..., torch.Tensor]:
    """An eager runner of `module` that appends a dense copy of each call's inputs to `record` (if given): the loop's
    timestep is an expanded (stride-0) view, which the copy turns into a tensor of its own."""
    @torch.inference_mode()
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        if record is not None:
            record.append(tuple(torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t) for t in inputs))
        return module(*inputs)

    return run
