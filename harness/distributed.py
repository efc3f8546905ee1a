"""Inside one rank of a parallel run: the device mesh of a Layout, the CFG pair's exchange, and diffusers'
context parallelism on a DiT expert.

The mesh has three named dimensions, (cfg, ring, ulysses). The two ranks of a `cfg` pair run one CFG branch
each and swap their noise predictions once per step; the ring x ulysses ranks of one branch split every
forward's tokens through the context-parallel plan diffusers ships for WanTransformer3DModel (Ulysses: an
all-to-all from token shards to head shards around attention; ring: K/V passed round the ranks). Only code
that runs under torch.distributed (harness.rank) calls these.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from harness.case import Case, Layout
from harness.errors import HarnessError

MESH_DIMS = ("cfg", "ring", "ulysses")
# Ring attention merges partial results by their log-sum-exp, which diffusers' default ("native") SDPA
# backend does not return; its FlashAttention backend does, in bf16/fp16 on CUDA only.
RING_ATTENTION = "_native_flash"


_MESH: list = []  # the run's mesh, made once per rank process by start()


def start(layout: Layout) -> "dist.device_mesh.DeviceMesh":
    """Make the run's (cfg, ring, ulysses) mesh. Creating it is collective: every rank calls this once, at
    start-up (harness.rank), so no rank can reach it first from inside a case and wait for the others."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    _MESH[:] = [init_device_mesh(device_type, (layout.cfg, layout.ring, layout.ulysses), mesh_dim_names=MESH_DIMS)]
    return _MESH[0]


def mesh() -> "dist.device_mesh.DeviceMesh":
    """The run's mesh. One per run, whatever a case's own layout: an expert's case names only its token split,
    and its sequence group is this rank's slice of the whole mesh."""
    if not _MESH:
        raise HarnessError("no device mesh in this process: only ranks started by harness.parallel have one")
    return _MESH[0]


def cfg_group() -> dist.ProcessGroup:
    """The two ranks that share one video's CFG step (rank 0 of the group runs the conditional branch)."""
    return mesh()["cfg"].get_group()


def exchange(prediction: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """Every rank's `prediction`, in group-rank order: one all-gather per CFG step (into one tensor,
    concatenated on the batch axis, the layout gloo takes as well as NCCL)."""
    prediction = prediction.contiguous()
    world = dist.get_world_size(group)
    gathered = torch.empty((world * prediction.shape[0], *prediction.shape[1:]), dtype=prediction.dtype,
                           device=prediction.device)
    dist.all_gather_into_tensor(gathered, prediction, group=group)
    return gathered.chunk(world)


def sequence_parallel(module: torch.nn.Module, case: Case, *, private: bool = False) -> torch.nn.Module:
    """The DiT wrapper `module` with its expert's tokens split over the case's ring x ulysses ranks.

    diffusers' context parallelism hooks the very modules it is applied to, and a hooked module cannot be
    copied (a hook calls the forward of the module it was registered on), so it works on a deep copy made
    first, unless the caller says `module` is already its own (`private`); the single-GPU model stays as it
    is. A module whose expert is already split comes back as it is: torch-fp8 splits its quantized copy
    before handing it to Inductor. With no split it is `module` itself.
    """
    if case.layout.sequence == 1 or module.transformer._parallel_config is not None:
        return module
    module = module if private else copy.deepcopy(module)
    _context_parallel(module.transformer, case.layout)
    return module


def _context_parallel(transformer: torch.nn.Module, layout: Layout) -> None:
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses, mesh=mesh())
    if layout.ring > 1:
        transformer.set_attention_backend(RING_ATTENTION)
    if torch.accelerator.device_count():
        transformer.enable_parallelism(config=config, cp_plan=_plan(transformer))
    else:
        _context_parallel_without_accelerator(transformer, config)


def _plan(transformer: torch.nn.Module) -> dict:
    """diffusers' plan for Wan without its root entry. That entry splits a per-token `timestep` [B, S]
    (Wan2.2-TI2V-5B); A14B text-to-video passes one timestep per video, [B], which it leaves alone. A hook on
    the root would pin the model's forward to the module it was registered on, so the shallow clones that
    Inductor compiles (engines/inductor.py) would run the uncompiled blocks."""
    return {name: entry for name, entry in type(transformer)._cp_plan.items() if name != ""}


def _context_parallel_without_accelerator(transformer: torch.nn.Module, config) -> None:
    """What `enable_parallelism` does, on the CPU: diffusers 0.42.1 takes each rank's device as
    `rank % torch.accelerator.device_count()` (ModelMixin._resolve_parallel_config), which divides by zero
    where there is no accelerator. The same three steps with the CPU as the device: set the config up,
    give it to every attention processor, hook the plan's modules."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    parallel = ParallelConfig(context_parallel_config=config)
    parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=config.mesh)
    transformer._parallel_config = parallel
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if hasattr(processor, "_parallel_config"):
            processor._parallel_config = parallel
    apply_context_parallel(transformer, config, _plan(transformer))
