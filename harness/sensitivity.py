"""Which parts of an fp8 DiT expert cost its accuracy: each part quantized alone, on the held-out loop's inputs.

A part is a layer family (self-attention's projections, fp8 self-attention itself, cross-attention, the FFN) or one
transformer block. Its error is the rel L2 of the expert's output with only that part's quantizers on, against the
same expert with none on (which computes the eager bf16 forward bit for bit), on every held-out loop call: the
quality prompts' CFG branches at each of the expert's denoising steps. Two more rows frame the parts: `none` (must
be 0) and `all` (the whole recipe, the candidate). Errors of parts do not add up to `all`: they interact.

The speed side is an estimate, never a measurement: each part's share of the expert's matmul FLOPs (linears and
attention, from one forward), and how much slower the candidate's matmuls would be with that part kept in bf16,
timing every matmul at the best rates measured on Hopper (harness/thresholds.toml [floors]). Norms, RoPE, the
quantize kernels and launch overheads are left out, so it ranks parts; it does not predict a speed-up.

The quantized module comes from the caller (the `modelopt` backend's simulation: cases/test_sensitivity.py), with
a context manager that leaves only a given set of its quantizers on.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from harness.cache import atomic_write_bytes
from harness.compare import rel_l2
from harness.profile import floor_tflops
from harness.recipes import block_index, block_ranges

FAMILIES = {
    "self_attn_proj": "self-attention projections (attn1 Q/K/V/out)",
    "self_attn_fp8": "self-attention itself in fp8 (Q/K/V and softmax)",
    "cross_attn": "cross-attention over the text (attn2)",
    "ffn": "feed-forward (ffn)",
}
# ModelOpt's names for the quantizers inside attention (on its matmuls, not on a linear's input or weight)
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer",
                        "bmm2_output_quantizer")


def family_of(quantizer: str) -> str | None:
    """The FAMILIES key of a quantizer by its module name; None outside them (e.g. outside the blocks)."""
    parts = quantizer.split(".")
    if "attn1" in parts:
        return "self_attn_fp8" if parts[-1] in ATTENTION_QUANTIZERS else "self_attn_proj"
    return "cross_attn" if "attn2" in parts else "ffn" if "ffn" in parts else None


def matmul_of(quantizer: str) -> str:
    """The matmul a quantizer feeds: its linear's module name, or '<attention module>:attention'."""
    owner, name = quantizer.rsplit(".", 1)
    return f"{owner}:attention" if name in ATTENTION_QUANTIZERS else owner


def matmul_flops(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple[str, int]]:
    """Every matmul of one forward of `module` on `inputs`: name (as matmul_of writes it) -> (gemm | attention, FLOPs).

    A linear is 2 x rows x in x out; an attention (a module with to_q and inner_dim, as diffusers' are) is
    QK^T and PV, 4 x batch x queries x keys x inner_dim.
    """
    found: dict[str, tuple[str, int]] = {}
    hooks = []

    def linear(name):
        return lambda m, args, out: found.__setitem__(name, ("gemm", 2 * args[0].numel() * m.out_features))

    def attention(name):
        def hook(m, args, kwargs, out):
            queries = args[0] if args else kwargs["hidden_states"]
            keys = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            keys = queries if keys is None else keys
            found[f"{name}:attention"] = ("attention", 4 * queries.shape[:-1].numel() * keys.shape[-2] * m.inner_dim)
        return hook

    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            hooks.append(sub.register_forward_hook(linear(name)))
        elif hasattr(sub, "to_q") and hasattr(sub, "inner_dim"):
            hooks.append(sub.register_forward_hook(attention(name), with_kwargs=True))
    try:
        with torch.inference_mode():
            module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return found


@dataclass(frozen=True)
class PartError:
    """One part's error on each held-out call, and what keeping it in bf16 would cost (estimated)."""

    name: str  # "none", "all", a FAMILIES key, or "block N"
    kind: str  # none | all | family | block
    what: str
    quantizers: int
    errors: tuple[float, ...]  # rel L2 per held-out call
    flop_share: float  # of the expert's matmul FLOPs
    est_slowdown_if_bf16: float  # the candidate's matmul time at the floor rates, +share, with this part in bf16

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def max(self) -> float:
        return max(self.errors)


@dataclass(frozen=True)
class Sensitivity:
    """The per-part errors of one quantized expert (a Result for the run's tables, too)."""

    title: str  # e.g. the case id and the recipe
    timesteps: tuple[int, ...]  # per held-out call
    parts: tuple[PartError, ...]  # in ranked() order
    est_matmul_speedup: float  # the candidate's matmuls against all-bf16 ones at the floor rates (estimated)

    def part(self, name: str) -> PartError:
        return next(p for p in self.parts if p.name == name)

    def by_timestep(self, part: PartError) -> dict[int, float]:
        """The part's mean error over the calls at each timestep (CFG branches, prompts), in loop order."""
        steps = sorted(set(self.timesteps), reverse=True)
        return {t: statistics.fmean(e for e, s in zip(part.errors, self.timesteps) if s == t) for t in steps}

    def table(self) -> list[dict]:
        """The ranked rows: none, all, the families by mean error, then the blocks by mean error."""
        rows, rank = [], {}
        for p in self.parts:
            rank[p.kind] = rank.get(p.kind, 0) + 1
            rows.append({"rank": rank[p.kind] if p.kind in ("family", "block") else "", "part": p.name,
                         "kind": p.kind, "what": p.what, "quantizers": p.quantizers, "rel_l2_mean": p.mean,
                         "rel_l2_max": p.max, **{f"rel_l2_t{t}": e for t, e in self.by_timestep(p).items()},
                         "matmul_flop_share": p.flop_share, "estimated_slowdown_if_bf16": p.est_slowdown_if_bf16})
        return rows

    def csv(self) -> str:
        rows = self.table()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
        return out.getvalue()

    def write(self, folder: Path, stem: str) -> list[Path]:
        """<stem>.csv and <stem>.png in `folder`, written atomically."""
        import matplotlib

        matplotlib.use("Agg")  # no display on CI runners
        import matplotlib.pyplot as plt

        table = Path(folder) / f"{stem}.csv"
        atomic_write_bytes(table, self.csv().encode())
        fig = self.figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        plot = Path(folder) / f"{stem}.png"
        atomic_write_bytes(plot, buffer.getvalue())
        return [table, plot]

    def figure(self):
        """Families (ranked), blocks (by index) and the error over the denoising steps, beside the whole recipe's."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        every = self.part("all")
        families = [p for p in self.parts if p.kind == "family"]
        blocks = sorted((p for p in self.parts if p.kind == "block"), key=lambda p: int(p.name.split()[1]))
        fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.2, 1.3, 1]})
        names = [p.name for p in families][::-1]
        left.barh(names, [p.mean for p in families][::-1],
                  xerr=[[0] * len(families), [p.max - p.mean for p in families][::-1]], color="tab:blue", capsize=3)
        for y, p in enumerate(families[::-1]):
            left.text(p.max, y, f"  {p.flop_share:.0%} of FLOPs, est. +{p.est_slowdown_if_bf16:.0%} if bf16",
                      va="center", fontsize=7)
        left.axvline(every.mean, color="red", linestyle="--", label=f"all: {every.mean:.3g}")
        left.set_xlim(0, 1.7 * max([every.mean, *(p.max for p in families)]))  # room for the labels
        left.set_xlabel("rel L2 vs bf16 eager, that family alone in fp8 (bar: mean, whisker: max)")
        left.set_title("by layer family", fontsize=9)
        left.legend(fontsize=7, loc="lower right")
        middle.bar([int(p.name.split()[1]) for p in blocks], [p.mean for p in blocks], color="tab:green")
        middle.xaxis.set_major_locator(MaxNLocator(integer=True))
        middle.axhline(every.mean, color="red", linestyle="--", label=f"all: {every.mean:.3g}")
        middle.set_xlabel(f"block (quantized: {block_ranges(int(p.name.split()[1]) for p in blocks)})")
        middle.set_ylabel("rel L2, that block alone in fp8 (mean over calls)")
        middle.set_title("by block", fontsize=9)
        middle.legend(fontsize=7)
        for p in (every, *families):
            steps = self.by_timestep(p)
            right.plot(range(len(steps)), list(steps.values()), marker="o", label=p.name,
                       linestyle="--" if p is every else "-", color="red" if p is every else None)
            right.set_xticks(range(len(steps)), [f"t={t}" for t in steps])
        right.set_xlabel("the expert's denoising steps (held-out loop, in order)")
        right.set_ylabel("rel L2 (mean over prompts and CFG branches)")
        right.set_title("over the denoising steps", fontsize=9)
        right.legend(fontsize=7)
        fig.suptitle(f"fp8 sensitivity: {self.title}; estimated matmul speed-up of the candidate over bf16 "
                     f"{self.est_matmul_speedup:.2f}x (floor rates, not measured)", fontsize=10)
        fig.tight_layout()
        return fig

    # the run's tables (harness.results.Result): the whole recipe, each family, the worst block
    def metrics(self) -> dict[str, float]:
        out = {"sens_all_rel_l2": self.part("all").mean}
        out.update({f"sens_{p.name}_rel_l2": p.mean for p in self.parts if p.kind == "family"})
        worst = next((p for p in self.parts if p.kind == "block"), None)
        if worst is not None:
            out.update(sens_worst_block=float(worst.name.split()[1]), sens_worst_block_rel_l2=worst.mean)
        out["sens_est_matmul_speedup"] = self.est_matmul_speedup
        return out

    def thresholds(self) -> dict:
        return {}

    def checks(self) -> dict:
        return {}


def measure(module: torch.nn.Module, only: Callable[[frozenset[str]], ContextManager], quantizers: list[str],
            calls: list[tuple[torch.Tensor, ...]], reference: list[torch.Tensor],
            flops: dict[str, tuple[str, int]], title: str) -> Sensitivity:
    """Run `module` on every call with each part's quantizers alone on (`only(names)` leaves just `names` of its
    `quantizers` on), against `reference` (the unquantized outputs of the same calls); `flops` from matmul_flops."""
    groups: dict[tuple[str, str], list[str]] = {("none", "none"): [], ("all", "all"): list(quantizers)}
    for name in quantizers:
        family = family_of(name)
        if family is not None:
            groups.setdefault(("family", family), []).append(name)
        if block_index(name) is not None:
            groups.setdefault(("block", f"block {block_index(name)}"), []).append(name)
    speed = _SpeedEstimate(flops, {matmul_of(q) for q in quantizers})
    parts = []
    for (kind, name), members in groups.items():
        with only(frozenset(members)), torch.inference_mode():
            errors = tuple(rel_l2(module(*call), expected) for call, expected in zip(calls, reference))
        what = {"none": "nothing quantized (must be 0)", "all": "the whole recipe: the candidate",
                "block": f"every quantizer of {name}"}.get(kind) or FAMILIES[name]
        matmuls = {matmul_of(q) for q in members}
        parts.append(PartError(name, kind, what, len(members), errors, speed.share(matmuls), speed.slowdown(matmuls)))
    order = {"none": 0, "all": 1, "family": 2, "block": 3}
    parts.sort(key=lambda p: (order[p.kind], -p.mean if math.isfinite(p.mean) else -math.inf))
    timesteps = tuple(int(call[1].flatten()[0]) for call in calls)
    return Sensitivity(title, timesteps, tuple(parts), speed.speedup())


class _SpeedEstimate:
    """The matmuls' time at the floor rates: fp8 for the quantized ones, bf16 for the rest."""

    def __init__(self, flops: dict[str, tuple[str, int]], quantized: set[str]):
        self.flops, self.quantized = flops, quantized
        self.total = sum(f for _, f in flops.values())
        self.candidate = sum(self._time(n, n in quantized) for n in flops)

    def _time(self, name: str, fp8: bool) -> float:
        kind, flops = self.flops.get(name, ("gemm", 0))
        return flops / floor_tflops(kind, "fp8" if fp8 else "bf16")

    def share(self, matmuls: set[str]) -> float:
        return sum(self.flops.get(n, ("", 0))[1] for n in matmuls) / self.total if self.total else 0.0

    def slowdown(self, matmuls: set[str]) -> float:
        extra = sum(self._time(n, False) - self._time(n, True) for n in matmuls & self.quantized)
        return extra / self.candidate if self.candidate else 0.0

    def speedup(self) -> float:
        return sum(self._time(n, False) for n in self.flops) / self.candidate if self.candidate else 0.0
