"""Eager PyTorch: the fp32 reference and the fp16/bf16 baseline every candidate is measured against."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from harness.backends import BACKENDS, Backend, Runner
from harness.case import Case
from harness.components import Component
from harness.distributed import sequence_parallel

@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """True fp32 while it runs: no TF32 in matmuls or convolutions. PyTorch runs cuDNN convolutions (the VAE, the
    patch embedding) in TF32 by default, which rounds their inputs to 10 mantissa bits; the fp32 reference every
    candidate is judged against must not. Through the allow_tf32 flags, which set cuDNN's convolutions and RNNs
    together: the fp32_precision API refuses a later read of allow_tf32 once those two differ."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def eager_runner(module: torch.nn.Module, case: Case) -> Runner:
    """`module` called as it is, split over the case's ranks where its layout says so; in true fp32 for fp32."""
    module = sequence_parallel(module, case)
    precision = exact_fp32 if case.precision == "fp32" else contextlib.nullcontext

    @torch.inference_mode()
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with precision():
            return module(*inputs)

    return run


class TorchEager(Backend):
    spec = BACKENDS["torch"]

    def _build(self, component: Component, case: Case) -> Runner:
        return eager_runner(component.module, case)
