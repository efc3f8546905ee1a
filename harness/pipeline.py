"""The Wan2.2 denoising loop with a swappable runner per component.

It follows diffusers' WanPipeline step for step (same prompt cleaning, padding, boundary switch,
CFG as two batch-1 forwards, fp32 latents between steps, UniPC flow matching, latent
un-normalisation), but calls Runners, so any backend can stand in for any component.
A unit case proves it matches WanPipeline exactly with eager runners.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.case import (COMPONENTS, DIT_COMPONENTS, ONE_GPU, PRECISIONS, Case, Layout, eager_precision, is_dit,
                          is_quantized)
from harness.errors import HarnessError
from harness.models import WanModel
from harness.shapes import VideoShape

# A fixed prompt set for quality cases: varied content, one negative prompt (the model card's style).
PROMPTS = (
    "Two astronauts ride horses across a red desert at sunset, cinematic, wide shot.",
    "Close-up of raindrops falling into a puddle in slow motion, soft light.",
)
NEGATIVE_PROMPT = "low quality, blurry, static, overexposed, worst quality, jpeg artifacts"
# What quantized backends calibrate on (harness.components.loop_inputs): other prompts and seeds than the
# quality cases', so the videos they are judged on stay held out from calibration.
CALIBRATION_PROMPTS = (
    "A cat walks on the grass, realistic, soft light.",
    "A drone shot over a snowy mountain ridge with clouds moving fast.",
    "A red vintage car drives along a coastal road at dawn, aerial view.",
)
CALIBRATION_SEED = 1000
# Four steps put two timesteps on each side of the 0.875 boundary (999, 900 | 750, 500 with UniPC shift 3),
# so each expert calibrates on the noise levels it serves.
CALIBRATION_STEPS = 4
log = logging.getLogger(__name__)
# Prompts already reported as truncated: quality cases tokenize the same prompts many times, and one
# warning per prompt is what a user needs.
_TRUNCATED: set[str] = set()


@dataclass
class Runners:
    """One callable per component, in the harness Runner convention (tensors in, one tensor out)."""

    text_encoder: Callable
    transformer: Callable
    transformer_2: Callable
    vae_decoder: Callable


@dataclass
class Generation:
    """A finished run: frames in [0, 1] as [F, H, W, 3], the latents after every step, stage times."""

    frames: torch.Tensor
    step_latents: list[torch.Tensor] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    origin: str = ""  # where a stored run came from (read from the cache, or made), for the rows that judge it


def code_digest() -> str:
    """A digest of the code every run's numbers come from (this loop and the component wrappers every runner calls),
    in the key of stored videos: a change to either makes them again."""
    code = Path(__file__).read_bytes() + Path(__file__).with_name("components.py").read_bytes()
    return hashlib.sha256(code).hexdigest()[:16]


def write_generation(run: Generation, folder: Path) -> None:
    """A finished run as files (a cache entry's content): its float frames and every step's latents exactly as
    computed, not re-quantized to 8 bits, so a video read back judges exactly as the fresh one did."""
    np.save(folder / "frames.npy", run.frames.numpy(), allow_pickle=False)
    np.save(folder / "latents.npy", torch.stack(run.step_latents).numpy() if run.step_latents else np.empty(0),
            allow_pickle=False)
    (folder / "run.json").write_text(json.dumps({"experts": run.experts, "stage_ms": run.stage_ms}))


def read_generation(folder: Path) -> Generation:
    """What write_generation wrote (the cache has checked every file's size and sha256 against its manifest)."""
    about = json.loads((folder / "run.json").read_text())
    latents = torch.from_numpy(np.load(folder / "latents.npy", allow_pickle=False))
    return Generation(frames=torch.from_numpy(np.load(folder / "frames.npy", allow_pickle=False)),
                      step_latents=list(latents) if latents.numel() else [], experts=about["experts"],
                      stage_ms=about["stage_ms"])


def under_test(precision: str) -> tuple[str, ...]:
    """The components a candidate backend runs at `precision`: the experts, where the time goes, and the text encoder
    except for fp8 and int8 (there is no quantized text encoder). The VAE decoder is never a candidate's: it stays
    eager PyTorch, as in NVIDIA's Wan2.2 TensorRT demo (its own parity and perf cases judge each backend's VAE
    separately, and Inductor takes minutes to compile its per-frame cache loop)."""
    return DIT_COMPONENTS if is_quantized(precision) else ("text_encoder", *DIT_COMPONENTS)


@dataclass(frozen=True)
class Precisions:
    """The precision each component of one pipeline run computes in (both experts share one)."""

    text_encoder: str
    experts: str
    vae_decoder: str

    def of(self, component: str) -> str:
        return self.experts if is_dit(component) else getattr(self, component)

    @property
    def id(self) -> str:
        """`bf16` where every component runs in it, else each one's: `te-fp32+dit-bf16+vae-fp32`."""
        parts = (self.text_encoder, self.experts, self.vae_decoder)
        if len(set(parts)) == 1:
            return self.experts
        return f"te-{self.text_encoder}+dit-{self.experts}+vae-{self.vae_decoder}"

    @property
    def eager(self) -> "Precisions":
        """What eager PyTorch runs in its place: bf16 for fp8 and int8, which have no eager run."""
        return Precisions(*(eager_precision(p) for p in (self.text_encoder, self.experts, self.vae_decoder)))

    @classmethod
    def as_run(cls, precision: str) -> "Precisions":
        """A user's pipeline at `precision`: the experts in it, the text encoder and VAE in its eager precision."""
        rest = eager_precision(precision)
        return cls(rest, precision, rest)

    @classmethod
    def judged(cls, precision: str) -> "Precisions":
        """A pipeline judged against the fp32 video: the components under test in `precision`, every other one in
        fp32 as in the reference, so another component's rounding cannot widen the band for an expert's error."""
        tested = under_test(precision)
        return cls(*(precision if c in tested else "fp32" for c in ("text_encoder", "transformer", "vae_decoder")))

    @classmethod
    def only(cls, component: str, precision: str) -> "Precisions":
        """One component (`text_encoder`, `experts` or `vae_decoder`) in `precision`, the rest in fp32: where a
        reduced precision's drift of the video comes from."""
        return cls(**{"text_encoder": "fp32", "experts": "fp32", "vae_decoder": "fp32", component: precision})


REFERENCE = Precisions("fp32", "fp32", "fp32")  # the pipeline every video and loop is judged against


def build_runners(get_runner: Callable, backend: str, precisions: Precisions, shape: VideoShape, source: str,
                  cfg_batch: int = 1, layout: Layout = ONE_GPU) -> Runners:
    """Runners for all four components from `get_runner(backend, case)`: `backend` runs the components under test
    (under_test), eager PyTorch the rest, each in its precision. The experts' runners are built for `cfg_batch` and
    the layout's token split (each rank of a parallel run encodes the prompts and decodes the video whole)."""
    tested = under_test(precisions.experts)

    def runner(component):
        batch, split = (cfg_batch, layout.forward) if is_dit(component) else (1, ONE_GPU)
        return get_runner(backend if component in tested else "torch",
                          Case(component, shape, precisions.of(component), batch=batch, source=source, layout=split))

    return Runners(**{name: runner(name) for name in COMPONENTS})


def tokenize(model: WanModel, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize exactly as WanPipeline does: cleaned text, padded to max_sequence_length."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    cleaned = [prompt_clean(p) for p in prompts]
    for text in cleaned:
        _warn_if_truncated(model, text)
    tokens = model.tokenizer(cleaned, padding="max_length", max_length=model.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _warn_if_truncated(model: WanModel, text: str) -> None:
    """WanPipeline silently keeps the first max_sequence_length tokens; say so, once per prompt."""
    if text in _TRUNCATED:
        return
    # verbose=False: the tokenizer's own warning about the length would only repeat this one, less exactly.
    length = len(model.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False).input_ids)
    if length > model.max_sequence_length:
        _TRUNCATED.add(text)
        log.warning("prompt truncated to the text encoder's %d tokens: %d of its %d tokens dropped (%r...)",
                    model.max_sequence_length, length - model.max_sequence_length, length, text[:60])


def initial_latents(model: WanModel, shape: VideoShape, seed: int, device, batch: int = 1) -> torch.Tensor:
    """fp32 Gaussian latents drawn on the CPU, so every device starts from the same noise."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape.latent_shape(batch), generator=gen, dtype=torch.float32).to(device)


def expert_for(model: WanModel, timestep) -> tuple[str, float]:
    """The high-noise expert runs while t >= boundary_ratio * 1000, the low-noise one after."""
    boundary = model.boundary_ratio * model.scheduler.config.num_train_timesteps
    if float(timestep) >= boundary:
        return "transformer", model.guidance_scale
    return "transformer_2", model.guidance_scale_2


def cfg_noise(runner: Callable, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
              negative_embeds: torch.Tensor, guidance: float, dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    """One classifier-free-guided prediction: two batch-1 forwards, as WanPipeline runs them, or (batch 2)
    one forward over both branches, which feeds the GPU larger GEMMs and halves the launches."""
    latent_in = latents.to(dtype)
    t = timestep.expand(latents.shape[0]).to(torch.int64)
    if batch == 2:
        cond, uncond = runner(torch.cat([latent_in, latent_in]), torch.cat([t, t]),
                              torch.cat([embeds, negative_embeds])).chunk(2)
    else:
        cond, uncond = runner(latent_in, t, embeds), runner(latent_in, t, negative_embeds)
    return uncond + guidance * (cond - uncond)


def cfg_noise_split(runner: Callable, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                    negative_embeds: torch.Tensor, guidance: float, dtype: torch.dtype, group) -> torch.Tensor:
    """The same prediction with the branches on the two ranks of `group` (CFG-parallel): rank 0 of the group
    runs the conditional forward, rank 1 the unconditional one, and one all-gather gives both ranks both, so
    they combine them exactly as cfg_noise does and step identical latents."""
    import torch.distributed as dist

    from harness.distributed import exchange

    latent_in = latents.to(dtype)
    t = timestep.expand(latents.shape[0]).to(torch.int64)
    mine = runner(latent_in, t, negative_embeds if dist.get_rank(group) else embeds)
    cond, uncond = exchange(mine, group)
    return uncond + guidance * (cond - uncond)


def check_finite(tensor: torch.Tensor, produced_by: str, *, step: int | None = None, steps: int | None = None,
                 timestep=None) -> None:
    """A NaN or Inf stays to the end of the pipeline, and the VAE turns it into a black video that looks like a result:
    stop where it first appears, naming what produced it (`produced_by`, e.g. "the text encoder") and, inside the
    denoising loop, the step and its timestep. Each check costs one device sync, small beside a forward."""
    if bool(torch.isfinite(tensor).all()):
        return
    where = "" if step is None else f" at step {step} (of {steps}, t={float(timestep):g})"
    raise HarnessError(f"{produced_by} produced non-finite values (NaN or Inf){where}: its weights may hold NaN or "
                       "Inf (copy the checkpoint again), or its precision or backend overflows: run it in fp32 eager "
                       "PyTorch to tell which")


def decode(model: WanModel, runner: Callable, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Un-normalise the latents with the VAE's mean/std, decode, and map [-1, 1] to [0, 1] frames."""
    cfg = model.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, dtype)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, dtype)
    video = runner(latents.to(dtype) * std + mean)
    check_finite(video, "the VAE decoder")  # before the clamp, which would turn an Inf into a plausible pixel
    # [B, C, F, H, W] in [-1, 1] -> [F, H, W, C] in [0, 1] for the first video
    return (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)


def generate(model: WanModel, runners: Runners, prompt: str, *, shape: VideoShape, steps: int,
             precisions: Precisions = Precisions("fp32", "fp32", "fp32"), seed: int = 0,
             negative_prompt: str = NEGATIVE_PROMPT, device="cpu", latents: torch.Tensor | None = None, progress: bool = False,
             keep_latents: bool = False, cfg_batch: int = 1, cfg_group=None, decode_video: bool = True) -> Generation:
    """Text encode -> two experts with the boundary switch and CFG -> VAE decode (skipped when not
    `decode_video`, for runs that only want what the experts saw: the frames stay empty).

    With a `cfg_group` (a torch.distributed process group of two ranks) the CFG branches run CFG-parallel.
    """
    from tqdm.auto import tqdm

    from harness.timing import timed_call

    dtype = PRECISIONS[precisions.experts]  # of the latents the experts see and of the prompt embeddings
    run = Generation(frames=torch.empty(0))
    ids, mask = tokenize(model, [prompt, negative_prompt], device)

    def encode(ids, mask):  # batch-1 calls, like the DiT's: engines built for batch 1 serve both
        return torch.cat([runners.text_encoder(ids[i:i + 1], mask[i:i + 1]) for i in range(len(ids))])

    embeds, run.stage_ms["text_encode"] = timed_call(encode, ids, mask, device=device)
    embeds = embeds.to(dtype)
    check_finite(embeds, "the text encoder")  # in the loop's dtype: an overflow in the cast is the encoder's too
    latents = initial_latents(model, shape, seed, device) if latents is None else latents.clone()
    scheduler = copy.deepcopy(model.scheduler)
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)

    log.info("text encoded in %.2f s", run.stage_ms["text_encode"] / 1e3)

    def denoise_step(latents, t, name, guidance):
        runner = getattr(runners, name)
        return (cfg_noise(runner, latents, t, embeds[:1], embeds[1:], guidance, dtype, cfg_batch)
                if cfg_group is None else
                cfg_noise_split(runner, latents, t, embeds[:1], embeds[1:], guidance, dtype, cfg_group))

    # Each step timed on its own, so a video's time splits into its experts' (a step's sync is small beside it).
    for step, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress, unit="step"), 1):
        name, guidance = expert_for(model, t)
        noise, ms = timed_call(denoise_step, latents, t, name, guidance, device=device)
        run.stage_ms[f"{name}_steps"] = run.stage_ms.get(f"{name}_steps", 0.0) + ms
        at = dict(step=step, steps=len(scheduler.timesteps), timestep=t)
        check_finite(noise, f"the {name} expert", **at)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        check_finite(latents, "the scheduler step", **at)
        run.experts.append(name)
        log.info("step %d of %d (%s, t=%g) in %.2f s", step, len(scheduler.timesteps), name, float(t), ms / 1e3)
        if keep_latents:
            run.step_latents.append(latents.detach().cpu())
    if decode_video:
        run.frames, run.stage_ms["vae_decode"] = timed_call(decode, model, runners.vae_decoder, latents,
                                                            PRECISIONS[precisions.vae_decoder], device=device)
        run.frames = run.frames.cpu()
        log.info("decoded in %.2f s", run.stage_ms["vae_decode"] / 1e3)
    return run
