"""Replay a runner's whole forward as one CUDA graph, where its input shapes are static.

The graph is captured on the first call into static input buffers; each later call copies its
inputs in, replays, and returns a copy of the output (the graph rewrites its one output buffer on
every replay). Shared by the TensorRT engine runner and torch-fp8.
"""
from __future__ import annotations

import torch

from harness.backends import Runner


class GraphedRunner:
    """`runner` replayed as a CUDA graph; a call with other shapes or dtypes than the first is refused."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_output: torch.Tensor | None = None

    def _signature(self, inputs) -> list[tuple]:
        return [(tuple(t.shape), t.dtype) for t in inputs]

    def _capture(self, inputs) -> None:
        self.static_inputs = tuple(t.contiguous().clone() for t in inputs)
        # One call outside capture first, on a side stream as torch.cuda.graphs recommends: lazy set-up
        # (TensorRT's, cuDNN plan builds, compiles, allocations) must not land in the graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.runner(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = self.runner(*self.static_inputs)

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self._capture(inputs)
        elif self._signature(inputs) != self._signature(self.static_inputs):
            raise ValueError(f"CUDA graph captured for inputs {self._signature(self.static_inputs)}, "
                             f"called with {self._signature(inputs)}: build one runner per static shape")
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return self.static_output.clone()
