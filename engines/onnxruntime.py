"""ONNX Runtime over the exported graph: CPU always, CUDA/TensorRT providers when the installed build has them."""
from __future__ import annotations

from pathlib import Path

import torch

from harness.backends import BackendOptions, Runner
from harness.cache import DiskCache
from harness.case import Case
from harness.components import Component
from harness.errors import BackendUnavailable
from harness.export import export_case

# Preferred first; ORT falls through the list for ops a provider lacks.
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OrtRunner:
    """A Runner over one ONNX file: torch tensors in, a torch tensor out on the first input's device."""

    def __init__(self, path: Path, providers: list[str], options=None):
        import onnxruntime

        try:  # options: onnxruntime.SessionOptions, e.g. graph optimizations off for Q/DQ graphs
            self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; their text is the reason
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailable(f"onnxruntime ({', '.join(providers)}) cannot load {path.name}: {first}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        # Host round trip: numpy feeds are the one path every provider takes; GPU timings through
        # this runner therefore include two copies and are not a fair TensorRT comparison.
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(out).to(inputs[0].device)


def cpu_graph_runner(path: Path) -> OrtRunner:
    """ONNX Runtime's CPU provider over one graph file: what export validation runs."""
    return OrtRunner(path, ["CPUExecutionProvider"])


def providers_for(device: torch.device | str) -> list[str]:
    """CPU for CPU cases; the GPU providers this onnxruntime build has, then CPU, for CUDA cases."""
    import onnxruntime

    if torch.device(device).type != "cuda":
        return ["CPUExecutionProvider"]
    have = set(onnxruntime.get_available_providers())
    return [p for p in _GPU_PROVIDERS if p in have] + ["CPUExecutionProvider"]


class OnnxRuntime:
    name = "onnxruntime"
    # bf16 is tried and, where the provider refuses it (the CPU one does), reported with ORT's words.
    precisions = ("fp32", "fp16", "bf16")
    attention_kernels = ()  # the exported graph decides

    def __init__(self, options: BackendOptions = BackendOptions()):
        self.cache = DiskCache(options.cache_dir)

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime not importable: {exc}"
        return True, ""

    def build(self, component: Component, case: Case) -> Runner:
        graph = export_case(component, case, self.cache)
        return OrtRunner(graph.path, providers_for(component.device))
