"""ONNX Runtime over the exported graph: CPU always, CUDA/TensorRT providers when the installed build has them."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from harness.backends import BACKENDS, Backend, BackendOptions, Runner
from harness.cache import DiskCache
from harness.case import Case
from harness.components import Component
from harness.errors import BackendUnavailable
from harness.export import export_case
from harness.residency import send_away

# Preferred first; ORT falls through the list for ops a provider lacks.
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# ORT's two ways of refusing a graph its kernels cannot run (the CPU provider has no bf16 Conv, for one):
#   INVALID_GRAPH ... Type Error: Type 'tensor(bfloat16)' of input parameter (x) of operator (Conv) in node (n) is invalid.
#   NOT_IMPLEMENTED : Could not find an implementation for Mul(14) node with name 'n'
_TYPE_REFUSAL = re.compile(r"Type '(?P<type>[^']+)' of \w+ parameter \([^)]*\) of operator \((?P<op>\w+)\) "
                           r"in node \((?P<node>[^)]*)\)")
_OP_REFUSAL = re.compile(r"implementation for (?P<op>\w+)\((?P<version>\d+)\) node with name '(?P<node>[^']*)'")


def _onnx_types() -> dict[torch.dtype, int]:
    """ONNX element types of the tensors a component takes and gives (bf16 has no numpy dtype to name it)."""
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL}


def refusal(message: str, providers: list[str], path: Path) -> str:
    """ORT's refusal of a graph in one line: which op (and type) the provider lacks, where it says so."""
    where = "CPU" if providers == ["CPUExecutionProvider"] else ", ".join(p.removesuffix("ExecutionProvider")
                                                                          for p in providers)
    typed, op = _TYPE_REFUSAL.search(message), _OP_REFUSAL.search(message)
    if typed:
        return f"ONNX Runtime {where} does not implement {typed['op']} for {typed['type']} (node {typed['node']})"
    if op:
        return (f"ONNX Runtime {where} does not implement {op['op']} (opset {op['version']}) for this graph's "
                f"tensor types (node {op['node']})")
    first = message.strip().splitlines()[0] if message.strip() else "no reason given"
    return f"ONNX Runtime {where} cannot load {path.name}: {first}"


class OrtRunner:
    """A Runner over one ONNX file: torch tensors in, a torch tensor out on the first input's device.

    Inputs and the output are bound by address (IOBinding): ORT reads the torch tensors where they are and
    allocates its output on their device, which torch then shares through DLPack, so a CUDA run makes
    no host copies and its timings compare fairly with TensorRT's.
    """

    def __init__(self, path: Path, providers: list[str], options=None):
        import onnxruntime

        try:  # options: onnxruntime.SessionOptions, e.g. graph optimizations off for Q/DQ graphs
            self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; their text is the reason
            raise BackendUnavailable(refusal(str(exc) or type(exc).__name__, providers, path)) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.types = _onnx_types()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        device = inputs[0].device
        binding = self.session.io_binding()
        bound = [t.contiguous() for t in inputs]  # held until the run ends: ORT reads their memory
        for name, t in zip(self.input_names, bound):
            binding.bind_input(name, t.device.type, t.device.index or 0, self.types[t.dtype], tuple(t.shape),
                               t.data_ptr())
        binding.bind_output(self.output_name, device.type, device.index or 0)
        if device.type == "cuda":
            # ORT runs on its own CUDA stream: the inputs torch queued on its stream must be finished first.
            # Run returns once ORT's stream is done, so the output is ready for torch's stream.
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        # The DLPack capsule holds its own reference to ORT's output buffer, so the tensor outlives the binding.
        return torch.from_dlpack(binding.get_outputs()[0])


def cpu_graph_runner(path: Path) -> OrtRunner:
    """ONNX Runtime's CPU provider over one graph file: what export validation runs."""
    return OrtRunner(path, ["CPUExecutionProvider"])


def providers_for(device: torch.device | str) -> list[str]:
    """CPU for CPU cases; the GPU providers this onnxruntime build has, then CPU (for the ops they lack), for CUDA
    cases."""
    import onnxruntime

    if torch.device(device).type != "cuda":
        return ["CPUExecutionProvider"]
    have = set(onnxruntime.get_available_providers())
    return [p for p in _GPU_PROVIDERS if p in have] + ["CPUExecutionProvider"]


def cpu_only_reason(device: str) -> str:
    """Why a `device` case cannot run on this onnxruntime build, or '': its CPU build (the `onnxruntime` package)
    has no GPU provider, and would run a CUDA case on the CPU, so timing it against eager CUDA would be meaningless."""
    import onnxruntime

    have = onnxruntime.get_available_providers()
    if device != "cuda" or any(p in have for p in _GPU_PROVIDERS):
        return ""
    return (f"this onnxruntime build runs on the CPU only (providers: {', '.join(have)}), so a CUDA case would run "
            "on the CPU, not the card: install onnxruntime-gpu for its CUDA provider")


class OnnxRuntime(Backend):
    spec = BACKENDS["onnxruntime"]

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        self.cache = DiskCache(options.cache_dir)

    def _available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime not importable: {exc}"
        return True, ""

    def runs_on(self, device: str) -> str:
        return cpu_only_reason(device)

    def _build(self, component: Component, case: Case) -> Runner:
        reason = cpu_only_reason(component.device.type)
        if reason:
            raise BackendUnavailable(f"onnxruntime: {reason}")
        graph = export_case(component, case, self.cache)
        send_away(component.module)  # the session holds the graph's weights: the eager original leaves the card
        return OrtRunner(graph.path, providers_for(component.device))
