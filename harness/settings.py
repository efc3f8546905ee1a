"""The options of a run, declared once for pytest and the CLI, and validated once into Settings.

A typo or an impossible value fails the whole run in one line before any model is built: under pytest a
usage error, under the CLI exit 2.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from harness.backends import (BACKENDS, COMPILE_SCOPES, ENGINE_BUILDERS, ENGINE_WEIGHTS, FP8_SCALES, LABELLED_OPTIONS,
                              PROMPT_COUNTS, BackendOptions, backends_running, check_backend, check_compute_capability)
from harness.case import ONE_GPU, QUANTIZED, Layout, check_precision
from harness.errors import HarnessError, check_choice
from harness.kernels import KERNELS
from harness.memory import GiB, meminfo
from harness.models import SOURCES, check_checkpoint_folder, dit_configs
from harness.paths import writable_folder
from harness.recipes import FP8_RECIPES, RECIPES, quantized_blocks
from harness.shapes import VideoShape, check_fits, check_steps, parse_shapes
from harness.thresholds import thresholds

DEFAULT_SHAPES = {"tiny": "16x16x9", "proxy": "480p", "checkpoint": "480p"}
GPU_BACKENDS = ("torch", "inductor", "torch-fp8", "onnxruntime", "tensorrt", "tensorrt_rtx")
# Inductor's CPU code generation takes minutes per component and precision on 2 cores (the VAE alone
# ~200 s), so the CPU default leaves it out; tests/test_backends.py still proves it on the CPU.
CPU_BACKENDS = ("torch", "torch-fp8", "onnxruntime", "tensorrt", "tensorrt_rtx")
CARDS = tuple(thresholds()["cards"])  # the cards the plan has rates for (thresholds.toml [cards.*])


@dataclass(frozen=True)
class Option:
    """One command-line option, shared by `pytest` and `python -m harness bench`."""

    flag: str
    help: str
    default: object = None  # None: Settings derives it (from the device, the source or the backends)
    type: Callable = str
    env: str | None = None  # an environment variable that supplies the default

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def default_value(self):
        return (os.environ.get(self.env) or self.default) if self.env else self.default  # an empty variable is unset

    def described(self) -> str:
        """The help line, with the default where there is one."""
        default = self.default_value()
        return self.help + (f" (default: {default})" if default is not None else "")


OPTIONS = (
    Option("--model-source", f"where the Wan model comes from: {' | '.join(SOURCES)}", "tiny"),
    Option("--model-path", "local diffusers Wan2.2 folder for --model-source=checkpoint", env="WAN_MODEL_PATH"),
    Option("--proxy-layers", "DiT layers of the proxy source, of 40", 2, int),
    Option("--backends", f"comma-separated backends (default on CUDA: {','.join(GPU_BACKENDS)}; "
                         f"on the CPU: {','.join(CPU_BACKENDS)})"),
    Option("--candidate", "the backend the speed-up gate judges (default tensorrt when among the backends, "
                          "else the first backend that is not torch)"),
    Option("--precisions", "comma-separated: fp32, fp16, bf16, fp8, int8 (default fp32,fp16,bf16, and fp8/int8 "
                           "when a backend among --backends runs them)"),
    Option("--shapes", "presets (480p, 720p) or HxWxF, comma-separated (default 16x16x9 tiny, 480p otherwise)"),
    Option("--steps", "denoising steps of the loop, quality and end-to-end cases (default 4 tiny; otherwise 40, the "
                      "model card's, for experts of up to 8 layers and in `generate`, and 4 for deeper experts, where "
                      "40 fp32 steps take most of an hour per video)", type=int),
    Option("--speedup-gate", "minimum candidate/eager speed-up of one CFG step", 1.5, float),
    Option("--video-gate", "minimum candidate/eager speed-up of one whole video, moves included (the end_to_end perf "
                           "case; default: reported, not gated)", type=float),
    Option("--attribution", "comma-separated eager precisions (fp16, bf16) whose drift of the video the quality cases "
                            "attribute to the experts, the text encoder and the VAE: four more eager videos each "
                            "(default: none)"),
    Option("--results-dir", "run folders are written under here", "results"),
    Option("--cache-dir", "ONNX graphs and engines (git-ignored)", ".cache", env="WAN_BENCH_CACHE"),
    Option("--device", "cuda or cpu (default: cuda when available)"),
    Option("--perf-rounds", "timed rounds per side in perf cases", 10, int),
    Option("--perf-precision", "precision of perf cases (default bf16 on CUDA, fp32 on CPU; torch-fp8 runs fp8, and "
                               "a backend runs fp8/int8 when --precisions names only those)"),
    Option("--cfg-batch", "the candidates' CFG step: 1 = two batch-1 forwards (as WanPipeline), 2 = one batch-2 "
                          "forward over both branches; eager torch always runs 1", 1, int),
    Option("--attention", "self-attention kernels, comma-separated: a kernel (sdpa, fa3: bf16; cudnn-fp8, fa3-fp8, "
                          "triton-fp8: fp8) goes to each backend of its precision that takes it; backend=kernel "
                          "sets one (e.g. torch-fp8=fa3 for bf16 attention beside fp8 GEMMs). Default: each "
                          "backend's own (stock SDPA; cudnn-fp8 for torch-fp8); eager torch always keeps SDPA"),
    Option("--fp8-scales", "torch-fp8's activation scales: row (one per row from each call's amax, torchao's "
                           "dynamic scaling) or static (one per tensor, calibrated once on the denoising loop's "
                           "inputs, as TensorRT's fp8 engines take them)", FP8_SCALES[0]),
    Option("--fp8-recipe", "which DiT blocks fp8 and int8 quantize, in modelopt, the TensorRT engines built from it "
                           "and torch-fp8 (the embedders and proj_out stay bf16 in every recipe): "
                           + "; ".join(f"{r.name}: {r.about}" + (f" (needs experts of more than {2 * r.edge} layers, "
                                                                  "else nothing is left to quantize)" if r.edge else "")
                                       for r in RECIPES.values()), FP8_RECIPES[0]),
    Option("--calibration-prompts", "how many of the calibration prompts (harness.pipeline.CALIBRATION_PROMPTS) the "
                                    "static scales are calibrated on, in torch-fp8 (--fp8-scales static), modelopt and "
                                    "the fp8/int8 TensorRT engines: fewer run a shorter eager loop",
           PROMPT_COUNTS[0], int),
    Option("--compile-scope", "what torch.compile covers in a DiT expert (inductor): blocks (each block "
                              "on its own; the embeddings and output head stay eager) or forward (the whole forward, "
                              "blocks as nested regions compiled once)", COMPILE_SCOPES[0]),
    Option("--parallel", "the GPUs of one video, for the parallel cases: cfg2 (the two CFG branches on two ranks), "
                         "ulysses<N>, ring<N> (each forward's tokens over N ranks), or a product such as "
                         "cfg2,ulysses2; none = one GPU", "none"),
    Option("--gpu-memory", "the card's memory in GiB (an H100 80GB: 79.6, the 81,559 MiB nvidia-smi shows): the "
                           "memory plan judges the run against it, and on a bigger card the run is held to it "
                           "(default: the card's own; with --device cpu, host memory)", type=float),
    Option("--engine-weights", "what a DiT expert's TensorRT plan holds: stripped (no weights: refitted from the "
                               "cached ONNX at load, or bound as graph inputs where the builder has no CUDA device), "
                               "full, or inputs (graph inputs even where it could refit)", ENGINE_WEIGHTS[0]),
    Option("--host-memory", "the runner's host memory in GiB, where the memory plan keeps the components' waiting "
                            "copies, or plans to rebuild them (default: this machine's)", type=float),
    Option("--card", f"the card the plan estimates time for: {', '.join(CARDS)} (default: this machine's, by its "
                     "name; with `python -m harness plan` on a machine without it, it also names the card's memory)"),
)


@dataclass(frozen=True)
class Settings:
    """The validated options of one run: what the session builds, and what every summary records."""

    source: str = "tiny"
    model_path: str | None = None
    proxy_layers: int = 2
    backends: tuple[str, ...] = ("torch",)
    candidate: str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    shapes: tuple[VideoShape, ...] = ()
    steps: int = 4
    speedup_gate: float = 1.5
    video_gate: float | None = None  # the end-to-end speed-up's gate, where one is asked for
    attribution: tuple[str, ...] = ()  # eager precisions whose video drift is attributed to the components
    results_dir: Path = Path("results")
    cache_dir: Path = Path(".cache")
    device: str = "cpu"
    perf_rounds: int = 10
    perf_precision: str = "fp32"
    cfg_batch: int = 1
    attention: tuple[tuple[str, str], ...] = ()  # (backend, kernel) for every backend that runs a kernel choice
    attention_asked: tuple[str, ...] = ()  # the backends whose kernel --attention named (not a default)
    parallel: Layout = ONE_GPU
    gpu_memory: float | None = None  # GiB; None: the card's own (host memory with --device cpu)
    backend_options: BackendOptions = field(default_factory=BackendOptions)
    host_memory: float | None = None  # GiB; None: this machine's
    card: str | None = None  # a key of thresholds.toml [cards]; None: this machine's, where it is one of them

    def options_for(self, backend: str) -> BackendOptions:
        """The options `backend` is built with: the shared ones and its own attention kernel."""
        return replace(self.backend_options, attention=dict(self.attention).get(backend, ""))

    def summary(self) -> dict:
        """What a run folder's summary.md lists under settings."""
        return {"model source": self.source + (f" ({self.model_path})" if self.model_path else ""),
                "proxy layers": self.proxy_layers if self.source == "proxy" else None,
                "backends": self.backends, "candidate": self.candidate, "precisions": self.precisions,
                "shapes": self.shapes, "steps": self.steps, "speed-up gate": self.speedup_gate,
                "video gate": self.video_gate,
                "attribution": self.attribution or None,
                "device": self.device, "perf rounds": self.perf_rounds, "perf precision": self.perf_precision,
                "cfg batch": self.cfg_batch, "gpu memory (GiB)": self.gpu_memory,
                "host memory (GiB)": self.host_memory, "card": self.card,
                **{LABELLED_OPTIONS[name].lstrip("-").replace("-", " "): getattr(self.backend_options, name)
                   for name in LABELLED_OPTIONS if option_readers(name, self.backends)},
                "attention": ", ".join(f"{b}={k}" for b, k in self.attention) or None,
                "parallel": self.parallel.spec}


@dataclass(frozen=True)
class Validated:
    """A pytest plugin object that hands settings `python -m harness bench` has validated to the session, with the
    command that gave them."""

    settings: Settings
    command: str
    plan_only: bool = False  # `python -m harness plan`: collect and plan the cases, run none


def settings_from(values: dict) -> Settings:
    """Validate option values (keyed by Option.dest; None = not given) into Settings, or raise HarnessError.

    Commands add their own keys: `opt_level` and `compute_capability` (TensorRT builds); `video` (`generate`: the
    model card's steps by default); `what_if` (`plan`: a --gpu-memory or --card names a CUDA card this machine
    need not have, and the run is planned as on it).
    """
    explicit = {k: v for k, v in values.items() if v is not None}
    # Declared defaults, environment variables among them (WAN_MODEL_PATH, WAN_BENCH_CACHE), under what was given.
    given = {**{o.dest: o.default_value() for o in OPTIONS if o.default_value() is not None}, **explicit}
    source = _choice(given["model_source"], SOURCES, "--model-source")
    _check_source_options(source, explicit)
    path = given.get("model_path") if source == "checkpoint" else None
    if source == "checkpoint":
        check_checkpoint_folder(path)
    what_if = given.get("what_if") and "device" not in explicit and ("gpu_memory" in explicit or "card" in explicit)
    device = "cuda" if what_if else _device(given.get("device"))
    backends = _names(given.get("backends", ",".join(GPU_BACKENDS if device == "cuda" else CPU_BACKENDS)),
                      check_backend, "--backends")
    precisions = _names(given.get("precisions", ",".join(default_precisions(backends))), check_precision, "--precisions")
    perf_precision = flagged("--perf-precision", check_precision,
                             given.get("perf_precision", "bf16" if device == "cuda" else "fp32"))
    # Only what was asked for: the defaults leave a precision to the backends that run it.
    for dest, asked in (("precisions", precisions), ("perf_precision", (perf_precision,))):
        if dest in explicit:
            _runnable(asked, backends, "--" + dest.replace("_", "-"))
    cache_dir = _folder(given["cache_dir"], "--cache-dir")
    return Settings(
        source=source, model_path=path, proxy_layers=check_layers(given["proxy_layers"]),
        backends=backends, candidate=_candidate(given.get("candidate"), backends),
        precisions=precisions, shapes=_shapes(given.get("shapes", DEFAULT_SHAPES[source]), source, path),
        steps=check_steps(given.get("steps", default_steps(source, _expert_depth(source, given, path),
                                                           bool(given.get("video"))))),
        speedup_gate=_gate(given["speedup_gate"]),
        video_gate=None if given.get("video_gate") is None else _gate(given["video_gate"], "--video-gate"),
        attribution=_attribution(given.get("attribution")),
        results_dir=_folder(given["results_dir"], "--results-dir"), cache_dir=cache_dir,
        device=device, perf_rounds=_positive(given["perf_rounds"], "--perf-rounds"),
        perf_precision=perf_precision,
        cfg_batch=_choice(given["cfg_batch"], (1, 2), "--cfg-batch"),
        parallel=_parallel(given["parallel"], given["cfg_batch"]),
        gpu_memory=_gpu_memory(given.get("gpu_memory"), device, given.get("what_if", False)),
        attention=attention_kernels(given.get("attention", ""), backends),
        attention_asked=tuple(b for b, _ in attention_kernels(given.get("attention", ""), backends, asked_only=True)),
        backend_options=BackendOptions(cache_dir=cache_dir, opt_level=_opt_level(given.get("opt_level", 3)),
                                       fp8_scales=_read_option("fp8_scales", given, FP8_SCALES, backends),
                                       compile_scope=_read_option("compile_scope", given, COMPILE_SCOPES, backends),
                                       fp8_recipe=_fp8_recipe(given, backends, source, path),
                                       calibration_prompts=_read_option("calibration_prompts", given, PROMPT_COUNTS,
                                                                        backends),
                                       engine_weights=_engine_weights(given["engine_weights"], backends),
                                       compute_capability=check_compute_capability(given.get("compute_capability", ""))),
        host_memory=_host_memory(given.get("host_memory")), card=_card(given.get("card"), device, what_if))


# The model card's denoising steps, and the cases' default for experts deeper than SHALLOW_LAYERS: there one fp32
# forward of an expert takes about half a minute on an H100, so a 40-step fp32 reference video would take 45
# minutes per prompt; 4 steps still run each expert on two of its timesteps, as calibration does (docs/hardware.md).
MODEL_CARD_STEPS, FULL_DEPTH_STEPS, SHALLOW_LAYERS = 40, 4, 8


def default_steps(source: str, depth: int, video: bool = False) -> int:
    """--steps when not given: 4 on the tiny model; the model card's 40 for a video a person watches (`generate`) and
    on experts of up to SHALLOW_LAYERS layers; FULL_DEPTH_STEPS on deeper ones."""
    if source == "tiny":
        return 4
    return MODEL_CARD_STEPS if video or depth <= SHALLOW_LAYERS else FULL_DEPTH_STEPS


def _expert_depth(source: str, given: dict, path: str | None) -> int:
    """The DiT experts' layers: --proxy-layers for the proxy, else the deepest expert's config."""
    if source == "proxy":
        return check_layers(given["proxy_layers"])
    return max(config["num_layers"] for config in dit_configs(source, path).values())


def _shapes(specs: str, source: str, path: str | None) -> tuple[VideoShape, ...]:
    """Parsed shapes that every DiT expert of the source can take (its own positional table decides)."""
    shapes = tuple(dict.fromkeys(parse_shapes(specs)))  # 480p,480x832x81 is one shape, run once
    if not shapes:
        raise HarnessError(f"--shapes {specs!r} names nothing; give presets (480p, 720p) or HxWxF, comma-separated")
    for name, config in dit_configs(source, path).items():
        for shape in shapes:
            check_fits(shape, config, f"checkpoint {name}" if source == "checkpoint" else source)
    return shapes


def _attribution(text: str | None) -> tuple[str, ...]:
    """--attribution: eager precisions other than fp32 (fp8 and int8 have no eager video: their activations are bf16)."""
    if text is None:
        return ()
    names = _names(text, check_precision, "--attribution")
    for name in names:
        if name == "fp32" or name in QUANTIZED:
            raise HarnessError(f"--attribution {name}: the drift attributed is eager PyTorch's against fp32, so name fp16 "
                               f"or bf16{' (fp8 and int8 run bf16 beside their quantized experts)' if name != 'fp32' else ''}")
    return names


def default_precisions(backends: tuple[str, ...]) -> tuple[str, ...]:
    """fp32, fp16 and bf16, then each quantized precision some backend among `backends` runs."""
    runs = {p for b in backends for p in BACKENDS[b].precisions}
    return ("fp32", "fp16", "bf16") + tuple(p for p in QUANTIZED if p in runs)


def attention_kernels(text: str, backends: tuple[str, ...], asked_only: bool = False) -> tuple[tuple[str, str], ...]:
    """--attention resolved into the kernel of every backend that has a choice (its default where not named;
    with `asked_only`, just the backends --attention named)."""
    takes = {b: BACKENDS[b].attention_kernels for b in backends}
    chosen: dict[str, str] = {}
    for item in (i.strip() for i in str(text).split(",") if i.strip()):
        backend, named, kernel = item.rpartition("=")
        if kernel not in KERNELS:
            raise HarnessError(f"--attention {item!r}: unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if named:
            if not backend.strip():
                raise HarnessError(f"--attention {item!r} names no backend before '='; write backend={kernel}")
            if backend not in takes:
                raise HarnessError(f"--attention {item}: {backend} is not among --backends {','.join(takes)}")
            flagged(f"--attention {item}", BACKENDS[backend].kernel, kernel)
            if chosen.get(backend, kernel) != kernel:
                raise HarnessError(f"--attention gives {backend} two kernels, {chosen[backend]} and {kernel}; "
                                   "name one")
            chosen[backend] = kernel
            continue
        kind = KERNELS[kernel].precision
        targets = [b for b in backends if b != "torch" and kernel in takes[b] and kind in BACKENDS[b].precisions]
        if not targets:
            raise HarnessError(f"--attention {kernel}: no backend among --backends {','.join(backends)} runs "
                               f"{kind} attention with it; name one as backend={kernel}")
        chosen.update(dict.fromkeys(targets, kernel))
    if asked_only:
        return tuple(chosen.items())
    return tuple((b, chosen.get(b, takes[b][0])) for b in backends if takes[b])


def parse_layout(text: str) -> Layout:
    """A --parallel spec ('cfg2', 'ulysses4', 'cfg2,ulysses2', 'none') as a Layout, or HarnessError."""
    text = str(text).strip()
    if text in ("", "none"):
        return ONE_GPU
    degrees: dict[str, int] = {}
    for item in (i.strip() for i in text.split(",")):
        match = re.fullmatch(r"(cfg|ulysses|ring)([1-9][0-9]*)", item)
        if not match:
            raise HarnessError(f"--parallel {text!r}: {item!r} is not cfg2, ulysses<N> or ring<N>; e.g. "
                               "--parallel cfg2,ulysses2 (none = one GPU)")
        axis, degree = match[1], int(match[2])
        if axis in degrees:
            raise HarnessError(f"--parallel {text!r} names {axis} twice")
        if axis == "cfg" and degree != 2:
            raise HarnessError(f"--parallel {item}: classifier-free guidance has two branches, so cfg2 is its only split")
        if degree == 1:
            raise HarnessError(f"--parallel {item} splits nothing; leave {axis} out (none = one GPU)")
        degrees[axis] = degree
    return Layout(**degrees)


def _parallel(text: str, cfg_batch: int) -> Layout:
    layout = parse_layout(text)
    if layout.cfg == 2 and cfg_batch == 2:
        raise HarnessError("--parallel cfg2 runs the two CFG branches on two ranks and --cfg-batch 2 runs them in one "
                           "batch-2 forward; choose one (--cfg-batch 1 with cfg2)")
    return layout


def _choice(value, choices, flag: str):
    if value not in choices:
        raise HarnessError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def flagged(flag: str, check: Callable[[str], str], value: str) -> str:
    """`check(value)`, its error prefixed with the option that carried the value."""
    try:
        return check(value)
    except HarnessError as exc:
        raise HarnessError(f"{flag}: {exc}") from None


def _names(text: str, check: Callable[[str], str], flag: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(flagged(flag, check, n.strip()) for n in str(text).split(",") if n.strip()))
    if not names:
        raise HarnessError(f"{flag} {text!r} names nothing; give a comma-separated list")
    return names


def _device(value: str | None) -> str:
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value not in ("cpu", "cuda"):
        raise HarnessError(f"--device {value!r}: use cpu or cuda (pick a GPU with CUDA_VISIBLE_DEVICES)")
    if value == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return value


def _candidate(value: str | None, backends: tuple[str, ...]) -> str | None:
    if value is None:
        return "tensorrt" if "tensorrt" in backends else next((b for b in backends if b != "torch"), None)
    flagged("--candidate", check_backend, value)
    if value == "torch":
        raise HarnessError("--candidate torch is the eager baseline the speed-up divides by; name another backend")
    if value not in backends:
        raise HarnessError(f"--candidate {value} is not among --backends {','.join(backends)}; add it there")
    return value


def _positive(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HarnessError(f"{flag} {value!r} must be a whole number >= 1")
    return value


def check_layers(value, flag: str = "--proxy-layers") -> int:
    """A count of A14B DiT layers: 1 to the expert's 40."""
    layers = _positive(value, flag)
    if layers > 40:
        raise HarnessError(f"{flag} {layers} must be between 1 and 40 (the A14B expert has 40)")
    return layers


def option_readers(name: str, backends: tuple[str, ...]) -> list[str]:
    """The backends among `backends` that read BackendOptions field `name` (harness.backends.LABELLED_OPTIONS)."""
    return [b for b in backends if name in BACKENDS[b].labelled_options]


def _read_option(name: str, given: dict, choices: tuple, backends: tuple[str, ...]):
    """A LABELLED_OPTIONS value: one of `choices` (the first is the default), and only a non-default value for a
    run with a backend that reads it (a value nothing reads would silently change nothing)."""
    flag, value = LABELLED_OPTIONS[name], given[name]
    _choice(value, choices, flag)
    if value != choices[0] and not option_readers(name, backends):
        raise HarnessError(f"{flag} {value}: no backend among --backends {','.join(backends)} reads it; "
                           f"add one of {', '.join(option_readers(name, tuple(BACKENDS)))}")
    return value


def _fp8_recipe(given: dict, backends: tuple[str, ...], source: str, path: str | None) -> str:
    """--fp8-recipe: read by a backend of the run, and leaving each expert of the source something to quantize."""
    recipe = _read_option("fp8_recipe", given, FP8_RECIPES, backends)
    for config in dit_configs(source, path).values():
        quantized_blocks(recipe, given["proxy_layers"] if source == "proxy" else config["num_layers"])
    return recipe


def _check_source_options(source: str, explicit: dict) -> None:
    """An option only another model source reads is a mistake to say out loud, not to ignore: `--model-path X`
    without `--model-source checkpoint` would otherwise time random weights."""
    for dest, flag, reader in (("model_path", "--model-path", "checkpoint"), ("proxy_layers", "--proxy-layers", "proxy")):
        if dest in explicit and source != reader:
            raise HarnessError(f"{flag} is read by --model-source {reader} only, and this run's source is {source}; "
                               f"add --model-source {reader} or drop {flag}")


def _runnable(precisions: tuple[str, ...], backends: tuple[str, ...], flag: str) -> None:
    """Each precision is run by some backend among `backends`: one that none runs only skips every case."""
    for precision in precisions:
        others = backends_running(precision)
        if not set(others) & set(backends):
            raise HarnessError(f"{flag} {precision}: no backend among --backends {','.join(backends)} runs it; "
                               f"add {' or '.join(others)}")


def _folder(value, flag: str) -> Path:
    """A folder the run writes into, checked now (harness.paths) so that a file in its place or a folder that cannot be
    made fails here in one line, not later in every case."""
    if not str(value).strip():
        raise HarnessError(f"{flag} is empty; give a folder")
    return writable_folder(value, f"{flag} {value}")


def _engine_weights(value: str, backends: tuple[str, ...]) -> str:
    """--engine-weights, and only a non-default one for a run that builds TensorRT engines (else it changes nothing)."""
    _choice(value, ENGINE_WEIGHTS, "--engine-weights")
    if value != ENGINE_WEIGHTS[0] and not set(backends) & set(ENGINE_BUILDERS):
        raise HarnessError(f"--engine-weights {value}: no backend among --backends {','.join(backends)} builds a "
                           f"TensorRT engine; add {' or '.join(ENGINE_BUILDERS)}")
    return value


def _opt_level(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise HarnessError(f"--opt-level {value!r}: TensorRT's builder optimization levels are 0 to 5")
    return value


def _gate(value, flag: str = "--speedup-gate") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HarnessError(f"{flag} {value!r} must be a finite number > 0")
    return float(value)


def _gpu_memory(value, device: str, what_if: bool) -> float | None:
    """--gpu-memory in GiB: a finite number above the memory no tensor can use, and no more than the run's device has
    (a run cannot be held to memory it does not have): the card's, or with --device cpu this machine's. `plan` alone
    (`what_if`) takes any card's from a CPU run, since it builds nothing."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 2:
        raise HarnessError(f"--gpu-memory {value!r}: give the card's memory in GiB, a number above 2 (e.g. 79.6 for "
                           "an H100 80GB)")
    if what_if:
        return float(value)
    if device == "cuda":
        total, has = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "this card has"
    else:
        total, has = meminfo("MemTotal"), "a --device cpu run has this machine's memory,"
    if value > total / GiB + 0.05:
        raise HarnessError(f"--gpu-memory {value:g}: {has} {total / GiB:.1f} GiB; give at most that, or plan for "
                           "a bigger card with `python -m harness plan --device cpu --gpu-memory ...`")
    return float(value)


def _host_memory(value) -> float | None:
    """--host-memory in GiB: a finite number above zero."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HarnessError(f"--host-memory {value!r}: give the runner's host memory in GiB, a number above 0 "
                           "(e.g. 128)")
    return float(value)


def _card(name: str | None, device: str, what_if: bool) -> str | None:
    """--card: one of thresholds.toml's [cards], named for a CUDA run (a CPU run has no card to time)."""
    if name is None:
        return None
    flagged("--card", lambda n: check_choice("card", n, CARDS), name)
    if device != "cuda" and not what_if:
        raise HarnessError(f"--card {name} names the GPU a time estimate is for, and this run is on the CPU; drop it, "
                           f"or plan for that card with `python -m harness plan --card {name}`")
    return name
