"""Eager PyTorch: the fp32 reference and the fp16/bf16 baseline every candidate is measured against."""
from __future__ import annotations

import torch

from harness.case import Case
from harness.components import Component
from engines.base import Runner


class TorchEager:
    name = "torch"
    precisions = ("fp32", "fp16", "bf16")

    def available(self) -> tuple[bool, str]:
        return True, ""

    def build(self, component: Component, case: Case) -> Runner:
        module = component.module

        @torch.inference_mode()
        def run(*inputs: torch.Tensor) -> torch.Tensor:
            return module(*inputs)

        return run
