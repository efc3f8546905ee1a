"""The run plan: what each selected case runs, in the order the session runs it, and what that needs of the card, the
host and the disk, and how long it takes, made from parameter counts and activation sizes before anything is built,
so that a run that cannot fit is refused in one line instead of dying in its tenth minute, and a long one says so
before it starts.

The plan reads the run's cases as pytest selected and ordered them (conftest.py; `python -m harness plan` collects
them the same way; `generate`, `export` and `build` name their one case), and walks what each case function runs (RUNS)
as the session runs it: eager forwards, calibration loops, candidates' runners built, videos generated, candidates
released. Each of those starts a step, named by the functions below that the session logs with (forward_step,
build_step, video_step, release_step), so the session's steps can be held to the plan's (tests/test_plan.py).

Three regimes, the first in which every phase fits the card:
- resident: every model the run builds and every candidate's runners stay on the device for the session;
- candidates take turns: one candidate backend's runners, engines and quantized copies at a time, released after its
  cases in each family (engines stay in the disk cache, so a later family reloads them); the models stay resident;
- components take turns too (harness.residency): one eager component on the device at a time, waiting in host memory
  while it leaves room (else built again from its seed or files); a candidate's own copy of a component never shares
  the device with the eager original (harness.residency.private_copy, send_away).

The weights are exact: each component is built on the meta device and counted. Activations are estimates (a DiT
forward's tensors alive at its peak counted by hand; the VAE decoder's measured peaks less its weights); host memory
is this process's own (measured) plus what the session keeps there; times are FLOPs at the named card's rates plus
the fixed costs measured so far (thresholds.toml [cards]). Sources: docs/hardware.md, "Memory" and "Time".
"""
from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import torch

from harness.backends import BACKENDS, QUANTIZED_BYTES, load, make_backend
from harness.case import COMPONENTS, PRECISIONS, Case, eager_precision, is_dit, is_quantized
from harness.errors import HarnessError
from harness.memory import meminfo
from harness.models import skeletons
from harness.perf import VIDEO_WARMUP, WARMUP, perf_precision_of
from harness.pipeline import (CALIBRATION_STEPS, PROMPTS, REFERENCE, Precisions,
                              under_test)
from harness.recipes import expert_layers, quantized_blocks
from harness.residency import HOST_MARGIN, module_bytes
from harness.shapes import TEXT_TOKENS, VideoShape, forward_flops, step_split
from harness.thresholds import thresholds

GiB = 2 ** 30
# Device memory no tensor of ours can use: the CUDA context, cuBLAS and cuDNN workspaces, the allocator's slack.
RESERVED = 2 * GiB
# This process's own host memory (torch, CUDA's libraries, diffusers, transformers) with no weights waiting there:
# the perf case at 2 layers on an H100, 1.96 GiB (results/gpu-h100-2026-12-07-full-size/perf-2).
HOST_BASE = int(1.96 * GiB)
# Live bytes at a DiT block's peak per token, per 2-byte element: the FFN's up-projection and its GELU output
# (2 x ffn) beside the residual stream and the norms' fp32 temporaries (about 4 x dim), counted by hand.
DIT_ACTIVATION = {"ffn": 2.0, "dim": 4.0}
# The VAE decoder's live bytes per output pixel per 2-byte element (its per-frame cache and the decoded frames):
# 4.45 GiB at 480p in bf16 and 8.8 GiB in fp32 on an H100 (docs/hardware.md).
VAE_ACTIVATION = 5980
# A DiT expert's engine plan with its weights stripped (refitted at load) is about this share of them on disk: the
# target of thresholds.toml [scale] max_stripped_plan_share.
STRIPPED_PLAN_SHARE = thresholds()["scale"]["max_stripped_plan_share"]
FAMILIES = ("parity", "quality", "perf", "export")
# The regimes, in the order the plan tries them: (what it says, (candidates take turns, components take turns)).
REGIMES = (("every model and runner stays resident", (False, False)),
           ("candidates take turns: one backend's runners, engines and quantized copies on the device at a time, each "
            "let go once no next case uses it", (True, False)),
           ("candidates and components take turns: one backend's runners at a time, one eager component on the device "
            "at a time", (True, True)))
WAITING = "waiting copies"  # the host part that components taking turns keep only where host memory has room
# The case functions whose verdict reads another backend's results: they run in the candidate's turn.
JUDGES_THE_CANDIDATE = ("test_speedup_gate",)


def forward_step(case: Case, loop: bool) -> str:
    """The step of an eager output the session computes for parity (on the held-out loop's inputs with `loop`)."""
    return f"forward torch {case.id}" + (" on the held-out loop's inputs" if loop else "")


def build_step(backend: str, case: Case) -> str:
    """The step of a candidate's runner being built (exported, compiled, quantized, an engine built or loaded)."""
    return f"build {backend} {case.id}"


def video_step(backend: str, precisions: Precisions, shape: VideoShape) -> str:
    """The step of a video generated: its runners built, then the loop and the decode."""
    return f"video {backend} {precisions.id} {shape.id}"


def release_step(backend: str) -> str:
    """The step that ends a backend's turn: its runners let go, the components sent off the device."""
    return f"release {backend}"


@dataclass(frozen=True)
class Planned:
    """One selected case as the plan reads it: the case function (its name in cases/) and its parameters."""

    test: str
    family: str
    backend: str | None = None  # the backend it runs (`backend` or `candidate`); None for the gate and the eager-only
    precision: str | None = None
    component: str | None = None  # a parity or export case's component, or a perf case's stage
    shape: VideoShape | None = None
    prompt: int | None = None


def turn_of(case: Planned, settings) -> str:
    """Whose turn a case runs in: its backend's; the gate's the candidate's it judges; else eager torch's."""
    if case.backend:
        return case.backend
    return (settings.candidate or "torch") if case.test in JUDGES_THE_CANDIDATE else "torch"


def run_order(cases: list[Planned | None], settings) -> list[int]:
    """The indices of `cases` in the order they run: family by family (FAMILIES, then the rest), each backend's cases
    of a family together, eager torch first and the candidates in --backends order; otherwise as collected."""
    turns = ["torch", *(b for b in settings.backends if b != "torch")]

    def key(i: int) -> tuple[int, int, int]:
        case = cases[i]
        if case is None or case.family not in FAMILIES:
            return len(FAMILIES), 0, i
        turn = turn_of(case, settings)
        return FAMILIES.index(case.family), turns.index(turn) if turn in turns else len(turns), i

    return sorted(range(len(cases)), key=key)


# ---------------------------------------------------------------------------------------------------- card and host

@dataclass(frozen=True)
class Card:
    """The device the run plans for: its memory, what of it no tensor can use, where the figure comes from, and its
    kind in thresholds.toml [cards] (None: no rates, no time estimate)."""

    name: str  # "--gpu-memory 79.6", "NVIDIA H100 80GB HBM3", "this machine's host memory (--device cpu)"
    total_bytes: int
    kind: str | None = None
    cuda: bool = True  # a GPU; else the CPU path, whose "card" is host memory
    reserved_bytes: int = RESERVED

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - self.reserved_bytes

    def hold(self) -> None:
        """Hold this process to the card's memory where the card it runs on is bigger (--gpu-memory), so that a bigger
        card fails where the planned one would, not later. Applied once, by Session.start."""
        if self.cuda and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            if self.total_bytes < total:
                torch.cuda.set_per_process_memory_fraction(self.total_bytes / total)


def _card_kind(name: str) -> str | None:
    """The [cards] entry a CUDA device's name matches ('NVIDIA H100 80GB HBM3' -> h100), or None."""
    return next((kind for kind in thresholds()["cards"] if kind in name.lower()), None)


def card_of(settings) -> Card:
    """The run's card: --gpu-memory, else the CUDA device's own memory (or, planning from a machine without it, the
    --card's), else on the CPU path host memory; its kind from --card or the device's name."""
    if settings.device != "cuda":
        if settings.gpu_memory is not None:
            return Card(f"--gpu-memory {settings.gpu_memory:g}", int(settings.gpu_memory * GiB), cuda=False)
        return Card("this machine's host memory (--device cpu)", host_memory(settings)[0], cuda=False)
    kind = settings.card
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        name, total, kind = props.name, props.total_memory, kind or _card_kind(props.name)
    else:  # `plan` for a card this machine does not have: settings.card or settings.gpu_memory names it
        name, total = f"--card {kind}", int(thresholds()["cards"][kind]["memory_gib"] * GiB) if kind else 0
    if settings.gpu_memory is not None:
        name, total = f"--gpu-memory {settings.gpu_memory:g}", int(settings.gpu_memory * GiB)
    return Card(name, total, kind)


def host_memory(settings) -> tuple[int, str]:
    """The runner's host memory in bytes and where the figure comes from."""
    if settings.host_memory is not None:
        return int(settings.host_memory * GiB), f"--host-memory {settings.host_memory:g}"
    return meminfo("MemTotal") or 1 << 50, "this machine's"  # no /proc: nothing to refuse by


# ---------------------------------------------------------------------------------------------------- phases

@dataclass(frozen=True)
class Part:
    what: str
    nbytes: int


@dataclass(frozen=True)
class Phase:
    """One moment of a case family: what is on the device at once, what host memory holds, and how long it lasts."""

    family: str
    shape: VideoShape
    label: str
    parts: tuple[Part, ...]  # on the device
    host_parts: tuple[Part, ...]  # in host memory
    turn: str  # the backend whose cases run
    seconds: float = 0.0  # the estimate (0 without a card's rates)
    step: str = ""  # the step the session logs as this phase starts, where one starts here
    unestimated: str = ""  # a fixed cost left out of `seconds` (not measured yet)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def host_bytes(self) -> int:
        return sum(p.nbytes for p in self.host_parts)

    @property
    def host_needed(self) -> int:
        """The host memory the phase cannot do without: waiting copies that do not fit are rebuilt instead."""
        return sum(p.nbytes for p in self.host_parts if p.what != WAITING)

    def describe(self, host: bool = False) -> str:
        return " + ".join(f"{p.what} {p.nbytes / GiB:.1f}" for p in (self.host_parts if host else self.parts)
                          if p.nbytes >= GiB // 20)


def activation_bytes(component: str, config, dtype: torch.dtype, shape: VideoShape, batch: int = 1) -> int:
    """What one inference forward of `component` keeps alive at its peak, beyond its weights."""
    scale = torch.finfo(dtype).bits / 16
    if is_dit(component):
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        per_token = DIT_ACTIVATION["ffn"] * config["ffn_dim"] + DIT_ACTIVATION["dim"] * dim
        return int(batch * shape.tokens * per_token * 2 * scale)
    if component == "vae_decoder":
        return int(VAE_ACTIVATION * 2 * scale * shape.height * shape.width)
    return int(batch * TEXT_TOKENS * (3 * config["d_ff"] + 8 * config["d_model"]) * 2 * scale)


def attention_scores_bytes(config, dtype: torch.dtype, shape: VideoShape, batch: int = 1) -> int:
    """A DiT self-attention's score matrix and its softmax, every head at once: what an exported graph's attention
    (MatMul, Softmax, MatMul) holds on the CPU, where no fused kernel spares it."""
    return 2 * batch * config["num_attention_heads"] * shape.tokens ** 2 * torch.finfo(dtype).bits // 8


def video_host_bytes(shape: VideoShape, steps: int) -> int:
    """A generation the session keeps: its fp32 frames and every step's fp32 latents."""
    return 4 * (shape.frames * shape.height * shape.width * 3 + steps * math.prod(shape.latent_shape()))


class _Weights:
    """Each component's bytes and config at each dtype, counted on meta-device builds (made once per dtype)."""

    def __init__(self, settings):
        self.settings = settings
        self._built: dict[torch.dtype, dict[str, torch.nn.Module]] = {}
        self._bytes: dict[tuple[str, torch.dtype], int] = {}

    def module(self, component: str, precision: str) -> torch.nn.Module:
        dtype = PRECISIONS[eager_precision(precision)]
        if dtype not in self._built:
            s = self.settings
            self._built[dtype] = skeletons(s.source, dtype, layers=s.proxy_layers, path=s.model_path)
        return self._built[dtype]["vae" if component == "vae_decoder" else component]

    def nbytes(self, component: str, precision: str) -> int:
        key = (component, PRECISIONS[eager_precision(precision)])
        if key not in self._bytes:
            self._bytes[key] = module_bytes(self.module(component, precision))
        return self._bytes[key]

    def config(self, component: str) -> dict:
        config = self.module(component, "fp32").config
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers' kind

    def activation(self, component: str, precision: str, shape: VideoShape, batch: int = 1) -> int:
        dtype = PRECISIONS[eager_precision(precision)]
        return activation_bytes(component, self.config(component), dtype, shape, batch)

    def scores(self, component: str, precision: str, shape: VideoShape, batch: int = 1) -> int:
        dtype = PRECISIONS[eager_precision(precision)]
        return attention_scores_bytes(self.config(component), dtype, shape, batch) if is_dit(component) else 0

    def held(self, backend: str, component: str, precision: str) -> int:
        """What `backend` keeps of its own on the device for (component, precision), as its spec declares
        (harness.backends.HOLDS): a quantized copy, a copy, an engine."""
        holds = BACKENDS[backend].holds
        if holds == "quantized copy" and is_quantized(precision):
            module = self.module(component, precision)
            blocks = quantized_blocks(self.settings.backend_options.fp8_recipe, expert_layers(module))
            return load(QUANTIZED_BYTES)(module, blocks)
        return 0 if holds == "nothing" else self.nbytes(component, precision)

    @cached_property
    def text_encoder_params(self) -> int:
        """The text encoder's parameters less its embedding table (a lookup, not a matmul)."""
        module = self.module("text_encoder", "fp32")
        return sum(p.numel() for name, p in module.named_parameters() if "shared" not in name
                   and "embed_tokens" not in name)


class _Rates:
    """Seconds of the work a phase does on the named card (thresholds.toml [cards]); zero without a card."""

    def __init__(self, kind: str | None, weights: _Weights):
        self.table = thresholds()["cards"][kind] if kind else None
        self.w = weights

    def forward(self, backend: str, component: str, precision: str, shape: VideoShape, batch: int = 1) -> float:
        """One forward (one decode for the VAE) of `component` on `backend` at `precision`."""
        if self.table is None:
            return 0.0
        if component == "vae_decoder":  # measured per decode at 480x832x81, scaled by the pixels decoded
            pixels = shape.frames * shape.height * shape.width / (81 * 480 * 832)
            return batch * pixels * self.table["vae_decode_s"][eager_precision(precision)]
        if is_dit(component):
            flops = batch * forward_flops(_Config(self.w.config(component)), shape.tokens)
        else:
            flops = 2 * batch * TEXT_TOKENS * self.w.text_encoder_params
        return flops / (self._tflops(backend, precision) * 1e12)

    def _tflops(self, backend: str, precision: str) -> float:
        rates = self.table["tflops"]
        eager = "torch-fp8 fp8" if is_quantized(precision) else f"torch {precision}"
        return rates.get(f"{backend} {precision}", rates[eager])

    def move(self, nbytes: int) -> float:
        return nbytes / GiB / self.table["move_gib_per_s"] if self.table else 0.0

    def build(self, backend: str) -> float | None:
        """A backend's fixed cost to make its runner of one DiT expert; None where it is not measured."""
        if self.table is None:
            return 0.0
        return self.table.get("build_s", {}).get(backend)


class _Config(dict):
    """A config dict read by attribute, as harness.shapes.forward_flops reads a diffusers config."""

    __getattr__ = dict.__getitem__


# ---------------------------------------------------------------------------------------------------- the walk

@dataclass
class _State:
    """What the session holds as the walk goes: the plan's copy of its caches and of the residency."""

    on_device: tuple[str, str] | None = None  # components taking turns: the eager (component, precision) there
    models: dict[str, None] = field(default_factory=dict)  # resident: eager precisions whose whole model is there
    kept: dict[tuple[str, str], int] = field(default_factory=dict)  # host copies of components taking turns
    held: dict[tuple[str, Case], int] = field(default_factory=dict)  # each kept runner's own copy on the device
    outputs: set = field(default_factory=set)  # eager outputs computed (Session.output)
    videos: set = field(default_factory=set)  # generations kept (Session.generation)
    loops: set = field(default_factory=set)  # recorded denoising loops: (shape, "held-out" | "calibration")
    video_bytes: int = 0  # host memory of the generations kept
    case_videos: set = field(default_factory=set)  # videos whose step this case has logged
    disk: dict[str, tuple[str, int]] = field(default_factory=dict)  # cache entry -> (family, bytes)


class _Walk:
    """The run's cases in order, as the session runs them, in one regime; each moment becomes a Phase."""

    def __init__(self, settings, weights: _Weights, rates: _Rates, card: Card, host_total: int,
                 unavailable: dict[str, str], candidates_take_turns: bool, components_take_turns: bool):
        self.s, self.w, self.r, self.card, self.host_total = settings, weights, rates, card, host_total
        self.unavailable = unavailable
        self.candidates_take_turns, self.components_take_turns = candidates_take_turns, components_take_turns
        self.backends = {b: make_backend(b, settings.options_for(b)) for b in settings.backends}
        self.state = _State()
        self.phases: list[Phase] = []
        self.unplanned: Counter = Counter()
        self.rebuilt: dict[tuple[str, str], None] = {}  # components whose host copy did not fit
        self.uses: set[tuple[str, Case]] = set()  # the candidates' runners the case now walked uses
        self.touched: list[frozenset] = []  # per case walked, the runners it used
        self.family, self.turn, self.shape, self.step = "", "torch", next(iter(settings.shapes), None), ""

    # ---- the run

    def run(self, cases: list[Planned], keep_after: list[frozenset] | None = None) -> None:
        """Walk `cases` in order; `keep_after[i]`: the runners case i+1 uses, which stay after case i where candidates
        take turns (every other runner of a candidate is let go when its case ends)."""
        previous = None
        for i, case in enumerate(cases):
            turn = turn_of(case, self.s)
            if previous is not None and (case.family, turn) != previous:
                self._end_turn(previous[1])
            self.family, self.turn, previous = case.family, turn, (case.family, turn)
            self.shape = case.shape or self.s.shapes[0]
            self.state.case_videos = set()
            handler = RUNS.get(case.test)
            if handler is None:
                self.unplanned[case.test] += 1
                self.state.on_device = None  # the session clears the device before a case it has not planned
            else:
                getattr(self, handler)(case)
            self.touched.append(frozenset(self.uses))
            self.uses = set()
            if keep_after is not None and self.candidates_take_turns:
                self._let_go(keep_after[i])
        if previous is not None:
            self._end_turn(previous[1])

    def _let_go(self, keep: frozenset) -> None:
        """As a case ends, the candidates' runners the next case does not use are let go, unless they hold nothing of
        their own on the device (Inductor's share the eager weights): those stay to their turn's end (Session.after_case).
        """
        for key in [k for k in self.state.held if k not in keep and BACKENDS[k[0]].holds != "nothing"]:
            del self.state.held[key]

    def _end_turn(self, backend: str) -> None:
        """Where candidates take turns, a backend's turn ends with its runners let go and the device cleared."""
        if not self.candidates_take_turns:
            return
        st = self.state
        st.held.clear()
        st.on_device = None
        self.step = release_step(backend)
        self._phase(f"{backend}'s turn ends: its runners let go", 0)

    # ---- what the case functions run (RUNS)

    def component_parity(self, case: Planned) -> None:
        """cases/test_parity.py test_component_parity: Session.parity."""
        backend, component, precision, shape = case.backend, case.component, case.precision, self.shape
        loop = is_quantized(precision)
        for reference in ("fp32", eager_precision(precision)):
            self._output(Case(component, shape, reference, source=self.s.source), loop)
        if backend == "torch":
            if precision in BACKENDS["torch"].precisions:  # the eager runner at the case's precision, judged again
                self._eager(component, precision, 1, f"{component} {precision}, eager, judged")
            return
        target = Case(component, shape, precision, source=self.s.source)
        if self._runner(backend, target):
            self._candidate(backend, target, 1, f"{component} {precision} on {backend}")

    def judged_videos(self, case: Planned) -> None:
        """The fp32 video, eager's at the precision and the backend's, the components not under test in fp32
        (cases/test_quality.py judge; cases/test_parity.py test_denoising_loop_parity: prompt 0)."""
        judged, prompt = Precisions.judged(case.precision), case.prompt or 0
        if self._video("torch", REFERENCE, prompt) and self._video("torch", judged.eager, prompt):
            self._video(case.backend, judged, prompt)

    def drift_attribution(self, case: Planned) -> None:
        """cases/test_quality.py test_video_drift_attribution: the fp32 video, then eager's at the precision with
        every component in it and with only the experts, the text encoder or the VAE in it."""
        precision = eager_precision(case.precision)
        self._video("torch", REFERENCE, 0)
        for precisions in (Precisions(precision, precision, precision),
                           *(Precisions.only(part, precision) for part in ("experts", "text_encoder", "vae_decoder"))):
            self._video("torch", precisions, 0)

    def speed(self, case: Planned) -> None:
        """cases/test_perf.py test_speed: the candidate and eager alternating, warm-up and --perf-rounds rounds."""
        backend, stage, s = case.backend, case.component, self.s
        precision = perf_precision_of(backend, s)
        if BACKENDS[backend].untimed or (is_quantized(precision) and stage in ("vae_decoder", "text_encoder")):
            return
        rounds, base = WARMUP + s.perf_rounds, eager_precision(precision)
        if stage == "end_to_end":  # whole videos, each moving its components where they take turns
            first = len(self.phases)
            if self._video("torch", Precisions.as_run(base), None, kept=False) and \
                    self._video(backend, Precisions.as_run(precision), None, kept=False):
                one = sum(p.seconds for p in self.phases[first:])
                self._phase("end-to-end videos, timed", 0, seconds=(VIDEO_WARMUP + s.perf_rounds - 1) * one)
            return
        component = "transformer" if stage == "cfg_step" else stage
        batch = s.cfg_batch if stage == "cfg_step" else 1
        target = Case(component, self.shape, precision, batch=batch, source=s.source)
        if not self._runner(backend, target):
            return
        forwards = 2 if stage == "cfg_step" else 1
        self._eager(component, base, rounds * forwards, f"{stage}: eager {base}, timed")
        self._candidate(backend, target, rounds * forwards // batch, f"{stage}: {backend} {precision}, timed")

    def gate(self, case: Planned) -> None:
        """cases/test_perf.py test_speedup_gate: reads the candidate's recorded timing; runs nothing."""

    def export(self, case: Planned) -> None:
        """cases/test_export.py and `harness export`: the component exported from eager PyTorch, then checked by ONNX
        Runtime's CPU provider at the case's shape, whose attention holds every head's scores in host memory."""
        self.build(case)
        if is_dit(case.component):
            scores = self.w.scores(case.component, case.precision, self.shape)
            self._phase(f"{case.component} {case.precision}: its graph checked on the CPU", 0, read=scores,
                        unestimated="ONNX Runtime check")

    def build(self, case: Planned) -> None:
        """`harness build`: the component exported from eager PyTorch (its engine is built in a process of its own)."""
        component, precision = case.component, case.precision
        self._eager(component, precision, 1, f"{component} {precision}, exported", unestimated="ONNX export")
        self._disk(f"onnx {component} {precision} {self.shape.id}", self.w.nbytes(component, precision))

    def generate(self, case: Planned) -> None:
        """`python -m harness generate`: one video through the backend (Precisions.as_run)."""
        self._video(case.backend, Precisions.as_run(case.precision), None, kept=False)

    # ---- what the session does underneath

    def _output(self, case: Case, loop: bool) -> None:
        """Session.output of eager torch: computed once per session (a held-out loop records its inputs first)."""
        key = (case, loop)
        if key in self.state.outputs:
            return
        self.state.outputs.add(key)
        self.step = forward_step(case, loop)
        if loop:
            self._loop("held-out", len(PROMPTS))
        self._eager(case.component, case.precision, 1, f"{case.component} in {case.precision}, eager")

    def _loop(self, kind: str, prompts: int) -> None:
        """A bf16 eager denoising loop whose experts' inputs are recorded (harness.components.capture_loop): once per
        session and shape for the held-out prompts and once for the calibration prompts."""
        key = (self.shape, kind)
        if key in self.state.loops:
            return
        self.state.loops.add(key)
        high, low = step_split(CALIBRATION_STEPS)
        for _ in range(prompts):
            for component, calls in (("text_encoder", 2), ("transformer", 2 * high), ("transformer_2", 2 * low)):
                self._eager(component, "bf16", calls, f"{component} in bf16, the {kind} loop")

    def _can_build(self, backend: str, case: Case) -> bool:
        """Whether the session gets a runner at all: the backend is available and its spec lets the case through."""
        return backend not in self.unavailable and not self.backends[backend].refusal(case.component, case.precision,
                                                                                       case.layout)

    def _runner(self, backend: str, case: Case) -> bool:
        """Session.runner of a candidate: built once and kept, where candidates take turns until a case ends that the
        next case does not use it (Session.after_case) or its turn ends."""
        if not self._can_build(backend, case):
            return False
        self.uses.add((backend, case))
        if (backend, case) not in self.state.held:
            self.state.held[(backend, case)] = self._build(backend, case)
        return True

    def _build(self, backend: str, case: Case) -> int:
        """A candidate's runner made: a quantized or copied expert built from a fresh copy while the original waits
        off the device (calibrated on the eager loop where the backend calibrates); an exported graph traced from the
        eager module, which then leaves the device for the engine; Inductor compiling on the first call. Returns
        the bytes the runner holds on the device."""
        component, precision = case.component, case.precision
        spec = BACKENDS[backend]
        self.step = build_step(backend, case)
        self._touch(precision)  # the session hands the backend its model's component
        if is_quantized(precision) and self._calibrates(backend):
            self._loop("calibration", self.s.backend_options.calibration_prompts)
        build_s = self.r.build(backend) if is_dit(component) else None
        unestimated = "" if build_s is not None else f"{backend} build"
        held = self.w.held(backend, component, precision)
        if is_quantized(precision):
            self._send_away(component, precision)
            copy = Part(f"{backend} {component}: a bf16 copy being quantized", self.w.nbytes(component, precision))
            calls = self._calibration_calls(component) if self._calibrates(backend) else 0
            seconds = (build_s or 0.0) + calls * self.r.forward("torch", component, "bf16", case.shape)
            act = self.w.activation(component, precision, case.shape) if calls else 0
            self._phase(f"{component} {precision}: {backend} quantizes a copy", act, (copy,), seconds, unestimated)
        elif spec.holds != "nothing":
            self._eager(component, precision, 1, f"{component} {precision}: {backend} exports it",
                        unestimated=unestimated)
            self._send_away(component, precision)
        else:
            self._phase(f"{component} {precision}: {backend} compiles it", 0, seconds=build_s or 0.0,
                        unestimated=unestimated)
        if spec.graph:
            self._disk(f"onnx {component} {precision} {case.shape.id}", self.w.nbytes(component, precision))
            share = STRIPPED_PLAN_SHARE if is_dit(component) and self.s.backend_options.engine_weights == "stripped" \
                else 1.0
            self._disk(f"{backend} engine {component} {precision} {case.shape.id}", int(held * share))
        return held

    def _calibration_calls(self, expert: str) -> int:
        """The expert's recorded calls in the calibration loop, each run again on the copy being calibrated."""
        high, low = step_split(CALIBRATION_STEPS)
        return self.s.backend_options.calibration_prompts * 2 * (high if expert == "transformer" else low)

    def _calibrates(self, backend: str) -> bool:
        """torch-fp8 calibrates only for --fp8-scales static; the others whenever their spec names a calibration."""
        spec = BACKENDS[backend]
        if "fp8_scales" in spec.labelled_options:
            return self.s.backend_options.fp8_scales == "static"
        return bool(spec.calibrates)

    def _video(self, backend: str, precisions: Precisions, prompt: int | None, kept: bool = True) -> bool:
        """A generation (Session.generation, kept for the session; or Session.generate, `kept` False): the backend's
        runners of the components under test, eager torch's of the rest, then the text encoder, each expert on its
        steps and the decode. False where a runner cannot be made (the case is skipped)."""
        st, s = self.state, self.s
        key = (backend, precisions, self.shape, prompt)
        if kept and key in st.videos:
            return True
        tested = under_test(precisions.experts)
        cases = {c: (backend if c in tested else "torch",
                     Case(c, self.shape, precisions.of(c), batch=self._cfg_batch(backend) if is_dit(c) else 1,
                          source=s.source)) for c in COMPONENTS}
        for runs, case in cases.values():
            if runs == "torch" and case.precision not in BACKENDS["torch"].precisions:
                return False
            if runs != "torch" and not self._runner(runs, case):
                return False
        if (backend, precisions) not in st.case_videos:  # the session logs a video once per case
            st.case_videos.add((backend, precisions))
            self.step = video_step(backend, precisions, self.shape)
        high, low = step_split(s.steps)
        forwards = 2 // self._cfg_batch(backend)
        for component, calls in (("text_encoder", 2), ("transformer", forwards * high),
                                 ("transformer_2", forwards * low), ("vae_decoder", 1)):
            runs, case = cases[component]
            if calls == 0:
                continue
            label = f"{component} {case.precision} in {backend}'s {precisions.id} video"
            if runs == "torch":
                self._eager(component, case.precision, calls, label)
            else:
                self._candidate(runs, case, calls, label)
        if kept:
            st.videos.add(key)
            st.video_bytes += video_host_bytes(self.shape, s.steps)
            if backend == "torch":  # eager videos are stored in the disk cache across sessions
                self._disk(f"video {precisions.id} {self.shape.id} {prompt}", video_host_bytes(self.shape, s.steps))
        return True

    def _cfg_batch(self, backend: str) -> int:
        return 1 if backend == "torch" else self.s.cfg_batch

    def _eager(self, component: str, precision: str, calls: int, label: str, extra: int = 0,
               unestimated: str = "") -> None:
        """Eager PyTorch runs `component` `calls` times: it is brought onto the device first (components taking
        turns), or its whole model joins the device (resident)."""
        seconds, read = self._bring(component, precision)
        seconds += calls * self.r.forward("torch", component, precision, self.shape)
        self._phase(label, self.w.activation(component, precision, self.shape) + extra, seconds=seconds,
                    unestimated=unestimated, read=read)

    def _candidate(self, backend: str, case: Case, calls: int, label: str) -> None:
        """A candidate's runner called `calls` times, beside what is on the device; one that holds nothing of its own
        (Inductor) runs the eager module's weights, which come onto the device for it."""
        spec = BACKENDS[backend]
        self._touch(case.precision)  # the case's inputs come from its precision's model
        seconds, read = self._bring(case.component, case.precision) if spec.holds == "nothing" else (0.0, 0)
        act = self.w.activation(case.component, case.precision, case.shape, case.batch)
        if spec.graph and not self.card.cuda:
            act += self.w.scores(case.component, case.precision, case.shape, case.batch)
        seconds += calls * self.r.forward(backend, case.component, case.precision, case.shape, case.batch)
        self._phase(label, act, seconds=seconds, read=read)

    def _bring(self, component: str, precision: str) -> tuple[float, int]:
        """Component `component` in `precision` onto the device: (seconds, host bytes read for it from files).

        Resident: its whole model joins the device, for the session. Taking turns: it replaces what is there, from
        its host copy if one was kept, else built anew (drawn on the device for the random sources, read from the
        files for a checkpoint), keeping a host copy where host memory leaves HOST_MARGIN free (harness.residency)."""
        st, precision = self.state, eager_precision(precision)
        if not self.components_take_turns:
            self._touch(precision)
            return 0.0, 0
        if st.on_device == (component, precision):
            return 0.0, 0
        st.on_device = (component, precision)
        nbytes = self.w.nbytes(component, precision)
        read = nbytes if self.s.source == "checkpoint" else 0
        if (component, precision) in st.kept:
            return self.r.move(nbytes), 0
        waiting = HOST_BASE + sum(st.kept.values()) + st.video_bytes
        if not self.card.cuda:  # the CPU path: the device is host memory, so nothing waits apart
            return 0.0, read
        if self.host_total - waiting - nbytes >= HOST_MARGIN:
            st.kept[(component, precision)] = nbytes
            return self.r.move(nbytes), read
        self.rebuilt[(component, precision)] = None
        return 0.0, read

    def _touch(self, precision: str) -> None:
        """Resident: the first use of a precision's model (Session.model) builds all of it on the device, for good."""
        if not self.components_take_turns:
            self.state.models.setdefault(eager_precision(precision), None)

    def _send_away(self, component: str, precision: str) -> None:
        if self.state.on_device == (component, eager_precision(precision)):
            self.state.on_device = None

    def _disk(self, entry: str, nbytes: int) -> None:
        self.state.disk.setdefault(entry, (self.family, nbytes))

    def _phase(self, label: str, act: int, transient: tuple[Part, ...] = (), seconds: float = 0.0,
               unestimated: str = "", read: int = 0) -> None:
        st, w = self.state, self.w
        if self.components_take_turns:
            eager = [st.on_device] if st.on_device else []
        else:
            eager = [(c, p) for p in st.models for c in COMPONENTS]
        held = (Part(f"{b} {c.component} {c.precision}" + (f" b{c.batch}" if c.batch > 1 else ""), n)
                for (b, c), n in st.held.items() if n)
        parts = (*(Part(f"{c} {p}", w.nbytes(c, p)) for c, p in eager), *held, *transient, Part("activations", act))
        host = (Part("the process", HOST_BASE), Part(WAITING, sum(st.kept.values())),
                Part("videos kept", st.video_bytes), Part("read or checked here", read),
                *((Part("the CPU path's device", sum(p.nbytes for p in parts)),) if not self.card.cuda else ()))
        self.phases.append(Phase(self.family, self.shape, label, parts, tuple(p for p in host if p.nbytes), self.turn,
                                 seconds, self.step, unestimated))
        self.step = ""


# What each case function of cases/ runs, by its name: the _Walk method that plans it (`export`, `generate`: the CLI's
# commands). Case functions not named here (the GPU probes, the parallel cases) size themselves: the plan lists them,
# and the session clears the device before each.
RUNS = {"test_component_parity": "component_parity", "test_denoising_loop_parity": "judged_videos",
        "test_video_quality": "judged_videos", "test_video_lpips": "judged_videos",
        "test_video_drift_attribution": "drift_attribution", "test_speed": "speed", "test_speedup_gate": "gate",
        "test_export_check_and_trt_build": "export", "export": "export", "build": "build", "generate": "generate"}


# ---------------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Every phase of a run's cases in order, the card and host they must fit, the disk they fill, their time."""

    card: Card
    host_bytes: int
    host_source: str  # "--host-memory 48", "this machine's"
    candidates_take_turns: bool
    components_take_turns: bool
    phases: tuple[Phase, ...]
    keep_after: tuple[frozenset, ...] = ()  # per case, the candidates' runners the next case uses: kept past it
    needs: tuple[tuple[str, int], ...] = ()  # (regime, its largest phase on the device), for each of REGIMES
    order: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (family, the backends whose turns its cases run in)
    left_out: tuple[tuple[str, str], ...] = ()  # (backend, why it cannot run here)
    rebuilt: tuple[str, ...] = ()  # components whose host copies did not fit: built anew each time they come back
    disk: tuple[tuple[str, int], ...] = ()  # (family, bytes its new cache entries take)
    disk_free: int | None = None
    unplanned: tuple[tuple[str, int], ...] = ()  # (case function, cases) the plan does not size
    steps: int = 0

    def family_names(self) -> list[str]:
        return list(dict.fromkeys(p.family for p in self.phases))

    def peak(self, family: str | None = None, shape: VideoShape | None = None) -> Phase | None:
        """The largest phase on the device (of `family`, at `shape`, or of the whole run)."""
        phases = [p for p in self.phases if family in (None, p.family) and shape in (None, p.shape)]
        return max(phases, key=lambda p: p.nbytes, default=None)

    def host_peak(self, family: str | None = None, shape: VideoShape | None = None) -> Phase | None:
        phases = [p for p in self.phases if family in (None, p.family) and shape in (None, p.shape)]
        return max(phases, key=lambda p: p.host_bytes, default=None)

    def seconds(self, family: str | None = None, shape: VideoShape | None = None) -> float:
        return sum(p.seconds for p in self.phases if family in (None, p.family) and shape in (None, p.shape))

    def unestimated(self, family: str | None = None) -> Counter:
        return Counter(p.unestimated for p in self.phases if p.unestimated and family in (None, p.family))

    def disk_bytes(self, family: str | None = None) -> int:
        return sum(n for f, n in self.disk if family in (None, f))

    def logged_steps(self) -> list[tuple[str, float]]:
        """The steps the session logs, in order, each with its estimated seconds (to the next step)."""
        steps: list[tuple[str, float]] = []
        for phase in self.phases:
            if phase.step:
                steps.append((phase.step, 0.0))
            if steps:
                steps[-1] = (steps[-1][0], steps[-1][1] + phase.seconds)
        return steps

    def fits(self, phase: Phase) -> bool:
        return phase.nbytes <= self.card.usable_bytes

    def check(self) -> None:
        """Refuse, in one line, a run whose largest phase does not fit the card (naming the candidate where it is a
        candidate's turn: one that does not fit even alone), or whose host memory cannot hold what it must."""
        worst = self.peak()
        if worst is not None and not self.fits(worst):
            alone = (f"candidate {worst.turn} does not fit even alone: " if worst.turn != "torch"
                     and self.candidates_take_turns else "")
            need = math.ceil((worst.nbytes + self.card.reserved_bytes) / GiB)
            raise HarnessError(f"{alone}{worst.family} at {worst.shape.id} needs {worst.nbytes / GiB:.1f} GiB on the "
                               f"device ({worst.label}: {worst.describe()} GiB) but {self.card.name} leaves "
                               f"{self.card.usable_bytes / GiB:.1f} GiB; run fewer --proxy-layers, a smaller --shapes, "
                               f"fewer --precisions or --backends, or a card of at least {need} GiB (`python -m "
                               "harness plan` shows every phase)")
        host = max(self.phases, key=lambda p: p.host_needed, default=None)
        if host is not None and host.host_needed > self.host_bytes:
            raise HarnessError(f"{host.family} at {host.shape.id} needs {host.host_needed / GiB:.1f} GiB of host "
                               f"memory ({host.label}: {host.describe(host=True)} GiB) but the runner has "
                               f"{self.host_bytes / GiB:.1f} GiB "
                               f"({self.host_source}); give it more (--host-memory plans for another runner), or run "
                               "fewer --proxy-layers or a smaller --shapes")

    def host_line(self) -> str:
        """What host memory holds at most, and how the run adapts where the components' copies do not fit it."""
        peak = self.host_peak()
        need = max((p.host_needed for p in self.phases), default=HOST_BASE)
        line = (f"host: {self.host_bytes / GiB:.1f} GiB ({self.host_source}); the run needs {need / GiB:.1f} GiB there "
                f"and holds {(peak.host_bytes if peak else HOST_BASE) / GiB:.1f} at most, with the components' "
                f"waiting copies")
        if self.rebuilt:
            line += (f"; the waiting copies of {', '.join(self.rebuilt)} do not fit beside the rest (with "
                     f"{HOST_MARGIN // GiB} GiB kept free), so they are built anew each time they come onto the card "
                     f"(the random sources' are drawn on the card; a checkpoint's are read again from its files)")
        return line

    def header(self) -> list[str]:
        """The plan's lines above its table: the card, host, disk, regime, order, what is left out."""
        card = self.card
        rates = (f"times at the {thresholds()['cards'][card.kind]['label']}'s rates (estimates: thresholds.toml "
                 f"[cards.{card.kind}])" if card.kind else "no time estimate (name the card with --card)")
        lines = [f"card: {card.name}, {card.total_bytes / GiB:.1f} GiB ({card.usable_bytes / GiB:.1f} usable); {rates}",
                 self.host_line()]
        if self.disk_free is not None:
            lines.append(f"disk: {self.disk_bytes() / GiB:.1f} GiB of new cache entries (exports, engines, videos) "
                         f"at most, {self.disk_free / GiB:.1f} GiB free at the cache folder"
                         + ("" if self.disk_bytes() <= self.disk_free else ": **does not fit**"))
        chosen = REGIMES[[self.candidates_take_turns, self.components_take_turns].count(True)][0]
        tried = "; ".join(f"{name.split(':')[0]}: {nbytes / GiB:.1f} GiB" for name, nbytes in self.needs
                          if name != chosen)
        left = dict(self.left_out)
        lines += [f"regime: {chosen}" + (f" (the others' peaks: {tried})" if tried else ""),
                  "order: " + "; ".join(f"{family}: " + ", ".join(b + (" (skips)" if b in left else "") for b in turns)
                                        for family, turns in self.order),
                  f"steps: {self.steps} per video"]
        lines += [f"left out: {backend}: {why}" for backend, why in self.left_out]
        if self.unplanned:
            lines.append("not planned (they size themselves; the device is cleared before each): "
                         + ", ".join(f"{test} ({n})" for test, n in self.unplanned))
        return lines

    def table(self, actual: dict[str, float] | None = None) -> str:
        """The header, then per family and shape: the card's and host's peaks, the disk, the time (Markdown); with
        `actual` (seconds per family), each family's actual time beside its estimate."""
        head = "| family | shape | card GiB | fits | largest phase | its parts (GiB) | host GiB | disk GiB | time |"
        lines = [*self.header(), "", head + (" actual |" if actual is not None else ""),
                 "|---" * (9 + (actual is not None)) + "|"]
        for family in self.family_names():
            shapes = list(dict.fromkeys(p.shape for p in self.phases if p.family == family))
            for i, shape in enumerate(shapes):
                worst, host = self.peak(family, shape), self.host_peak(family, shape)
                row = [family, shape.id, f"{worst.nbytes / GiB:.1f}", "yes" if self.fits(worst) else "**no**",
                       worst.label, worst.describe(), f"{host.host_bytes / GiB:.1f}",
                       f"{self.disk_bytes(family) / GiB:.1f}" if i == 0 else "",
                       self._time(self.seconds(family, shape), self.unestimated(family) if i == 0 else Counter())]
                if actual is not None:
                    row.append(duration(actual[family]) if i == 0 and family in actual else "")
                lines.append("| " + " | ".join(row) + " |")
        worst, host = self.peak(), self.host_peak()
        if worst is not None:
            row = ["**total**", "", f"{worst.nbytes / GiB:.1f}", "yes" if self.fits(worst) else "**no**", "", "",
                   f"{host.host_bytes / GiB:.1f}", f"{self.disk_bytes() / GiB:.1f}",
                   self._time(self.seconds(), self.unestimated())]
            if actual is not None:
                row.append(duration(sum(actual.values())))
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def _time(self, seconds: float, unestimated: Counter) -> str:
        if self.card.kind is None:
            return "n/a"
        left = ", ".join(f"{n} x {what}" for what, n in unestimated.items())
        return duration(seconds) + (f" + not estimated: {left}" if left else "")


def duration(seconds: float) -> str:
    """A time as a person reads it: 3 h 05 min, 12 min 30 s, 45 s."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def make_plan(settings, cases: list[Planned], unavailable: dict[str, str] | None = None) -> Plan:
    """The plan of `cases` (in the order they run) in the first regime whose phases all fit the card: resident,
    candidates taking turns, or components taking turns too. `unavailable`: backends that cannot run here, by reason
    (their cases are skipped: the plan leaves out what they would build)."""
    unavailable = unavailable or {}
    card, (host_total, host_source) = card_of(settings), host_memory(settings)
    weights = _Weights(settings)  # the meta-device builds, made once for every walk
    rates = _Rates(card.kind, weights)
    walks = [_Walk(settings, weights, rates, card, host_total, unavailable, *regime) for _, regime in REGIMES]
    walks[0].run(cases)  # resident; it also records which runners each case uses
    keep_after = [*walks[0].touched[1:], frozenset()]
    for walk in walks[1:]:
        walk.run(cases, keep_after)
    needs = [(name, max((p.nbytes for p in walk.phases), default=0)) for (name, _), walk in zip(REGIMES, walks)]
    walk = next((w for w, (_, need) in zip(walks, needs) if need <= card.usable_bytes), walks[-1])
    st = walk.state
    disk_free = shutil.disk_usage(settings.cache_dir).free if settings.cache_dir.exists() else None
    by_family: dict[str, int] = {}
    for family, nbytes in st.disk.values():
        by_family[family] = by_family.get(family, 0) + nbytes
    order = {}
    for case in cases:
        order.setdefault(case.family, {})[turn_of(case, settings)] = None
    return Plan(card, host_total, host_source, walk.candidates_take_turns, walk.components_take_turns,
                tuple(walk.phases), tuple(keep_after), tuple(needs),
                tuple((family, tuple(turns)) for family, turns in order.items()), tuple(unavailable.items()),
                tuple(f"{c} {p}" for c, p in walk.rebuilt),
                tuple(by_family.items()),
                disk_free, tuple(walk.unplanned.items()), settings.steps)
