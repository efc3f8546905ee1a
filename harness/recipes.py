"""The fp8 recipes (--fp8-recipe): which parts of a DiT expert a quantized precision quantizes.

One table, read by every backend that quantizes the experts: `modelopt` (and so the fp8/int8 TensorRT engines built
from its Q/DQ export; int8 SmoothQuant takes the same layer choice) and `torch-fp8`. Every recipe keeps what lies
outside the transformer blocks in high precision (bf16) and names the blocks it quantizes; inside a quantized
block each backend quantizes what it can (ModelOpt: every linear, and fp8 self-attention's Q, K, V and softmax;
torch-fp8: the linears whose dims are multiples of 16, and self-attention where its kernel is an fp8 one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from harness.errors import HarnessError

# Outside the blocks, kept in high precision by every recipe:
#   patch_embedding     the Conv3d that embeds the latents,
#   condition_embedder  the timestep and text embedders, with the modulation projection (time_proj),
#   proj_out            the output projection.
# Measured with ModelOpt, fp8 calibrated on the loop, fp32 tiny DiT at 128x128x9, rel L2 of one expert forward on
# held-out loop inputs against fp32: FP8_DEFAULT_CFG as it is 0.048 (it quantizes the embedders), these three kept
# high 0.020; quantizing proj_out as well 0.059. On the proxy at A14B width (2 of 40 layers, 480p, H100, calibrated
# on 3 random-input forwards): 0.049, outside the fp8 band of 0.028, against 0.019 with these kept high, the error
# of torch-fp8 (0.0195), which keeps the same layers in bf16. Norms and the modulation tables are no matmuls and
# are never quantized.
HIGH_PRECISION_MODULES = ("patch_embedding", "condition_embedder", "proj_out")


@dataclass(frozen=True)
class Recipe:
    name: str
    edge: int  # blocks kept in high precision at each end of the stack: 0..edge-1 and N-edge..N-1 of N
    about: str


RECIPES = {r.name: r for r in (
    Recipe("all-blocks", 0, "every block quantized"),
    # ModelOpt's diffusers example for Wan2.2 (filter_func_wan_video, quantize.py --model wan2.2-t2v-14b --format
    # fp8 --quantize-mha) keeps blocks 0, 1, 2, 37, 38 and 39 of 40 in high precision beside the embedders and
    # proj_out. Its --quantize-mha quantizes every attention whose head size is a multiple of 16, cross-attention
    # too; here cross-attention's Q/K/V stay 16-bit under every recipe (its projections are quantized): vLLM-Omni
    # reported fp8 attention with the FFN on long Wan2.2 sequences at LPIPS 0.93, 0.52 without cross-attention,
    # the FFN alone stable.
    Recipe("nvidia", 3, "ModelOpt's Wan2.2 example: blocks 0-2 and the last three stay bf16, fp8 self-attention"),
)}
FP8_RECIPES = tuple(RECIPES)  # the first is the default: today's behaviour

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """The index of the transformer block a module (or quantizer) name lies in, or None outside the blocks."""
    match = _BLOCK.search(name)
    return int(match[1]) if match else None


def expert_layers(module: torch.nn.Module) -> int:
    """How many transformer blocks `module` holds (a meta skeleton too): one past the highest block index."""
    return 1 + max((i for i in (block_index(n) for n, _ in module.named_modules()) if i is not None), default=-1)


def quantized_blocks(recipe: str, layers: int) -> tuple[int, ...]:
    """The blocks `recipe` quantizes in an expert of `layers` blocks; HarnessError where it would quantize none."""
    if recipe not in RECIPES:
        raise HarnessError(f"--fp8-recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    edge = RECIPES[recipe].edge
    blocks = tuple(range(edge, layers - edge))
    if not blocks:
        raise HarnessError(f"--fp8-recipe {recipe} keeps blocks 0-{edge - 1} and the last {edge} of each expert in "
                           f"high precision, so an expert of {layers} layers would quantize nothing; use "
                           f"--fp8-recipe {FP8_RECIPES[0]}, or an expert of more than {2 * edge} layers "
                           f"(e.g. --model-source proxy --proxy-layers {2 * edge + 2})")
    return blocks


def block_ranges(blocks) -> str:
    """Block indices written as ranges: (0, 1, 2, 5, 7, 8) -> '0-2, 5, 7-8'; '' for none."""
    spans: list[list[int]] = []
    for i in sorted(blocks):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
