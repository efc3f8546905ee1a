"""What TensorRT built, layer by layer: the builder's detailed layer information parsed into a GEMM precision
table, and the proof that an engine runs its DiT blocks' GEMMs (and self-attention) in fp8 or int8.

With profiling verbosity DETAILED the builder logs the engine's layers itself, as one VERBOSE message that
starts with "Layers:" and has one line per engine layer: name, LayerType, the Inputs / Constants / Outputs
tensors (Dimensions, Datatype), TacticName and the ONNX nodes it came from (Metadata). That needs no GPU,
where IEngineInspector needs a deserialized engine, which a CPU-only machine cannot make. In an
ahead-of-time build GEMM tactics read __myelin_CASK_STUB (kernels are picked when the engine is
JIT-compiled on the user's GPU), so the table proves operand types and fusion, not speed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from harness.recipes import block_index, block_ranges

LAYERS_HEADER = "Layers:"
# TensorRT's datatype names -> the harness's precision names
DTYPES = {"FP8": "fp8", "Int8": "int8", "Half": "fp16", "BFloat16": "bf16", "Float": "fp32", "Int32": "int32",
          "Int64": "int64", "Bool": "bool", "UInt8": "uint8", "FP4": "fp4"}
_TENSOR = re.compile(r"\{ Name: (?P<name>[^,]*), Dimensions: \[(?P<dims>[^\]]*)\].*?Datatype: (?P<dtype>\w+)")
_BLOCK_PART = re.compile(r"/(?P<block>blocks\.\d+)/(?P<part>attn1|attn2|ffn)\b")
# the node a GEMM layer computes (a fused layer also lists nodes of the next layer's input, maybe another block's)
_GEMM_NODE = re.compile(r"/(MatMul(_\d+)?|Gemm)$")


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class EngineLayer:
    name: str
    kind: str  # TensorRT's LayerType: gemm, kgen, runtime_fusion, ...
    inputs: tuple[Tensor, ...]
    constants: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    tactic: str
    onnx_nodes: tuple[str, ...]


@dataclass(frozen=True)
class Gemm:
    """One GEMM-like engine layer: where it sits in the DiT, what it is, in which precision, how many FLOPs."""

    layer: str
    block: str  # "blocks.N", or "" outside the blocks (embedders, proj_out)
    part: str  # attn1 | attn2 | ffn inside a block
    kind: str  # linear (activation x weight) | batched (activation x activation) | fused_mha
    precision: str  # the operands' precision, e.g. fp8, or "fp8 x fp16" when they differ
    flops: int


def parse_layers(text: str) -> list[EngineLayer]:
    """Every engine layer of the builder's "Layers:" message."""
    return [_layer(line) for line in text.splitlines() if line.startswith("Name: ")]


def _layer(line: str) -> EngineLayer:
    kind = re.search(r"LayerType: (\w+)", line)
    tactic = re.search(r"TacticName: ([^,]+)", line)
    return EngineLayer(line[len("Name: "):line.find(", LayerType")], kind.group(1) if kind else "",
                       _tensors(line, "Inputs"), _tensors(line, "Constants"), _tensors(line, "Outputs"),
                       tactic.group(1) if tactic else "", tuple(re.findall(r"ONNX Layer: ([^\]]+)\]", line)))


def _tensors(line: str, section: str) -> tuple[Tensor, ...]:
    """The tensors of one section: from `Section: [` to the `}]` that closes it (or `[]` when empty)."""
    start = line.find(f"{section}: [")
    if start < 0 or line.startswith("[]", start + len(section) + 2):
        return ()
    body = line[start:line.find("}]", start) + 1]
    return tuple(Tensor(m["name"], tuple(int(d) for d in m["dims"].split(",") if d), DTYPES.get(m["dtype"], m["dtype"]))
                 for m in _TENSOR.finditer(body))


def gemms(layers: list[EngineLayer], weight_inputs: frozenset[str] = frozenset()) -> list[Gemm]:
    """The GEMM-like layers: gemm layers, Myelin's GEMM+epilogue fusions (_Fc) and fused attention kernels.

    `weight_inputs` names the weights a plan takes as graph inputs (harness.weight_inputs): a GEMM reading one is
    a linear layer, as it is where the weight is a constant.
    """
    found = (_gemm(layer, weight_inputs) for layer in layers)
    return [g for g in found if g is not None]


def _gemm(layer: EngineLayer, weight_inputs: frozenset[str]) -> Gemm | None:
    fused_mha = layer.kind == "kgen" and re.search(r"mha", layer.tactic + layer.name, re.I) and len(layer.inputs) >= 3
    fused_gemm = layer.kind == "runtime_fusion" and "_Fc" in layer.name
    if not (fused_mha or fused_gemm or layer.kind == "gemm") or not layer.inputs:
        return None
    block, part = _where(layer)
    if fused_mha:
        q, _, v = layer.inputs[:3]
        flops = 2 * math.prod(q.dims[:-2]) * q.dims[-2] * v.dims[-2] * (q.dims[-1] + v.dims[-1])
        return Gemm(layer.name, block, part, "fused_mha", _precision(layer.inputs[:3]), flops)
    weights = [c for c in layer.constants if len(c.dims) >= 2 and math.prod(c.dims) > 1]  # not alpha/beta/scales
    weights += [t for t in layer.inputs[1:] if t.name in weight_inputs]
    a = layer.inputs[0]
    if weights:
        b, kind = max(weights, key=lambda c: math.prod(c.dims)), "linear"
    elif len(layer.inputs) >= 2:
        b, kind = layer.inputs[1], "batched"
    else:
        return None
    k = a.dims[-1]
    n = b.dims[-1] if b.dims[-2] == k else b.dims[-2]
    return Gemm(layer.name, block, part, kind, _precision((a, b)), 2 * math.prod(a.dims[:-1]) * k * n)


def _precision(operands) -> str:
    kinds = sorted({t.dtype for t in operands})
    return kinds[0] if len(kinds) == 1 else " x ".join(kinds)


def _where(layer: EngineLayer) -> tuple[str, str]:
    own = [n for n in layer.onnx_nodes if _GEMM_NODE.search(n)] or list(layer.onnx_nodes)
    for node in own:
        match = _BLOCK_PART.search(node)
        if match:
            return match["block"], match["part"]
    return "", ""


@dataclass(frozen=True)
class PrecisionProof:
    """How much of the quantized blocks' GEMM work an engine runs in `target`, how their self-attention ran, and
    which blocks run `target` GEMMs at all: with an --fp8-recipe that keeps blocks high, exactly the others."""

    target: str
    block_gemm_flops: int  # every linear GEMM inside the quantized blocks (or the expected total, where larger)
    target_gemm_flops: int  # those with both operands in `target`
    self_attention: tuple[str, ...]  # per self-attention layer of the quantized blocks: "fused_mha fp8", ...
    target_blocks: tuple[int, ...] = ()  # every block with a GEMM (linear or attention) with an operand in `target`
    quantized_blocks: tuple[int, ...] = ()  # the blocks meant to run in `target` (the recipe's)
    expert_gemm_flops: int = 0  # every linear GEMM of the engine: each block's, the embedders' and proj_out's

    @property
    def share(self) -> float:
        return self.target_gemm_flops / self.block_gemm_flops if self.block_gemm_flops else 0.0

    @property
    def expert_share(self) -> float:
        """The share of the whole expert's GEMM work in `target`: a recipe that keeps blocks high runs less than its
        own blocks' share."""
        return self.target_gemm_flops / self.expert_gemm_flops if self.expert_gemm_flops else 0.0

    @property
    def fused_self_attention(self) -> bool:
        """Self-attention is one fused MHA kernel in `target` in every quantized block."""
        return bool(self.self_attention) and all(a == f"fused_mha {self.target}" for a in self.self_attention)

    @property
    def blocks_as_meant(self) -> bool:
        """`target` GEMMs run in the quantized blocks and in no block kept high."""
        return self.target_blocks == self.quantized_blocks

    def __str__(self) -> str:
        kept = "" if self.blocks_as_meant else f" (meant: {block_ranges(self.quantized_blocks) or 'none'})"
        return (f"{self.share:.1%} of the recipe's {self.block_gemm_flops:,} block GEMM FLOPs in {self.target}, "
                f"{self.expert_share:.1%} of the expert's {self.expert_gemm_flops:,}; {self.target} GEMMs in blocks "
                f"{block_ranges(self.target_blocks) or 'none'}{kept}; self-attention: "
                f"{', '.join(self.self_attention) or 'none seen'}")

    def verdicts(self, min_share: float) -> dict[str, bool]:
        """The proof's two verdicts, by the metric names of the export table: at least `min_share` of the recipe's
        blocks' GEMM work in `target`, and `target` GEMMs in exactly the recipe's blocks."""
        return {"quantized_gemm_share": self.share >= min_share, "quantized_blocks": self.blocks_as_meant}

    def shortfall(self, min_share: float) -> str:
        """Why this engine is not the one its recipe asks for, in one line ('' when it is): the blocks meant and
        found, and the share of the recipe's GEMM work in `target` against `min_share`."""
        if all(self.verdicts(min_share).values()):
            return ""
        target, found, meant = self.target, block_ranges(self.target_blocks), block_ranges(self.quantized_blocks)
        if not self.target_blocks:
            what = f"nothing runs in {target}: no block has a GEMM in {target}, where the recipe means blocks {meant}"
        elif not self.blocks_as_meant:
            what = f"{target} GEMMs in blocks {found}, where the recipe means blocks {meant}"
        else:
            what = f"{target} GEMMs in blocks {found}, as the recipe means"
        return f"{what}; {self.share:.1%} of their GEMM FLOPs in {target} (at least {min_share:.0%} needed)"


def precision_proof(rows: list[Gemm], target: str, expected_flops: int = 0,
                    quantized_blocks: tuple[int, ...] | None = None) -> PrecisionProof:
    """The proof over `rows` (gemms()) for the blocks `quantized_blocks` numbers (None: every block in the rows).
    `expected_flops`, those blocks' linear FLOPs from the module itself, guards against GEMMs the log hides inside
    other kernels: they count as not `target`."""
    in_blocks = [g for g in rows if g.block]
    if quantized_blocks is None:
        quantized_blocks = tuple(sorted({block_index(g.block) for g in in_blocks}))
    meant = [g for g in in_blocks if block_index(g.block) in quantized_blocks]
    linear = [g for g in meant if g.kind == "linear"]
    attention = tuple(f"{g.kind} {g.precision}" for g in meant if g.part == "attn1" and g.kind != "linear")
    ran = tuple(sorted({block_index(g.block) for g in in_blocks if target in g.precision.split(" x ")}))
    block_flops = max(sum(g.flops for g in linear), expected_flops)
    outside = sum(g.flops for g in rows if g.kind == "linear") - sum(g.flops for g in linear)  # of the recipe's blocks
    return PrecisionProof(target, block_flops, sum(g.flops for g in linear if g.precision == target), attention, ran,
                          tuple(quantized_blocks), block_flops + outside)


def markdown_table(rows: list[Gemm]) -> str:
    """The GEMM rows as a markdown table (results files)."""
    lines = ["| engine layer | block | part | kind | precision | GFLOP |", "|---|---|---|---|---|---|"]
    lines += [f"| `{g.layer[:90]}` | {g.block or '-'} | {g.part or '-'} | {g.kind} | {g.precision} | "
              f"{g.flops / 1e9:.3f} |" for g in rows]
    return "\n".join(lines) + "\n"
