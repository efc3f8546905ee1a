"""The Backend contract, and where the harness finds each backend: an import path loaded on first use.

The library never imports engines/ at module level (a test over the import graph holds it to that): the
engines build on the library, and the session loads a backend by its registered path when a case first
asks for it, as pytest loads its plugins. A missing optional package (TensorRT, torchao, cuDNN's
frontend) therefore only makes its own backend unavailable.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from harness.errors import HarnessError, check_choice
from harness.recipes import FP8_RECIPES

if TYPE_CHECKING:
    from harness.case import Case
    from harness.components import Component

# A Runner takes the component's inputs (torch tensors on the case's device, floats in the case's dtype)
# in `Component.input_names` order and returns the single output tensor.
Runner = Callable[..., torch.Tensor]

BACKENDS = {
    "torch": "engines.torch_eager:TorchEager",
    "inductor": "engines.inductor:Inductor",
    "torch-fp8": "engines.torch_fp8:TorchFp8",
    "modelopt": "engines.modelopt:ModelOpt",
    "onnxruntime": "engines.onnxruntime:OnnxRuntime",
    "tensorrt": "engines.tensorrt:TensorRT",
    "tensorrt_rtx": "engines.tensorrt:TensorRTRTX",
}
# `harness build` makes engines without running them: a builder, not a second method on the backend.
ENGINE_BUILDERS = {"tensorrt": "engines.tensorrt:TensorRTBuilder", "tensorrt_rtx": "engines.tensorrt:TensorRTRTXBuilder"}
# What runs an exported graph on the CPU when export is validated: OrtRunner(path) -> Runner.
GRAPH_RUNNER = "engines.onnxruntime:cpu_graph_runner"
# What exports an fp8/int8 case: the Q/DQ graph of the ModelOpt-quantized expert, (component, case, cache) -> graph.
QUANTIZED_EXPORT = "engines.modelopt_export:export_quantized"
# Self-attention kernels the torch backends can run in Wan's blocks (engines/attention/kernels.py), and the
# precision of their arithmetic. Each backend lists the ones it takes in `attention_kernels`, default first.
ATTENTION_KERNELS = {"sdpa": "bf16", "fa3": "bf16", "cudnn-fp8": "fp8", "fa3-fp8": "fp8", "triton-fp8": "fp8"}
KERNEL_CHECK = "engines.attention.kernels:kernel_available"  # name -> (runs here, why not and what to install)
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
# Options that only some backends read, with their flag: such a backend declares them in `labelled_options`,
# its rows name their values, and giving a non-default value to a run with no such backend is an error.
LABELLED_OPTIONS = {"fp8_scales": "--fp8-scales", "compile_scope": "--compile-scope", "fp8_recipe": "--fp8-recipe"}


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend is built with; each reads the fields it has a use for."""

    cache_dir: Path = Path(".cache")  # ONNX graphs and engines
    compile_mode: str = "default"  # torch.compile mode (inductor, torch-fp8)
    attention: str = ""  # self-attention kernel (ATTENTION_KERNELS); "" is the backend's own default
    opt_level: int = 3  # TensorRT builder optimization level
    weight_streaming: bool = False  # TensorRT: stream weights that do not fit the GPU's memory
    cuda_graph: bool = False  # replay static-shape forwards as one CUDA graph
    fp8_scales: str = FP8_SCALES[0]  # torch-fp8's activation scales; the first choice is the default
    compile_scope: str = COMPILE_SCOPES[0]  # what torch.compile covers in a DiT expert (inductor)
    fp8_recipe: str = FP8_RECIPES[0]  # which blocks the quantizing backends quantize (harness.recipes)
    engine_weights: str = ENGINE_WEIGHTS[0]  # what a DiT expert's TensorRT plan holds
    # TensorRT: the compute capability an engine is built for, "major.minor"; "" is this GPU's own, or with
    # no GPU a default per precision (engines/tensorrt.py AOT_TARGETS)
    compute_capability: str = ""


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]
    attention_kernels: tuple[str, ...]  # the ATTENTION_KERNELS it can run, its default first; () for graph backends
    shards_sequence: bool  # runs a case whose layout splits each forward's tokens over ranks (harness.distributed)

    def available(self) -> tuple[bool, str]:
        """(True, '') or (False, a concrete reason such as 'tensorrt not importable: ...')."""

    def build(self, component: "Component", case: "Case") -> Runner:
        """Prepare `component` for `case` (compile, export, build an engine) and return a Runner."""


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
    return [name for name, path in BACKENDS.items() if precision in load(path).precisions]


def make_backend(name: str, options: BackendOptions = BackendOptions()) -> Backend:
    """A backend instance by registry name; unknown names are a user error."""
    return load(BACKENDS[check_backend(name)])(options)
