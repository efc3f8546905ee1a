"""The memory plan: what each case family holds on the device, phase by phase, at the run's size, computed from
parameter counts and activation sizes before anything is built, so that a run that cannot fit is refused in one
line instead of dying in its tenth minute.

Two regimes. Where every model the run needs fits the card at once, the session keeps them resident, as it always
did. Where they do not, the weighted components take turns on the device (harness.residency): one component at
a time, beside the candidates' own copies (an fp8 expert, an engine), which stay for the session. The plan follows
the order the cases run in, so a phase counts the copies built before it, not every copy of the run.

The weights are exact: each component is built on the meta device and counted. Activations are estimates: for a
DiT forward, the tensors alive at its peak counted by hand; for the VAE decoder, its measured peaks less its weights
(docs/hardware.md, "Memory", which also holds the peaks measured against the plan at 2 and 40 layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.backends import BACKENDS, QUANTIZED_BYTES, load
from harness.case import COMPONENTS, DIT_COMPONENTS, PRECISIONS, eager_precision, is_dit, is_quantized
from harness.errors import HarnessError
from harness.memory import meminfo
from harness.models import skeletons
from harness.perf import perf_precision_of
from harness.pipeline import REFERENCE, Precisions
from harness.recipes import expert_layers, quantized_blocks
from harness.residency import module_bytes
from harness.shapes import VideoShape

GiB = 2 ** 30
# Device memory no tensor of ours can use: the CUDA context, cuBLAS and cuDNN workspaces, the allocator's slack.
RESERVED = 2 * GiB
# Live bytes at a DiT block's peak per token, per 2-byte element: the FFN's up-projection and its GELU output
# (2 x ffn) beside the residual stream and the norms' fp32 temporaries (about 4 x dim), counted by hand.
DIT_ACTIVATION = {"ffn": 2.0, "dim": 4.0}
# The VAE decoder's live bytes per output pixel per 2-byte element (its per-frame cache and the decoded frames):
# 4.45 GiB at 480p in bf16 and 8.8 GiB in fp32 on an H100 (docs/hardware.md).
VAE_ACTIVATION = 5980
FAMILIES = ("parity", "quality", "perf", "export")


@dataclass(frozen=True)
class Part:
    what: str
    nbytes: int


@dataclass(frozen=True)
class Phase:
    """One moment of a case family: what is on the device at once."""

    family: str
    shape: VideoShape
    label: str
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{p.what} {p.nbytes / GiB:.1f}" for p in self.parts if p.nbytes >= GiB // 20)


@dataclass(frozen=True)
class MemoryPlan:
    """Every phase of every case family of a run, and the card they must fit."""

    card_bytes: int
    card: str  # where the number comes from: "--gpu-memory 80", "NVIDIA H100 80GB HBM3", "host memory"
    offloads: bool  # components take turns on the device (harness.residency) instead of all staying resident
    phases: tuple[Phase, ...]
    host_bytes: int  # host memory for the components' copies while they wait there

    @property
    def usable_bytes(self) -> int:
        return self.card_bytes - RESERVED

    def peak(self, family: str, shape: VideoShape | None = None) -> Phase | None:
        """The family's largest phase (at `shape`, or at any of the run's shapes)."""
        phases = [p for p in self.phases if p.family == family and shape in (None, p.shape)]
        return max(phases, key=lambda p: p.nbytes, default=None)

    def fits(self, phase: Phase) -> bool:
        return phase.nbytes <= self.usable_bytes

    def check(self, families: tuple[str, ...] = FAMILIES) -> None:
        """Refuse, in one line, a run whose largest phase among `families` does not fit the card."""
        peaks = [p for p in (self.peak(f) for f in families) if p is not None]
        worst = max(peaks, key=lambda p: p.nbytes, default=None)
        if worst is None or self.fits(worst):
            return
        raise HarnessError(f"{worst.family} at {worst.shape.id} needs {worst.nbytes / GiB:.1f} GiB on the device "
                           f"({worst.label}: {worst.describe()} GiB) but {self.card} leaves "
                           f"{self.usable_bytes / GiB:.1f} GiB; {self._what_fits(worst)}")

    def _what_fits(self, worst: Phase) -> str:
        need = math.ceil((worst.nbytes + RESERVED) / GiB)
        return (f"run fewer --proxy-layers, a smaller --shapes, fewer --precisions or --backends, or a card of "
                f"at least {need} GiB (`python -m harness plan` shows every phase)")

    def table(self) -> str:
        """Per family and shape: the planned peak, its phase and parts, and whether it fits (Markdown)."""
        lines = [f"card: {self.card}, {self.card_bytes / GiB:.1f} GiB ({self.usable_bytes / GiB:.1f} usable); "
                 + ("components take turns on the device, each waiting in host memory or rebuilt "
                    f"({self.host_bytes / GiB:.1f} GiB of host copies at most)" if self.offloads
                    else "every model stays resident"), "",
                 "| family | shape | planned peak GiB | fits | largest phase | its parts (GiB) |",
                 "|---|---|---|---|---|---|"]
        for family in FAMILIES:
            for shape in dict.fromkeys(p.shape for p in self.phases):
                worst = self.peak(family, shape)
                if worst is not None:
                    lines.append(f"| {family} | {shape.id} | {worst.nbytes / GiB:.1f} | "
                                 f"{'yes' if self.fits(worst) else '**no**'} | {worst.label} | {worst.describe()} |")
        return "\n".join(lines)


def activation_bytes(component: str, config, dtype: torch.dtype, shape: VideoShape, batch: int = 1) -> int:
    """What one inference forward of `component` keeps alive at its peak, beyond its weights."""
    scale = torch.finfo(dtype).bits / 16
    if is_dit(component):
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        per_token = DIT_ACTIVATION["ffn"] * config["ffn_dim"] + DIT_ACTIVATION["dim"] * dim
        return int(batch * shape.tokens * per_token * 2 * scale)
    if component == "vae_decoder":
        return int(VAE_ACTIVATION * 2 * scale * shape.height * shape.width)
    return int(batch * 512 * (3 * config["d_ff"] + 8 * config["d_model"]) * 2 * scale)


class _Weights:
    """Each component's bytes at each dtype, counted on meta-device builds (made once per dtype)."""

    def __init__(self, settings):
        self.settings = settings
        self._built: dict[torch.dtype, dict[str, torch.nn.Module]] = {}

    def module(self, component: str, precision: str) -> torch.nn.Module:
        dtype = PRECISIONS[eager_precision(precision)]
        if dtype not in self._built:
            s = self.settings
            self._built[dtype] = skeletons(s.source, dtype, layers=s.proxy_layers, path=s.model_path)
        return self._built[dtype]["vae" if component == "vae_decoder" else component]

    def nbytes(self, component: str, precision: str) -> int:
        return module_bytes(self.module(component, precision))

    def config(self, component: str) -> dict:
        config = self.module(component, self.settings.precisions[0]).config
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers' kind

    def activation(self, component: str, precision: str, shape: VideoShape, batch: int = 1) -> int:
        dtype = PRECISIONS[eager_precision(precision)]
        return activation_bytes(component, self.config(component), dtype, shape, batch)

    def held(self, backend: str, component: str, precision: str) -> int:
        """What `backend` keeps of its own on the device for (component, precision), as its spec declares
        (harness.backends.HOLDS): a quantized copy, an engine."""
        holds = BACKENDS[backend].holds
        if holds == "quantized copy" and is_quantized(precision):
            module = self.module(component, precision)
            blocks = quantized_blocks(self.settings.backend_options.fp8_recipe, expert_layers(module))
            return load(QUANTIZED_BYTES)(module, blocks)
        return 0 if holds == "nothing" else self.nbytes(component, precision)


def _backends_running(settings, precision: str) -> list[str]:
    return [b for b in settings.backends if precision in BACKENDS[b].precisions]


class _Planner:
    """Walks a run's case families in their order, keeping what stays on the device as they go."""

    def __init__(self, settings, offloads: bool, weights: _Weights):
        self.s, self.offloads, self.w = settings, offloads, weights
        self.phases: list[Phase] = []
        self.loaded: dict[str, None] = {}  # the precisions whose whole model the session has built so far, in order

    def _phase(self, family: str, shape: VideoShape, label: str, running: list[tuple[str, str]], held: dict,
               act: int) -> None:
        """`running`: the (component, precision) pairs this phase runs eagerly. Where nothing takes turns, the session
        keeps the whole model of every precision it has built (harness.session.Session.model), from the first
        phase that ran one of its components on."""
        self.loaded.update(dict.fromkeys(eager_precision(p) for _, p in running))
        pairs = running if self.offloads else [(c, p) for p in self.loaded for c in COMPONENTS]
        parts = [Part(f"{c} {eager_precision(p)}", self.w.nbytes(c, p)) for c, p in pairs]
        self.phases.append(Phase(family, shape, label, tuple(parts) + tuple(Part(k, v) for k, v in held.items() if v)
                                 + (Part("activations", act),)))

    def _hold(self, held: dict, backend: str, component: str, precision: str) -> None:
        held[f"{backend} {component} {precision}"] = self.w.held(backend, component, precision)

    def parity(self, shape: VideoShape) -> None:
        """Per component: the fp32 reference, the eager run, then each candidate, built for the case and let go after
        it where the components take turns (harness.session.Session.parity)."""
        for component in COMPONENTS:
            for precision in self.s.precisions:
                if is_quantized(precision) and not is_dit(component):
                    continue
                held: dict[str, int] = {}
                for reference in dict.fromkeys(("fp32", eager_precision(precision))):
                    self._phase("parity", shape, f"{component} in {reference}, eager", [(component, reference)], held,
                                self.w.activation(component, reference, shape))
                if is_quantized(precision):  # calibrated on the eager loop's inputs
                    self._loop("parity", shape, Precisions.as_run(eager_precision(precision)), held)
                for backend in _backends_running(self.s, precision):
                    self._hold(held, backend, component, precision)
                    self._phase("parity", shape, f"{component} {precision} on {backend}", [], held,
                                self.w.activation(component, precision, shape))

    def _loop(self, family: str, shape: VideoShape, precisions: Precisions, held: dict) -> None:
        """An eager generation: each component in turn in its precision, its activations at the run's shape."""
        for component in COMPONENTS:
            precision = eager_precision(precisions.of(component))
            self._phase(family, shape, f"{component} in {precision}, eager loop", [(component, precision)], held,
                        self.w.activation(component, precision, shape))

    def quality(self, shape: VideoShape) -> None:
        """The fp32 video, eager's at each precision and each candidate's, the components not under test in fp32
        (harness.pipeline.Precisions.judged; cases/test_quality.py)."""
        held: dict[str, int] = {}
        for precision in (p for p in self.s.precisions if p != "fp32"):
            self._loop("quality", shape, REFERENCE, held)
            self._loop("quality", shape, Precisions.judged(precision).eager, held)
            for backend in _backends_running(self.s, precision):
                for component in DIT_COMPONENTS:
                    self._hold(held, backend, component, precision)
                self._loop("quality", shape, Precisions.judged(precision).eager, held)

    def perf(self, shape: VideoShape) -> None:
        held: dict[str, int] = {}
        for backend in (b for b in self.s.backends if b != "torch"):
            precision = perf_precision_of(backend, self.s)
            if is_quantized(precision):
                self._loop("perf", shape, Precisions.as_run(eager_precision(precision)), held)
            for component in COMPONENTS:
                if is_quantized(precision) and not is_dit(component):
                    continue  # the quantized backends time the experts only (cases/test_perf.py)
                self._hold(held, backend, component, precision)
                self._phase("perf", shape, f"{component}: eager {eager_precision(precision)} and {backend}",
                            [(component, precision)], held, self.w.activation(component, precision, shape))

    def export(self, shape: VideoShape) -> None:
        for component in COMPONENTS:
            for precision in self.s.precisions:
                self._phase("export", shape, f"{component} {precision}, exported", [(component, precision)], {},
                            self.w.activation(component, precision, shape))


def card_memory(settings) -> tuple[int, str]:
    """The memory the run's device has, in bytes, and where the number comes from."""
    if settings.gpu_memory is not None:
        return int(settings.gpu_memory * GiB), f"--gpu-memory {settings.gpu_memory:g}"
    if settings.device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, props.name
    return meminfo("MemTotal") or 1 << 50, "this machine's host memory (--device cpu)"  # none: nothing to refuse by


def _walk(settings, families: tuple[str, ...], offloads: bool, weights: "_Weights") -> _Planner:
    planner = _Planner(settings, offloads, weights)
    for shape in settings.shapes:
        for family in (f for f in FAMILIES if f in families):
            getattr(planner, family)(shape)
    return planner


def memory_plan(settings, families: tuple[str, ...] = FAMILIES) -> MemoryPlan:
    """The plan of a run of `families` (the case families it selected): resident if every model they need fits at
    once, else taking turns (harness.residency)."""
    card_bytes, card = card_memory(settings)
    weights = _Weights(settings)  # the meta-device builds, made once for both walks
    resident = _walk(settings, families, False, weights)
    if all(p.nbytes <= card_bytes - RESERVED for p in resident.phases):
        return MemoryPlan(card_bytes, card, False, tuple(resident.phases), 0)
    turns = _walk(settings, families, True, weights)
    host = sum(weights.nbytes(c, p) for c in COMPONENTS for p in dict.fromkeys(map(eager_precision, settings.precisions)))
    return MemoryPlan(card_bytes, card, True, tuple(turns.phases), host)
