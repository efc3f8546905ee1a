"""ONNX export of each Wan component, cached on disk, and its validation against PyTorch.

Every TensorRT engine starts as one of these graphs, so each is proven twice before any GPU time
is spent: by onnx.checker/shape inference and by an ONNX Runtime CPU run against eager PyTorch.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from harness.backends import Runner
from harness.cache import DiskCache, content_digest, spec_hash
from harness.case import Case, is_dit
from harness.compare import ParityResult, judge_parity
from harness.components import Component
from harness.errors import BackendUnavailable, HarnessError
from harness.machine import version
from harness.memory import StageUsage, run_isolated, stage
from harness.shapes import VideoShape

log = logging.getLogger(__name__)

# Opset 20 has everything these graphs need and predates RMSNormalization-23, which the TensorRT
# parser rejected (NVIDIA/TensorRT#4639), so nothing can sneak it back in.
OPSET = 20
EXPORTERS = ("torchscript", "dynamo")
# Bumped when export_friendly() changes what a graph computes or contains.
PATCHES = "rmsnorm-fp32+nearest-v1"
GRAPH_FILE = "model.onnx"
# Post-processes a written graph in place and returns counts for the entry's metadata (see export_case).
Rewrite = Callable[[Path], dict]
META_FILE = "export.json"  # how the export went (times, stages, op counts): not part of the graph's content


@contextlib.contextmanager
def export_friendly() -> Iterator[None]:
    """Swap in export-friendly forwards with the same math, and restore the originals afterwards."""
    from diffusers.models.autoencoders import autoencoder_kl_wan

    swaps = [(torch.nn.RMSNorm, "forward", _rms_norm_decomposed),
             (autoencoder_kl_wan.WanUpsample, "forward", _upsample_nearest)]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in swaps]
    try:
        for owner, name, replacement in swaps:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _rms_norm_decomposed(self: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w in fp32, as plain ops every exporter and parser knows.

    Works around the dynamo exporter's missing aten._fused_rms_norm (pytorch/pytorch#168306), the
    legacy exporter's missing aten::rms_norm at opset < 23 (pytorch/pytorch#159249), and the
    TensorRT parser rejecting RMSNormalization-23 (NVIDIA/TensorRT#4639). The Wan DiT's q/k norms
    are torch.nn.RMSNorm; UMT5LayerNorm and the VAE's WanRMS_norm are already plain ops.
    """
    dims = tuple(range(-len(self.normalized_shape), 0))
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if self.weight is not None:
        y = y * self.weight.float()
    return y.to(x.dtype)


def _upsample_nearest(self, x: torch.Tensor) -> torch.Tensor:
    """WanUpsample with mode 'nearest': for an integer 2x scale it picks the same source pixels.

    The legacy exporter has no symbolic for aten::_upsample_nearest_exact2d (the same gap as the
    _aa upsamples, pytorch/pytorch#119232, which maintainers closed as not planned).
    """
    mode = "nearest" if self.mode == "nearest-exact" and _integer_scale(self.scale_factor) else self.mode
    return torch.nn.functional.interpolate(x.float(), size=self.size, scale_factor=self.scale_factor,
                                           mode=mode).type_as(x)


def _integer_scale(scale) -> bool:
    scales = scale if isinstance(scale, (tuple, list)) else (scale,)
    return scale is not None and all(float(s).is_integer() for s in scales)


@dataclass
class ExportedGraph:
    """A graph in the cache: where it is, what it computes, and what exporting it cost."""

    case: Case
    path: Path
    key: str
    fingerprint: str  # sha256 of the export spec: the engine cache keys on it
    hit: bool
    fetch_s: float  # this lookup (a hit is a load; a miss includes the export)
    export_s: float  # the original export, as recorded in the entry
    op_counts: dict[str, int] = field(default_factory=dict)
    content: str = ""  # what the graph and its weights hold (from the entry's manifest): the engine cache keys on it
    weight_bytes: int = 0  # the exported module's parameters
    stages: list[StageUsage] = field(default_factory=list)  # the original export's (model build,) export

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.iterdir() if p.is_file())


def export_spec(component: Component, case: Case, fingerprint: str, opset: int, exporter: str,
                example: tuple[torch.Tensor, ...]) -> dict:
    """Everything that changes the exported bytes; its hash is the cache key."""
    return {"component": component.name, "model": fingerprint, "precision": case.precision,
            "dynamic": case.dynamic, "inputs": [list(t.shape) for t in example], "opset": opset,
            "exporter": exporter, "patches": PATCHES, "torch": torch.__version__,
            "diffusers": version("diffusers"), "transformers": version("transformers"),
            "onnx": version("onnx")}


def export_case(component: Component, case: Case, cache: DiskCache, *, opset: int = OPSET,
                exporter: str | None = None, rewrite: Rewrite | None = None) -> ExportedGraph:
    """Export `component` at `case`, with the case's seeded inputs, to ONNX through the cache (a hit loads).

    `rewrite(path)` post-processes the written graph in place and returns counts for the entry's metadata
    (the Q/DQ rewrite of quantized experts); component.fingerprint must cover what it does.
    """
    exporter = exporter or default_exporter(case)
    if exporter not in EXPORTERS:
        raise HarnessError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    example = component.inputs(case)
    spec = export_spec(component, case, component.fingerprint, opset, exporter, example)

    def build(folder: Path) -> None:
        if component.holds_weights:
            meta = _export_into(component, case, example, folder, opset, exporter, rewrite, [])
        else:  # a skeleton: build and export the real component where its memory goes back when it ends
            meta = run_isolated(_export_from_recipe, component.recipe, case, folder, opset, exporter, rewrite)
        (folder / META_FILE).write_text(json.dumps(meta, indent=1))

    cached = cache.fetch("onnx", case.id, spec, build, _load_meta)
    log.info("onnx %s: %s in %.2f s (%s)", case.id, "cache hit" if cached.hit else "exported",
             cached.seconds, cached.path)
    meta = cached.value
    return ExportedGraph(case, cached.path / GRAPH_FILE, cached.path.name, spec_hash(spec), cached.hit,
                         cached.seconds, meta["export_s"], meta["op_counts"],
                         content_digest(cached.path, skip=(META_FILE,)), meta["weight_bytes"], meta["stages"])


def _export_into(component: Component, case: Case, example: tuple[torch.Tensor, ...], folder: Path, opset: int,
                 exporter: str, rewrite: Rewrite | None, stages: list[StageUsage]) -> dict:
    """Export into the entry folder (external data is written there directly), then rewrite it; returns the
    entry's metadata. export_s covers both: it is the time to the graph the entry holds."""
    first = len(stages)
    with stage("export", stages):
        _export_to(component, case, example, folder / GRAPH_FILE, opset, exporter)
    rewritten = {}
    if rewrite:
        with stage("rewrite", stages):
            rewritten["rewrite"] = rewrite(folder / GRAPH_FILE)
    return {"export_s": sum(s.seconds for s in stages[first:]),
            "op_counts": assert_plain_types(folder / GRAPH_FILE), "weight_bytes": component.weight_bytes,
            "stages": [s.as_dict() for s in stages], **rewritten}


def _export_from_recipe(recipe, case: Case, folder: Path, opset: int, exporter: str, rewrite: Rewrite | None) -> dict:
    """In a process of its own: build the component from its recipe, then export it (both stages measured)."""
    stages: list[StageUsage] = []
    with stage("model build", stages):
        component = recipe()
    return _export_into(component, case, component.inputs(case), folder, opset, exporter, rewrite, stages)


def default_exporter(case: Case) -> str:
    """TorchScript where it is right (~10x faster here); dynamo where TorchScript goes wrong.

    - Dynamic DiT: the TorchScript tracer bakes the RoPE sizes (Python ints from hidden_states.shape
      in WanRotaryPosEmbed.forward) into Expand nodes, so the graph fails at any other shape
      ("invalid expand shape"); torch.export keeps them symbolic.
    - UMT5 at fp16: its clamp, torch.where(isinf(x).any(), finfo.max - 1000, finfo.max), leaves a
      float64 Cast in the TorchScript graph; at bf16 TorchScript serialisation fails ("ScalarType
      ComplexDouble is an unexpected tensor scalar type"). Dynamo exports both cleanly.
    """
    if (is_dit(case.component) and case.dynamic) or (case.component == "text_encoder" and case.precision != "fp32"):
        return "dynamo"
    return "torchscript"


def _export_to(component: Component, case: Case, example: tuple[torch.Tensor, ...], path: Path,
               opset: int, exporter: str) -> None:
    """Run the chosen exporter; graphs over 2 GB get their weights as external data files."""
    module = component.module.eval()
    names = dict(input_names=list(component.input_names), output_names=[component.output_name])
    with export_friendly(), torch.inference_mode(False), torch.no_grad():
        if exporter == "dynamo":
            shapes = _dynamo_shapes(component) if case.dynamic else None
            # external_data=True always: a 40-layer expert is 28.6 GB, far past protobuf's 2 GB limit.
            # The exporter's optimizer must stay on: without it torch.split becomes SplitToSequence +
            # SequenceAt, which the TensorRT parser rejects (UNSUPPORTED_NODE, seen with TensorRT-RTX 1.7).
            torch.onnx.export(module, example, str(path), dynamo=True, opset_version=opset, external_data=True,
                              dynamic_shapes=shapes, **names)
        else:
            # The TorchScript exporter is ~10x faster on these graphs and writes external data by
            # itself once a graph passes 2 GB.
            axes = component.dynamic_axes if case.dynamic else None
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset,
                              dynamic_axes=axes, do_constant_folding=True, **names)


def _dynamo_shapes(component: Component) -> dict:
    return {name: {axis: torch.export.Dim.AUTO for axis in component.dynamic_axes.get(name, {})}
            for name in component.input_names}


def _load_meta(folder: Path) -> dict:
    """An entry is usable when its graph parses and its metadata holds what ExportedGraph reports; otherwise
    (an entry written before stages were recorded, too) the cache rebuilds it."""
    import onnx

    onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
    meta = json.loads((folder / META_FILE).read_text())
    return {**meta, "weight_bytes": int(meta["weight_bytes"]), "stages": [StageUsage(**s) for s in meta["stages"]]}


_WIDE_TYPES = {"DOUBLE": "float64", "COMPLEX64": "complex64", "COMPLEX128": "complex128"}


def assert_plain_types(path: Path) -> dict[str, int]:
    """Fail when any tensor in the graph is float64 or complex (TensorRT has neither); return op counts."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    wide = {onnx.TensorProto.DataType.Value(k): v for k, v in _WIDE_TYPES.items()}
    found = [f"{name}: {wide[t]}" for name, t in _tensor_types(model) if t in wide]
    if found:
        raise ValueError(f"exported graph {path} has {len(found)} tensors TensorRT cannot take "
                         f"(first: {', '.join(found[:5])}); find the op that promotes to float64/complex "
                         f"in the component and cast it in export_friendly()")
    return dict(collections.Counter(node.op_type for node in model.graph.node).most_common())


def _tensor_types(model) -> Iterator[tuple[str, int]]:
    """(name, elem_type) of every typed tensor: inputs, outputs, values, weights, Cast targets, constants."""
    graph = model.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        yield info.name, info.type.tensor_type.elem_type
    for init in graph.initializer:
        yield init.name, init.data_type
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                yield node.name, attr.i
            elif attr.HasField("t"):
                yield node.name, attr.t.data_type


def second_shape(case: Case) -> VideoShape:
    """A different shape for the dynamic check: twice the side, 4 more frames (VAE frames are static)."""
    s = case.shape
    frames = s.frames if case.component == "vae_decoder" else s.frames + 4
    return VideoShape(s.height * 2, s.width * 2, frames)


def check_inputs(component: Component, case: Case) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """The inputs a graph is checked at: the case's own and, for a dynamic graph, a second shape."""
    first = component.inputs(case)
    if not case.dynamic:
        return [(case.shape.id, first)]
    if case.component == "text_encoder":  # its dynamic axis is the text length, not the video shape
        half = first[0].shape[1] // 2
        return [(case.shape.id, first), (f"text{half}", tuple(t[:, :half] for t in first))]
    other = second_shape(case)
    return [(case.shape.id, first), (other.id, component.inputs(case, seed=1, shape=other))]


@dataclass(frozen=True)
class ParityAt:
    """ONNX Runtime against PyTorch at one input shape."""

    shape: str
    result: ParityResult

    @property
    def passed(self) -> bool:
        return bool(self.result)


@dataclass
class GraphCheck:
    """The validation of one exported graph; truthy when every check that ran passed."""

    case: Case
    checker: str = "not run"
    shape_inference: str = "not run"
    parity: list[ParityAt] = field(default_factory=list)
    parity_skipped: str | None = None

    def __bool__(self) -> bool:
        return (self.checker == "ok" and self.shape_inference == "ok"
                and (self.parity_skipped is not None or bool(self.parity))
                and all(p.passed for p in self.parity))

    @property
    def worst_rel_l2(self) -> float | None:
        return max((p.result.rel_l2 for p in self.parity), default=None)

    def metrics(self) -> dict[str, float | None]:
        return {"ort_rel_l2": self.worst_rel_l2}

    def thresholds(self) -> dict[str, float | None]:
        return {"ort_rel_l2": max((p.result.tolerance for p in self.parity), default=None)}

    def checks(self) -> dict[str, bool | None]:
        return {"ort_rel_l2": bool(self)}

    def __str__(self) -> str:
        parity = "; ".join(f"{p.shape}: {p.result.message()}" for p in self.parity) or f"skipped: {self.parity_skipped}"
        return (f"{self.case.id}: {'PASS' if self else 'FAIL'}; checker {self.checker}; "
                f"shape inference {self.shape_inference}; ORT {parity}")


def validate_graph(graph: ExportedGraph, load_runner, component: Component, reference: Component) -> GraphCheck:
    """checker + shape inference on the file, then the graph's runner against PyTorch at each check shape.

    `load_runner(path)` makes the Runner of the graph (ONNX Runtime CPU, from the caller) or raises
    BackendUnavailable with the runtime's own refusal (ORT's CPU provider has no bf16 kernels for some ops).
    `component` is in the graph's precision, `reference` its fp32 twin that the drift rule measures against.
    """
    import onnx

    result = GraphCheck(graph.case)
    result.checker = _try(lambda: onnx.checker.check_model(str(graph.path), full_check=False))
    # The inferred graph goes outside the entry: a file added there would make the entry fail its manifest check.
    with tempfile.TemporaryDirectory() as scratch:
        result.shape_inference = _try(lambda: onnx.shape_inference.infer_shapes_path(
            str(graph.path), str(Path(scratch) / GRAPH_FILE)))
    try:
        runner = load_runner(graph.path)
    except BackendUnavailable as exc:
        result.parity_skipped = str(exc)
        return result
    for label, inputs in check_inputs(component, graph.case):
        result.parity.append(ParityAt(label, _parity_at(runner, component, reference, inputs, graph.case.precision)))
    return result


def _try(check) -> str:
    try:
        check()
        return "ok"
    except Exception as exc:  # report the checker's own words, whatever it raises
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@torch.no_grad()
def _parity_at(runner: Runner, component: Component, reference: Component, inputs: tuple[torch.Tensor, ...],
               precision: str) -> ParityResult:
    """The graph against the fp32 module, allowed k x the module's own drift at the graph's precision."""
    eager = component.module(*inputs)
    ref_inputs = tuple(t.to(reference.device, torch.float32) if t.is_floating_point() else t.to(reference.device)
                       for t in inputs)
    expected = eager if precision == "fp32" else reference.module(*ref_inputs)
    return judge_parity(runner(*inputs), expected, precision, eager)
