"""NVIDIA ModelOpt post-training quantization of the DiT experts (fp8, int8 SmoothQuant), and the `modelopt`
backend: the fake-quantized experts run eagerly in PyTorch, on the CPU or any GPU.

Everything that touches ModelOpt lives here and in engines/modelopt_export.py, written against 0.47.0: its
quantization configs are lists of {quantizer_name, cfg | enable} entries where a later entry wins, and its
examples deprecate the diffusers ONNX -> TensorRT workflow in 0.48, so the version is pinned and checked.

Calibration runs the expert on the inputs it sees in the real denoising loop (Component.loop_inputs), on a
deep copy: the shared module stays the unquantized eager baseline. The calibrated quantizer state is cached
through harness.calibration (keyed without running the loop) and every run, calibrated or not, restores it onto a
fresh deep copy, so a cache hit and a miss give the same module. The backend's numbers stand for a quantized
engine's numerics; its timings stand for nothing: fake quantization rounds in fp8/int8 and computes in bf16.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from typing import Collection

import torch

from engines.torch_eager import eager_runner
from harness.backends import BACKENDS, Backend, BackendOptions, Runner
from harness.cache import Cached, DiskCache
from harness.calibration import calibrated
from harness.case import Case
from harness.components import Component
from harness.errors import BackendUnavailable
from harness.machine import version
from harness.residency import private_copy
from harness.recipes import FP8_RECIPES, HIGH_PRECISION_MODULES, expert_layers, quantized_blocks

log = logging.getLogger(__name__)

MODELOPT_VERSION = "0.47.0"

# SmoothQuant's migration strength, the SmoothQuant paper's default: int8 measured 0.011-0.019 rel L2 on the bf16
# tiny DiT at 128x128x9 (held-out loop calls), where fp8 measured 0.018-0.025.
SMOOTHQUANT_ALPHA = 0.5


def _mtq():
    """modelopt.torch.quantization, imported quietly (it warns about untested transformers versions)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def modelopt_reason() -> str:
    """'' when ModelOpt 0.47.0 imports, else why not and what to install."""
    try:
        import modelopt

        _mtq()
        import modelopt.torch.opt  # noqa: F401
    except Exception as exc:  # ImportError, or a build against another torch failing as it loads
        return f"nvidia-modelopt not importable: {type(exc).__name__}: {exc}; pip install nvidia-modelopt=={MODELOPT_VERSION}"
    if modelopt.__version__ != MODELOPT_VERSION:
        return (f"nvidia-modelopt {modelopt.__version__} is installed; this harness is written against "
                f"{MODELOPT_VERSION} (list-style configs; 0.48 deprecates the diffusers ONNX export): "
                f"pip install nvidia-modelopt=={MODELOPT_VERSION}")
    return ""


def _keep_high_precision(cfg: dict, recipe: str, layers: int) -> dict:
    """Every quantizer off outside the blocks `recipe` quantizes (harness.recipes), in an expert of `layers` blocks.

    ModelOpt matches a quantizer's full name with fnmatch; the dot after the index keeps block 1's pattern off
    blocks 10-19.
    """
    quantized = quantized_blocks(recipe, layers)
    patterns = [f"*{name}*" for name in HIGH_PRECISION_MODULES]
    patterns += [f"*blocks.{i}.*" for i in range(layers) if i not in quantized]
    cfg["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in patterns]
    return cfg


def _fp8_config(recipe: str, layers: int) -> dict:
    """FP8_DEFAULT_CFG (per-tensor e4m3 weights and inputs, max calibration) with fp8 self-attention.

    Self-attention's Q, K, V and softmax output in fp8, as torch-fp8 runs it; it cost the tiny DiT 0.0198 ->
    0.0203 rel L2. Cross-attention over the 512 text tokens stays 16-bit.
    """
    cfg = copy.deepcopy(_mtq().FP8_DEFAULT_CFG)
    e4m3 = {"num_bits": (4, 3), "axis": None}
    cfg["quant_cfg"] += [{"quantizer_name": "*attn1.[qkv]_bmm_quantizer", "cfg": dict(e4m3)},
                         {"quantizer_name": "*attn1.softmax_quantizer", "cfg": dict(e4m3)}]
    return _keep_high_precision(cfg, recipe, layers)


def _int8_config(recipe: str, layers: int) -> dict:
    """INT8_SMOOTHQUANT_CFG: int8 weights per output channel, int8 inputs per tensor after smoothing."""
    cfg = copy.deepcopy(_mtq().INT8_SMOOTHQUANT_CFG)
    cfg["algorithm"] = {"method": "smoothquant", "alpha": SMOOTHQUANT_ALPHA}
    return _keep_high_precision(cfg, recipe, layers)


def quant_config(precision: str, recipe: str, layers: int) -> dict:
    """The ModelOpt config of `precision` (fp8 or int8) for an expert of `layers` blocks, with what `recipe` keeps
    in high precision switched off."""
    return {"fp8": _fp8_config, "int8": _int8_config}[precision](recipe, layers)


def enabled_quantizers(module: torch.nn.Module) -> list[str]:
    """The names of the quantizers that are on in a ModelOpt-quantized `module`."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [name for name, sub in module.named_modules() if isinstance(sub, TensorQuantizer) and sub.is_enabled]


def planned_quantizers(module: torch.nn.Module, precision: str, recipe: str) -> list[str]:
    """The quantizers quant_config(precision, recipe) turns on in `module`, decided by ModelOpt's own matching on a
    copy with its quantizers inserted, without calibrating: on a meta skeleton it costs no weights (a 40-layer
    expert takes about 2 s)."""
    _mtq()  # imported quietly first
    from modelopt.torch.quantization.conversion import replace_quant_module, set_quantizer_by_cfg

    copied = copy.deepcopy(module)
    with _quiet():
        replace_quant_module(copied)
        set_quantizer_by_cfg(copied, quant_config(precision, recipe, expert_layers(module))["quant_cfg"])
    return enabled_quantizers(copied)


@contextlib.contextmanager
def quantizing_only(module: torch.nn.Module, names: Collection[str]):
    """Within the block, only the quantizers in `names` of those on in `module` stay on; the others are back on
    after. With none on, the ModelOpt copy computes what the eager module computes, bit for bit (measured on the
    tiny DiT in bf16)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    off = [sub for name, sub in module.named_modules()
           if isinstance(sub, TensorQuantizer) and sub.is_enabled and name not in names]
    for sub in off:
        sub.disable()
    try:
        yield
    finally:
        for sub in off:
            sub.enable()


# ---------------------------------------------------------------------------------------------- calibration

def _replay(inputs: list[tuple[torch.Tensor, ...]]):
    """ModelOpt's forward_loop: the recorded expert calls, in order."""
    def forward_loop(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for args in inputs:
                module(*args)

    return forward_loop


def quantized_weight_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of the weights whose quantizer is on in a quantized `module`: the layers that become Q/DQ GEMMs."""
    return {sub.weight.dtype for sub in module.modules()
            if getattr(getattr(sub, "weight_quantizer", None), "is_enabled", False)}


def _quantizer_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer buffer (amax, SmoothQuant's pre_quant_scale) by state_dict key: a few KB per layer."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if "_quantizer." in k}


def calibrate(component: Component, case: Case, cache: DiskCache, scheme: str | None = None,
              recipe: str = FP8_RECIPES[0], prompts: int | None = None) -> Cached[dict]:
    """The quantizer state of `component` calibrated on the loop's inputs, through the calibration cache
    (harness.calibration): a hit runs no loop.

    `scheme` (fp8 or int8) defaults to case.precision; name it to quantize beside the case's own activation
    precision, e.g. an fp16 expert for an ONNX Runtime check (ORT's CPU provider has no bf16 Conv). `recipe`
    (--fp8-recipe) names the blocks quantized and `prompts` (--calibration-prompts) how many calibration prompts the
    loop runs; both are in the key, with the config and ModelOpt's version.
    """
    reason = modelopt_reason()
    if reason:
        raise BackendUnavailable(f"ModelOpt calibrates the {case.precision} scales: {reason}")
    scheme = scheme or case.precision
    cfg = quant_config(scheme, recipe, expert_layers(component.module))

    def quantizer_state(calls: list[tuple[torch.Tensor, ...]]) -> dict:
        import modelopt.torch.opt as mto

        module = private_copy(component.module)
        with _quiet():
            _mtq().quantize(module, cfg, _replay(calls))
        return {"modelopt_state": mto.modelopt_state(module), "buffers": _quantizer_buffers(module)}

    settings = {"recipe": recipe, "config": cfg, "modelopt": version("nvidia-modelopt")}
    return calibrated(f"modelopt-{scheme}", component, case, cache, settings, quantizer_state, prompts)


@contextlib.contextmanager
def _quiet():
    """ModelOpt prints progress ('Inserted 54 quantizers', 'Smoothed 20 modules'): into the debug log instead."""
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore")
        yield
    log.debug("%s", out.getvalue().strip())


def restore(component: Component, scales: dict) -> torch.nn.Module:
    """A fresh deep copy of the component's module with the cached quantizers and scales; no calibration pass.

    SmoothQuant also divided each smoothed linear's weight by its per-input-channel scale; that is redone
    from the stored scale. ModelOpt keeps that scale in the weight dtype but divided by its fp32 value, so in
    bf16 the restored weights differ from the calibrated copy's by one ulp (18% of them on the tiny DiT): the
    same int8 model rounded differently (output 0.7% rel L2 apart, both 0.012-0.016 from fp32; fp32 copies
    restore bit-identical). Every run uses the restored copy, so a cache hit and a miss compute the same.
    """
    import modelopt.torch.opt as mto

    with _quiet():
        module = mto.restore_from_modelopt_state(private_copy(component.module), scales["modelopt_state"])
    device = component.device
    for key, value in scales["buffers"].items():
        owner, attr = key.rsplit(".", 1)
        module.get_submodule(owner).register_buffer(attr, value.to(device))
    _fold_smoothing(module)
    return module.eval()


@torch.no_grad()
def _fold_smoothing(module: torch.nn.Module) -> None:
    for sub in module.modules():
        scale = getattr(getattr(sub, "input_quantizer", None), "_pre_quant_scale", None)
        if scale is not None and isinstance(getattr(sub, "weight", None), torch.Tensor):
            inverse = 1.0 / scale.to(torch.float32).squeeze()
            sub.weight.copy_((sub.weight * inverse[None, :]).to(sub.weight.dtype))


def quantized_module(component: Component, case: Case, cache: DiskCache, scheme: str | None = None,
                     recipe: str = FP8_RECIPES[0], prompts: int | None = None) -> tuple[torch.nn.Module, str]:
    """The component's module fake-quantized (see `calibrate`), and the key of the calibration entry it restored."""
    cached = calibrate(component, case, cache, scheme, recipe, prompts)
    return restore(component, cached.value["scales"]), cached.path.name


class ModelOpt(Backend):
    """The fake-quantized experts (fp8 or int8) in eager PyTorch: what a quantized engine should compute."""

    spec = BACKENDS["modelopt"]

    def __init__(self, options: BackendOptions = BackendOptions()):
        super().__init__(options)
        self.cache = DiskCache(options.cache_dir)
        self.recipe = options.fp8_recipe
        self.prompts = options.calibration_prompts

    def _available(self) -> tuple[bool, str]:
        """On CUDA ModelOpt JIT-compiles its fake-quant kernels with ninja on first use (64 s measured on an
        H100) and falls back to its torch path when it cannot, so the import is all that is needed."""
        reason = modelopt_reason()
        return not reason, reason

    def _build(self, component: Component, case: Case) -> Runner:
        module, _ = quantized_module(component, case, self.cache, recipe=self.recipe, prompts=self.prompts)
        return eager_runner(module, case)
