"""Eager PyTorch: the fp32 reference and the fp16/bf16 baseline every candidate is measured against."""
from __future__ import annotations

import torch

from harness.backends import BackendOptions, Runner
from harness.case import Case
from harness.components import Component
from harness.distributed import sequence_parallel


class TorchEager:
    name = "torch"
    precisions = ("fp32", "fp16", "bf16")
    attention_kernels = ("sdpa",)  # the baseline keeps diffusers' stock attention
    shards_sequence = True

    def __init__(self, options: BackendOptions = BackendOptions()):
        pass  # eager PyTorch has nothing to set

    def available(self) -> tuple[bool, str]:
        return True, ""

    def build(self, component: Component, case: Case) -> Runner:
        module = sequence_parallel(component.module, case)

        @torch.inference_mode()
        def run(*inputs: torch.Tensor) -> torch.Tensor:
            return module(*inputs)

        return run
