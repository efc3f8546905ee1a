"""Several GPUs per video, the harness's side (harness.parallel, harness.rank): layout options, what a machine
cannot run, the ranks' environment, and the launch itself on gloo processes on the CPU, in every default run:
rank 0's result, a failing rank, a rank that cannot build its backend, a timeout, a 2 x 2 mesh.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness.case import Case, Layout
from harness.errors import BackendUnavailable, HarnessError
from harness.machine import machine_info
from harness.parallel import MULTICAST_OFF, Job, launch, rank_environment, unsupported
from harness.session import Session
from harness.settings import parse_layout, settings_from


# ----------------------------------------------------- the default run: options, launch, gloo on 2 processes

@pytest.mark.unit
@pytest.mark.parametrize("spec, degrees", [
    ("none", (1, 1, 1, 1)), ("cfg2", (2, 1, 1, 2)), ("ulysses4", (1, 4, 1, 4)), ("ring2", (1, 1, 2, 2)),
    ("cfg2,ulysses2", (2, 2, 1, 4)), (" ulysses2 , cfg2 ", (2, 2, 1, 4)), ("cfg2,ring2,ulysses2", (2, 2, 2, 8)),
])
def test_layout_specs(spec, degrees):
    layout = parse_layout(spec)
    assert (layout.cfg, layout.ulysses, layout.ring, layout.world) == degrees
    assert parse_layout(layout.spec) == layout  # the spelling recorded in summaries reads back


@pytest.mark.unit
@pytest.mark.parametrize("spec, words", [
    ("cfg4", "cfg2 is its only split"), ("ulysses", "not cfg2, ulysses<N> or ring<N>"),
    ("cfg2,cfg2", "names cfg twice"), ("ulysses0", "not cfg2"), ("tp2", "not cfg2"),
])
def test_bad_layout_specs_say_what_to_write(spec, words):
    with pytest.raises(HarnessError, match=words):
        settings_from({"parallel": spec, "backends": "torch"})


@pytest.mark.unit
def test_cfg_parallel_and_a_batch_2_cfg_forward_exclude_each_other():
    with pytest.raises(HarnessError, match="choose one"):
        settings_from({"parallel": "cfg2", "cfg_batch": 2, "backends": "torch"})
    assert settings_from({"parallel": "ulysses2", "cfg_batch": 2, "backends": "torch"}).parallel.ulysses == 2


@pytest.mark.unit
def test_a_layout_is_in_the_case_id_and_the_summary():
    shape = settings_from({"backends": "torch"}).shapes[0]
    single = Case("cfg_step", shape, "bf16")
    assert dataclasses.replace(single, layout=Layout(cfg=2, ulysses=2)).id == single.id + "-cfg2-ulysses2"
    assert settings_from({"parallel": "cfg2", "backends": "torch"}).summary()["parallel"] == "cfg2"
    assert Layout(cfg=2, ulysses=4).forward == Layout(ulysses=4)  # the CFG pair runs whole forwards


@pytest.mark.unit
@pytest.mark.parametrize("layout, device, gpus, precision, tokens, heads, words", [
    (Layout(cfg=2, ulysses=2), "cuda", 2, "bf16", 32760, 40, "needs 4 GPUs; 2 visible"),
    (Layout(ulysses=2), "cpu", 0, "fp32", 3, 2, "3 tokens do not split evenly over 2 ranks"),
    (Layout(ulysses=4), "cuda", 8, "bf16", 32760, 2, "2 heads do not divide over ulysses4"),
    (Layout(ring=2), "cpu", 0, "fp32", 12, 2, "CUDA only"),
    (Layout(ring=2), "cuda", 2, "fp32", 12, 2, "takes bf16/fp16, not fp32"),
    (Layout(cfg=2, ulysses=2), "cuda", 4, "bf16", 32760, 40, ""),
    (Layout(cfg=2), "cpu", 0, "fp32", 3, 2, ""),  # CFG-parallel splits no tokens; CPU ranks need no GPUs
])
def test_what_the_machine_cannot_run_is_named(layout, device, gpus, precision, tokens, heads, words):
    reason = unsupported(layout, device, gpus, precision, tokens, heads)
    assert (words in reason) if words else reason == ""


@pytest.mark.unit
def test_ranks_get_the_whole_parent_environment_and_multicast_off_unless_set():
    parent = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3", "HF_HOME": "/cache", "NCCL_NVLS_ENABLE": "1"}
    env = rank_environment(parent, rank=1, world=2, port=29500, device="cuda")
    assert {k: env[k] for k in parent} == parent  # passed through, the user's NCCL_NVLS_ENABLE=1 included
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "1", "2", "29500")
    assert env["MASTER_ADDR"] == "127.0.0.1" and "OMP_NUM_THREADS" not in env
    assert rank_environment({}, 0, 2, 1, "cuda")["NCCL_NVLS_ENABLE"] == MULTICAST_OFF["NCCL_NVLS_ENABLE"] == "0"
    assert int(rank_environment({}, 0, 2, 1, "cpu")["OMP_NUM_THREADS"]) >= 1  # CPU ranks share the cores


@pytest.mark.unit
def test_machine_info_names_gpus_and_interconnect_for_a_parallel_run():
    info = machine_info(parallel=True)
    assert info["gpus"] == torch.cuda.device_count()
    assert info["interconnect"] == ("n/a" if info["gpus"] < 2 else info["interconnect"])


# Tasks the launch cases run inside real ranks (harness.rank imports them from this module by name).

def probe(session: Session, fail: str = "", sleep_s: float = 0.0) -> dict:
    """Every rank starts a child (as Inductor starts compile workers); then one all-reduce, a failure on
    rank 1, or a sleep."""
    rank = dist.get_rank()
    child = subprocess.Popen(["sleep", "600"])
    dist.barrier()  # both children run before anything fails or sleeps
    if fail and rank == 1:
        raise BackendUnavailable("rank 1 cannot build it") if fail == "unavailable" else ValueError("rank 1 broke")
    time.sleep(sleep_s)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    child.kill()
    child.wait()
    return {"world": dist.get_world_size(), "sum": float(total), "backend": dist.get_backend(),
            "env": {k: os.environ.get(k) for k in MULTICAST_OFF}}


def launch_probe(token: str, timeout_s: float = 120, **arguments):
    """The probe on 2 ranks whose environment, and so their children's, carries WAN_PROBE=token."""
    settings = settings_from({"parallel": "cfg2", "backends": "torch", "device": "cpu"})
    job = Job(settings, "tests.test_parallel:probe", arguments)
    return launch(job, 2, timeout_s=timeout_s, environ={**os.environ, "WAN_PROBE": token})


@pytest.fixture
def token():
    return f"probe-{os.getpid()}-{time.monotonic_ns()}"


def processes_with(token: str) -> list[int]:
    """Live processes (zombies have ended) whose environment carries WAN_PROBE=token."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if f"WAN_PROBE={token}".encode() in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                found.append(int(proc.name))
        except (OSError, ValueError):  # not a process, or gone while we looked
            continue
    return found


def assert_no_process_left(token: str):
    deadline = time.monotonic() + 5  # a killed child is reaped by whoever adopted it, a moment later
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(token) == []


@pytest.mark.parallel
def test_launch_returns_rank_0s_result_over_gloo(token):
    got = launch_probe(token)
    assert (got["world"], got["sum"], got["backend"]) == (2, 3.0, "gloo")
    assert got["env"] == MULTICAST_OFF
    assert_no_process_left(token)


@pytest.mark.parallel
def test_a_failing_rank_is_one_error_with_its_traceback_and_no_process_left(token):
    with pytest.raises(HarnessError, match=r"(?s)rank 1 exited with status 1.*ValueError: rank 1 broke"):
        launch_probe(token, fail="error")
    assert_no_process_left(token)  # rank 0 waited in the all-reduce for ever: it was stopped, its child too


@pytest.mark.parallel
def test_a_rank_that_cannot_build_its_backend_makes_a_skip(token):
    with pytest.raises(BackendUnavailable, match="rank 1 cannot build it"):
        launch_probe(token, fail="unavailable")
    assert_no_process_left(token)


@pytest.mark.parallel
def test_ranks_past_the_timeout_are_stopped(token):
    with pytest.raises(HarnessError, match=r"still running after 4 s"):
        launch_probe(token, timeout_s=4, sleep_s=600)  # stopped asleep in the task, or still starting up
    assert_no_process_left(token)


def mesh_and_kernel_split(session: Session) -> dict:
    """Every rank's CFG pair and sequence group as diffusers' context-parallel config sees them on the run's
    mesh; and the harness's own attention processor (engines/attention: how Inductor's and torch-fp8's
    kernels run) with its "sdpa" kernel, split in both orders the engines use, against the stock expert."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    from engines.attention.processor import SelfAttnProcessor, install, with_kernel
    from harness.compare import rel_l2
    from harness.components import DiT
    from harness.distributed import cfg_group, mesh, sequence_parallel

    s = session.settings
    config = ContextParallelConfig(ulysses_degree=s.parallel.ulysses, ring_degree=s.parallel.ring, mesh=mesh())
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh())
    mine = {"cfg": dist.get_process_group_ranks(cfg_group()),
            "ulysses": dist.get_process_group_ranks(config._ulysses_mesh.get_group()),
            "sequence": dist.get_process_group_ranks(config._flattened_mesh.get_group())}
    groups = [None] * dist.get_world_size()
    dist.all_gather_object(groups, mine)

    case = Case("transformer", s.shapes[0], s.precisions[0], source=s.source, layout=s.parallel.forward)
    component = session.component(case)
    split_first = sequence_parallel(component.module, case)  # Inductor: split, then the kernel on a clone
    split_first = DiT(with_kernel(split_first.transformer, "sdpa"))
    kernel_first = copy.deepcopy(component.module)  # torch-fp8: its own copy gets the kernel, then the split
    install(kernel_first.transformer, "sdpa")
    kernel_first = sequence_parallel(kernel_first, case, private=True)
    inputs = session.inputs(case)
    with torch.inference_mode():
        want = component.module(*inputs)
        errors = {name: rel_l2(module(*inputs), want) for name, module in
                  (("split_first", split_first), ("kernel_first", kernel_first))}
    processors = [b.attn1.processor for m in (split_first, kernel_first) for b in m.transformer.blocks]
    split = all(isinstance(p, SelfAttnProcessor) and p._parallel_config is not None for p in processors)
    return {"groups": groups, "errors": errors, "kernel_processors_split": split}


@pytest.mark.parallel
def test_a_2_x_2_mesh_and_the_kernel_processor_inside_its_ulysses_exchange(tmp_path):
    """cfg2,ulysses2 on 4 gloo ranks: ranks (0, 1) and (2, 3) each split one branch's tokens; (0, 2) and (1, 3)
    swap their CFG predictions (one mesh per run, whatever layout a case names: an expert's names only
    ulysses2). In each pair, the harness's kernel processor runs inside diffusers' exchange."""
    settings = settings_from({"parallel": "cfg2,ulysses2", "backends": "torch", "device": "cpu", "shapes": "32x32x9",
                              "precisions": "bf16", "results_dir": str(tmp_path)})
    got = launch(Job(settings, "tests.test_parallel:mesh_and_kernel_split", {}), 4)
    groups = got["groups"]
    assert [g["cfg"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["ulysses"] for g in groups] == [g["sequence"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert got["kernel_processors_split"]
    assert max(got["errors"].values()) <= 1e-5, got["errors"]  # the [parallel] band where one GPU has no drift


@pytest.mark.parallel
def test_a_whole_sequence_graph_backend_is_a_skip_under_ulysses(tmp_path):
    settings = settings_from({"parallel": "ulysses2", "backends": "torch,onnxruntime", "device": "cpu",
                              "shapes": "32x32x9", "results_dir": str(tmp_path)})
    with pytest.raises(BackendUnavailable, match="whole-sequence graph"):
        Session(settings).parallel("outputs", "onnxruntime", "fp32", settings.shapes[0], video=False)
