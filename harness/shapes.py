"""Video shapes: presets, validation, latent shapes, token counts, step split and DiT FLOPs."""
from __future__ import annotations

import re
from dataclasses import dataclass

from harness.errors import HarnessError

# Wan's VAE compresses 4x in time and 8x in space; the DiT patchifies (1, 2, 2).
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
PATCH = (1, 2, 2)
LATENT_CHANNELS = 16
# Harness-wide bounds, far past a GPU's memory at A14B width; each model's own positional table
# (rope_max_seq_len in its DiT config) bounds a run further: see check_fits.
MAX_SIDE = 2048
MAX_FRAMES = 1021
# The flow-matching scheduler is trained on 1000 timesteps: more steps than that only repeat them.
MAX_STEPS = 1000
PRESETS = {"480p": (480, 832, 81), "720p": (720, 1280, 81)}

# A14B expert width (docs/hardware.md), used for the FLOP count of one DiT block.
A14B_DIM = 5120
A14B_FFN = 13824
A14B_LAYERS = 40
TEXT_TOKENS = 512


@dataclass(frozen=True)
class VideoShape:
    """A pixel-space video size; `id` is the readable form used in case ids (HxWxF)."""

    height: int
    width: int
    frames: int

    @property
    def id(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL_COMPRESSION + 1

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        return (batch, LATENT_CHANNELS, self.latent_frames,
                self.height // SPATIAL_COMPRESSION, self.width // SPATIAL_COMPRESSION)

    @property
    def tokens(self) -> int:
        """Sequence length the DiT attends over: latent frames x (H/16) x (W/16)."""
        _, _, f, h, w = self.latent_shape()
        return (f // PATCH[0]) * (h // PATCH[1]) * (w // PATCH[2])


def validate(height: int, width: int, frames: int) -> VideoShape:
    """Return the shape, or raise HarnessError naming the Wan rule it breaks."""
    step = SPATIAL_COMPRESSION * PATCH[1]
    if min(height, width, frames) <= 0:
        raise HarnessError(f"shape {height}x{width}x{frames}: height, width and frames must be positive")
    # The bounds first, so that the multiple suggested below is always inside them.
    for name, value in (("height", height), ("width", width)):
        if value > MAX_SIDE:
            raise HarnessError(f"{name} {value} exceeds {MAX_SIDE}, the largest side this harness supports")
        if value % step:
            raise HarnessError(f"{name} {value} is not a multiple of {step}: Wan needs H and W "
                               f"divisible by {step} (VAE x8, patch x2); try {value // step * step or step}")
    if frames > MAX_FRAMES:
        raise HarnessError(f"frames {frames} exceeds {MAX_FRAMES}, the most this harness supports")
    if (frames - 1) % TEMPORAL_COMPRESSION:
        k = (frames - 1) // TEMPORAL_COMPRESSION
        tries = " or ".join(str(f) for f in (4 * k + 1, 4 * k + 5) if f <= MAX_FRAMES)
        raise HarnessError(f"frames {frames} is not 4k+1: Wan's VAE needs 4k+1 frames; try {tries}")
    return VideoShape(height, width, frames)


def check_steps(steps, flag: str = "--steps") -> int:
    """A denoising step count: a whole number from 1 to the scheduler's MAX_STEPS training timesteps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise HarnessError(f"{flag} {steps!r} must be a whole number from 1 to {MAX_STEPS} (the scheduler's "
                           "training timesteps; the model card uses 40)")
    return steps


def check_fits(shape: VideoShape, dit_config: dict, model: str) -> VideoShape:
    """Return the shape, or raise HarnessError when a latent axis outgrows the DiT's positional table.

    Wan's rotary embedding holds `rope_max_seq_len` positions per axis (frames, height, width after the
    (1, 2, 2) patchify): a longer axis has no positions and the forward fails on a reshape.
    """
    table = dit_config["rope_max_seq_len"]
    patch = dit_config["patch_size"]
    _, _, frames, height, width = shape.latent_shape()
    largest = {"frames": TEMPORAL_COMPRESSION * (table * patch[0] - 1) + 1,
               "height": table * patch[1] * SPATIAL_COMPRESSION, "width": table * patch[2] * SPATIAL_COMPRESSION}
    for axis, length, p in (("frames", frames, patch[0]), ("height", height, patch[1]), ("width", width, patch[2])):
        if length // p > table:
            raise HarnessError(f"shape {shape.id}: {axis} {getattr(shape, axis)} needs {length // p} positions but "
                               f"the {model} DiT's rope_max_seq_len is {table}; use {axis} <= {largest[axis]}")
    return shape


def parse_shape(spec: str) -> VideoShape:
    """Parse a preset name (480p, 720p) or HxWxF, e.g. 16x16x9."""
    spec = spec.strip().lower()
    if spec in PRESETS:
        return validate(*PRESETS[spec])
    match = re.fullmatch(r"(-?\d+)x(-?\d+)x(-?\d+)", spec)
    if not match:
        raise HarnessError(f"shape {spec!r} is neither a preset ({', '.join(PRESETS)}) nor HxWxF like 480x832x81")
    return validate(*(int(g) for g in match.groups()))


def parse_shapes(specs: str) -> list[VideoShape]:
    """Parse a comma-separated list of shape specs."""
    return [parse_shape(s) for s in specs.split(",") if s.strip()]


def block_flops_by_region(tokens: int, dim: int = A14B_DIM, ffn: int = A14B_FFN,
                          text_tokens: int = TEXT_TOKENS) -> dict[str, float]:
    """FLOPs of one DiT block (docs/hardware.md) split by what runs them: attention (QK^T and PV of self- and
    cross-attention) and the GEMMs (Q/K/V/O projections of both attentions, and the FFN)."""
    return {"attention": 4 * tokens ** 2 * dim + 4 * tokens * text_tokens * dim,
            "gemm": 12 * tokens * dim ** 2 + 4 * tokens * dim * ffn}


def block_flops(tokens: int, dim: int = A14B_DIM, ffn: int = A14B_FFN, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one DiT block: projections, self-attention, cross-attention, FFN."""
    return sum(block_flops_by_region(tokens, dim, ffn, text_tokens).values())


def dit_flops(tokens: int, layers: int = A14B_LAYERS) -> float:
    """FLOPs of one DiT forward of `layers` A14B-width blocks (the blocks dominate; embeddings are ignored)."""
    return layers * block_flops(tokens)


def step_split(steps: int, boundary_ratio: float = 0.875, flow_shift: float = 3.0) -> tuple[int, int]:
    """How many of `steps` run the high-noise expert (t >= boundary) and how many the low-noise one."""
    from harness.models import make_scheduler  # the real scheduler decides the timesteps

    check_steps(steps)
    scheduler = make_scheduler(flow_shift)
    scheduler.set_timesteps(steps)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    high = int(sum(float(t) >= boundary for t in scheduler.timesteps))
    return high, steps - high


def forward_flops(dit_config, tokens: int, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one forward of a WanTransformer3DModel with this config (any width, any depth)."""
    dim = dit_config.num_attention_heads * dit_config.attention_head_dim
    return dit_config.num_layers * block_flops(tokens, dim, dit_config.ffn_dim, text_tokens)
