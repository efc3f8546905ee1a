"""torchao fp8 row-wise matmuls on the DiT linears, fp8 self-attention, then torch.compile.

fp8 GEMMs + compile measured 1.39x over eager bf16 on one A14B block (torchao 0.18, torch 2.11, H100;
docs/hardware.md), with attention, half the block's FLOPs, still bf16; the 1.5x gate needs fp8
attention too (engines/attention/). Quantization replaces weights, so it works on a deep copy:
the eager bf16 baseline shares the original.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Callable, Collection, Iterable

import torch

from engines.attention.processor import install
from engines.cuda_graph import GraphedRunner
from engines.inductor import Inductor
from harness.backends import BACKENDS, Backend, BackendOptions, Runner
from harness.cache import Cached, DiskCache
from harness.calibration import calibrated
from harness.case import Case
from harness.components import Component
from harness.distributed import sequence_parallel
from harness.errors import BackendUnavailable
from harness.kernels import KERNELS
from harness.machine import version
from harness.residency import module_bytes, private_copy
from harness.recipes import FP8_RECIPES, block_index, expert_layers, quantized_blocks

log = logging.getLogger(__name__)

# fp8 e4m3 tensor-core matmuls (torch._scaled_mm) exist from Ada/Hopper on.
MIN_CAPABILITY = (8, 9)


def _torchao_reason() -> str:
    """'' when torchao imports with the fp8 config this backend uses, else why not."""
    try:
        importlib.import_module("torchao.quantization")
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except Exception as exc:  # an ImportError, or a torchao built against another torch failing on load
        return f"torchao not importable: {type(exc).__name__}: {exc}"
    return ""


def _device_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device: fp8 matmuls need compute capability >= 8.9"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}: "
                f"fp8 matmuls need >= 8.9 (Ada, Hopper, Blackwell)")
    return ""


def fp8_linear(module: torch.nn.Module, fqn: str, blocks: Collection[int] | None = None) -> bool:
    """Linears inside the transformer blocks (those numbered in `blocks`, the --fp8-recipe's; None: every block)
    whose dims suit torch._scaled_mm (multiples of 16).

    Embedders and the output projection stay bf16, as in the per-block measurement (docs/hardware.md).
    """
    index = block_index(fqn)
    return (isinstance(module, torch.nn.Linear) and index is not None and (blocks is None or index in blocks)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def fp8_copy_bytes(module: torch.nn.Module, blocks: Collection[int] | None = None) -> int:
    """The bytes of `module` once the fp8 linears of `blocks` (None: every block) hold one-byte weights (per-row
    scales are a rounding error)."""
    total = module_bytes(module)
    return total - sum(m.weight.numel() * (m.weight.element_size() - 1)
                       for name, m in module.named_modules() if fp8_linear(m, name, blocks))


def quantized_copy(module: torch.nn.Module, scales: dict[str, torch.Tensor] | None = None,
                   keep: Callable[[torch.nn.Module, str], bool] = fp8_linear) -> tuple[torch.nn.Module, int]:
    """A copy of `module` whose linears chosen by `keep` run fp8 e4m3 matmuls; and how many were quantized. The copy
    is made with harness.residency.private_copy: a component taking turns on the device is built anew from its
    recipe while the original waits in host memory, and torchao then swaps each linear's weight for its fp8 one in
    place, so a 40-layer expert never stands on the card twice.

    Without `scales`: weights and activations per row, each call's activations scaled by their own amax. With
    `scales` (static_scales, by linear name): one scale per weight and the given one per activation, as TensorRT's
    fp8 engines take them. set_inductor_config=False throughout: the Inductor backend passes its tuning per compile
    (engines/inductor.py) instead of torchao setting it for every later compile in the process.
    """
    from torchao.quantization import (FqnToConfig, Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor,
                                      quantize_)

    clone = private_copy(module)
    chosen = [name for name, m in clone.named_modules() if keep(m, name)]
    if chosen and scales is None:
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        quantize_(clone, config, filter_fn=keep)
    elif chosen:
        from torchao.prototype.quantization.quant_api import Float8StaticActivationFloat8WeightConfig

        configs = {name: Float8StaticActivationFloat8WeightConfig(
            act_quant_scale=scales[name].to(clone.get_submodule(name).weight.device), granularity=PerTensor(),
            set_inductor_config=False) for name in chosen}
        quantize_(clone, FqnToConfig(configs), filter_fn=None)
    return clone, len(chosen)


def static_scales(module: torch.nn.Module, calls: Iterable[tuple[torch.Tensor, ...]],
                  keep: Callable[[torch.nn.Module, str], bool] = fp8_linear) -> dict[str, torch.Tensor]:
    """One activation scale per linear chosen by `keep`: the largest |x| it saw over `calls`, over e4m3's largest
    value, by torchao's own observer (what its prepare-calibrate-convert flow computes). The observers watch the
    shared module through forward hooks, removed after, so no copy of the expert is made to calibrate."""
    from torchao.quantization import PerTensor
    from torchao.quantization.observer import AffineQuantizedMinMaxObserver
    from torchao.quantization.quant_primitives import MappingType

    observers, hooks = {}, []
    for name, sub in module.named_modules():
        if keep(sub, name):
            observers[name] = AffineQuantizedMinMaxObserver(
                mapping_type=MappingType.SYMMETRIC, target_dtype=torch.float8_e4m3fn, granularity=PerTensor(),
                eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32, zero_point_dtype=torch.float32,
                keepdim=True)
            hooks.append(sub.register_forward_pre_hook(functools.partial(_observe, observers[name])))
    try:
        with torch.inference_mode():
            for inputs in calls:
                module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: observer.calculate_qparams()[0].detach().cpu() for name, observer in observers.items()}


def _observe(observer: torch.nn.Module, module: torch.nn.Module, args: tuple) -> None:
    observer(args[0])


def calibrate(component: Component, case: Case, cache: DiskCache, recipe: str = FP8_RECIPES[0],
              prompts: int | None = None) -> Cached[dict]:
    """torch-fp8's static activation scales of `component` under `recipe`, through the calibration cache
    (harness.calibration): a hit runs no loop."""
    keep = functools.partial(fp8_linear, blocks=quantized_blocks(recipe, expert_layers(component.module)))
    settings = {"recipe": recipe, "torchao": version("torchao")}
    return calibrated("torch-fp8-static", component, case, cache, settings,
                      functools.partial(static_scales, component.module, keep=keep), prompts)


class TorchFp8(Backend):
    """fp8 row-wise GEMMs (torchao) + torch.compile per block; bf16 activations."""

    spec = BACKENDS["torch-fp8"]

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        self.scales = options.fp8_scales
        self.recipe = options.fp8_recipe
        self.prompts = options.calibration_prompts
        self.cache = DiskCache(options.cache_dir)
        # Blocks only: torchao's fp8 weights are tensor subclasses, and torch 2.11's nested compile regions
        # reject them at trace time ("Expected FakeTensor, got PrototypeFloat8Tensor" on an H200), so the
        # whole-forward scope is inductor's alone (docs/hardware.md).
        self.compiler = Inductor(dataclasses.replace(options, attention="sdpa", compile_scope="blocks"))
        # The whole forward as one CUDA graph (static shapes only). Off by default: on an H100 it changed a
        # CFG step by -0.7% to +0.3%, inside the rounds' IQR (results/gpu-h100-2026-11-26-fp8/cuda_graph.csv).
        self.cuda_graph = options.cuda_graph

    def _available(self) -> tuple[bool, str]:
        reason = "; ".join(r for r in (_device_reason(), _torchao_reason()) if r)
        return (not reason), reason

    def _build(self, component: Component, case: Case) -> Runner:
        if self.cuda_graph and case.dynamic:
            raise BackendUnavailable("torch-fp8: a CUDA graph needs static shapes; this case is dynamic")
        blocks = quantized_blocks(self.recipe, expert_layers(component.module))
        keep = functools.partial(fp8_linear, blocks=blocks)
        if not any(keep(m, name) for name, m in component.module.named_modules()):
            # the tiny DiT (width 24) has no linear fit for fp8 matmuls: it would be plain bf16
            raise BackendUnavailable(f"torch-fp8: no linear in {case.component}'s blocks has dims that are "
                                     f"multiples of 16, so nothing would run in fp8; use the proxy source")
        scales = (calibrate(component, case, self.cache, self.recipe, self.prompts).value["scales"]
                  if self.scales == "static" else None)
        module, count = quantized_copy(component.module, scales, keep)
        log.info("torch-fp8: %d linears of %s quantized to fp8 e4m3, %s scales, recipe %s", count, case.component,
                 self.scales, self.recipe)
        if self.kernel != "sdpa":
            # Installed before compiling, so Inductor fuses the Q/K/V quantization with RoPE and the norms. An fp8
            # kernel goes to the recipe's quantized blocks only: the blocks it keeps high keep bf16 attention.
            fp8_attention = KERNELS[self.kernel].precision == "fp8"
            install(module.transformer, self.kernel, blocks=blocks if fp8_attention else None)
        module = sequence_parallel(module, case, private=True)  # the quantized copy is this backend's own
        # The compiler's own part only: this backend's checks have run, and inductor's spec runs no fp8.
        runner = self.compiler._build(dataclasses.replace(component, module=module), case)
        return GraphedRunner(runner) if self.cuda_graph else runner
