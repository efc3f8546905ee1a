"""--fp8-recipe: one table of which blocks fp8/int8 quantize, read the same way by torch-fp8's filter and by ModelOpt's
config (and so by the TensorRT engines built from its Q/DQ export), checked on a 40-layer A14B expert built on the
meta device: its structure and names, no weights. The engine side is tests/test_modelopt.py's recipe proof."""
from __future__ import annotations

import functools

import pytest

from engines.layer_precision import Gemm, precision_proof
from harness.components import dit_component
from harness.errors import HarnessError
from harness.models import load_expert
from harness.recipes import FP8_RECIPES, block_index, block_ranges, expert_layers, quantized_blocks

pytestmark = pytest.mark.unit
# What each recipe quantizes in the 40-layer A14B expert: ModelOpt's Wan2.2 example keeps blocks 0-2 and 37-39
EXPECTED = {"all-blocks": set(range(40)), "nvidia": set(range(3, 37))}


@pytest.fixture(scope="module")
def a14b_meta():
    """The 40-layer expert as the backends see it (the DiT wrapper names it transformer.blocks.N...)."""
    return dit_component(load_expert(40, device="meta"), "meta-skeleton").module


def test_the_recipes_name_the_blocks_they_quantize():
    assert FP8_RECIPES[0] == "all-blocks", "the default is the behaviour before recipes existed"
    assert quantized_blocks("nvidia", 7) == (3,) and quantized_blocks("all-blocks", 2) == (0, 1)
    with pytest.raises(HarnessError, match="an expert of 6 layers would quantize nothing; use --fp8-recipe all-blocks"):
        quantized_blocks("nvidia", 6)
    assert block_index("transformer.blocks.13.ffn.net.2.weight_quantizer") == 13 and block_index("blocks.1") == 1
    assert block_index("transformer.proj_out") is None and block_index("transformer.blocks") is None
    assert block_ranges((0, 1, 2, 37, 38, 39)) == "0-2, 37-39" and block_ranges((5, 3, 9)) == "3, 5, 9"


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_torch_fp8_filter_follows_the_recipe_on_a_40_layer_expert(recipe, a14b_meta):
    from engines.torch_fp8 import fp8_linear

    assert expert_layers(a14b_meta) == 40
    keep = functools.partial(fp8_linear, blocks=quantized_blocks(recipe, 40))
    picked = [name for name, m in a14b_meta.named_modules() if keep(m, name)]
    assert {block_index(n) for n in picked} == EXPECTED[recipe], "exactly the recipe's blocks run fp8 GEMMs"
    assert len(picked) == 10 * len(EXPECTED[recipe]), "attn1 and attn2 Q, K, V, out and the FFN's two, per block"
    assert not [n for n in picked if any(k in n for k in ("patch_embedding", "condition_embedder", "proj_out"))]


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_modelopt_config_follows_the_recipe_on_a_40_layer_expert(recipe, a14b_meta):
    """ModelOpt's own matching (its quantizers inserted into a copy, the config applied, nothing calibrated)."""
    from engines.modelopt import modelopt_reason, planned_quantizers

    reason = modelopt_reason()
    if reason:
        pytest.skip(reason)
    on = planned_quantizers(a14b_meta, "fp8", recipe)
    assert {block_index(n) for n in on} == EXPECTED[recipe], "embedders and proj_out too stay high precision"
    per_block = {}
    for name in on:
        per_block.setdefault(block_index(name), []).append(name.split(".", 3)[-1])
    assert all(sorted(names) == sorted(per_block[3]) for names in per_block.values()), "each block alike"
    assert len(per_block[3]) == 24 and "attn1.softmax_quantizer" in per_block[3], \
        "10 linears x (input, weight) and fp8 self-attention's Q, K, V and softmax"
    assert not [n for n in per_block[3] if n.startswith("attn2") and "bmm" in n], "cross-attention's Q/K/V stay 16-bit"
    int8 = planned_quantizers(a14b_meta, "int8", recipe)
    assert {block_index(n) for n in int8} == EXPECTED[recipe], "int8 takes the same blocks"


def _gemm(block: int | None, precision: str, flops: int = 1000) -> Gemm:
    """One linear GEMM of the builder's layer log: in block `block`, or outside the blocks (None)."""
    return Gemm(f"gemm-{block}-{precision}", "" if block is None else f"blocks.{block}", "" if block is None else "ffn",
                "linear", precision, flops)


def test_the_proof_line_gives_the_recipes_share_and_the_whole_experts():
    """nvidia on a 7-layer expert quantizes block 3 alone: all of that block's GEMM work is fp8, a seventh of the
    blocks', less of the expert's with proj_out; the line says both."""
    rows = [_gemm(i, "fp8" if i == 3 else "bf16") for i in range(7)] + [_gemm(None, "bf16", 500)]
    proof = precision_proof(rows, "fp8", quantized_blocks=quantized_blocks("nvidia", 7))
    assert str(proof).startswith("100.0% of the recipe's 1,000 block GEMM FLOPs in fp8, 13.3% of the expert's 7,500; "
                                 "fp8 GEMMs in blocks 3; self-attention: none seen"), str(proof)
    assert proof.shortfall(0.95) == "" and all(proof.verdicts(0.95).values())


@pytest.mark.parametrize("precisions, needle", [
    (("fp8", "bf16"), "fp8 GEMMs in blocks 0, where the recipe means blocks 0-1; 50.0% of their GEMM FLOPs in fp8 "
                      "(at least 95% needed)"),
    (("bf16", "bf16"), "nothing runs in fp8: no block has a GEMM in fp8, where the recipe means blocks 0-1; 0.0% of"),
    (("fp8", "fp8", "fp8"), "fp8 GEMMs in blocks 0-2, where the recipe means blocks 0-1; 100.0% of"),
], ids=["a-block-left-out", "nothing-quantized", "a-block-kept-high-quantized"])
def test_the_proof_says_which_blocks_were_meant_and_found(precisions, needle):
    rows = [_gemm(i, p) for i, p in enumerate(precisions)]
    proof = precision_proof(rows, "fp8", quantized_blocks=(0, 1))
    assert proof.shortfall(0.95).startswith(needle), proof.shortfall(0.95)
