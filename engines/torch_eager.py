"""Eager PyTorch: the fp32 reference and the fp16/bf16 baseline every candidate is measured against."""
from __future__ import annotations

import torch

from harness.backends import BACKENDS, Backend, Runner
from harness.case import Case
from harness.components import Component
from harness.distributed import sequence_parallel


def eager_runner(module: torch.nn.Module, case: Case) -> Runner:
    """`module` called as it is, split over the case's ranks where its layout says so."""
    module = sequence_parallel(module, case)

    @torch.inference_mode()
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        return module(*inputs)

    return run


class TorchEager(Backend):
    spec = BACKENDS["torch"]

    def _build(self, component: Component, case: Case) -> Runner:
        return eager_runner(component.module, case)
