"""TensorRT and TensorRT-RTX: one implementation, with the TensorRT Python module passed in.

The two modules share the API this needs (strongly typed networks from ONNX, optimization
profiles, timing cache, execute_async_v3 with tensor addresses; docs/hardware.md). Here on the CPU,
`tensorrt_rtx` builds engines ahead of time, which proves each graph, profile and cache key against
TensorRT's own parser and builder; running an engine needs a supported GPU on a user's machine.

A DiT expert's plan holds no weights by default (plan_weights_mode): the engine cache keys it on the content of
the graph it was built from, and the runner refits or binds that graph's weights at load. The build itself is
engines/trt_build.py, run in a process of its own for a graph that holds weights.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from engines.cuda_graph import GraphedRunner
from engines.layer_precision import Gemm, PrecisionProof, gemms, parse_layers, precision_proof
from engines.trt_build import (LAYERS_FILE, NETWORK_FILE, PLAN_FILE, BuildOptions, EngineBuildError, Profile,
                               build_into, capturing_logger)
from harness.backends import BACKENDS, Backend, BackendOptions, Runner
from harness.cache import DiskCache
from harness.case import Case, is_dit, is_quantized
from harness.components import Component
from harness.errors import BackendUnavailable, HarnessError
from harness.export import ExportedGraph, check_inputs, export_case
from harness.memory import StageUsage, run_isolated
from harness.recipes import expert_layers, quantized_blocks
from harness.residency import send_away
from harness.thresholds import thresholds
from harness.weight_inputs import WeightInputs, read_index, weight_bytes_view, weight_inputs

log = logging.getLogger(__name__)

# TensorRT-RTX 1.7's deserializer names these as the compute capabilities it runs on (docs/hardware.md:
# "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0"); Hopper (9.0) is not among them.
RTX_RUNS_ON = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
# Modules that build ahead of time with no GPU present.
AOT_MODULES = ("tensorrt_rtx",)


def import_trt(module_name: str) -> tuple[ModuleType | None, str]:
    """(module, '') or (None, '<name> not importable: <why>')."""
    try:
        return importlib.import_module(module_name), ""
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        return None, f"{module_name} not importable: {type(exc).__name__}: {exc}"


def run_reason(module_name: str) -> str:
    """'' when engines can run on this machine's GPU, else the concrete reason."""
    if not torch.cuda.is_available():
        if module_name in AOT_MODULES:
            return f"{module_name} is build-only here: no CUDA device (engines build ahead of time on the CPU)"
        return f"{module_name} needs a CUDA device to build and run engines; none is visible"
    cc = torch.cuda.get_device_capability()
    if module_name in AOT_MODULES and cc not in RTX_RUNS_ON and cc < (12, 0):
        return (f"TensorRT-RTX cannot run on compute capability {cc[0]}.{cc[1]} (it runs on "
                f"{', '.join(f'{a}.{b}' for a, b in RTX_RUNS_ON)} and newer)")
    return ""


def build_target(module_name: str, compute_capability: str | None = None) -> str:
    """What the engine is built for: a named compute capability, the GPU's own, or the AOT default set on a CPU."""
    if compute_capability:
        return "sm" + compute_capability.replace(".", "")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    return f"aot-default:{module_name}"


# What an ahead-of-time build of a quantized precision targets when no compute capability is named: the
# lowest with fp8 tensor cores (Ada) for fp8, Ampere's 8.6 for int8. TensorRT-RTX refuses fp8 for 8.6 and
# below ("contains HW-specific datatypes: fp8_e4m3"), so fp8 is never dropped silently. Other precisions keep
# TensorRT-RTX's own default set of targets.
AOT_TARGETS = {"fp8": "8.9", "int8": "8.6"}


def compute_target(module_name: str, precision: str, asked: str = "") -> str | None:
    """The compute capability to name to the builder ("8.9"), or None for its own choice: this GPU on a GPU
    machine, the default set of an AOT build. Full TensorRT builds for the GPU it runs on only."""
    if torch.cuda.is_available():
        own = "{}.{}".format(*torch.cuda.get_device_capability())
        if asked and asked != own and module_name not in AOT_MODULES:
            raise HarnessError(f"{module_name} builds for the GPU it runs on (compute capability {own}); "
                               f"--compute-capability {asked} needs tensorrt_rtx, which builds ahead of time")
        return asked if module_name in AOT_MODULES else None
    return asked or AOT_TARGETS.get(precision)


def profile_from(names: tuple[str, ...], input_sets: list[tuple[torch.Tensor, ...]]) -> Profile:
    """min/max over every input set, opt at the first: covers each shape a case will run."""
    entries = []
    for i, name in enumerate(names):
        shapes = [tuple(inputs[i].shape) for inputs in input_sets]
        lo = tuple(min(dims) for dims in zip(*shapes))
        hi = tuple(max(dims) for dims in zip(*shapes))
        entries.append((name, lo, shapes[0], hi))
    return Profile(tuple(entries))


def case_profile(component: Component, case: Case) -> Profile:
    """The case's profile: static at its shape, or spanning the shapes its dynamic graph is checked at."""
    return profile_from(component.input_names, [inputs for _, inputs in check_inputs(component, case)])


@dataclass
class EngineBuild:
    """A built (or cached) engine with what the issue asks to report about it."""

    path: Path
    key: str
    hit: bool
    fetch_s: float
    build_s: float
    size_bytes: int
    layers: int
    layer_types: dict[str, int] = field(default_factory=dict)
    plugin_layers: list[str] = field(default_factory=list)
    target: str = ""
    trt_version: str = ""
    weights: str = "full"  # what the plan holds: "full", or stripped: "refit" | "inputs" (see plan_weights_mode)
    onnx_content: str = ""  # content digest of the graph entry the plan was built from (weights included)
    onnx_bytes: int = 0  # that graph's weights: of the source graph where the plan takes them as inputs
    stages: list[StageUsage] = field(default_factory=list)  # the original build's parse and build+serialize
    precision: str = ""
    layer_info: str = ""  # the builder's detailed layer information; "" where the module logs none
    weight_inputs: frozenset[str] = frozenset()  # the weights an "inputs" plan takes as graph inputs
    quantized_blocks: tuple[int, ...] | None = None  # the blocks its --fp8-recipe quantizes (None: every block)

    def gemms(self) -> list[Gemm]:
        """The engine's GEMM-like layers, from the builder's layer information."""
        return gemms(parse_layers(self.layer_info), self.weight_inputs)

    def proof(self, target: str | None = None, expected_flops: int = 0) -> PrecisionProof:
        """How much of the blocks' GEMM work runs in `target` (default: this engine's quantized precision); see
        precision_proof for `expected_flops`."""
        return precision_proof(self.gemms(), target or self.precision, expected_flops, self.quantized_blocks)

    @functools.cached_property
    def quantized_proof(self) -> PrecisionProof | None:
        """The proof of a quantized engine whose module logged its layers; None otherwise."""
        return self.proof() if is_quantized(self.precision) and self.layer_info else None

    def metrics(self) -> dict[str, float]:
        out = {"trt_layers": self.layers, "engine_mb": self.size_bytes / 2 ** 20, "build_s": self.build_s,
               "fetch_s": self.fetch_s, "plan_share": self.size_bytes / self.onnx_bytes}
        proof = self.quantized_proof
        if proof:
            out.update(quantized_gemm_share=proof.share, fused_self_attention=float(proof.fused_self_attention),
                       quantized_blocks=len(proof.target_blocks))
        return out

    def thresholds(self) -> dict:
        proof = self.quantized_proof
        if not proof:
            return {}
        return {"quantized_gemm_share": min_quantized_share(), "quantized_blocks": len(proof.quantized_blocks)}

    def checks(self) -> dict:
        """The quantized blocks' GEMM share, and their list: exactly the blocks the recipe quantizes."""
        proof = self.quantized_proof
        return proof.verdicts(min_quantized_share()) if proof else {}

    def shortfall(self) -> str:
        """Why the layer proof fails this quantized engine, in one line ('' when it holds, or no proof was logged)."""
        problem = self.quantized_proof.shortfall(min_quantized_share()) if self.quantized_proof else ""
        return f"{problem}; {self.path.parent / LAYERS_FILE} lists each GEMM's precision" if problem else ""

    def __str__(self) -> str:
        plugins = f", plugins: {', '.join(self.plugin_layers)}" if self.plugin_layers else ", no plugin layers"
        proof = f"; {self.quantized_proof}" if self.quantized_proof else ""
        return (f"engine {self.key}: {'cache hit' if self.hit else 'built'} in {self.fetch_s:.2f} s "
                f"(build {self.build_s:.2f} s), {self.size_bytes / 2 ** 20:.2f} MB ({self.weights} weights, "
                f"{100 * self.size_bytes / self.onnx_bytes:.2f}% of the ONNX), {self.layers} layers"
                f"{plugins}; target {self.target}, {self.trt_version}{proof}")


def min_quantized_share() -> float:
    """The share of the blocks' GEMM FLOPs a quantized engine must run in its precision (thresholds.toml)."""
    return thresholds()["quantized_engine"]["min_gemm_share"]


# A graph holding this many bytes is built in a process of its own (see build_plan).
ISOLATE_BYTES = 2 ** 30


def plan_weights_mode(asked: str, component: str, cuda: bool) -> str:
    """What the plan of `component` holds when `asked` (ENGINE_WEIGHTS) is asked for:

    - "full": the weights, in the plan;
    - "refit": none (STRIP_PLAN + REFIT_IDENTICAL); the runner refits them from the ONNX in the cache at load.
      TensorRT's refit and strip flags need a CUDA driver at build time (docs/hardware.md), so only with `cuda`;
    - "inputs": none; the weights are graph inputs the runner binds (harness.weight_inputs): how a machine with no
      CUDA device builds a weightless plan, and how it is timed on a GPU against a refitted one.
    """
    if asked == "full" or not is_dit(component):
        return "full"
    if asked == "inputs" or not cuda:
        return "inputs"
    return "refit"


def engine_spec(module_name: str, module_version: str, onnx_fingerprint: str, profiles: list[Profile],
                opt_level: int = 3, workspace_gib: float | None = None, weight_streaming: bool = False,
                weights: str = "full", onnx_content: str = "", compute_capability: str | None = None) -> dict:
    """Everything that changes the engine's bytes, or the weights it runs with; its hash is the engine cache key.

    `onnx_content` (the content digest of the graph entry the plan is built from) keys the plan on the weights
    themselves, so a weight-stripped plan is never served for a graph with other weights.
    """
    flags = ["STRONGLY_TYPED"] + (["WEIGHT_STREAMING"] if weight_streaming else [])
    return {"onnx": onnx_fingerprint, "module": module_name, "version": module_version,
            "target": build_target(module_name, compute_capability), "profiles": [p.as_json() for p in profiles],
            "opt_level": opt_level, "workspace_gib": workspace_gib, "profiling": "detailed",
            "flags": flags + (["STRIP_PLAN", "REFIT_IDENTICAL"] if weights == "refit" else []),
            "weights": weights, "onnx_content": onnx_content}


def build_plan(trt: ModuleType, graph: ExportedGraph, profiles: list[Profile], cache: DiskCache, *,
               opt_level: int = 3, workspace_gib: float | None = None, weight_streaming: bool = False,
               weights: str = "full", compute_capability: str | None = None,
               recipe_blocks: tuple[int, ...] | None = None) -> EngineBuild:
    """Parse the ONNX into a strongly typed network and build a serialized engine, through the cache.

    A plan of "inputs" weights is built from the graph's weights-as-inputs twin. A graph holding ISOLATE_BYTES
    or more is built in a process of its own: only TensorRT and the mapped graph sit beside the build, and
    TensorRT's memory goes back to the machine when it ends. `recipe_blocks`: the blocks a quantized engine's
    --fp8-recipe quantizes, which its layer proof checks (None: every block).
    """
    parsed: WeightInputs | ExportedGraph = weight_inputs(graph, cache) if weights == "inputs" else graph
    spec = engine_spec(trt.__name__, trt.__version__, graph.fingerprint, profiles, opt_level, workspace_gib,
                       weight_streaming, weights, parsed.content, compute_capability)
    timing_cache = cache.root / "timing" / f"{trt.__name__}-{trt.__version__}-{spec['target'].replace(':', '_')}.cache"
    isolate = weights != "inputs" and graph.size_bytes >= ISOLATE_BYTES
    options = BuildOptions(opt_level, workspace_gib, weight_streaming, strip=weights == "refit",
                           timing_cache=torch.cuda.is_available(), compute_capability=compute_capability,
                           drop_pages=isolate)
    record = {"weights": weights, "onnx_content": parsed.content, "onnx_bytes": graph.size_bytes}

    def build(folder: Path) -> None:
        args = (trt.__name__, parsed.path, profiles, folder, timing_cache, options, record)
        if isolate:
            run_isolated(build_into, *args)
        else:
            build_into(*args)

    cached = cache.fetch("engines", f"{graph.case.id}-{trt.__name__}", spec, build, _load_network_info)
    info = cached.value
    result = EngineBuild(cached.path / PLAN_FILE, cached.path.name, cached.hit, cached.seconds, info["build_s"],
                         (cached.path / PLAN_FILE).stat().st_size, info["layers"], info["layer_types"],
                         info["plugin_layers"], spec["target"], f"{trt.__name__} {trt.__version__}",
                         info["weights"], info["onnx_content"], info["onnx_bytes"], info["stages"],
                         graph.case.precision, info["layer_info"],
                         frozenset(w.name for w in parsed.weights) if weights == "inputs" else frozenset(),
                         recipe_blocks)
    if is_quantized(result.precision) and not result.layer_info:
        log.warning("%s %s logged no detailed layer information: no proof of what %s engine runs in %s",
                    trt.__name__, trt.__version__, graph.case.id, result.precision)
    log.info("%s", result)
    return result


def _load_network_info(folder: Path) -> dict:
    """An engine entry is usable when its plan is non-empty and its network summary holds what EngineBuild reports;
    the layer information is read beside it (a module that logs none leaves no file)."""
    if (folder / PLAN_FILE).stat().st_size == 0:
        raise ValueError("empty engine plan")
    info = json.loads((folder / NETWORK_FILE).read_text())
    missing = {"weights", "onnx_content", "onnx_bytes"} - info.keys()
    if missing:
        raise ValueError(f"{NETWORK_FILE} lacks {', '.join(sorted(missing))}")
    layers = folder / LAYERS_FILE
    return {**info, "stages": [StageUsage(**s) for s in info["stages"]],
            "layer_info": layers.read_text() if layers.is_file() else ""}


class WeightsMismatch(RuntimeError):
    """A weight-stripped plan was handed a graph other than the one it was built from."""


@dataclass(frozen=True)
class PlanWeights:
    """Where a weight-stripped plan gets its weights at load: refit from `onnx`, or bind the inputs `folder` indexes."""

    mode: str  # "refit" | "inputs"
    onnx: Path
    folder: Path


def plan_weights(engine: EngineBuild, graph: ExportedGraph, cache: DiskCache) -> PlanWeights | None:
    """The weights `engine` runs with, taken from `graph`; None for a plan that holds its own.

    Refuses (WeightsMismatch) a graph whose content is not the one the plan was built from: a stripped plan fed
    other weights would run, and silently compute something else.
    """
    if engine.weights == "full":
        return None
    source = weight_inputs(graph, cache) if engine.weights == "inputs" else graph
    if source.content != engine.onnx_content:
        raise WeightsMismatch(f"engine {engine.key} holds no weights and was built for ONNX content "
                              f"{engine.onnx_content[:12]}..., but {source.path} holds {source.content[:12]}...: "
                              f"other weights; build the engine for this graph instead")
    return PlanWeights(engine.weights, graph.path, source.path.parent)


def refit_from_onnx(trt: ModuleType, engine, onnx: Path, logger) -> None:
    """Fill a weight-stripped engine from its ONNX graph's weights (the external data beside it)."""
    refitter = trt.Refitter(engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx)) or not refitter.refit_cuda_engine():
        raise EngineBuildError(f"{trt.__name__} could not refit the engine from {onnx}: {'; '.join(logger.errors)}")
    missing = refitter.get_missing_weights()
    if missing:
        raise EngineBuildError(f"{trt.__name__} refit from {onnx} left {len(missing)} weights unset "
                               f"(first: {', '.join(missing[:3])})")


# The ONNX types of the weights a plan can take as inputs (harness.weight_inputs), the quantized ones included.
WEIGHT_DTYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16,
                 "FLOAT8E4M3FN": torch.float8_e4m3fn, "INT8": torch.int8}


def bind_weight_inputs(context, folder: Path) -> dict[str, torch.Tensor]:
    """Copy each weight the plan takes as an input to the GPU once and bind it; returns the tensors (keep them)."""
    bound = {}
    for entry in read_index(folder):
        host = torch.from_numpy(weight_bytes_view(folder, entry)).view(WEIGHT_DTYPES[entry.dtype]).reshape(entry.shape)
        bound[entry.name] = host.to("cuda")
        context.set_tensor_address(entry.name, bound[entry.name].data_ptr())
    return bound


def _torch_dtype(trt: ModuleType, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}
    return table[str(dtype).split(".")[-1]]


class EngineRunner:
    """Runs a deserialized engine on torch CUDA tensors, on the current torch stream.

    Inputs are bound by address (no copies), outputs are allocated once per output shape, and for
    a static engine a CUDA graph of the whole enqueue can be captured and replayed. A weight-stripped plan
    gets its weights once, at load (`weights`); `weights_s` is what that took.
    """

    def __init__(self, trt: ModuleType, plan: bytes, cuda_graph: bool = False, weight_streaming: bool = False,
                 weights: PlanWeights | None = None):
        self.trt = trt
        self.logger = capturing_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:  # version mismatch, unsupported GPU: TensorRT logged why
            raise BackendUnavailable(f"{trt.__name__} cannot deserialize the engine: "
                                     f"{'; '.join(self.logger.errors) or 'no reason logged'}")
        start = time.perf_counter()
        if weights is not None and weights.mode == "refit":
            refit_from_onnx(trt, self.engine, weights.onnx, self.logger)
        if weight_streaming:
            self._set_streaming_budget()
        self.context = self.engine.create_execution_context()
        self._weights = bind_weight_inputs(self.context, weights.folder) if weights and weights.mode == "inputs" else {}
        self.weights_s = time.perf_counter() - start
        if weights is not None:
            log.info("%s weights of the engine: %s from %s in %.1f s", trt.__name__, weights.mode, weights.folder,
                     self.weights_s)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
                       and n not in self._weights]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dynamic = any(-1 in tuple(self.engine.get_tensor_shape(n)) for n in self.inputs)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._graphed = GraphedRunner(self._enqueue_inputs) if cuda_graph and not self.dynamic else None

    def _set_streaming_budget(self) -> None:
        """Keep as many weights resident as free memory allows (10% headroom); stream the rest."""
        free, _ = torch.cuda.mem_get_info()
        budget = min(self.engine.streamable_weights_size, int(free * 0.9))
        self.engine.weight_streaming_budget_v2 = budget
        log.info("weight streaming: %.2f of %.2f GB resident", budget / 1e9, self.engine.streamable_weights_size / 1e9)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._enqueue(inputs) if self._graphed is None else self._graphed(*inputs)

    def _enqueue_inputs(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._enqueue(inputs)

    def _enqueue(self, inputs) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        for name, tensor in zip(self.inputs, inputs):
            tensor = self._checked(name, tensor)
            if self.dynamic:
                self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = self._output_buffer()
        self.context.set_tensor_address(self.outputs[0], out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.trt.__name__} execute_async_v3 failed: {'; '.join(self.logger.errors)}")
        return out

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        expected = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
        if tensor.dtype != expected or not tensor.is_cuda:
            raise TypeError(f"engine input {name} wants a CUDA {expected} tensor, got {tensor.device} {tensor.dtype}")
        return tensor.contiguous()

    def _output_key(self) -> tuple:
        return (self.outputs[0], tuple(self.context.get_tensor_shape(self.outputs[0])))

    def _output_buffer(self) -> torch.Tensor:
        key = self._output_key()
        if key not in self._buffers:  # allocated once per output shape, reused on every later call
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(self.outputs[0]))
            self._buffers[key] = torch.empty(key[1], dtype=dtype, device="cuda")
        return self._buffers[key]


class _Builder:
    """Export (cached) and build (cached) engines with one TensorRT module; subclasses name the module."""

    module_name = ""

    def __init__(self, options: BackendOptions = BackendOptions(), cache: DiskCache | None = None):
        self.cache = cache or DiskCache(options.cache_dir)
        self.options = dict(opt_level=options.opt_level, weight_streaming=options.weight_streaming)
        self.engine_weights = options.engine_weights
        self.compute_capability = options.compute_capability
        self.recipe = options.fp8_recipe
        self.prompts = options.calibration_prompts

    def can_build(self) -> tuple[bool, str]:
        """TensorRT-RTX builds without a GPU; full TensorRT needs one."""
        module, reason = import_trt(self.module_name)
        if module is None:
            return False, reason
        if self.module_name not in AOT_MODULES and not torch.cuda.is_available():
            return False, run_reason(self.module_name)
        return True, ""

    def build(self, component: Component, case: Case) -> tuple[ExportedGraph, EngineBuild]:
        ok, reason = self.can_build()
        if not ok:
            raise BackendUnavailable(reason)
        target = compute_target(self.module_name, case.precision, self.compute_capability)
        graph = self._graph(component, case)
        trt = importlib.import_module(self.module_name)
        weights = plan_weights_mode(self.engine_weights, case.component, torch.cuda.is_available())
        # What the proof checks a quantized engine's layers against, in every line that reports the engine.
        blocks = quantized_blocks(self.recipe, expert_layers(component.module)) if is_quantized(case.precision) else None
        engine = build_plan(trt, graph, [case_profile(component, case)], self.cache, weights=weights,
                            compute_capability=target, recipe_blocks=blocks, **self.options)
        return graph, engine

    def _graph(self, component: Component, case: Case) -> ExportedGraph:
        """The case's graph: for fp8/int8 the Q/DQ export of the ModelOpt-quantized expert."""
        if not is_quantized(case.precision):
            return export_case(component, case, self.cache)
        from engines.modelopt import modelopt_reason
        from engines.modelopt_export import export_quantized

        reason = modelopt_reason()
        if reason:
            raise BackendUnavailable(f"{case.precision} engines start from ModelOpt's Q/DQ graph: {reason}")
        return export_quantized(component, case, self.cache, recipe=self.recipe, prompts=self.prompts)


class TensorRTBuilder(_Builder):
    module_name = "tensorrt"


class TensorRTRTXBuilder(_Builder):
    module_name = "tensorrt_rtx"


class _TensorRTBackend(Backend):
    """The backend over one TensorRT module: builds through its builder, runs the engine on CUDA. TensorRT chooses
    its own attention kernels from the graph."""

    builder_class: type[_Builder] = _Builder

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        self.builder = self.builder_class(options)
        self.cuda_graph = options.cuda_graph
        self.weight_streaming = options.weight_streaming

    def _available(self) -> tuple[bool, str]:
        """Can this machine run engines? (tensorrt_rtx may still build them when it cannot.)"""
        module, reason = import_trt(self.builder.module_name)
        if module is None:
            return False, reason
        reason = run_reason(self.builder.module_name)
        return not reason, reason

    def _build(self, component: Component, case: Case) -> Runner:
        """An engine runner; a cached plan that does not deserialize is evicted and rebuilt once. The engine holds the
        component's weights on the card, so the eager original (which the export traced) leaves it first."""
        graph, engine = self.builder.build(component, case)
        send_away(component.module)
        try:
            return self._runner(graph, engine)
        except BackendUnavailable as exc:
            if not engine.hit:  # a fresh plan that fails is the builder's verdict: report it
                raise
            self.builder.cache.evict(engine.path.parent, str(exc))
            graph, engine = self.builder.build(component, case)
            return self._runner(graph, engine)

    def _runner(self, graph: ExportedGraph, engine: EngineBuild) -> Runner:
        trt = importlib.import_module(self.builder.module_name)
        weights = plan_weights(engine, graph, self.builder.cache)  # before the plan is read: a mismatch is refused
        return EngineRunner(trt, engine.path.read_bytes(), cuda_graph=self.cuda_graph,
                            weight_streaming=self.weight_streaming, weights=weights)


class TensorRT(_TensorRTBackend):
    spec = BACKENDS["tensorrt"]
    builder_class = TensorRTBuilder


class TensorRTRTX(_TensorRTBackend):
    spec = BACKENDS["tensorrt_rtx"]
    builder_class = TensorRTRTXBuilder
