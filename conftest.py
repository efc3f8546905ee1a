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
from harness.plan import FAMILIES, RUNS, Planned, run_order, turn_of  # noqa: E402
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
    config.wan_session.progress = _terminal_line(config)
    config.wan_family_seconds = {}


def _terminal_line(config):
    """Where the session's progress lines go: the terminal, past pytest's capture, as each step of the plan starts."""
    import contextlib

    def write(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None:
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(f"wan-trt-bench: {line}")

    return write


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, controller side: every worker writes into the controller's run folder."""
    node.workerinput.update(workers.worker_input(node.config.wan_session.recorder))


def pytest_runtest_setup(item):
    """Each case's peak memory counts from here, its fixtures included, and its rows name it (Session.record reads
    both into the rows). Perf cases never time inside an xdist worker (see harness.workers.perf_skip_reason)."""
    from harness.memory import start_case

    session = item.config.wan_session
    session.test = item.nodeid
    planned = getattr(item, "wan_planned", None)
    if planned is not None and planned.test not in RUNS:
        session.clear_device()  # a case the plan does not size starts with nothing of the session's on the device
    start_case(cuda=session.settings.device == "cuda")
    reason = workers.perf_skip_reason(os.environ) if item.get_closest_marker("perf") else None
    if reason:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A backend this machine cannot run is a skip with its concrete reason, never a failure or a pass; a user
    error (HarnessError) fails the case with its one line, as the CLI prints it, not a traceback."""
    outcome = yield
    report = outcome.get_result()
    family = next((f for f in FAMILIES if item.get_closest_marker(f)), None)
    if family is not None:  # each family's actual time, beside its estimate in summary.md
        seconds = item.config.wan_family_seconds
        seconds[family] = seconds.get(family, 0.0) + report.duration
    if call.excinfo is not None and call.excinfo.errisinstance(BackendUnavailable):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {call.excinfo.value}")
    elif report.failed and call.excinfo is not None and call.excinfo.errisinstance(HarnessError):
        report.longrepr = f"error: {call.excinfo.value}"
    elif call.excinfo is not None and out_of_memory(call.excinfo.value):
        # One line, and the memory the case held is given back, so that the cases after it still run.
        family = next((f for f in FAMILIES if item.get_closest_marker(f)), None)
        report.longrepr = item.config.wan_session.out_of_memory(call.excinfo.value, family)


def pytest_runtest_teardown(item, nextitem):
    """After a backend's last case of a family, its turn ends (harness.plan): where candidates take turns, what it
    built is let go before the next backend's cases."""
    here = getattr(item, "wan_planned", None)
    after = getattr(nextitem, "wan_planned", None) if nextitem is not None else None
    settings = item.config.wan_session.settings
    if here is not None:
        item.config.wan_session.after_case(item.wan_index)
    if here is not None and (after is None or (after.family, turn_of(after, settings))
                             != (here.family, turn_of(here, settings))):
        item.config.wan_session.end_turn(turn_of(here, settings))


def _planned(item) -> Planned | None:
    """The plan's view of a collected case (harness.plan): its function, family and parameters; None outside the
    case families, or for a case marked to skip."""
    family = next((f for f in FAMILIES if item.get_closest_marker(f)), None)
    if family is None or item.get_closest_marker("skip"):
        return None
    params = item.callspec.params if hasattr(item, "callspec") else {}
    case = params.get("parity_case") or params.get("export_case_")
    return Planned(getattr(item, "originalname", item.name), family, params.get("backend") or params.get("candidate"),
                   case.precision if case else params.get("reduced_precision") or params.get("attributed_precision"),
                   case.component if case else params.get("stage"), case.shape if case else params.get("shape"),
                   params.get("prompt"))


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: only the cases that will run are planned
def pytest_collection_modifyitems(config, items):
    """The cases run family by family, each backend's together (harness.plan.run_order), and their plan is made
    here: a run that does not fit the card is refused in one line, before any case runs."""
    session = config.wan_session
    planned = [_planned(item) for item in items]
    order = run_order(planned, session.settings)
    items[:] = [items[i] for i in order]
    index = 0
    for item, case in zip(items, (planned[i] for i in order)):
        item.wan_planned, item.wan_index = case, index
        index += case is not None
    handed = next((p for p in config.pluginmanager.get_plugins() if isinstance(p, Validated)), None)
    plan_only = handed is not None and handed.plan_only
    try:
        session.start([planned[i] for i in order if planned[i] is not None], check=not plan_only)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    if plan_only:  # `python -m harness plan`: the cases were collected to be planned, not run
        config.hook.pytest_deselected(items=list(items))
        items[:] = []


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
        wan.finish(session.config.wan_family_seconds)
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
