"""A Case names one thing to measure: component, shape, precision, batch, model source, shape mode, GPU layout."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from harness.errors import check_choice
from harness.shapes import VideoShape

COMPONENTS = ("transformer", "transformer_2", "vae_decoder", "text_encoder")
# The two DiT experts: high-noise first, low-noise after the boundary. fp8/int8 and ONNX dynamic axes apply to them.
DIT_COMPONENTS = ("transformer", "transformer_2")
# What a case may measure besides one whole component: several components at once (a CFG step, the loop,
# the video), or a part of one (one DiT block and its kernel regions, the self-attention kernel alone, one of
# the block's GEMMs alone).
STAGES = ("cfg_step", "denoising_loop", "video", "end_to_end", "block", "attention", "gemm")
# fp8 means bf16 activations with fp8 e4m3 matmuls (and attention where the backend has it); int8 the same with
# int8 matmuls (SmoothQuant-style), for GPUs without fp8 (compute capability 8.0 and 8.6).
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16,
              "int8": torch.bfloat16}
# The precisions that quantize the DiT experts' matmuls; the text encoder and the VAE stay bf16 beside them.
QUANTIZED = ("fp8", "int8")


def precision_of(dtype: torch.dtype) -> str:
    """The eager precision computing in `dtype` (fp8 and int8 compute in bf16 too, but have no eager run)."""
    return next(name for name, d in PRECISIONS.items() if d == dtype and not is_quantized(name))


def is_quantized(precision: str) -> bool:
    return precision in QUANTIZED


def eager_precision(precision: str) -> str:
    """The eager precision a case runs beside and is judged against: fp8 and int8 have no eager run, so bf16."""
    return "bf16" if is_quantized(precision) else precision


def is_dit(component: str) -> bool:
    return component in DIT_COMPONENTS


def check_component(name: str) -> str:
    return check_choice("component", name, COMPONENTS)


def check_precision(name: str) -> str:
    return check_choice("precision", name, PRECISIONS)


@dataclass(frozen=True)
class Layout:
    """How one video is spread over ranks (one GPU each): the two CFG branches on `cfg` ranks (1 or 2), and
    each forward's tokens split over `ring` x `ulysses` ranks; the world is the product. The default is one GPU."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """The ranks one forward's tokens are split over (diffusers' context parallelism)."""
        return self.ulysses * self.ring

    @property
    def forward(self) -> "Layout":
        """The layout one expert forward runs under: its token split; the CFG pair runs whole forwards."""
        return Layout(ulysses=self.ulysses, ring=self.ring)

    @property
    def spec(self) -> str:
        """The --parallel spelling: 'cfg2,ulysses2', or 'none' for one GPU."""
        degrees = (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring))
        return ",".join(f"{axis}{n}" for axis, n in degrees if n > 1) or "none"


ONE_GPU = Layout()


@dataclass(frozen=True)
class Case:
    """One parametrization; `id` is both the pytest id and the readable part of cache keys."""

    component: str
    shape: VideoShape
    precision: str = "fp32"
    batch: int = 1
    source: str = "tiny"
    dynamic: bool = False
    variant: str = ""  # e.g. "prompt1": tells apart runs of one stage that differ only in their inputs
    layout: Layout = ONE_GPU  # in the id when several GPUs run the case, so its rows never meet one GPU's

    def __post_init__(self):
        if self.component not in STAGES:
            check_component(self.component)
        check_precision(self.precision)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def id(self) -> str:
        mode = "-dynamic" if self.dynamic else ""
        variant = f"-{self.variant}" if self.variant else ""
        layout = "" if self.layout == ONE_GPU else "-" + self.layout.spec.replace(",", "-")
        return f"{self.component}-{self.source}-{self.shape.id}-{self.precision}-b{self.batch}{mode}{variant}{layout}"

    def with_precision(self, precision: str) -> "Case":
        return dataclasses.replace(self, precision=precision)
