"""Parse an ONNX graph and write a TensorRT plan into a cache entry folder; no torch, so it runs in a lean process.

Host memory is what limits a real-width build (docs/hardware.md has the measurements), so the build here:
- parses from the file, which lets the parser memory-map the external data rather than receive a copy;
- streams the plan into its file as the builder serializes it (build_serialized_network_to_stream), instead of
  holding the whole plan in memory beside TensorRT's own copy of the weights, and frees the parser and network,
  which hold that copy, before anything else;
- with `drop_pages`, keeps the pages of the mapped weight files out of this process's resident memory while
  TensorRT reads them (see _PageDropper).
engines/tensorrt.py runs a build of a graph that holds weights in a process of its own (harness.memory.run_isolated),
which imports this module and TensorRT only: neither torch nor the caller's memory sits beside the build.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib
import json
import logging
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engines.layer_precision import LAYERS_HEADER
from harness.cache import atomic_write_bytes
from harness.errors import HarnessError
from harness.memory import StageUsage, stage

log = logging.getLogger(__name__)

PLAN_FILE = "engine.plan"
NETWORK_FILE = "network.json"
LAYERS_FILE = "layers.txt"  # the builder's detailed layer information (engines/layer_precision.py)
MADV_DONTNEED = 4
DROP_EVERY_S = 0.005


class EngineBuildError(RuntimeError):
    """TensorRT's parser or builder refused the graph; the message carries its own words."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) shape per input; static when all three agree."""

    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]

    @property
    def static(self) -> bool:
        return all(lo == opt == hi for _, lo, opt, hi in self.shapes)

    def as_json(self) -> list:
        return [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.shapes]


@dataclass(frozen=True)
class BuildOptions:
    """How a plan is built; everything here but `drop_pages` changes the plan's bytes (and so the engine key)."""

    opt_level: int = 3
    workspace_gib: float | None = None
    weight_streaming: bool = False
    strip: bool = False  # STRIP_PLAN + REFIT_IDENTICAL: the plan keeps no weights; the runner refits them from the ONNX
    timing_cache: bool = False  # read and persist the timing cache: only where a GPU times tactics
    compute_capability: str | None = None  # "8.9": build for exactly this target; None: the builder's own choice
    drop_pages: bool = False


def build_into(module_name: str, onnx_path: Path, profiles: list[Profile], folder: Path, timing_cache: Path,
               options: BuildOptions, record: dict) -> None:
    """Build `onnx_path` into folder/PLAN_FILE and write folder/NETWORK_FILE: the network's layers, the stages'
    time and memory, and `record` (what the caller keys the plan on); and folder/LAYERS_FILE, the builder's own
    account of the engine's layers, where the module logs one."""
    trt = importlib.import_module(module_name)
    stages: list[StageUsage] = []
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with stage("parse", stages):
        parsed = parser.parse_from_file(str(onnx_path))  # from a file, so external data is found beside it
    if not parsed:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{trt.__name__} ONNX parser rejected {onnx_path}:\n" + "\n".join(errors))
    info = _network_info(trt, network)
    config = _builder_config(trt, builder, profiles, timing_cache, options)
    dropping = _PageDropper(onnx_path.parent) if options.drop_pages else contextlib.nullcontext()
    with dropping, stage("build+serialize", stages):
        built = _write_plan(trt, builder, network, config, folder / PLAN_FILE)
    if not built:
        raise EngineBuildError(f"{trt.__name__} builder failed on {onnx_path}:\n" + "\n".join(logger.errors))
    timing = config.get_timing_cache().serialize() if options.timing_cache else None
    del parser, network, config  # they hold TensorRT's copy of the weights: give it back first
    if timing is not None:
        atomic_write_bytes(timing_cache, bytes(timing))
    if logger.layer_info:
        (folder / LAYERS_FILE).write_text(logger.layer_info)
    summary = {"build_s": stages[-1].seconds, **info, "stages": [s.as_dict() for s in stages], **record}
    (folder / NETWORK_FILE).write_text(json.dumps(summary, indent=1))


def _builder_config(trt: ModuleType, builder, profiles: list[Profile], timing_cache: Path, options: BuildOptions):
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    # Per-layer information in the plan and in the build log: the proof of what each layer runs in.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.compute_capability:
        _set_target(trt, config, options.compute_capability)
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2 ** 30))
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.strip:
        # REFIT_IDENTICAL, not REFIT: the plan is only ever refitted with the weights it was built with (the engine
        # key holds their content), so TensorRT may still optimise with their values, as for a full plan.
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    # A persisted timing cache makes rebuilds (new profile, new flag) skip tactic timing already done.
    # An ahead-of-time build with no GPU times nothing, and TensorRT-RTX then refuses the cache.
    if options.timing_cache:
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


def _write_plan(trt: ModuleType, builder, network, config, path: Path) -> bool:
    """Build and serialize into `path`: streamed where the module can, else from the returned plan's own buffer
    (memoryview: bytes(plan) would be one more copy of it)."""
    if hasattr(trt, "IStreamWriter") and hasattr(builder, "build_serialized_network_to_stream"):
        with path.open("wb") as f:
            return builder.build_serialized_network_to_stream(network, config, _stream_writer(trt, f))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        return False
    with path.open("wb") as f:
        f.write(memoryview(plan))
    return True


def _stream_writer(trt: ModuleType, file):
    class FileWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)

        def write(self, data) -> int:
            file.write(data)
            return len(data)

    return FileWriter()


def _network_info(trt: ModuleType, network) -> dict:
    """Layer count, layer types and plugin layers of the parsed network (what TensorRT made of each op)."""
    plugin_types = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, n)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    types = collections.Counter(str(layer.type).split(".")[-1] for layer in layers)
    plugins = [layer.name for layer in layers if layer.type in plugin_types]
    return {"layers": len(layers), "layer_types": dict(types.most_common()), "plugin_layers": plugins}


def capturing_logger(trt: ModuleType):
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


class _PageDropper:
    """While TensorRT builds, unmap the pages of the ONNX weight files it has mapped read-only, every 5 ms.

    The parser maps the external data and the builder reads it once, while it copies the weights into its own
    memory, so without this the process holds the weights twice (measured: 2.4x the weights at 4 real-width
    layers; 1.45x with it). madvise(MADV_DONTNEED) on a read-only file mapping only removes its pages from this
    process's page table: they are clean, so nothing is lost, and a later read faults the same bytes back in from
    the page cache. Writable mappings are never touched (dropping a written private page would lose the write).
    It lowers this process's resident memory, not the machine's: the page cache keeps the pages, reclaimable, so
    the anonymous peak is the floor to quote. Linux only; elsewhere it does nothing.
    """

    def __init__(self, folder: Path):
        self.prefix = f"{folder.resolve()}/"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-dropper", daemon=True)
        self._madvise = None
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise

    def _ranges(self) -> list[tuple[int, int]]:
        ranges = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1] in ("r--p", "r--s") and fields[5].rstrip("\n").startswith(self.prefix):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
        return ranges

    def _run(self) -> None:
        while not self._stop.wait(DROP_EVERY_S):
            for lo, hi in self._ranges():
                self._madvise(lo, hi - lo, MADV_DONTNEED)

    def __enter__(self) -> "_PageDropper":
        if self._madvise is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
