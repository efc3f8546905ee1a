"""pytest-xdist on several GPUs: pinning by worker id, perf kept out of workers, parts merged into one run."""
from __future__ import annotations

import pytest

from harness import workers
from harness.errors import HarnessError
from harness.report import write_summary
from harness.results import Row, load_run

pytestmark = pytest.mark.unit


def worker_env(worker: str, count: int, gpus: str, **extra: str) -> dict[str, str]:
    return {workers.WORKER_ENV: worker, workers.WORKER_COUNT_ENV: str(count), workers.GPUS_ENV: gpus, **extra}


@pytest.mark.parametrize("worker, gpus, expected", [
    ("gw0", ["0", "1"], "0"), ("gw1", ["0", "1"], "1"), ("gw2", ["0", "1"], "0"),  # wraps round: shared
    ("gw1", ["4", "6"], "6"), ("gw0", [], None),
])
def test_gpu_for_worker(worker, gpus, expected):
    assert workers.gpu_for_worker(worker, gpus) == expected


def test_bad_worker_id_is_a_harness_error():
    with pytest.raises(HarnessError, match="expected gw<N>"):
        workers.worker_index("master")


def test_visible_gpus_follow_the_users_selection():
    assert workers.visible_gpus({}, 3) == ["0", "1", "2"]
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 2) == ["2", "3"]
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, 0) == []


def test_controller_exports_and_worker_pins():
    controller: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "2,3"}
    workers.export_gpus(controller, workers.visible_gpus(controller, 2))
    worker = {**controller, workers.WORKER_ENV: "gw1"}  # what xdist's worker process starts with
    assert workers.pin_worker(worker) == "3" and worker["CUDA_VISIBLE_DEVICES"] == "3"


def test_pin_leaves_non_workers_alone():
    plain = {"CUDA_VISIBLE_DEVICES": "1"}
    assert workers.pin_worker(plain) is None and plain == {"CUDA_VISIBLE_DEVICES": "1"}
    no_gpus = worker_env("gw0", 2, "")
    assert workers.pin_worker(no_gpus) is None and "CUDA_VISIBLE_DEVICES" not in no_gpus


@pytest.mark.parametrize("env, skipped", [
    ({}, False),  # no xdist: perf times alone
    (worker_env("gw0", 1, "0"), True),  # even -n 1: pytest-benchmark is off under xdist
    (worker_env("gw1", 2, "0,1"), True),  # a GPU each, but host CPU/PCIe/memory are shared
])
def test_perf_stays_out_of_xdist_workers(env, skipped):
    assert (workers.perf_skip_reason(env) is not None) == skipped


def test_perf_skip_reason_says_what_to_do():
    reason = workers.perf_skip_reason(worker_env("gw3", 4, "0,1"))
    assert "4 xdist workers" in reason and "run `pytest -m perf` on its own" in reason


def test_workers_share_the_controllers_run_folder(tmp_path):
    env: dict[str, str] = {}
    controller = workers.session_recorder(tmp_path, None, env, device_count=2, command="pytest -n 2")
    assert env[workers.GPUS_ENV] == "0,1" and not controller.path.exists()  # nothing recorded yet
    workerinput = {"workerid": "gw1", **workers.worker_input(controller)}
    part = workers.session_recorder(tmp_path, workerinput, env, device_count=0)
    assert part.path == controller.path and part.part == "gw1"
    with pytest.raises(HarnessError, match="got no run id"):
        workers.session_recorder(tmp_path, {"workerid": "gw0"}, env, device_count=0)


def test_preset_run_id_must_be_new(tmp_path):
    env = {workers.RUN_ID_ENV: "run-ci-7"}
    assert workers.session_recorder(tmp_path, None, env, 0).run_id == "run-ci-7"
    (tmp_path / "run-ci-7").mkdir()
    with pytest.raises(HarnessError, match="already exists"):
        workers.session_recorder(tmp_path, None, env, 0)


def test_timestamp_run_ids_do_not_collide(tmp_path):
    first = workers.session_recorder(tmp_path, None, {}, 0)
    first.path.mkdir()
    assert workers.session_recorder(tmp_path, None, {}, 0).run_id != first.run_id


def part_row(worker: str, metric: str) -> Row:
    return Row(f"case-{worker}", "transformer", "torch", "fp32", "16x16x9", 16, metric, 1.0, None, True, "cpu", "")


def test_parts_merge_into_one_run(tmp_path):
    controller = workers.session_recorder(tmp_path, None, {}, device_count=2)
    for worker in ("gw10", "gw2"):  # numeric order, not string order
        part = workers.session_recorder(tmp_path, {"workerid": worker, **workers.worker_input(controller)}, {}, 0)
        part.add("parity", part_row(worker, "rel_l2"))
        part.add("perf", part_row(worker, "median_ms"))
        assert write_summary(part) is None  # a worker never writes the summary
    summary = write_summary(controller)
    rows = load_run(controller.path)
    assert [(r.case, r.metric) for r in rows] == [("case-gw2", "rel_l2"), ("case-gw10", "rel_l2"),
                                                  ("case-gw2", "median_ms"), ("case-gw10", "median_ms")]
    assert not (controller.path / "parts").exists() and "case-gw10" in summary.read_text()
