"""The GPU regression workflow (.github/workflows/gpu-regression.yml) runs commands that exist: every harness
command parses and every pytest option and marker it names is registered."""
import re
import shlex
from pathlib import Path

import pytest

from harness.__main__ import build_parser

pytestmark = pytest.mark.unit
WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "gpu-regression.yml"


def workflow_commands(prefix: str) -> list[list[str]]:
    """Every shell command in the workflow's steps that starts with `prefix`, with variables filled in."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (a transformers dependency) parses the workflow")
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["gpu-regression"]["steps"]
    commands = []
    for step in steps:
        script = re.sub(r"\$\{\{[^}]*\}\}|\$\{?[A-Z_]+\}?", "X", step.get("run", "").replace("\\\n", " "))
        commands += [shlex.split(line) for line in script.splitlines() if line.strip().startswith(prefix)]
    return commands


def test_workflow_harness_commands_parse():
    commands = workflow_commands("python -m harness")
    assert {c[3] for c in commands} >= {"compare"}
    for command in commands:
        build_parser().parse_args(command[3:])  # exits (SystemExit) on an unknown command or option


def test_workflow_pytest_options_exist(request):
    (command,) = workflow_commands("python -m pytest")
    args = command[3:]
    for option in [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]:
        request.config.getoption(option)  # ValueError when no plugin or conftest registers it
    registered = {m.split(":")[0] for m in request.config.getini("markers")}
    marks = args[args.index("-m") + 1]
    assert set(re.findall(r"\w+", marks)) - {"or", "and", "not"} <= registered
