"""Which weights are on the device when the model is larger than the card: each component waits in host memory,
or, where host memory is short too, holds no weights and is built again from its recipe, and comes onto the device
when it runs, one component at a time.

This is diffusers' model CPU offload (`enable_model_cpu_offload`: a whole component moves when its forward or its
`decode` starts) with two differences that keep it from being used as it is: a run here calls the components in
any order (parity, a CFG step, the loop), not in a pipeline's fixed chain, and it needs the same component in
several dtypes, where a 40-layer fp32 expert (57 GB) does not fit beside the bf16 model in the host memory of most
machines. The triggers are the ones diffusers uses: a forward pre-hook, and `_hf_hook.pre_forward`, which
diffusers' `apply_forward_hook` calls before the VAE's `decode`.

Weights move by swapping each tensor's storage (`tensor.data = ...`), so every holder of a parameter (the eager
runner, Inductor's shallow copy of a module) sees the move. A component's host copy stays while it is on the
device, so sending it back costs no copy. Host copies are pageable, not pinned: pinning 69 GB takes longer than
the few seconds an expert's move costs, and a move never happens inside a timed round.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from harness.memory import meminfo

log = logging.getLogger(__name__)
GiB = 2 ** 30
# Host memory a component's copy must leave free to be kept there; else it is dropped and built again when needed.
HOST_MARGIN = 16 * GiB
# Builds the component's weights anew on a device: (device) -> a module of the same structure and dtypes.
Build = Callable[[torch.device], torch.nn.Module]


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, each shared tensor once (UMT5's tied embeddings)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def module_bytes(module: torch.nn.Module) -> int:
    """Every parameter and buffer once (a tied embedding is one tensor), also of a module on the meta device."""
    return sum(t.numel() * t.element_size() for t in _tensors(module).values())


def _placeholder(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor of `t`'s shape and dtype on `device` backed by one element: the shape survives, the memory goes."""
    return torch.empty((), dtype=t.dtype, device=device).expand(t.shape)


def host_room(nbytes: int) -> bool:
    """Whether host memory can keep `nbytes` more and still leave HOST_MARGIN free."""
    available = meminfo("MemAvailable")
    return available is not None and available - nbytes >= HOST_MARGIN


@dataclass(frozen=True)
class Move:
    """One component coming onto the device: which, how many bytes, how long it took (a build counts as a move)."""

    label: str
    nbytes: int
    seconds: float


@dataclass(eq=False)
class _Entry:
    module: torch.nn.Module
    label: str
    recipe: Build
    nbytes: int
    host: dict[str, torch.Tensor] | None = None  # the host copy, by tensor name; None: the weights are dropped
    on_device: bool = False
    loads: int = field(default=0)


class Residency:
    """The components of the run's models that take turns on `device`; at most one is there at a time."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._entries: dict[int, _Entry] = {}
        self.phase = "nothing on the device yet"
        self.log: list[Move] = []  # every move so far, in order: a whole video's moves are reported with its time

    def manage(self, module: torch.nn.Module, label: str, recipe: Build) -> torch.nn.Module:
        """Take `module` (built on the meta device: structure and config, no weights) under management: it gets
        its weights from `recipe` the first time it runs."""
        entry = _Entry(module, label, recipe, module_bytes(module))
        # Meta tensors cannot take another device's storage: swap in placeholders, one per tensor, so ties hold.
        swapped: dict[int, torch.Tensor] = {}
        for owner in module.modules():
            for table, wrap in ((owner._parameters, partial(torch.nn.Parameter, requires_grad=False)),
                                (owner._buffers, lambda t: t)):
                for key, t in list(table.items()):
                    if t is not None:
                        table[key] = swapped.setdefault(id(t), wrap(_placeholder(t, torch.device("cpu"))))
        self._entries[id(module)] = entry
        module.register_forward_pre_hook(partial(self._pre_forward, entry), with_kwargs=True)
        module._hf_hook = _DecodeHook(self, entry)
        module.wan_residency = self
        return module

    @property
    def moves(self) -> int:
        """How many times a component has come onto the device: a perf case checks none came while it timed."""
        return len(self.log)

    def manages(self, module: torch.nn.Module) -> bool:
        return id(module) in self._entries

    def _pre_forward(self, entry: _Entry, module, args, kwargs):
        self._onload(entry)
        move = partial(_to_device, device=self.device)
        return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}

    def _onload(self, entry: _Entry) -> None:
        if not entry.on_device:
            # Weights are made outside any inference mode the caller is in: inference tensors would refuse the
            # in-place fills of the seeded build's threads and torchao's swaps in a private copy.
            with torch.inference_mode(False), torch.no_grad():
                self._bring(entry)

    def _bring(self, entry: _Entry) -> None:
        self.release()
        start = time.perf_counter()
        self.phase = f"loading {entry.label} ({entry.nbytes / GiB:.1f} GiB) onto {self.device}"
        if entry.host is None:
            fresh = _tensors(entry.recipe(self.device))
            for name, t in _tensors(entry.module).items():
                t.data = fresh[name].data
            del fresh
            if self.device.type != "cpu" and host_room(entry.nbytes):
                entry.host = {name: t.detach().to("cpu") for name, t in _tensors(entry.module).items()}
        else:
            for name, t in _tensors(entry.module).items():
                t.data = entry.host[name].to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are queued: the move ends when they land
        entry.on_device, entry.loads = True, entry.loads + 1
        self.phase = f"running {entry.label}"
        self.log.append(Move(entry.label, entry.nbytes, time.perf_counter() - start))
        log.info("%s on %s in %.1f s (%s)", entry.label, self.device, self.log[-1].seconds,
                 "from host memory" if entry.loads > 1 and entry.host is not None else "built")

    def _send_away(self, entry: _Entry) -> None:
        """Back to its host copy; with none (host memory short, or the device is the host), drop the weights."""
        for name, t in _tensors(entry.module).items():
            t.data = entry.host[name] if entry.host is not None else _placeholder(t, torch.device("cpu"))
        entry.on_device = False

    def release(self) -> None:
        """Send every component away: before another comes, and after an out-of-memory failure, so that the next
        case starts clean."""
        for entry in self._entries.values():
            if entry.on_device:
                self._send_away(entry)
        free_device_memory()
        self.phase = "nothing on the device"

    def send_away(self, module: torch.nn.Module) -> None:
        """Send one managed component off the device (to its host copy, or dropped), if it is there."""
        entry = self._entries[id(module)]
        if entry.on_device:
            self._send_away(entry)
            free_device_memory()

    def private_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of `module` with weights of its own on the device, built from its recipe rather than copied, so
        that quantizing it never holds the component twice; the original is sent away first."""
        entry = self._entries[id(module)]
        self.send_away(module)
        self.phase = f"building a private copy of {entry.label}"
        with torch.inference_mode(False), torch.no_grad():
            return entry.recipe(self.device)


class _DecodeHook:
    """What diffusers' `apply_forward_hook` calls before `AutoencoderKLWan.decode` (accelerate's hook protocol)."""

    def __init__(self, residency: Residency, entry: _Entry):
        self._residency, self._entry = residency, entry

    def pre_forward(self, module, *args, **kwargs):
        self._residency._onload(self._entry)
        return args, kwargs


def free_device_memory() -> None:
    """Collect what nothing holds any more and give the allocator's cache back, so that an expert's 28.6 GB returns
    as one block rather than cached fragments the next component cannot use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device)
    return value


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The device a managed component (or a module wrapping one) runs on, or None where no residency manages it."""
    for sub in module.modules():
        residency = getattr(sub, "wan_residency", None)
        if residency is not None:
            return residency.device
    return None


def _managed(module: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(its name, the component) where a residency manages `module` or the one component a wrapper of it
    (harness.components' DiT) holds; None for an unmanaged module."""
    for name, child in [("", module), *module.named_children()]:
        residency = getattr(child, "wan_residency", None)
        if residency is not None and residency.manages(child):
            return name, child
    return None


def private_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` (or of a wrapper around one component, harness.components' DiT) to quantize or change:
    where a residency manages the component, built from its recipe while the original waits off the device, so
    the two are never there at once; else a deep copy, as an unmanaged module is wholly resident anyway."""
    import copy

    managed = _managed(module)
    if managed is None:
        return copy.deepcopy(module)
    name, child = managed
    fresh = child.wan_residency.private_copy(child)
    if not name:
        return fresh
    wrapper = copy.copy(module)
    wrapper._modules = {**module._modules, name: fresh}
    return wrapper


def send_away(module: torch.nn.Module) -> None:
    """Where a residency manages `module` (or the component a wrapper holds), send it off the device: a backend that
    now holds its own copy of the weights there (an engine, an ONNX Runtime session) never has the eager original
    beside it, as a private copy never does (harness.plan counts them that way)."""
    managed = _managed(module)
    if managed is not None:
        managed[1].wan_residency.send_away(managed[1])


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the device running out of memory, also where a CUDA library says so in its own words:
    cuSOLVER's handle creation fails with CUSOLVER_STATUS_INTERNAL_ERROR, cuBLAS with CUBLAS_STATUS_ALLOC_FAILED."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        sign in text for sign in ("out of memory", "CUSOLVER_STATUS_INTERNAL_ERROR", "CUBLAS_STATUS_ALLOC_FAILED",
                                  "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation"))

