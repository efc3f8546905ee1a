"""The CLI as a user meets it: exit codes, one-line errors, and a playable video from `generate`."""
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from harness.__main__ import main
from harness.video import read_mp4

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("argv, needle", [
    (["shapes", "1000x832x81"], "multiple of 16"),
    (["shapes", "480x832x80"], "4k+1"),
    (["generate", "--prompt", "x", "--backend", "nope"], "unknown backend"),
    (["generate", "--prompt", "x", "--precision", "fp4"], "unknown precision"),
    (["generate", "--prompt", "x", "--model-source", "checkpoint", "--model-path", "/no/such/folder"], "does not exist"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Libraries may log warnings on import (torchao via diffusers); our message is one line, last.
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "Traceback" not in err


def test_shapes_prints_latent_and_tokens(capsys):
    assert main(["shapes", "480p"]) == 0
    out = capsys.readouterr().out
    assert "[1, 16, 21, 60, 104]" in out and "32,760" in out


def test_env_lists_libraries_and_backends():
    proc = subprocess.run([sys.executable, "-m", "harness", "env"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("torch", "diffusers", "onnxruntime", "tensorrt_rtx", "inductor", "torch-fp8", "tensorrt"):
        assert name in proc.stdout
    # torchao's import notes (torch's pytree on its enums, diffusers on old tensor types) are not shown.
    assert "_pytree" not in proc.stderr and "Unable to import" not in proc.stderr, proc.stderr


def test_cli_filters_the_warnings_pytest_ini_filters():
    import torch

    from harness.__main__ import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("Constant folding - Only steps=1 can be constant folded", UserWarning)
        warnings.warn("Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        warnings.warn("Exporting aten::index operator of advanced indexing", UserWarning)
        warnings.warn("a warning of our own", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of our own"]


def test_readme_generate_example_runs_as_written(tmp_path):
    """The README's generate line, as a new user copies it, in a fresh folder: the tiny source's default shape."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (line,) = re.findall(r"`python( -m harness generate [^`]*)`", readme)
    # `python` is the set-up's venv interpreter, which runs these tests.
    proc = subprocess.run([sys.executable, *shlex.split(line)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 0, proc.stderr
    assert read_mp4(tmp_path / "video.mp4").shape == (9, 16, 16, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


@pytest.mark.parametrize("command, defaults", [
    ("generate", ["(default: torch)", "(default: fp32)", "(default: 16x16x9 tiny", "(default: video.mp4)",
                  "(default: tiny)", "(default 4 tiny"]),
    ("bench", ["(default: tiny)", "(default: 1.5)", "(default: 10)", "(default: results)"]),
])
def test_help_shows_the_defaults(command, defaults, capsys):
    code = main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert code == 0 and all(d in help_text for d in defaults), help_text
