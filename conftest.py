"""pytest's side of the harness: the options, one Session per run, parametrization, and skips for what cannot run."""
from __future__ import annotations

import os
import shlex

import pytest

from harness import workers

# Under `pytest -n <gpus>` each xdist worker takes its own GPU. This must run before torch can
# initialise CUDA, which reads CUDA_VISIBLE_DEVICES once; hence here, above the imports that load torch.
workers.pin_worker(os.environ)

from harness.case import COMPONENTS, Case, is_dit, is_quantized  # noqa: E402
from harness.errors import BackendUnavailable, HarnessError  # noqa: E402
from harness.plan import FAMILIES  # noqa: E402
from harness.report import tables_markdown, write_summary  # noqa: E402
from harness.residency import out_of_memory  # noqa: E402
from harness.results import CaseCount, SessionEnd  # noqa: E402
from harness.session import Session, check_asked_kernels  # noqa: E402
from harness.settings import OPTIONS, Validated, check_layers, settings_from  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("wan-trt-bench")
    for option in OPTIONS:
        # No default here: Settings applies the declared ones, and tells what was given from what was not.
        group.addoption(option.flag, dest=f"wan_{option.dest}", type=option.type, default=None,
                        help=option.described())
    group.addoption("--scale-layers", dest="wan_scale_layers", type=int, default=None,
                    help="run cases/test_scale.py: export and build an A14B-width expert of this many layers "
                         "(10: 7 GB of bf16 weights, minutes on 2 cores); skipped without it")


def pytest_configure(config):
    from harness.__main__ import quiet_third_party

    quiet_third_party()  # the check of a checkpoint folder imports diffusers here, before pytest captures output
    handed = next((p for p in config.pluginmanager.get_plugins() if isinstance(p, Validated)), None)
    try:
        if handed:
            settings, command = handed.settings, handed.command
        else:
            settings = settings_from({o.dest: config.getoption(f"wan_{o.dest}") for o in OPTIONS})
            check_asked_kernels(settings)
            command = shlex.join(["pytest", *config.invocation_params.args])
        if config.getoption("wan_scale_layers") is not None:
            check_layers(config.getoption("wan_scale_layers"), "--scale-layers")
        # Made here, not in a fixture: under xdist the controller runs no fixtures, yet it owns the run
        # folder (it merges the workers' parts in pytest_sessionfinish). No rows, no folder.
        import torch

        recorder = workers.session_recorder(settings.results_dir, getattr(config, "workerinput", None), os.environ,
                                            torch.cuda.device_count(), settings=settings.summary(),
                                            command=command)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.wan_session = Session(settings, recorder)
    config.wan_count = CaseCount()
    config.pluginmanager.register(config.wan_count)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, controller side: every worker writes into the controller's run folder."""
    node.workerinput.update(workers.worker_input(node.config.wan_session.recorder))


def pytest_runtest_setup(item):
    """Each case's peak memory counts from here, its fixtures included, and its rows name it (Session.record reads
    both into the rows). Perf cases never time inside an xdist worker (see harness.workers.perf_skip_reason)."""
    from harness.memory import start_case

    item.config.wan_session.test = item.nodeid
    start_case(cuda=item.config.wan_session.settings.device == "cuda")
    reason = workers.perf_skip_reason(os.environ) if item.get_closest_marker("perf") else None
    if reason:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A backend this machine cannot run is a skip with its concrete reason, never a failure or a pass; a user
    error (HarnessError) fails the case with its one line, as the CLI prints it, not a traceback."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(BackendUnavailable):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {call.excinfo.value}")
    elif report.failed and call.excinfo is not None and call.excinfo.errisinstance(HarnessError):
        report.longrepr = f"error: {call.excinfo.value}"
    elif call.excinfo is not None and out_of_memory(call.excinfo.value):
        # One line, and the memory the case held is given back, so that the cases after it still run.
        family = next((f for f in FAMILIES if item.get_closest_marker(f)), None)
        report.longrepr = item.config.wan_session.out_of_memory(call.excinfo.value, family)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: only the families that will run are planned
def pytest_collection_modifyitems(config, items):
    """A run whose memory plan does not fit the card is refused here, in one line, before any case runs."""
    session = config.wan_session
    session.families = tuple(f for f in FAMILIES if any(item.get_closest_marker(f) for item in items))
    try:
        session.plan.check(session.families)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def session(request) -> Session:
    return request.config.wan_session


@pytest.fixture(scope="session")
def settings(session):
    return session.settings


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The fp32 tiny model saved as a diffusers folder: what --model-source=checkpoint loads, in each precision's
    dtype as from_pretrained casts it."""
    from harness.models import load_model

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    load_model("tiny").pipeline().save_pretrained(folder)
    return folder


def pytest_generate_tests(metafunc):
    """Parity cases: component x shape x precision x backend; `shape`: each of the run's shapes."""
    s = metafunc.config.wan_session.settings
    if "parity_case" in metafunc.fixturenames:
        # fp8 and int8 mean quantized DiT matmuls; the text encoder and VAE have no quantized variant.
        cases = [Case(c, shape, p, source=s.source) for c in COMPONENTS for shape in s.shapes
                 for p in s.precisions if not is_quantized(p) or is_dit(c)]
        metafunc.parametrize("parity_case", cases, ids=[c.id for c in cases])
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", s.backends)
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", s.shapes, ids=[x.id for x in s.shapes])
    if "attributed_precision" in metafunc.fixturenames:
        skip = pytest.mark.skip(reason="no --attribution: pass e.g. --attribution bf16 (four more eager videos)")
        metafunc.parametrize("attributed_precision", s.attribution or [pytest.param(None, marks=skip)])
    if "reduced_precision" in metafunc.fixturenames:
        # Whole-pipeline cases compare each precision against the fp32 reference, so fp32 itself is not one.
        metafunc.parametrize("reduced_precision", [p for p in s.precisions if p != "fp32"])


def pytest_sessionfinish(session, exitstatus):
    """The run folder records whether every selected case ran (a run cut short is not a whole one), then its summary."""
    wan = getattr(session.config, "wan_session", None)
    if wan is not None:
        wan.recorder.finish(SessionEnd(int(exitstatus), session.testscollected, session.config.wan_count.ran))
        session.config.wan_summary = write_summary(wan.recorder)


def pytest_terminal_summary(terminalreporter, config):
    wan = getattr(config, "wan_session", None)
    if wan is not None and getattr(config, "wan_summary", None):
        terminalreporter.write_sep("=", "wan-trt-bench results")
        terminalreporter.write_line(tables_markdown(wan.recorder.tables()))
        terminalreporter.write_line(f"summary: {config.wan_summary}")


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU, driver, CUDA, TensorRT and torch versions in the benchmark JSON (pytest-benchmark hook)."""
    from harness.machine import machine_info as wan_machine_info

    machine_info["wan"] = wan_machine_info()
