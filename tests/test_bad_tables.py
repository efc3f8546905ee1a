"""Bad results tables and baselines: a NaN never passes the regression gate, and a damaged or self-contradicting
run folder is one line for every command that reads it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.__main__ import main
from harness.results import SESSION_FILE, Row, RunRecorder, SessionEnd

from tests.helpers import cli_error

H100 = "NVIDIA H100 80GB HBM3 (sm_90)"
PERF_CASE = "cfg_step-proxy-480p-bf16-b1"


def perf_run(root: Path, name: str, median: float, iqr: float) -> Path:
    """A run folder holding one perf case's median and IQR, as a perf case records them."""
    recorder = RunRecorder(root, name)
    for metric, value in (("median_ms", median), ("iqr_ms", iqr)):
        recorder.add("perf", Row(PERF_CASE, "cfg_step", "tensorrt", "bf16", "480p", 32760, metric, value, None, None,
                                 H100, "torch=2.14.1;tensorrt=11.4.0.106"))
    recorder.finish(SessionEnd(0, 1, 1))  # its session ran every case it selected
    return recorder.path


@pytest.fixture
def accepted(tmp_path) -> Path:
    assert main(["baseline", "save", "--from", str(perf_run(tmp_path, "run-ok", 100.0, 1.0)), "--name", "gpu",
                 "--dir", str(tmp_path / "baselines"), "--tables", "perf"]) == 0
    return tmp_path / "baselines" / "gpu.json"


@pytest.mark.unit
@pytest.mark.parametrize("median, iqr", [(math.nan, 1.0), (1000.0, math.nan), (100.0, math.inf)],
                         ids=["nan-median", "nan-iqr-10x-slower", "inf-iqr"])
def test_compare_calls_a_nan_perf_row_regressed(accepted, tmp_path, capsys, median, iqr):
    current = perf_run(tmp_path, "run-nan", median, iqr)
    assert main(["compare", "--baseline", str(accepted), "--current", str(current)]) == 1
    out = capsys.readouterr().out
    assert "1 regressed" in out and "0 ok" in out


@pytest.mark.unit
def test_baseline_save_refuses_a_nan_iqr(tmp_path, capsys):
    run_folder = perf_run(tmp_path, "run-nan", 100.0, math.nan)
    line = cli_error(["baseline", "save", "--from", str(run_folder), "--name", "nan", "--dir", str(tmp_path), "--tables",
                      "perf"], capsys)
    assert "iqr_ms nan" in line and "never an accepted number" in line
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.unit
def test_a_baseline_without_iqr_ms_names_the_field(accepted, tmp_path, capsys):
    doc = json.loads(accepted.read_text())
    del doc["entries"][f"{PERF_CASE}|tensorrt|median_ms"]["iqr_ms"]
    accepted.write_text(json.dumps(doc))
    current = perf_run(tmp_path, "run-cur", 100.0, 1.0)
    line = cli_error(["compare", "--baseline", str(accepted), "--current", str(current)], capsys)
    assert f'entries["{PERF_CASE}|tensorrt|median_ms"].iqr_ms' in line and "is missing" in line


@pytest.mark.unit
@pytest.mark.parametrize("tolerance", ["nan", "inf", "1e9", "-1"])
def test_compare_refuses_a_perf_tolerance_that_hides_a_regression(accepted, tmp_path, capsys, tolerance):
    current = perf_run(tmp_path, "run-slow", 1000.0, 1.0)
    line = cli_error(["compare", "--baseline", str(accepted), "--current", str(current),
                      f"--perf-tolerance={tolerance}"], capsys)
    assert "--perf-tolerance" in line and "must be a finite number >= 0 and < 10" in line


def read_run_commands(run: str, accepted: Path, tmp_path: Path) -> list[list[str]]:
    return [["summary", run], ["compare", "--baseline", str(accepted), "--current", run],
            ["baseline", "save", "--from", run, "--name", "x", "--dir", str(tmp_path / "saved"), "--tables", "perf"]]


@pytest.mark.unit
@pytest.mark.parametrize("metric, value, passed, needle", [
    ("median_ms", math.nan, None, f"perf.csv holds {PERF_CASE}|tensorrt|median_ms more than once"),
    ("speedup", math.nan, True, f"perf.csv marks {PERF_CASE}|tensorrt|speedup passed with value nan"),
], ids=["nan-repeating-a-key", "nan-marked-passed"])
def test_a_table_that_contradicts_itself_is_one_line_for_every_command(accepted, tmp_path, capsys, metric, value,
                                                                       passed, needle):
    """A row appended by hand: read as-is, `summary` would print a pass or both verdicts of one key, and `compare`
    could judge the good repeat; every command that reads a run folder refuses it alike, and saves nothing."""
    run = perf_run(tmp_path, "run-bad", 100.0, 1.0)
    RunRecorder(tmp_path, "run-bad").add("perf", Row(PERF_CASE, "cfg_step", "tensorrt", "bf16", "480p", 32760, metric,
                                                     value, 1.5, passed, H100, "torch=2.14.1"))
    for argv in read_run_commands(str(run), accepted, tmp_path):
        line = cli_error(argv, capsys)
        assert needle in line and "rerun the cases into a new run folder" in line, argv
    assert not (tmp_path / "saved").exists()


@pytest.mark.unit
@pytest.mark.parametrize("candidate", [math.nan, 1890.0], ids=["nan-median", "median-x10"])
def test_a_speedup_its_own_medians_contradict_is_one_line_for_every_command(accepted, tmp_path, capsys, candidate):
    """A GPU run folder whose candidate median was edited: `summary` would print 350 | 1890 | 1.852x | pass, and
    `baseline save` keep the slower median, while the medians give 0.185x."""
    run = perf_run(tmp_path, "run-edited", candidate, 1.0)
    recorder = RunRecorder(tmp_path, "run-edited")
    for backend, metric, value, threshold, passed in (("torch", "median_ms", 350.0, None, None),
                                                      ("torch", "iqr_ms", 1.0, None, None),
                                                      ("tensorrt", "speedup", 350.0 / 189.0, 1.5, True)):
        recorder.add("perf", Row(PERF_CASE, "cfg_step", backend, "bf16", "480p", 32760, metric, value, threshold,
                                 passed, H100, "torch=2.14.1;tensorrt=11.4.0.106"))
    for argv in read_run_commands(str(run), accepted, tmp_path):
        line = cli_error(argv, capsys)
        assert f"perf.csv gives {PERF_CASE} tensorrt a speedup of 1.852x where the medians beside it (350 -> " in line
        assert "rerun the cases into a new run folder" in line, argv
    assert not (tmp_path / "saved").exists()


@pytest.mark.unit
@pytest.mark.parametrize("damage, needle", [
    (lambda run: [p.unlink() for p in run.iterdir()], "no result tables in"),
    (lambda run: (run / "perf.csv").write_bytes(b"\xff\xfe\x00\x01garbage\n"), "perf.csv: not UTF-8 text"),
    (lambda run: (run / "perf.csv").write_text(""), "perf.csv: the file is empty"),
], ids=["no-tables", "not-utf8", "empty-table"])
def test_a_damaged_run_folder_is_one_line_for_every_command(accepted, tmp_path, capsys, damage, needle):
    run = perf_run(tmp_path, "run-damaged", 100.0, 1.0)
    damage(run)
    for argv in read_run_commands(str(run), accepted, tmp_path):
        assert needle in cli_error(argv, capsys), argv
    assert not (tmp_path / "saved").exists()


@pytest.mark.unit
def test_an_empty_path_is_refused_not_read_as_the_current_folder(accepted, tmp_path, capsys):
    for argv in read_run_commands("", accepted, tmp_path) + [["compare", "--baseline", "", "--current", "x"]]:
        assert "is an empty path" in cli_error(argv, capsys), argv


@pytest.mark.unit
@pytest.mark.parametrize("end, tables, needle", [
    (SessionEnd(2, 40, 0), "perf", "was interrupted after 0 of 40 cases (pytest exit status 2); a baseline takes a "
                                   "whole run: rerun the cases"),
    (None, "perf", "holds no session.json recording that its pytest session finished"),
    (SessionEnd(0, 1, 1), "parity,perf", "has no parity.csv for --tables parity,perf; it holds perf: pass --tables "
                                         "naming those"),
], ids=["cut-at-its-first-case", "killed-before-it-finished", "a-table-missing"])
def test_baseline_save_refuses_a_run_that_is_not_whole(tmp_path, capsys, end, tables, needle):
    """A baseline from part of a run would call every case it lacks new, or judge nothing in a table it lacks."""
    run = perf_run(tmp_path, "run-part", 100.0, 1.0)
    if end is None:
        (run / SESSION_FILE).unlink()
    else:
        RunRecorder(tmp_path, "run-part").finish(end)
    line = cli_error(["baseline", "save", "--from", str(run), "--name", "x", "--dir", str(tmp_path / "saved"),
                      "--tables", tables], capsys)
    assert line.startswith(f"error: {run} ") and needle in line, line
    assert not (tmp_path / "saved").exists()


@pytest.mark.unit
def test_baseline_save_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    line = cli_error(["baseline", "save", "--from", str(perf_run(tmp_path, "run-ok", 100.0, 1.0)), "--name", "x",
                      "--dir", str(tmp_path / "a-file"), "--tables", "perf"], capsys)
    assert f"cannot write baseline {tmp_path / 'a-file' / 'x.json'}" in line
