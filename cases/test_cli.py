"""The CLI as a user meets it: exit codes, one-line errors, and a playable video from `generate`."""
import os
import subprocess
import sys

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


def test_generate_writes_a_playable_mp4(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert main(["generate", "--prompt", "a cat", "--shape", "32x48x9", "--steps", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    frames = read_mp4(out)
    assert frames.shape == (9, 32, 48, 3)
    printed = capsys.readouterr().out
    assert "random weights" in printed and "denoise" in printed
