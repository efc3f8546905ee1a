"""What several of the harness's tests share: the CLI's one-line error, subprocesses from the repository root,
whole pytest sessions, and pytest's one usage error.

The CLI runs in the test's own process through `main`; whole pytest sessions and `bench` run as subprocesses, with
their results and cache folders under the test's temporary folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.__main__ import main

REPO = Path(__file__).resolve().parent.parent


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI and return its one line: exit 2, `error: ...` alone on stderr, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def child_env(**variables: str) -> dict[str, str]:
    """A subprocess's environment: HF offline (nothing here downloads), a known run id, and `variables`. Under
    `pytest -n` the worker's PYTEST_XDIST_* variables are left out: the child is a plain session, not a second worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return {**env, "HF_HUB_OFFLINE": "1", "WAN_BENCH_RUN_ID": "run-bad-input", **variables}


def run(command: list[str], timeout: int = 600, **variables: str) -> subprocess.CompletedProcess:
    """A subprocess from the repository root, in child_env(**variables)."""
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**variables))


def pytest_session(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--results-dir={tmp_path / 'results'}",
                f"--cache-dir={tmp_path / 'cache'}", *args])


def assert_one_usage_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """pytest stopped in pytest_configure: exit 4, exactly one `ERROR:` line naming the problem, no case ran."""
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert lines == [lines[0]] and lines[0].startswith("ERROR: ") and needle in lines[0], output
    assert "Traceback" not in output
