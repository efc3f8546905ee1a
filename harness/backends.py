"""The backend contract: each backend's declared spec, registered here, and the base class every engine fills in.

The library never imports engines/ at module level (a test over the import graph holds it to that): the
engines build on the library. What the settings, the session, the memory plan and the cases need to know of a
backend (what it runs, what it reads, what it holds) is declared in its BackendSpec below, so reading it loads no
engine; the engine class is loaded by its registered path when a case first builds it, as pytest loads its
plugins. A missing optional package (TensorRT, torchao, cuDNN's frontend) therefore only makes its own backend
unavailable.
"""
from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from harness.case import QUANTIZED, Layout, is_dit, is_quantized
from harness.errors import BackendUnavailable, HarnessError, check_choice
from harness.kernels import KERNEL_CHECK
from harness.pipeline import CALIBRATION_PROMPTS
from harness.recipes import FP8_RECIPES

if TYPE_CHECKING:
    from harness.case import Case
    from harness.components import Component

# A Runner takes the component's inputs (torch tensors on the case's device, floats in the case's dtype)
# in `Component.input_names` order and returns the single output tensor.
Runner = Callable[..., torch.Tensor]

# `harness build` makes engines without running them: a builder, not a second method on the backend.
ENGINE_BUILDERS = {"tensorrt": "engines.tensorrt:TensorRTBuilder", "tensorrt_rtx": "engines.tensorrt:TensorRTRTXBuilder"}
# What runs an exported graph on the CPU when export is validated: OrtRunner(path) -> Runner.
GRAPH_RUNNER = "engines.onnxruntime:cpu_graph_runner"
# What exports an fp8/int8 case: the Q/DQ graph of the ModelOpt-quantized expert, (component, case, cache) -> graph.
QUANTIZED_EXPORT = "engines.modelopt_export:export_quantized"
# What a DiT expert's TensorRT plan holds (--engine-weights; the VAE and text encoder keep their weights): stripped
# (none: refitted from the ONNX at load where the builder has a CUDA device, else the weights are graph inputs),
# full, or inputs (graph inputs even where it could refit: to time that plan on a GPU).
ENGINE_WEIGHTS = ("stripped", "full", "inputs")


# torch-fp8's activation scales: per row from each call's amax (torchao's dynamic scaling), or one per tensor
# calibrated once on the denoising loop's inputs, as TensorRT's fp8 engines take them.
FP8_SCALES = ("row", "static")
# What torch.compile covers in a DiT expert: each block on its own (the embeddings and output head stay eager),
# or the whole forward with the blocks as nested regions (compiled once, stamped out per block).
COMPILE_SCOPES = ("blocks", "forward")
# Options that only some backends read, with their flag: such a backend's spec lists them in `labelled_options`,
# its rows name their values, and giving a non-default value to a run with no such backend is an error.
LABELLED_OPTIONS = {"fp8_scales": "--fp8-scales", "compile_scope": "--compile-scope", "fp8_recipe": "--fp8-recipe",
                    "calibration_prompts": "--calibration-prompts"}
# How many of the calibration prompts static scales are calibrated on (--calibration-prompts), the default first:
# all of them (fewer held fp8 parity on the tiny model, which says little of real weights:
# results/cpu-2026-12-08-calibration-prompts).
PROMPT_COUNTS = tuple(range(len(CALIBRATION_PROMPTS), 0, -1))
# What a backend keeps on the device of its own, beside the eager module it shares, per component and precision
# (harness.plan): nothing; a copy of the module's weights; or a quantized copy, whose quantized GEMM weights take one
# byte each at fp8/int8 (QUANTIZED_BYTES counts them) and which is a whole copy at other precisions.
HOLDS = ("nothing", "copy", "quantized copy")
QUANTIZED_BYTES = "engines.torch_fp8:fp8_copy_bytes"  # (module, blocks) -> its bytes with one-byte fp8 GEMM weights there


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend is built with; each reads the fields it has a use for."""

    cache_dir: Path = Path(".cache")  # ONNX graphs and engines
    compile_mode: str = "default"  # torch.compile mode (inductor, torch-fp8)
    attention: str = ""  # self-attention kernel (harness.kernels); "" is the backend's own default
    opt_level: int = 3  # TensorRT builder optimization level
    weight_streaming: bool = False  # TensorRT: stream weights that do not fit the GPU's memory
    cuda_graph: bool = False  # replay static-shape forwards as one CUDA graph
    fp8_scales: str = FP8_SCALES[0]  # torch-fp8's activation scales; the first choice is the default
    compile_scope: str = COMPILE_SCOPES[0]  # what torch.compile covers in a DiT expert (inductor)
    fp8_recipe: str = FP8_RECIPES[0]  # which blocks the quantizing backends quantize (harness.recipes)
    calibration_prompts: int = PROMPT_COUNTS[0]  # how many calibration prompts static scales come from
    engine_weights: str = ENGINE_WEIGHTS[0]  # what a DiT expert's TensorRT plan holds
    # TensorRT: the compute capability an engine is built for, "major.minor"; "" is this GPU's own, or with
    # no GPU a default per precision (engines/tensorrt.py AOT_TARGETS)
    compute_capability: str = ""


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is and runs, declared without loading it; its engine class runs the checks that follow from it
    (Backend.build)."""

    name: str
    path: str  # its engine class, "module:Class"
    precisions: tuple[str, ...]  # fp8/int8 quantize the DiT experts only (harness.case)
    attention_kernels: tuple[str, ...] = ()  # the kernels (harness.kernels) it puts in the DiT blocks, its default
    #                                          first; () where an exported graph or a simulation decides
    shards_sequence: bool = False  # runs a case whose layout splits each forward's tokens over ranks (harness.distributed)
    labelled_options: tuple[str, ...] = ()  # the LABELLED_OPTIONS it reads
    untimed: str = ""  # why its timings stand for nothing, where it is a simulation (the perf cases skip with it)
    holds: str = HOLDS[0]  # what it keeps on the device of its own (HOLDS)
    # What calibrates the static scales it runs on (harness.calibration), "module:function" taking (component, case,
    # cache, recipe, prompts) -> the cached scales; '' where it runs none. torch-fp8's are read with --fp8-scales
    # static; the engines' fp8/int8 graphs are exported from ModelOpt's.
    calibrates: str = ""
    # It runs an exported ONNX graph, whose attention materialises each head's score matrix on the CPU (harness.plan).
    graph: bool = False

    def kernel(self, asked: str = "") -> str:
        """The self-attention kernel it runs when `asked` for one ('' asks for its default); '' for a backend with no
        choice. A kernel it does not take is a user error."""
        if asked and asked not in self.attention_kernels:
            choice = ", ".join(self.attention_kernels) or "none (it runs an exported graph)"
            why = " (the eager baseline keeps stock SDPA)" if self.name == "torch" else ""
            raise HarnessError(f"{self.name} takes {choice}{why}, not {asked}")
        return asked or next(iter(self.attention_kernels), "")


_EAGER = ("fp32", "fp16", "bf16")
MODELOPT_CALIBRATION = "engines.modelopt:calibrate"

BACKENDS = {spec.name: spec for spec in (
    # Eager PyTorch: the fp32 reference and the baseline every candidate is measured against, on diffusers' own attention.
    BackendSpec("torch", "engines.torch_eager:TorchEager", _EAGER, ("sdpa",), shards_sequence=True),
    BackendSpec("inductor", "engines.inductor:Inductor", _EAGER, ("sdpa", "fa3"), shards_sequence=True,
                labelled_options=("compile_scope",)),
    # cuDNN's fp8 attention first: it won against the Triton kernel on the H100 (notes/fp8-attention.md); fa3 and sdpa
    # keep self-attention in bf16 beside the fp8 GEMMs.
    BackendSpec("torch-fp8", "engines.torch_fp8:TorchFp8", ("fp8",), ("cudnn-fp8", "fa3-fp8", "triton-fp8", "fa3", "sdpa"),
                shards_sequence=True, labelled_options=("fp8_scales", "fp8_recipe", "calibration_prompts"),
                holds="quantized copy", calibrates="engines.torch_fp8:calibrate"),
    # The fake-quantized experts in eager PyTorch: ModelOpt's attention plugin quantizes Q/K/V around the stock SDPA.
    # It stands for a quantized engine, which runs one whole-sequence graph, and keeps bf16 weights: a whole copy.
    BackendSpec("modelopt", "engines.modelopt:ModelOpt", QUANTIZED,
                labelled_options=("fp8_recipe", "calibration_prompts"), holds="copy", calibrates=MODELOPT_CALIBRATION,
                untimed="modelopt simulates fp8/int8 in bf16 arithmetic; its timings stand for no engine"),
    # bf16 is tried and, where the provider refuses it (the CPU one does), reported with ORT's words. Its session holds
    # the graph's weights where it runs.
    BackendSpec("onnxruntime", "engines.onnxruntime:OnnxRuntime", _EAGER, holds="copy", graph=True),
    # fp8/int8 engines are built from ModelOpt's Q/DQ graphs of the experts and follow its --fp8-recipe. A stripped
    # plan is refitted at load, so the engine holds its weights on the device either way.
    *(BackendSpec(name, f"engines.tensorrt:{cls}", (*_EAGER, *QUANTIZED),
                  labelled_options=("fp8_recipe", "calibration_prompts"), holds="quantized copy", graph=True,
                  calibrates=MODELOPT_CALIBRATION)
      for name, cls in (("tensorrt", "TensorRT"), ("tensorrt_rtx", "TensorRTRTX"))),
)}


class Backend(ABC):
    """A backend: an engine class that names its registered `spec` and fills in `_build` (and `_available`, where it
    needs more than torch). The checks every backend shares run here once, from the spec, before the engine's own
    part, as Polygraphy's BaseRunner.infer runs its checks and then infer_impl."""

    spec: ClassVar[BackendSpec]

    def __init__(self, options: BackendOptions = BackendOptions()):
        self.kernel = self.spec.kernel(options.attention)

    # An instance answers for its spec: what a caller holding one asks.
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.spec.precisions

    @property
    def shards_sequence(self) -> bool:
        return self.spec.shards_sequence

    def available(self) -> tuple[bool, str]:
        """(True, '') or (False, a concrete reason such as 'tensorrt not importable: ...'): what the engine needs,
        then what its attention kernel needs."""
        ok, reason = self._available()
        if ok and self.kernel:
            return load(KERNEL_CHECK)(self.kernel)
        return ok, reason

    def runs_on(self, device: str) -> str:
        """Why this backend would not run a case on `device` ('cpu' or 'cuda') where it is available, or '': a backend
        that would quietly run somewhere else (on the CPU during a CUDA run) is unavailable there, not timed there."""
        return ""

    def refusal(self, component: str, precision: str, layout: Layout) -> str:
        """Why this backend cannot run `component` at `precision` under `layout`, or ''."""
        spec, kernel = self.spec, self.kernel
        if precision not in spec.precisions:
            return f"{spec.name} has no {precision} path (it runs {', '.join(spec.precisions)})"
        if is_quantized(precision) and not is_dit(component):
            return (f"{precision} quantization covers the DiT experts only, not {component} (the text encoder and "
                    "VAE stay bf16 beside them)")
        if layout.sequence > 1 and not spec.shards_sequence:
            return (f"{spec.name} runs one whole-sequence graph per forward; splitting its tokens over ranks "
                    f"(--parallel {layout.spec}) is out of its scope")
        if kernel and kernel != "sdpa":  # a kernel of ours, in the blocks' self-attention processors
            if not is_dit(component):
                return f"{spec.name} runs {kernel} attention in the DiT experts' blocks only, not in {component}"
            if layout.ring > 1:
                return (f"{kernel} attention returns no log-sum-exp, which ring attention needs; use ulysses, "
                        "or --attention sdpa")
        return ""

    def build(self, component: Component, case: Case) -> Runner:
        """Prepare `component` for `case` (compile, export, build an engine) and return a Runner; BackendUnavailable
        with the reason where the spec rules the case out."""
        reason = self.refusal(case.component, case.precision, case.layout)
        if reason:
            raise BackendUnavailable(reason)
        return self._build(component, case)

    def _available(self) -> tuple[bool, str]:
        return True, ""

    @abstractmethod
    def _build(self, component: Component, case: Case) -> Runner:
        """The engine's own part of `build`, for a case the shared checks let through."""


def check_compute_capability(text: str) -> str:
    """'' or a compute capability written major.minor, e.g. 8.9; anything else is a user error."""
    if text and not re.fullmatch(r"\d+\.\d", text):
        raise HarnessError(f"--compute-capability {text!r}: write it as major.minor, e.g. 8.9 (Ada) or 8.6 (Ampere)")
    return text


def check_backend(name: str) -> str:
    return check_choice("backend", name, BACKENDS)


def load(path: str):
    """The object at 'module:attribute'."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def backends_running(precision: str) -> list[str]:
    """Every registered backend with a path for `precision`, by name."""
    return [name for name, spec in BACKENDS.items() if precision in spec.precisions]


def backend_class(name: str) -> type[Backend]:
    """The engine class of a registered backend, loaded on first use; unknown names are a user error."""
    return load(BACKENDS[check_backend(name)].path)


def make_backend(name: str, options: BackendOptions = BackendOptions()) -> Backend:
    """A backend instance by registry name."""
    return backend_class(name)(options)
