"""TensorRT and TensorRT-RTX: one implementation, with the TensorRT Python module passed in.

The two modules share the API this needs (strongly typed networks from ONNX, optimization
profiles, timing cache, execute_async_v3 with tensor addresses; docs/hardware.md). Here on the CPU,
`tensorrt_rtx` builds engines ahead of time, which proves each graph, profile and cache key against
TensorRT's own parser and builder; running an engine needs a supported GPU on a user's machine.
"""
from __future__ import annotations

import collections
import functools
import importlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from engines.cuda_graph import GraphedRunner
from engines.layer_precision import LAYERS_HEADER, PrecisionProof, gemms, parse_layers, precision_proof
from harness.backends import BackendOptions, Runner
from harness.cache import DiskCache, atomic_write_bytes
from harness.case import QUANTIZED, Case, is_quantized
from harness.compare import thresholds
from harness.components import Component
from harness.errors import BackendUnavailable, HarnessError
from harness.export import ExportedGraph, check_inputs, export_case

log = logging.getLogger(__name__)

PLAN_FILE = "engine.plan"
NETWORK_FILE = "network.json"
LAYERS_FILE = "layers.txt"  # the builder's detailed layer information (engines/layer_precision.py)
# TensorRT-RTX 1.7's deserializer names these as the compute capabilities it runs on (docs/hardware.md:
# "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0"); Hopper (9.0) is not among them.
RTX_RUNS_ON = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
# Modules that build ahead of time with no GPU present.
AOT_MODULES = ("tensorrt_rtx",)


class EngineBuildError(RuntimeError):
    """TensorRT's parser or builder refused the graph; the message carries its own words."""


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


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) shape per input; static when all three agree."""

    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]

    @property
    def static(self) -> bool:
        return all(lo == opt == hi for _, lo, opt, hi in self.shapes)

    def as_json(self) -> list:
        return [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.shapes]


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
    precision: str = ""
    layer_info: str = ""  # the builder's detailed layer information; "" where the module logs none

    def proof(self, target: str | None = None) -> PrecisionProof:
        """How much of the blocks' GEMM work runs in `target` (default: this engine's quantized precision)."""
        return precision_proof(gemms(parse_layers(self.layer_info)), target or self.precision)

    @functools.cached_property
    def quantized_proof(self) -> PrecisionProof | None:
        """The proof of a quantized engine whose module logged its layers; None otherwise."""
        return self.proof() if is_quantized(self.precision) and self.layer_info else None

    def metrics(self) -> dict[str, float]:
        out = {"trt_layers": self.layers, "engine_mb": self.size_bytes / 2 ** 20, "build_s": self.build_s,
               "fetch_s": self.fetch_s}
        if self.quantized_proof:
            out.update(quantized_gemm_share=self.quantized_proof.share,
                       fused_self_attention=float(self.quantized_proof.fused_self_attention))
        return out

    def thresholds(self) -> dict:
        return {"quantized_gemm_share": min_quantized_share()} if self.quantized_proof else {}

    def checks(self) -> dict:
        proof = self.quantized_proof
        return {"quantized_gemm_share": proof.share >= min_quantized_share()} if proof else {}

    def __str__(self) -> str:
        plugins = f", plugins: {', '.join(self.plugin_layers)}" if self.plugin_layers else ", no plugin layers"
        proof = f"; {self.quantized_proof}" if self.quantized_proof else ""
        return (f"engine {self.key}: {'cache hit' if self.hit else 'built'} in {self.fetch_s:.2f} s "
                f"(build {self.build_s:.2f} s), {self.size_bytes / 2 ** 20:.2f} MB, {self.layers} layers"
                f"{plugins}; target {self.target}, {self.trt_version}{proof}")


def min_quantized_share() -> float:
    """The share of the blocks' GEMM FLOPs a quantized engine must run in its precision (thresholds.toml)."""
    return thresholds()["quantized_engine"]["min_gemm_share"]


def engine_spec(module_name: str, module_version: str, onnx_fingerprint: str, profiles: list[Profile],
                opt_level: int = 3, workspace_gib: float | None = None, weight_streaming: bool = False,
                compute_capability: str | None = None) -> dict:
    """Everything that changes the engine's bytes; its hash is the engine cache key."""
    return {"onnx": onnx_fingerprint, "module": module_name, "version": module_version,
            "target": build_target(module_name, compute_capability), "profiles": [p.as_json() for p in profiles],
            "opt_level": opt_level, "workspace_gib": workspace_gib, "profiling": "detailed",
            "flags": ["STRONGLY_TYPED"] + (["WEIGHT_STREAMING"] if weight_streaming else [])}


def build_plan(trt: ModuleType, onnx_path: Path, profiles: list[Profile], cache: DiskCache, readable: str,
               onnx_fingerprint: str, *, opt_level: int = 3, workspace_gib: float | None = None,
               weight_streaming: bool = False, compute_capability: str | None = None,
               precision: str = "") -> EngineBuild:
    """Parse the ONNX into a strongly typed network and build a serialized engine, through the cache."""
    spec = engine_spec(trt.__name__, trt.__version__, onnx_fingerprint, profiles, opt_level, workspace_gib, weight_streaming,
                       compute_capability)
    timing_cache = cache.root / "timing" / f"{trt.__name__}-{trt.__version__}-{spec['target'].replace(':', '_')}.cache"

    def build(folder: Path) -> None:
        options = dict(opt_level=opt_level, workspace_gib=workspace_gib, weight_streaming=weight_streaming,
                       compute_capability=compute_capability)
        _build_into(trt, onnx_path, profiles, folder, timing_cache, **options)

    cached = cache.fetch("engines", f"{readable}-{trt.__name__}", spec, build, _load_network_info)
    info = cached.value
    layer_info = cached.path / LAYERS_FILE
    result = EngineBuild(cached.path / PLAN_FILE, cached.path.name, cached.hit, cached.seconds, info["build_s"],
                         (cached.path / PLAN_FILE).stat().st_size, info["layers"], info["layer_types"],
                         info["plugin_layers"], spec["target"], f"{trt.__name__} {trt.__version__}", precision,
                         layer_info.read_text() if layer_info.is_file() else "")
    if is_quantized(precision) and not result.layer_info:
        log.warning("%s %s logged no detailed layer information: no proof of what %s engine runs in %s",
                    trt.__name__, trt.__version__, readable, precision)
    log.info("%s", result)
    return result


def _build_into(trt: ModuleType, onnx_path: Path, profiles: list[Profile], folder: Path, timing_cache: Path,
                *, opt_level: int, workspace_gib: float | None, weight_streaming: bool,
                compute_capability: str | None) -> None:
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external data is found beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{trt.__name__} ONNX parser rejected {onnx_path}:\n" + "\n".join(errors))
    config = _builder_config(trt, builder, profiles, timing_cache, opt_level, workspace_gib, weight_streaming)
    if compute_capability:
        _set_target(trt, config, compute_capability)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{trt.__name__} builder failed on {onnx_path}:\n" + "\n".join(logger.errors))
    build_s = time.perf_counter() - start
    (folder / PLAN_FILE).write_bytes(bytes(plan))
    if logger.layer_info:
        (folder / LAYERS_FILE).write_text(logger.layer_info)
    (folder / NETWORK_FILE).write_text(json.dumps({"build_s": build_s, **_network_info(trt, network)}, indent=1))
    if torch.cuda.is_available():
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))


def _builder_config(trt: ModuleType, builder, profiles: list[Profile], timing_cache: Path, opt_level: int,
                    workspace_gib: float | None, weight_streaming: bool):
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    # Per-layer information in the plan and in the build log: the proof of what each layer runs in.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2 ** 30))
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    # A persisted timing cache makes rebuilds (new profile, new flag) skip tactic timing already done.
    # An ahead-of-time build with no GPU times nothing, and TensorRT-RTX then refuses the cache.
    if torch.cuda.is_available():
        previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(previous), ignore_mismatch=True)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, lo, opt, hi in profile.shapes:
            optimization.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(optimization)
    return config


def _set_target(trt: ModuleType, config, compute_capability: str) -> None:
    """Build for exactly one named compute capability (TensorRT-RTX's ahead-of-time targets)."""
    name = "SM" + compute_capability.replace(".", "")
    known = sorted((n for n in dir(trt.ComputeCapability) if re.fullmatch(r"SM\d+", n)), key=lambda n: int(n[2:]))
    if name not in known:
        raise HarnessError(f"{trt.__name__} {trt.__version__} cannot target compute capability {compute_capability}; "
                           f"it targets {', '.join(f'{n[2:-1]}.{n[-1]}' for n in known)}")
    config.num_compute_capabilities = 1  # the count first, then each target
    config.set_compute_capability(getattr(trt.ComputeCapability, name), 0)


def _network_info(trt: ModuleType, network) -> dict:
    """Layer count, layer types and plugin layers of the parsed network (what TensorRT made of each op)."""
    plugin_types = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, n)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    types = collections.Counter(str(layer.type).split(".")[-1] for layer in layers)
    plugins = [layer.name for layer in layers if layer.type in plugin_types]
    return {"layers": len(layers), "layer_types": dict(types.most_common()), "plugin_layers": plugins}


def _load_network_info(folder: Path) -> dict:
    """An engine entry is usable when its plan is non-empty and its network summary reads."""
    if (folder / PLAN_FILE).stat().st_size == 0:
        raise ValueError("empty engine plan")
    return json.loads((folder / NETWORK_FILE).read_text())


def _capturing_logger(trt: ModuleType):
    """A TensorRT logger that keeps errors (for the failure message) and the detailed layer information, and
    forwards warnings to logging."""

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.layer_info = ""

        def log(self, severity, msg):
            if msg.startswith(LAYERS_HEADER):  # VERBOSE: one line per engine layer
                self.layer_info = msg
            if severity <= trt.ILogger.Severity.ERROR:
                # Kept for the exception a real failure raises; logged quietly because an AOT build
                # on a machine without a CUDA driver logs harmless cudaError 35 lines as errors.
                self.errors.append(msg)
                log.debug("%s: %s", trt.__name__, msg)
            elif severity <= trt.ILogger.Severity.WARNING:
                log.warning("%s: %s", trt.__name__, msg)

    return CapturingLogger()


def _progress_monitor(trt: ModuleType):
    """tqdm bars per builder phase (shown on a terminal only: tqdm disables itself otherwise)."""
    from tqdm import tqdm

    class TqdmProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False, disable=None)

        def step_complete(self, phase_name, step):
            self.bars[phase_name].update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.bars.pop(phase_name).close()

    return TqdmProgress()


def _torch_dtype(trt: ModuleType, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}
    return table[str(dtype).split(".")[-1]]


class EngineRunner:
    """Runs a deserialized engine on torch CUDA tensors, on the current torch stream.

    Inputs are bound by address (no copies), outputs are allocated once per output shape, and for
    a static engine a CUDA graph of the whole enqueue can be captured and replayed.
    """

    def __init__(self, trt: ModuleType, plan: bytes, cuda_graph: bool = False, weight_streaming: bool = False):
        self.trt = trt
        self.logger = _capturing_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:  # version mismatch, unsupported GPU: TensorRT logged why
            raise BackendUnavailable(f"{trt.__name__} cannot deserialize the engine: "
                                     f"{'; '.join(self.logger.errors) or 'no reason logged'}")
        if weight_streaming:
            self._set_streaming_budget()
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
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
        self.compute_capability = options.compute_capability

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
        engine = build_plan(trt, graph.path, [case_profile(component, case)], self.cache, case.id, graph.fingerprint,
                            compute_capability=target, precision=case.precision, **self.options)
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
        return export_quantized(component, case, self.cache)


class TensorRTBuilder(_Builder):
    module_name = "tensorrt"


class TensorRTRTXBuilder(_Builder):
    module_name = "tensorrt_rtx"


class _TensorRTBackend:
    """The backend over one TensorRT module: builds through its builder, runs the engine on CUDA."""

    name = ""
    builder_class: type[_Builder] = _Builder
    precisions = ("fp32", "fp16", "bf16", *QUANTIZED)  # fp8/int8: the DiT experts, from ModelOpt Q/DQ graphs
    attention_kernels = ()  # TensorRT chooses its own attention kernels from the graph
    shards_sequence = False  # one exported graph holds the whole sequence's attention

    def __init__(self, options: BackendOptions = BackendOptions()):
        self.builder = self.builder_class(options)
        self.cuda_graph = options.cuda_graph
        self.weight_streaming = options.weight_streaming

    def available(self) -> tuple[bool, str]:
        """Can this machine run engines? (tensorrt_rtx may still build them when it cannot.)"""
        module, reason = import_trt(self.builder.module_name)
        if module is None:
            return False, reason
        reason = run_reason(self.builder.module_name)
        return not reason, reason

    def build(self, component: Component, case: Case) -> Runner:
        """An engine runner; a cached plan that does not deserialize is evicted and rebuilt once."""
        _, engine = self.builder.build(component, case)
        try:
            return self._runner(engine)
        except BackendUnavailable as exc:
            if not engine.hit:  # a fresh plan that fails is the builder's verdict: report it
                raise
            self.builder.cache.evict(engine.path.parent, str(exc))
            _, engine = self.builder.build(component, case)
            return self._runner(engine)

    def _runner(self, engine: EngineBuild) -> Runner:
        trt = importlib.import_module(self.builder.module_name)
        return EngineRunner(trt, engine.path.read_bytes(), cuda_graph=self.cuda_graph,
                            weight_streaming=self.weight_streaming)


class TensorRT(_TensorRTBackend):
    name = "tensorrt"
    builder_class = TensorRTBuilder


class TensorRTRTX(_TensorRTBackend):
    name = "tensorrt_rtx"
    builder_class = TensorRTRTXBuilder
