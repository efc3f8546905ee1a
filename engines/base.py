"""The Backend interface and the registry of backends by name."""
from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch

from harness.case import Case
from harness.components import Component
from harness.errors import HarnessError

# A Runner takes the component's inputs (torch tensors on the case's device, floats in the case's
# dtype) in `Component.input_names` order and returns the single output tensor.
Runner = Callable[..., torch.Tensor]


class BackendUnavailable(Exception):
    """Raised by build() when this machine cannot run the backend; the message is the concrete reason."""


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]

    def available(self) -> tuple[bool, str]:
        """(True, '') or (False, a concrete reason such as 'tensorrt not importable: ...')."""

    def build(self, component: Component, case: Case) -> Runner:
        """Prepare `component` for `case` (compile, export, build an engine) and return a Runner."""


# name -> "module:attribute"; imported lazily so a missing optional package only affects its backend.
_REGISTRY = {
    "torch": "engines.torch_eager:TorchEager",
    "inductor": "engines.inductor:Inductor",
    "torch-fp8": "engines.torch_fp8:TorchFp8",
    "onnxruntime": "engines.onnxruntime:OnnxRuntime",
    "tensorrt": "engines.tensorrt:TensorRT",
    "tensorrt_rtx": "engines.tensorrt:TensorRTRTX",
}
BACKENDS = tuple(_REGISTRY)


def get_backend(name: str, **options) -> Backend:
    """Instantiate a backend by registry name; unknown names are a user error."""
    if name not in _REGISTRY:
        raise HarnessError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)(**options)

# Backends that export the component to ONNX first need the whole model (fingerprints, example inputs).
ONNX_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt_rtx")


def backend_for(name: str, model) -> Backend:
    """get_backend with the model handed to the ONNX-based backends, which export before they build."""
    return get_backend(name, model=model) if name in ONNX_BACKENDS else get_backend(name)
