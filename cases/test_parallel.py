"""Several GPUs per video: CFG-parallel and Ulysses/ring context parallelism against one GPU.

With `--parallel cfg2|ulysses<N>|ring<N>|cfg2,ulysses<N>` the parity, quality and perf cases here launch the
layout's ranks (harness.parallel) and judge what rank 0 returns against the same backend on one GPU: the
expert forwards and the CFG step within reduction-order noise (thresholds.toml [parallel]), the loop's latents
likewise, the video with the precision's quality bands, and the CFG step's time against one GPU's eager
baseline and one GPU's same backend, with the scaling efficiency. A layout the machine cannot run is a skip
with the reason. Without --parallel they skip, and the `parallel` cases below prove the launch, rank-0
writing and the parity plumbing on 2 gloo processes on the CPU in every default run.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness.backends import BACKENDS
from harness.case import DIT_COMPONENTS, Case, Layout
from harness.compare import judge_parallel, judge_parallel_loop, video_quality
from harness.errors import BackendUnavailable, HarnessError
from harness.machine import machine_info
from harness.parallel import MULTICAST_OFF, Job, launch, rank_environment, unsupported
from harness.report import write_summary
from harness.results import Measured, RunRecorder, load_run
from harness.session import Session
from harness.settings import parse_layout, settings_from
from harness.timing import judge_speedup

# What a parity case compares: one expert forward (the layouts that split tokens) or one CFG step (all).
UNITS = (*DIT_COMPONENTS, "cfg_step")
WARMUP = 2


def pytest_generate_tests(metafunc):
    s = metafunc.config.wan_session.settings
    if "parallel_precision" in metafunc.fixturenames:
        metafunc.parametrize("parallel_precision", s.precisions)


# ---------------------------------------------------------------------------------- judging a layout's run

def outputs(session: Session, backend: str, precision: str, shape) -> dict:
    """The ranks' forwards and CFG step at `shape`, with the video at the run's first shape (one launch)."""
    return session.parallel("outputs", backend, precision, shape, video=shape == session.settings.shapes[0])


def judge_unit(session: Session, unit: str, backend: str, precision: str, shape) -> tuple[Case, object]:
    """The layout's expert forward or CFG step against one GPU's, same backend and precision."""
    s = session.settings
    got = outputs(session, backend, precision, shape)
    if unit != "cfg_step" and s.parallel.sequence == 1:
        pytest.skip(f"--parallel {s.parallel.spec} splits the CFG step, not one forward: the cfg_step case judges it")
    if unit == "cfg_step":
        case = Case(unit, shape, precision, batch=session.cfg_batch(backend), source=s.source, layout=s.parallel)
        single, reference = session.cfg_step(backend, precision, shape)(), session.cfg_step("torch", "fp32", shape)()
        return case, judge_parallel(got["cfg_step"], single, reference, precision)
    one = Case(unit, shape, precision, source=s.source)
    single, reference = session.output(backend, one), session.output("torch", one.with_precision("fp32"))
    return dataclasses.replace(one, layout=s.parallel), judge_parallel(got["forward"][unit], single, reference, precision)


def judge_run(session: Session, backend: str, precision: str) -> tuple[Case, object, Case, object]:
    """The layout's loop latents and video (prompt 0, the run's first shape) against one GPU's."""
    s = session.settings
    shape = s.shapes[0]
    got = outputs(session, backend, precision, shape)
    single, reference = session.generation(backend, precision, shape), session.generation("torch", "fp32", shape)
    base = Case("denoising_loop", shape, precision, batch=session.cfg_batch(backend), source=s.source, layout=s.parallel)
    loop = judge_parallel_loop(got["latents"], single.step_latents, reference.step_latents, precision)
    video = video_quality(got["frames"], single.frames, precision)
    return base, loop, dataclasses.replace(base, component="video", variant="prompt0"), video


def time_layout(session: Session, backend: str, shape) -> tuple[Case, list[tuple[str, object]]]:
    """The layout's CFG step against one GPU's eager baseline and one GPU's `backend`, alternating rounds;
    the results to record for the candidate (CPU timings are recorded, never gated: judge_speedup)."""
    s = session.settings
    precision = "fp8" if backend == "torch-fp8" else s.perf_precision
    got = session.parallel("cfg_step_times", backend, precision, shape, rounds=s.perf_rounds, warmup=WARMUP)
    times = got["times"]
    eager, parallel = times["eager"], times["parallel"]
    one_gpu = times.get("one_gpu", eager)  # eager torch is its own one-GPU side
    versus_eager, versus_one = judge_speedup(eager, parallel, None), judge_speedup(one_gpu, parallel, None)
    scaling = {"speedup_vs_one_gpu": versus_one.speedup, "scaling_efficiency": versus_one.speedup / s.parallel.world,
               "one_gpu_median_ms": one_gpu.median_ms, "one_gpu_iqr_ms": one_gpu.iqr_ms,
               "eager_median_ms": eager.median_ms, "eager_iqr_ms": eager.iqr_ms}
    scaling.update({f"peak_mem_gib_rank{r}": b / 2 ** 30 for r, b in enumerate(got["peak_mem_bytes"]) if b is not None})
    case = Case("cfg_step", shape, precision, batch=session.cfg_batch(backend), source=s.source, layout=s.parallel)
    return case, [("parallel", parallel), ("versus_eager", versus_eager), ("scaling", Measured(scaling))]


# ------------------------------------------------------------------------- the cases, under --parallel

@pytest.mark.parity
@pytest.mark.parametrize("unit", UNITS)
def test_parallel_parity(unit, backend, parallel_precision, shape, session):
    case, result = judge_unit(session, unit, backend, parallel_precision, shape)
    session.record("parity", case, backend, result)
    assert result, result.message()


@pytest.mark.parity
def test_parallel_loop_parity(backend, parallel_precision, session):
    case, result, _, _ = judge_run(session, backend, parallel_precision)
    session.record("parity", case, backend, result)
    assert result, result.message()


@pytest.mark.quality
def test_parallel_video_quality(backend, parallel_precision, session):
    _, _, case, result = judge_run(session, backend, parallel_precision)
    session.record("quality", case, backend, result)
    assert result, result.message()


@pytest.mark.perf
def test_parallel_speed(backend, shape, session):
    untimed = BACKENDS[backend].untimed
    if untimed:  # a simulation: its numerics stand for an engine's, its timings for nothing
        pytest.skip(untimed)
    case, results = time_layout(session, backend, shape)
    for _, result in results:
        session.record("perf", case, backend, result)
    versus_eager = dict(results)["versus_eager"]
    assert math.isfinite(versus_eager.speedup) and versus_eager.speedup > 0, versus_eager.message()


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
    job = Job(settings, "cases.test_parallel:probe", arguments)
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
    got = launch(Job(settings, "cases.test_parallel:mesh_and_kernel_split", {}), 4)
    groups = got["groups"]
    assert [g["cfg"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["ulysses"] for g in groups] == [g["sequence"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert got["kernel_processors_split"]
    assert max(got["errors"].values()) <= 1e-5, got["errors"]  # the [parallel] band where one GPU has no drift


# One precision per layout keeps the default run short; `pytest -m "parity or quality" --parallel <layout>
# --shapes 32x32x9 --precisions fp32,bf16` measures every pair (thresholds.toml [parallel] has the numbers).
GLOO_RUNS = {"cfg2": "fp32", "ulysses2": "bf16"}


@pytest.fixture(scope="module", params=list(GLOO_RUNS))
def gloo_session(request, tmp_path_factory):
    """A tiny-source session on the CPU whose cases run on 2 gloo ranks; 32x32x9 has 12 tokens to split."""
    results = tmp_path_factory.mktemp(f"results-{request.param}")
    settings = settings_from({"parallel": request.param, "backends": "torch", "device": "cpu", "shapes": "32x32x9",
                              "precisions": GLOO_RUNS[request.param], "perf_rounds": 2, "results_dir": str(results)})
    return Session(settings, RunRecorder(results, f"run-{request.param}", "pytest", settings.summary()))


@pytest.mark.parallel
def test_gloo_ranks_match_one_process_and_the_parent_alone_writes(gloo_session):
    """The parity plumbing end to end (launch, rank 0's return, the parent's verdicts and rows), then the run
    folder: written by the parent alone, every row under a case id that names the layout."""
    session = gloo_session
    s = session.settings
    shape, precision = s.shapes[0], s.precisions[0]
    for unit in UNITS if s.parallel.sequence > 1 else ("cfg_step",):
        case, result = judge_unit(session, unit, "torch", precision, shape)
        session.record("parity", case, "torch", result)
        assert result, result.message()
    loop, loop_result, video, video_result = judge_run(session, "torch", precision)
    session.record("parity", loop, "torch", loop_result)
    session.record("quality", video, "torch", video_result)
    assert loop_result and video_result, loop_result.message() + "; " + video_result.message()
    assert len(loop_result.step_errors) == s.steps
    if s.parallel.cfg == 2:  # the perf plumbing once: alternating rounds on rank 0, barriers on every rank
        case, results = time_layout(session, "torch", shape)
        for _, result in results:
            session.record("perf", case, "torch", result)
        scaling = dict(results)["scaling"].values
        assert scaling["scaling_efficiency"] == pytest.approx(scaling["speedup_vs_one_gpu"] / 2)
        assert not any(k.startswith("peak_mem") for k in scaling)  # no CUDA allocator to ask on the CPU
    summary = write_summary(session.recorder)
    rows = load_run(session.recorder.path)
    assert rows and all(r.case.endswith("-" + s.parallel.spec) for r in rows)
    assert {p.name for p in session.recorder.path.iterdir()} <= {"parity.csv", "quality.csv", "perf.csv", "summary.md",
                                                                   "speedup.png", "error_vs_step.png"}
    text = summary.read_text()
    assert f"- parallel: {s.parallel.spec}" in text and "| interconnect | n/a |" in text


@pytest.mark.parallel
def test_a_whole_sequence_graph_backend_is_a_skip_under_ulysses(tmp_path):
    settings = settings_from({"parallel": "ulysses2", "backends": "torch,onnxruntime", "device": "cpu",
                              "shapes": "32x32x9", "results_dir": str(tmp_path)})
    with pytest.raises(BackendUnavailable, match="whole-sequence graph"):
        Session(settings).parallel("outputs", "onnxruntime", "fp32", settings.shapes[0], video=False)
