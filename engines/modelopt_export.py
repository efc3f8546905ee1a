"""The fp8/int8 Q/DQ ONNX graph of a ModelOpt-quantized DiT expert, in standard ONNX operators.

The quantized copy (engines/modelopt.py) is exported like every graph (harness.export: TorchScript, opset 20,
inside export_friendly()), then rewritten here. ModelOpt 0.47.0's fp8 symbolics write the custom ops
trt::TRT_FP8QuantizeLinear (typed uint8) and trt::TRT_FP8DequantizeLinear, which onnx.checker and ONNX Runtime
reject. ModelOpt's own post-processing (FP8QuantExporter) is not used: modelopt.onnx needs the [onnx] extra,
which would downgrade onnx and onnxruntime, and it gives fp8 weights to every Conv, also to the patch
embedding kept high, and fp8 Q/DQ in fp32 to every softmax, also cross-attention's, which TensorRT's strongly
typed build then refuses. The rewrite:
  1. trt-domain fp8 Q/DQ become standard QuantizeLinear/DequantizeLinear on float8e4m3fn (saturating);
  2. each weight's Q is folded into a stored fp8 (int8) initializer that feeds its DQ, 2-4x smaller than
     the high-precision weight with a Q/DQ pair;
  3. a weight's DQ -> Transpose -> MatMul becomes a pre-transposed weight whose DQ feeds the MatMul, the
     pattern TensorRT fuses into a quantized GEMM.
Convs whose weight quantizer is off are left as they are.
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import torch

from engines.modelopt import quantized_module, quantized_weight_dtypes
from engines.onnxruntime import OrtRunner
from harness.backends import Runner
from harness.cache import DiskCache, spec_hash
from harness.case import Case
from harness.components import Component
from harness.errors import HarnessError
from harness.export import ExportedGraph, export_case
from harness.recipes import FP8_RECIPES, block_ranges, expert_layers, quantized_blocks

# Bumped when the rewrite changes what a graph contains.
REWRITE = "qdq-standard-v1"
# The dtype ModelOpt writes a Q/DQ's scales and attention casts in; it must be the graph's float type.
TRT_DTYPE = {torch.float16: "Half", torch.bfloat16: "BFloat16"}
FP8_MAX = 448.0  # largest finite float8e4m3fn
ZERO_POINT = "fp8_zero_point"  # one scalar initializer: its type is what makes a QuantizeLinear output fp8
# A graph with more weight bytes than this keeps them in a data file beside it: protobuf refuses messages past
# 2 GiB, and writing tensor by tensor spares the whole serialized copy (a real-width expert's rewrite peaked at
# 3x its weights with it).
EXTERNAL_DATA_BYTES = 256 << 20


def export_quantized(component: Component, case: Case, cache: DiskCache, scheme: str | None = None,
                     recipe: str = FP8_RECIPES[0], prompts: int | None = None) -> ExportedGraph:
    """The Q/DQ graph of `component` quantized for case.precision (fp8 or int8; or `scheme` beside the case's
    own activation precision, see engines.modelopt.calibrate) under `recipe` (--fp8-recipe), calibrated on the first
    `prompts` calibration prompts (--calibration-prompts), through the ONNX cache.

    Its cache key covers the calibration entry it was restored from, the rewrite and ModelOpt's version.
    """
    import modelopt

    if case.dynamic:
        raise HarnessError(f"{case.id}: fp8/int8 graphs are static; ModelOpt's Q/DQ symbolics exist for the "
                           "TorchScript exporter, which bakes the DiT's RoPE sizes; drop --dynamic")
    # The graph's float type is the case's: a checkpoint keeps some tensors in fp32 beside its bf16 layers
    # (diffusers' _keep_in_fp32_modules), so no single parameter tells it.
    dtype = case.dtype
    if dtype not in TRT_DTYPE:
        raise HarnessError(f"{case.id}: a Q/DQ graph computes in fp16 or bf16 (ModelOpt exports fp8 attention for "
                           f"16-bit graphs only), and this case computes in {dtype}; quantize beside an fp16 or bf16 "
                           "case")
    module, calibration = quantized_module(component, case, cache, scheme, recipe, prompts)
    layers = quantized_weight_dtypes(module)
    if not layers:  # a graph of it would hold no Q/DQ GEMM, whatever the weights' dtype
        raise HarnessError(f"{case.id}: nothing was quantized: every weight quantizer of the expert is off after "
                           f"ModelOpt restored it, where --fp8-recipe {recipe} means blocks "
                           f"{block_ranges(quantized_blocks(recipe, expert_layers(module)))}; an engine of it would run "
                           f"no GEMM in {scheme or case.precision}")
    if layers != {dtype}:
        raise HarnessError(f"{case.id}: the layers ModelOpt quantizes hold {' and '.join(sorted(map(str, layers)))} "
                           f"weights, not the case's {dtype}; export the expert of a model loaded in the case's "
                           "precision")
    _set_scale_dtype(module, TRT_DTYPE[dtype])
    fingerprint = spec_hash({"weights": component.fingerprint, "calibration": calibration, "rewrite": REWRITE,
                             "modelopt": modelopt.__version__})
    quantized = dataclasses.replace(component, module=module, fingerprint=fingerprint)
    return export_case(quantized, case, cache, exporter="torchscript", rewrite=rewrite_qdq)


def _set_scale_dtype(module: torch.nn.Module, trt_dtype: str) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for sub in module.modules():
        if isinstance(sub, TensorQuantizer):
            sub.trt_high_precision_dtype = trt_dtype


def qdq_cpu_runner(path: Path) -> Runner:
    """ONNX Runtime CPU over a Q/DQ graph with its graph optimizations off: with them on, ORT 1.32 computes
    fp8 Q/DQ graphs wrong (0.39 rel L2 from the unoptimized run, measured; turning off its
    QDQPropagationTransformer or MatMulAddFusion alone also fixes it)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return OrtRunner(path, ["CPUExecutionProvider"], options)


# ---------------------------------------------------------------------------------------------- the rewrite

class _Index:
    """Producers, consumers and constant values of one graph's tensors."""

    def __init__(self, graph):
        self.initializers = {i.name: i for i in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a Constant node's output; None for a computed tensor."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return next(numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value")
        return None


def rewrite_qdq(path: Path) -> dict[str, int]:
    """Rewrite the graph at `path` in place (see the module docstring); returns what it changed, by kind."""
    import onnx

    stale = _external_files(path)
    model = onnx.load(str(path))
    graph, index = model.graph, _Index(model.graph)
    counts: collections.Counter = collections.Counter()
    drop = []
    for q in [n for n in graph.node if n.op_type in ("QuantizeLinear", "TRT_FP8QuantizeLinear")]:
        dq = _only_dq(index, q)
        fp8 = q.domain == "trt"
        if fp8:
            _standardize(q, dq)
        weight = index.constant(q.input[0])
        if weight is None:
            counts[f"{'fp8' if fp8 else 'int8'} activation Q/DQ"] += 1
            continue
        transpose = _weight_transpose(index, dq)
        _store_weight(graph, q, dq, weight, np.asarray(index.constant(q.input[1]), np.float32), transpose, fp8)
        drop.append(q)
        counts[f"{'fp8' if fp8 else 'int8'} weights"] += 1
        if transpose is not None:
            _bypass(index, transpose.output[0], dq.output[0])
            drop.append(transpose)
            counts["weight transposes folded"] += 1
    if any(n.op_type == "QuantizeLinear" and ZERO_POINT in n.input for n in graph.node):
        _fp8_tensor(graph.initializer.add(), ZERO_POINT, torch.zeros(()))
    for node in drop:
        graph.node.remove(node)
    _tidy(model)
    _save(model, path)
    for name in stale - {path.name + ".data"}:
        (path.parent / name).unlink(missing_ok=True)
    return dict(counts)


def _only_dq(index: _Index, q):
    users = index.consumers[q.output[0]]
    if len(users) != 1 or users[0].op_type not in ("DequantizeLinear", "TRT_FP8DequantizeLinear"):
        raise ValueError(f"{q.name}: a Q must feed exactly one DQ, it feeds {[u.op_type for u in users]}")
    return users[0]


def _standardize(q, dq) -> None:
    """trt::TRT_FP8QuantizeLinear(x, scale) -> QuantizeLinear(x, scale, fp8 zero point, saturate=1); the DQ alike."""
    from onnx import helper

    q.domain, q.op_type = "", "QuantizeLinear"
    del q.input[2:]
    q.input.append(ZERO_POINT)
    q.attribute.append(helper.make_attribute("saturate", 1))
    dq.domain, dq.op_type = "", "DequantizeLinear"


def _weight_transpose(index: _Index, dq):
    """The Transpose after a weight's DQ when its outputs feed MatMuls only (x @ W^T of a Linear), else None."""
    users = index.consumers[dq.output[0]]
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    transpose = users[0]
    return transpose if all(c.op_type == "MatMul" for c in index.consumers[transpose.output[0]]) else None


def _store_weight(graph, q, dq, weight: np.ndarray, scale: np.ndarray, transpose, fp8: bool) -> None:
    """The weight quantized as its Q would at run time (x / scale, rounded, saturated), stored as an initializer
    the DQ reads in place of Q's output; pre-transposed when `transpose` follows the DQ (the DQ's axis moves too).

    Written into the graph's own initializer list: a protobuf list copies what it is extended with.
    """
    from onnx import helper, numpy_helper

    axis = next((a.i for a in q.attribute if a.name == "axis"), 1) % weight.ndim
    if scale.ndim:  # per output channel (int8): the scale broadcasts along `axis`
        scale = np.expand_dims(scale, tuple(d for d in range(weight.ndim) if d != axis))
    values = weight.astype(np.float32) / scale
    if transpose is not None:
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), list(range(weight.ndim))[::-1])
        values = np.ascontiguousarray(values.transpose(perm))
        if scale.ndim:
            del dq.attribute[:]
            dq.attribute.append(helper.make_attribute("axis", perm.index(axis)))
    name = f"{q.input[0]}_{'fp8' if fp8 else 'int8'}"
    dq.input[0] = name
    if fp8:
        _fp8_tensor(graph.initializer.add(), name, torch.from_numpy(values).clamp(-FP8_MAX, FP8_MAX))
    else:
        graph.initializer.add().CopyFrom(numpy_helper.from_array(np.clip(np.rint(values), -128, 127).astype(np.int8), name))


def _fp8_tensor(tensor, name: str, values: torch.Tensor) -> None:
    """Fill the TensorProto `tensor` with `values` as float8e4m3fn."""
    from onnx import TensorProto

    tensor.name, tensor.data_type = name, TensorProto.FLOAT8E4M3FN
    tensor.dims.extend(values.shape)
    tensor.raw_data = values.to(torch.float8_e4m3fn).contiguous().view(torch.uint8).numpy().tobytes()


def _bypass(index: _Index, old: str, new: str) -> None:
    """Every consumer of tensor `old` reads `new` instead."""
    for node in index.consumers[old]:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _tidy(model) -> None:
    """Drop the stale value_info (uint8-typed Q outputs), the unused high-precision weights and the trt opset."""
    graph = model.graph
    del graph.value_info[:]
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for i in reversed(range(len(graph.initializer))):  # in place: rebuilding the list would copy every weight
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
    opsets = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def _external_files(path: Path) -> set[str]:
    """The external data files the graph at `path` reads (the exporter writes them past 2 GB)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}


def _save(model, path: Path) -> None:
    import onnx

    large = sum(len(i.raw_data) for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=path.name + ".data")
