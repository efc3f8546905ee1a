"""Bad options to whole pytest sessions and to `bench`: one usage error, before any case runs."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.__main__ import main
from harness.results import SessionEnd, session_end

from tests.helpers import REPO, assert_one_usage_error, child_env, cli_error, pytest_session, run


@pytest.mark.parametrize("option, needle", [
    ("--backends=foo", "--backends: unknown backend 'foo'"),
    ("--candidate=foo", "--candidate: unknown backend 'foo'"),
    ("--precisions=fp4", "--precisions: unknown precision 'fp4'"),
    ("--model-source=proxy --proxy-layers=0", "--proxy-layers 0 must be a whole number >= 1"),
    ("--proxy-layers=3", "--proxy-layers is read by --model-source proxy only"),
    ("--steps=-1", "--steps -1 must be a whole number from 1 to 1000"),
    ("--perf-rounds=0", "--perf-rounds 0 must be a whole number >= 1"),
    ("--shapes=16x528x1", "rope_max_seq_len is 32"),
    ("--engine-weights=none", "--engine-weights 'none': choose one of stripped, full, inputs"),
    ("--fp8-scales=dynamic", "--fp8-scales 'dynamic': choose one of row, static"),
    ("--backends=torch,onnxruntime --fp8-scales=static",
     "--fp8-scales static: no backend among --backends torch,onnxruntime reads it; add one of torch-fp8"),
    ("--backends=torch,onnxruntime --compile-scope=forward",
     "--compile-scope forward: no backend among --backends torch,onnxruntime reads it; add one of inductor"),
    ("--compile-scope=model", "--compile-scope 'model': choose one of blocks, forward"),
    ("--fp8-recipe=middle", "--fp8-recipe 'middle': choose one of all-blocks, nvidia"),
    ("--backends=torch --fp8-recipe=nvidia", "--fp8-recipe nvidia: no backend among --backends torch reads it; add "
                                             "one of torch-fp8, modelopt, tensorrt, tensorrt_rtx"),
    ("--model-source=proxy --proxy-layers=6 --fp8-recipe=nvidia", "an expert of 6 layers would quantize nothing; "
                                                                  "use --fp8-recipe all-blocks"),
    ("--backends=torch,onnxruntime --precisions=fp8", "--precisions fp8: no backend among --backends"),
    ("--scale-layers=-3", "--scale-layers -3 must be a whole number >= 1"),
    ("--model-path=/nowhere", "--model-path is read by --model-source checkpoint only"),
    # /proc exists and os.access calls it writable for root, yet mkdir fails: only making a folder proves it.
    ("--results-dir=/proc/wan-results", "--results-dir /proc/wan-results: cannot make a folder in /proc"),
    ("--cache-dir=/proc/wan-cache", "--cache-dir /proc/wan-cache: cannot make a folder in /proc"),
    ("--device=cpu --gpu-memory=1e9", "--gpu-memory 1e+09: a --device cpu run has this machine's memory"),
])
def test_a_bad_option_stops_pytest_once(tmp_path, option, needle):
    assert_one_usage_error(pytest_session(tmp_path, "-m", "parity", *option.split()), needle)


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "harness", "bench", f"--results-dir={tmp_path / 'results'}",
                f"--cache-dir={tmp_path / 'cache'}", *args])


@pytest.mark.parametrize("late", [["--steps", "0"], ["--shapes=32x32x9"]])
def test_bench_refuses_run_options_after_the_separator(tmp_path, late):
    # After --, a run option would override the one bench checked, unchecked, and its summary path would be wrong.
    proc = bench(tmp_path, "--", *late)
    assert proc.returncode == 2 and f"{late[0]} comes after --" in proc.stderr, proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and "summary" not in proc.stdout and not (tmp_path / "results").exists()


def test_bench_on_the_cpu_cannot_outgrow_the_machine_through_gpu_memory(tmp_path):
    """Else the plan takes 1e9 GiB for the budget and starts building 40 layers on a 24 GiB machine."""
    proc = bench(tmp_path, "--model-source", "proxy", "--proxy-layers", "40", "--device", "cpu", "--gpu-memory", "1e9",
                 "--backends", "torch,onnxruntime", "--precisions", "fp32")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr
    assert lines[0].startswith("error: --gpu-memory 1e+09: a --device cpu run has this machine's memory, ")
    assert not (tmp_path / "results").exists()


def test_bench_takes_checkpoint_options_as_its_own(tiny_checkpoint, tmp_path):
    proc = bench(tmp_path, "--model-source", "checkpoint", f"--model-path={tiny_checkpoint}", "--shapes", "32x48x5",
                 "--backends", "torch,onnxruntime", "--", "-k", "parity and text_encoder and fp32")
    summary = tmp_path / "results" / "run-bad-input" / "summary.md"
    assert proc.returncode == 0 and f"summary: {summary}" in proc.stdout, proc.stdout[-3000:] + proc.stderr
    text = summary.read_text()
    assert "| text_encoder-checkpoint-32x48x5-fp32-b1 | onnxruntime |" in text
    # The session ran on the settings bench validated, and its run folder names the bench command that gave them.
    assert f"- command: `python -m harness bench --results-dir={tmp_path / 'results'}" in text
    header = next(line for line in text.splitlines() if line.startswith("| case"))  # the parity table's
    assert " case_peak_host_gib |" in header and "| verdict " in header  # each case's peak beside its verdict
    # The TorchScript export of the text encoder warns about aten::index; pytest.ini filters it.
    assert "warnings summary" not in proc.stdout and "Warning:" not in proc.stdout + proc.stderr
    end = session_end(summary.parent)  # -k left two cases: both ran, so the run is whole
    assert end == SessionEnd(0, 2, 2) and "Interrupted" not in text, end


def test_a_bench_cut_at_its_first_case_says_so_and_is_no_baseline(tmp_path, capsys):
    """Ctrl-C once the first case has recorded its rows: pytest stops cleanly, and the run folder says it holds part of
    a run, in summary.md and `summary`, and `baseline save` refuses it. The cases after the first import nothing new:
    a Ctrl-C that lands inside a compiled extension's import (onnxruntime's) can come back as an ImportError, which
    the session takes for an unavailable backend and runs on."""
    run_folder = tmp_path / "results" / "run-cut"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "bench", f"--results-dir={tmp_path / 'results'}",
                             f"--cache-dir={tmp_path / 'cache'}", "--backends", "torch", "--precisions", "fp32", "--",
                             "-k", "test_component_parity"], cwd=REPO, env=child_env(WAN_BENCH_RUN_ID="run-cut"),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not any(run_folder.glob("*.csv")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    end = session_end(run_folder)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED and end.exit_status == 2 and end.ran < end.selected, output
    line = f"**Interrupted after {end.ran} of {end.selected} cases** (pytest exit status 2)"
    assert line in (run_folder / "summary.md").read_text()
    assert main(["summary", str(run_folder)]) == 0 and capsys.readouterr().out.startswith(line)
    error = cli_error(["baseline", "save", "--from", str(run_folder), "--name", "cut", "--dir", str(tmp_path)], capsys)
    assert f"was interrupted after {end.ran} of {end.selected} cases" in error and not (tmp_path / "cut.json").exists()


def test_bench_with_no_rows_prints_no_summary_path(tmp_path):
    proc = bench(tmp_path, "--backends", "torch", "--", "-k", "no_case_has_this_name")
    assert "no rows were recorded" in proc.stdout and "summary:" not in proc.stdout
    assert not (tmp_path / "results" / "run-bad-input" / "summary.md").exists()


def test_export_labels_cases_and_table_with_the_checkpoint_and_shape(tiny_checkpoint, tmp_path):
    proc = pytest_session(tmp_path, "-m", "export", "--model-source=checkpoint", f"--model-path={tiny_checkpoint}",
                          "--shapes=32x48x5", "--precisions=fp32", "-k", "test_export_check_and_trt_build and "
                          "text_encoder", "-v", "cases/test_export.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "text_encoder-checkpoint-32x48x5-fp32-b1" in proc.stdout
    table = (tmp_path / "results" / "run-bad-input" / "export-cpu.md").read_text()
    assert table.startswith("# ONNX export and TensorRT-RTX build (checkpoint source, 32x48x5)")
    assert "| text_encoder | fp32 | static |" in table and "| text_encoder | fp32 | dynamic |" in table
