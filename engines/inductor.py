"""torch.compile (Inductor): what a Hopper user runs instead of TensorRT (1.21x on one A14B block, docs/hardware.md).

The eager backend runs the very same module object, so nothing here compiles in place: `module.compile()`
would swap the forward of the shared module and silently turn the eager baseline into a compiled one.
Instead the DiT gets a shallow clone whose `blocks` list holds wrappers of the original blocks (weights shared,
no copy: a 40-layer expert is 28.6 GB): `torch.compile` wrappers, or with --compile-scope forward nested-region
wrappers inside one compiled forward. Other components get a wrapper.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time

import torch

from engines.attention.processor import with_kernel
from harness.backends import BACKENDS, Backend, BackendOptions, Runner
from harness.case import Case
from harness.components import Component
from harness.distributed import sequence_parallel
from harness.errors import BackendUnavailable, HarnessError

log = logging.getLogger(__name__)

MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# Inductor settings every compile here gets, on top of its mode's, passed per call: torchao's quantize_()
# would otherwise set them process-wide, so an inductor run's kernels depended on whether torch-fp8 had been
# built before it in the same session. Coordinate-descent tuning re-tunes each generated Triton kernel's
# launch config (block sizes, warps) by timing it, which is what torchao recommends for its fp8 GEMM models.
TUNING = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}
# One session compiles the same block code for each shape, expert, precision and attention kernel; past
# dynamo's default of 8 recompiles a block would silently run eager, so the limit is raised.
RECOMPILE_LIMIT = 64


def _cpu_compiler() -> str | None:
    """Inductor's CPU code generation needs a C++ compiler on PATH."""
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


# torch.compiler.nested_compile_region came with torch 2.8; without it --compile-scope forward is refused.
_NESTED = getattr(torch.compiler, "nested_compile_region", None)


class _Region(torch.nn.Module):
    """A block as a nested compile region: torch.compile of the whole forward traces it once and stamps out
    the same compiled code for every identical block, so 40 layers still compile about as fast as one."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


if _NESTED is not None:
    _Region.forward = _NESTED(_Region.forward)


def blocks_clone(transformer: torch.nn.Module, wrap) -> torch.nn.Module:
    """A shallow clone of `transformer` whose `blocks` are `wrap(block)` of the original blocks.

    Only the clone's module table is new; parameters, buffers and the original `blocks` are shared and
    untouched. Identical blocks reuse one compiled graph (parameters are graph inputs), so 40 layers
    compile about as fast as one: PyTorch's "regional compilation" recipe.
    """
    clone = copy.copy(transformer)
    clone._modules = dict(transformer._modules)
    clone._modules["blocks"] = torch.nn.ModuleList(wrap(block) for block in transformer.blocks)
    return clone


def _dit_compiled(module: torch.nn.Module, compile_fn, kernel: str, scope: str) -> torch.nn.Module | None:
    """The DiT wrapper compiled per `scope` (its blocks' self-attention on `kernel`), or None without blocks.

    blocks: each block compiled on its own; the patch embedding, embedders and output head around them
    stay eager. forward: the whole forward compiled, the blocks as nested regions, so the head and tail
    fuse too (about 4 ms of a 1-layer 480p forward ran uncompiled per block scope: docs/hardware.md).
    """
    inner = getattr(module, "transformer", None)
    if inner is None or not isinstance(getattr(inner, "blocks", None), torch.nn.ModuleList):
        return None
    if kernel != "sdpa":
        inner = with_kernel(inner, kernel)  # a clone: the eager baseline keeps the stock processors
    clone = copy.copy(module)
    clone._modules = {**module._modules, "transformer": blocks_clone(inner, compile_fn if scope == "blocks" else _Region)}
    return clone if scope == "blocks" else compile_fn(clone)


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


class Inductor(Backend):
    """torch.compile with a chosen mode: a DiT expert per block ("regional") or its whole forward with the blocks
    as nested regions (--compile-scope); other components as one module."""

    spec = BACKENDS["inductor"]

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        if options.compile_mode not in MODES:
            raise HarnessError(f"unknown inductor mode {options.compile_mode!r}; choose one of {', '.join(MODES)}")
        self.mode = options.compile_mode
        self.scope = options.compile_scope

    def _available(self) -> tuple[bool, str]:
        if not torch.cuda.is_available() and _cpu_compiler() is None:
            return False, "no CUDA device and no C++ compiler (g++/clang++) on PATH: Inductor's CPU backend needs one"
        return True, ""

    def compile_options(self, dynamic: bool = False) -> dict:
        """Inductor's config for these compiles: what torch.compile(mode=...) would set, then TUNING."""
        from torch._inductor import list_mode_options

        return {**list_mode_options(self.mode, dynamic), **TUNING}

    def compile_fn(self, case: Case):
        """The torch.compile call used for every region; static shapes unless the case is dynamic."""
        options = self.compile_options(case.dynamic)
        return lambda m: torch.compile(m, options=options, dynamic=case.dynamic, fullgraph=False)

    def _build(self, component: Component, case: Case) -> Runner:
        if self.scope == "forward" and _NESTED is None:
            raise BackendUnavailable(f"--compile-scope forward needs torch.compiler.nested_compile_region (torch >= "
                                     f"2.8); this is torch {torch.__version__}: use --compile-scope blocks")
        if self.scope == "forward" and case.layout.sequence > 1:
            raise BackendUnavailable("--compile-scope forward would trace diffusers' context-parallel hooks around "
                                     "the blocks; split the tokens with --compile-scope blocks")
        _raise_recompile_limit()
        compile_fn = self.compile_fn(case)
        # Split before compiling, so the compiled blocks take their token shard and the exchange is traced.
        component = dataclasses.replace(component, module=sequence_parallel(component.module, case))
        dit = _dit_compiled(component.module, compile_fn, self.kernel, self.scope)
        compiled = compile_fn(component.module) if dit is None else dit
        scope = "whole module" if dit is None else {"blocks": "per block", "forward": "whole forward, blocks nested"}[self.scope]
        return _first_call_logged(compiled, f"{self.name}[{self.mode}, {scope}] {case.id}")


def _first_call_logged(module: torch.nn.Module, label: str) -> Runner:
    """Compilation happens on the first call; log how long it took so a slow build is visible."""
    state = {"first": True}

    @torch.inference_mode()
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        if not state["first"]:
            return module(*inputs)
        start = time.perf_counter()
        out = module(*inputs)
        state["first"] = False
        log.info("%s: first call (compile) took %.1f s", label, time.perf_counter() - start)
        return out

    return run
