"""The run folder: rows on disk as they arrive, summary.md, plots, and reading a run back."""
from __future__ import annotations

import csv
import math
import mmap
import os
import re
import stat

import pytest
import torch

from harness.case import Case
from harness.errors import HarnessError
from harness.memory import (GPU_PEAK, GPU_RESERVED_PEAK, HOST_PEAK, GiB, reset_gpu_peak, resident_bytes, stage,
                            start_case)
from harness.report import MEMORY_NOTE, short_summary, tables_markdown, write_summary
from harness.results import (SESSION_FILE, Measured, Row, RunRecorder, SessionEnd, load_run, load_tables,
                             session_end)
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape

pytestmark = pytest.mark.unit

CASE = "transformer-tiny-16x16x9-bf16-b1"


def row(metric: str, value: float | None, backend: str = "tensorrt_rtx", threshold: float | None = None,
        passed: bool | None = None, note: str = "", test: str = "") -> Row:
    return Row(case=CASE, component="transformer", backend=backend, precision="bf16", shape="16x16x9",
               tokens=16, metric=metric, value=value, threshold=threshold, passed=passed,
               device="cpu (x86_64, 2 threads)", versions="torch=2.14.1;tensorrt_rtx=1.7.1.116", note=note, test=test)


def recorded_run(tmp_path) -> RunRecorder:
    rec = RunRecorder(tmp_path, "run-test", command="pytest -m parity", settings={"steps": 4})
    rec.add("parity", row("rel_l2", 4e-3, threshold=1e-2, passed=True))
    rec.add("parity", row("max_abs", 0.5, threshold=0.1, passed=False))
    for step, err in enumerate((1e-3, 3e-3, 9e-3), start=1):
        rec.add("parity", row(f"rel_l2@step={step}", err))
    rec.add("perf", row("median_ms", 12.5, backend="torch"))
    rec.add("perf", row("median_ms", 12.5 / 1.2))
    rec.add("perf", row("speedup", 1.2, threshold=1.5, passed=None))
    rec.add("perf", row("speedup_q1", 1.1))
    rec.add("perf", row("speedup_q3", 1.5))
    rec.add("perf", row("tflops", None, note="skipped: no FLOP count for this graph",
                        test="cases/test_perf.py::test_speed"))  # last: its note, then its test, end the file
    rec.finish(SessionEnd(1, 3, 3))  # every selected case ran, one failed
    return rec


def test_row_is_on_disk_right_after_add(tmp_path):
    rec = RunRecorder(tmp_path, "run-x")
    rec.add("parity", row("rel_l2", 4e-3))
    with (tmp_path / "run-x" / "parity.csv").open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 1 and records[0]["metric"] == "rel_l2" and float(records[0]["value"]) == 4e-3
    rec.add("parity", row("max_abs", 0.1))
    assert len(load_run(rec.path)) == 2  # appended, header written once


def test_load_run_round_trips_types(tmp_path):
    rows = [row("rel_l2", 4e-3, threshold=1e-2, passed=True), row("psnr_mean", math.inf, passed=False),
            row("tflops", None)]
    rec = RunRecorder(tmp_path)
    for r in rows:
        rec.add("parity", r)
    assert load_run(rec.path) == rows
    assert rec.run_id.startswith("run-") and rec.path == tmp_path / rec.run_id


def test_summary_has_header_tables_and_failures(tmp_path):
    summary = write_summary(recorded_run(tmp_path))
    text = summary.read_text()
    assert summary == tmp_path / "run-test" / "summary.md"
    assert "`pytest -m parity`" in text and "git commit:" in text and "- steps: 4" in text
    assert "| device |" in text and "torch" in text  # machine table
    assert "## parity" in text and "## perf" in text and "## quality" not in text  # empty table absent
    assert "FAIL: max_abs" in text and "0.5 (thr 0.1) FAIL" in text
    assert "error by denoising step" in text and "step 3" in text
    assert "n/a" in text  # the unmeasured tflops
    assert not (tmp_path / "run-test" / "quality.csv").exists()


def test_plots_are_real_pngs(tmp_path):
    rec = recorded_run(tmp_path)
    write_summary(rec)
    for name in ("speedup.png", "error_vs_step.png"):
        data = (rec.path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000, name
    assert not [p for p in rec.path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cpu_timings_are_labelled_informational(tmp_path):
    rec = recorded_run(tmp_path)
    text = write_summary(rec).read_text()
    assert "CPU timings are informational, never gated" in text.split("## perf", 1)[1]
    assert short_summary(rec.path).startswith("CPU timings are informational")


def test_speedup_plot_has_quartile_error_bars_and_the_cpu_label(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.container import ErrorbarContainer

    from harness.report import _speedup_figure

    rows = load_tables(recorded_run(tmp_path).path)["perf"]
    quartiles = {(r.case, r.backend, r.metric, r.test): r.value for r in rows if r.metric.startswith("speedup_q")}
    fig = _speedup_figure([r for r in rows if r.metric == "speedup"], quartiles)
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (segments,) = bars.lines[2]
    assert [round(y, 6) for y in segments.get_segments()[0][:, 1]] == [1.1, 1.5]  # from q1 to q3 around 1.2
    assert ax.get_title().startswith("CPU timings: informational")


def test_written_files_get_the_umask_mode_not_owner_only(tmp_path):
    """Atomic writes go through mkstemp (0600); others on a shared runner must still read the results."""
    umask = os.umask(0o022)
    try:
        rec = recorded_run(tmp_path)
        write_summary(rec)
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in rec.path.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_markdown_matches_summary_tables(tmp_path):
    rec = recorded_run(tmp_path)
    assert tables_markdown(rec.tables()) in write_summary(rec).read_text()


def test_nothing_recorded_leaves_no_folder(tmp_path):
    rec = RunRecorder(tmp_path, "run-empty")
    assert write_summary(rec) is None and not rec.path.exists()


def test_unknown_table_is_a_harness_error(tmp_path):
    with pytest.raises(HarnessError, match="unknown results table 'speed'"):
        RunRecorder(tmp_path).add("speed", row("rel_l2", 1.0))


def test_corrupt_csv_names_file_and_line(tmp_path):
    rec = RunRecorder(tmp_path, "run-bad")
    rec.add("parity", row("rel_l2", 1.0))
    path = rec.path / "parity.csv"
    path.write_text(path.read_text().replace(",1.0,", ",one,"))
    with pytest.raises(HarnessError, match=r"parity\.csv:2: unreadable row"):
        load_tables(rec.path)


def test_a_folder_without_tables_is_refused(tmp_path):
    with pytest.raises(HarnessError, match=r"no result tables in .* \(is it a run folder\?\)"):
        load_run(tmp_path)


@pytest.mark.parametrize("damage, needle", [
    (lambda data: b"", "the file is empty"),
    (lambda data: data.splitlines(keepends=True)[0], "a header and no rows"),
    (lambda data: b"hello world\n", "the first line is not the header"),
    (lambda data: b"\xff\xfe\x00\x01garbage\n", "not UTF-8 text"),
    (lambda data: data + b'a,"' + b"x" * 200_000 + b'"\r\n', "field larger than field limit"),
    (lambda data: data[:-8], "cut short while written"),  # inside the last row's last column
    (lambda data: data[:data.rindex(b',"cpu')] + b"\r\n", "10 fields where the header has 14"),
], ids=["empty", "header-only", "no-header", "not-utf8", "huge-field", "cut-in-last-column", "cut-to-fewer-fields"])
def test_a_damaged_table_is_named_in_one_line(tmp_path, damage, needle):
    rec = recorded_run(tmp_path)
    path = rec.path / "perf.csv"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(HarnessError) as error:
        load_run(rec.path)
    message = str(error.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message, message


def test_a_table_that_is_a_folder_is_named(tmp_path):
    rec = recorded_run(tmp_path)
    (rec.path / "perf.csv").unlink()
    (rec.path / "perf.csv").mkdir()
    with pytest.raises(HarnessError, match=r"cannot read .*perf\.csv: Is a directory"):
        load_run(rec.path)


@pytest.mark.parametrize("metric, value, needle", [("median_ms", -5.0, "median_ms -5 (a time is > 0)"),
                                                   ("median_ms", 0.0, "median_ms 0 (a time is > 0)"),
                                                   ("iqr_ms", -1.0, "iqr_ms -1 (a spread is >= 0)")])
def test_a_time_no_timing_gives_is_refused(tmp_path, metric, value, needle):
    rec = RunRecorder(tmp_path, "run-time")
    rec.add("perf", row(metric, value))
    with pytest.raises(HarnessError, match=re.escape(f"perf.csv:2: holds {needle}")):
        load_run(rec.path)
    nan = RunRecorder(tmp_path, "run-nan")  # a broken timing is recorded as NaN: loaded, for the gates to fail
    nan.add("perf", row(metric, math.nan))
    assert math.isnan(load_run(nan.path)[0].value)


def summary_verdicts(text: str) -> dict[str, str]:
    """metric (or candidate, in the speed-up table) -> the verdict cell of its summary line."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {c[2] if len(c) == 6 else f"speedup {c[1]}": c[-1] for c in cells if c[-1] != "verdict"}  # not headers


def test_summary_prints_the_verdicts_the_rows_carry(tmp_path):
    """The judges decided once; the summary repeats their verdicts and decides none again."""
    rec = RunRecorder(tmp_path, "run-s")
    for backend, passed in (("tensorrt_rtx", False), ("inductor", None)):  # CPU timings: never gated
        test = f"test_speed[{backend}]"
        rec.add("perf", row("median_ms", 12.0, backend="torch", test=test))
        rec.add("perf", row("median_ms", 10.0, backend=backend, test=test))
        rec.add("perf", row("speedup", 1.2, backend=backend, threshold=1.5, passed=passed, test=test))
    rec.add("quality", row("lpips_max", 0.05, threshold=0.1, passed=False))  # not what the band gives: shown as carried
    rec.add("quality", row("psnr_mean", 30.0, threshold=24.0, passed=True))
    rec.add("parity", row("loop_rel_l2", math.nan, threshold=1e-2, passed=False))
    verdicts = summary_verdicts(short_summary(rec.path))
    assert verdicts == {"speedup tensorrt_rtx": "FAIL", "speedup inductor": "not gated", "speedup": "FAIL",
                        "lpips_max": "FAIL", "psnr_mean": "pass", "loop_rel_l2": "FAIL"}, verdicts


@pytest.mark.parametrize("rows, needle", [
    ([row("rel_l2", math.nan, threshold=1e-2, passed=True)], "marks {case}|tensorrt_rtx|rel_l2 passed with value nan"),
    ([row("speedup", math.inf, threshold=1.5, passed=True)], "marks {case}|tensorrt_rtx|speedup passed with value inf"),
    ([row("ort_rel_l2", 1e-6, threshold=math.inf, passed=True)], "threshold inf, which no judge passes"),
    ([row("speedup", None, threshold=1.5, passed=True)], "passed with value blank and threshold 1.5"),
    ([row("rel_l2", 4e-3, threshold=1e-2, passed=True, test="t"),
      row("rel_l2", 0.5, threshold=1e-2, passed=False, test="t")], "holds {case}|tensorrt_rtx|rel_l2 more than once in t;"),
], ids=["nan-value", "inf-value", "inf-threshold", "blank-value", "key-twice"])
def test_the_reader_refuses_a_table_that_contradicts_itself(tmp_path, rows, needle):
    rec = RunRecorder(tmp_path, "run-bad")
    for r in rows:
        rec.add("parity", r)
    with pytest.raises(HarnessError) as error:
        load_run(rec.path)
    message = str(error.value)
    assert message.startswith(str(rec.path / "parity.csv")) and needle.format(case=CASE) in message, message
    assert "\n" not in message and "rerun the cases into a new run folder" in message


def test_the_reader_takes_what_repeats_by_design(tmp_path):
    """One key in two tests (eager torch re-timed beside each candidate), each record's peak memory, and a pass with
    no number (an export whose ORT parity was skipped) contradict nothing."""
    rec = RunRecorder(tmp_path, "run-ok")
    rows = [row("median_ms", 100.0, backend="torch", test="a"), row("median_ms", 50.0, backend="torch", test="b"),
            row(HOST_PEAK, 1.0, test="a"), row(HOST_PEAK, 1.5, test="a"), row("ort_rel_l2", None, passed=True)]
    for r in rows:
        rec.add("perf", r)
    assert load_run(rec.path) == rows


def test_a_skipped_metric_shows_its_reason_in_the_tables_and_summaries(tmp_path):
    rec = RunRecorder(tmp_path, "run-skip")
    why = "skipped: frames 16x16 are below the 128 px short side VMAF needs"
    rec.add("quality", row("psnr_fp32", 30.0, threshold=24.0, passed=True))
    for metric in ("vmaf_fp32", "vmaf_frame_fp32"):
        rec.add("quality", row(metric, None, threshold=78.0, note=why))
    assert [r.note for r in load_run(rec.path)] == ["", why, why]
    text = write_summary(rec).read_text()
    assert f"- vmaf_fp32, vmaf_frame_fp32: {why}" in text and "| pass " in text  # the skip fails nothing
    assert "| VMAF " in text and "| not measured " in text
    short = short_summary(rec.path)
    assert summary_verdicts(short)["vmaf_frame_fp32"] == "skipped" and f"- vmaf_fp32, vmaf_frame_fp32: {why}" in short


@pytest.mark.parametrize("missing", [1, 2], ids=["before-the-test-column", "before-the-note-column"])
def test_a_table_written_before_the_last_columns_still_loads(tmp_path, missing):
    rec = RunRecorder(tmp_path, "run-old")
    rec.add("quality", row("psnr_mean", 30.0, threshold=24.0, passed=True))
    path = rec.path / "quality.csv"
    path.write_text("".join(line.rsplit(",", missing)[0] + "\n" for line in path.read_text().splitlines()))
    assert load_run(rec.path) == [row("psnr_mean", 30.0, threshold=24.0, passed=True)]


def test_summary_shows_a_blank_speedup_as_not_measured(tmp_path):
    rec = RunRecorder(tmp_path, "run-blank")
    rec.add("perf", row("speedup", None, threshold=1.5, passed=None))
    rec.add("export", row("ort_rel_l2", None, passed=True))  # checker and shape inference passed, ORT parity skipped
    text = short_summary(rec.path)
    assert "| n/a " in text and summary_verdicts(text)["speedup tensorrt_rtx"] == "not gated"
    assert summary_verdicts(text)["ort_rel_l2"] == "pass"


def test_summary_pairs_each_speedup_with_its_own_eager_time(tmp_path):
    """Two candidates of one case, each timed beside its own eager run: the rows are found by their test, wherever
    they stand (here the speed-ups first, then the timings in the other order)."""
    rec = RunRecorder(tmp_path, "run-two")
    measured = (("onnxruntime", 100.0, 10.0), ("inductor", 50.0, 25.0))
    for backend, eager, candidate in measured:
        rec.add("perf", row("speedup", eager / candidate, backend=backend, test=f"test_speed[{backend}]"))
    for backend, eager, candidate in reversed(measured):
        rec.add("perf", row("median_ms", candidate, backend=backend, test=f"test_speed[{backend}]"))
        rec.add("perf", row("median_ms", eager, backend="torch", test=f"test_speed[{backend}]"))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in short_summary(rec.path).splitlines()]
    times = {c[1]: (c[2], c[3]) for c in cells if len(c) == 7 and c[2][0].isdigit()}  # the speed-up table's rows
    assert times == {"onnxruntime": ("100", "10"), "inductor": ("50", "25")}, times


def speedup_run(tmp_path, eager: float, candidate: float, speedup: float, name: str = "run-speed") -> RunRecorder:
    """One perf case's rows as cases/test_perf.py records them, with each number given."""
    rec = RunRecorder(tmp_path, name)
    test = "cases/test_perf.py::test_speed[cfg_step-16x16x9-tensorrt_rtx]"
    rec.add("perf", row("median_ms", eager, backend="torch", test=test))
    rec.add("perf", row("median_ms", candidate, test=test))
    rec.add("perf", row("speedup", speedup, threshold=1.5, passed=None, test=test))
    return rec


@pytest.mark.parametrize("eager, candidate", [(350.0, math.nan), (350.0, 1890.0), (350.0, math.inf),
                                              (math.inf, 189.0), (350.0 * 1.01, 189.0)],
                         ids=["nan-candidate", "candidate-x10", "inf-candidate", "inf-eager", "off-by-1%"])
def test_the_reader_refuses_a_speedup_its_own_medians_contradict(tmp_path, eager, candidate):
    """A speed-up of 1.852x beside medians that give 0.185x (or NaN) would be printed, gated and saved as it is."""
    rec = speedup_run(tmp_path, eager, candidate, 350.0 / 189.0)
    with pytest.raises(HarnessError) as error:
        load_run(rec.path)
    message = str(error.value)
    assert message.startswith(f"{rec.path / 'perf.csv'} gives {CASE} tensorrt_rtx a speedup of 1.852x where the "
                              f"medians beside it ({eager:.4g} -> {candidate:.4g} ms) give "), message
    assert "\n" not in message and "rerun the cases into a new run folder" in message


@pytest.mark.parametrize("eager, candidate, speedup", [(350.0, 189.0, 350.0 / 189.0), (350.0, math.nan, math.nan),
                                                       (350.0, math.inf, 0.0), (math.inf, 189.0, math.inf)],
                         ids=["ratio", "nan-candidate", "inf-candidate", "inf-eager"])
def test_the_reader_takes_a_speedup_that_is_its_medians_ratio(tmp_path, eager, candidate, speedup):
    """As the judge divides them: a NaN median gives a NaN speed-up, which is a failed case, not a contradiction."""
    rows = load_run(speedup_run(tmp_path, eager, candidate, speedup).path)
    assert [r.metric for r in rows] == ["median_ms", "median_ms", "speedup"]


def test_the_reader_refuses_a_speedup_with_no_medians_to_divide(tmp_path):
    rec = RunRecorder(tmp_path, "run-alone")
    rec.add("perf", row("median_ms", 10.0))
    rec.add("perf", row("speedup", 1.2))
    with pytest.raises(HarnessError, match=f"holds {CASE}\\|tensorrt_rtx\\|speedup with no medians beside it"):
        load_run(rec.path)


def test_a_parallel_speedup_divides_the_medians_its_own_backend_recorded(tmp_path):
    """A parallel case records the one-GPU eager and one-GPU candidate medians under its own backend."""
    rec = RunRecorder(tmp_path, "run-parallel")
    for metric, value in (("median_ms", 40.0), ("speedup", 2.5), ("eager_median_ms", 100.0),
                          ("one_gpu_median_ms", 60.0), ("speedup_vs_one_gpu", 1.5)):
        rec.add("perf", row(metric, value, backend="torch-fp8"))
    assert len(load_run(rec.path)) == 5
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in short_summary(rec.path).splitlines()]
    assert [c[2:5] for c in cells if len(c) == 7 and c[2][:1].isdigit()] == [["100", "40", "2.500x"]]
    rec.add("perf", row("speedup_vs_one_gpu", 1.6, backend="torch-fp8", test="again"))
    rec.add("perf", row("median_ms", 40.0, backend="torch-fp8", test="again"))
    rec.add("perf", row("one_gpu_median_ms", 60.0, backend="torch-fp8", test="again"))
    with pytest.raises(HarnessError, match="a speedup_vs_one_gpu of 1.6x where the medians beside it \\(60 -> 40 ms\\) "
                                           "give 1.5x"):
        load_run(rec.path)


def test_a_run_folder_records_how_its_session_ended(tmp_path):
    """Atomically, in a folder that holds rows, by the controller alone (a worker's part would count its own share)."""
    assert session_end(tmp_path) is None
    RunRecorder(tmp_path, "run-empty").finish(SessionEnd(5, 0, 0))
    assert not (tmp_path / "run-empty").exists()  # no rows, no folder
    rec = recorded_run(tmp_path)
    part = RunRecorder(tmp_path, rec.run_id, part="gw0")
    part.add("parity", row("rel_l2", 1e-3))
    part.finish(SessionEnd(0, 1, 1))
    assert session_end(rec.path) == SessionEnd(1, 3, 3) and not (rec.path / "parts" / "gw0" / SESSION_FILE).exists()
    assert session_end(rec.path).complete and not SessionEnd(2, 3, 1).complete and SessionEnd(1, 0, 0).complete
    assert not [p for p in rec.path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize("text", ["{", '{"exit_status": 0, "selected": 3}', '{"exit_status": 0, "selected": 3, '
                                  '"ran": -1}', '{"exit_status": 0, "selected": 3, "ran": 2.5}', "[]"],
                         ids=["not-json", "a-key-missing", "negative", "not-whole", "not-an-object"])
def test_a_damaged_session_record_is_one_line(tmp_path, text):
    rec = recorded_run(tmp_path)
    (rec.path / SESSION_FILE).write_text(text)
    with pytest.raises(HarnessError) as error:
        session_end(rec.path)
    message = str(error.value)
    assert message.startswith(f"{rec.path / SESSION_FILE}: unreadable session record (") and "\n" not in message


def test_the_summaries_say_a_run_was_cut_short(tmp_path):
    """Ctrl-C, a crash or -x leave tables that look like a whole run's; summary.md and `summary` say first that they
    are not, and a whole run, failures and all, says nothing of it."""
    rec = recorded_run(tmp_path)
    assert "Interrupted" not in write_summary(rec).read_text() and "Interrupted" not in short_summary(rec.path)
    rec.finish(SessionEnd(2, 40, 1))
    line = "**Interrupted after 1 of 40 cases** (pytest exit status 2): the tables hold only the cases that ran."
    assert line in write_summary(rec).read_text() and short_summary(rec.path).startswith(line)
    (rec.path / SESSION_FILE).unlink()  # killed before pytest_sessionfinish, or still running
    assert short_summary(rec.path).startswith("**Not known to be whole**: no session.json records that its pytest "
                                              "session finished")


def test_the_memory_table_shows_the_largest_peak_of_a_case_whatever_the_order(tmp_path):
    """Eager torch is timed in each candidate's test: its case's peak is the larger of the two tests' peaks."""
    rec = RunRecorder(tmp_path, "run-peaks")
    for test, peak in (("test_speed[onnxruntime]", 2.5), ("test_speed[inductor]", 1.5)):
        rec.add("perf", row(HOST_PEAK, peak, backend="torch", test=test))
    memory = short_summary(rec.path).split(MEMORY_NOTE)[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in memory.splitlines() if line.startswith("| ")]
    assert cells == [["case", "backend", HOST_PEAK], [CASE, "torch", "2.5"]]


def memory_session(tmp_path, device: str) -> Session:
    return Session(settings_from({"device": device, "backends": "torch"}), RunRecorder(tmp_path, "run-memory"))


def test_a_recorded_case_carries_its_whole_peak_host_memory(tmp_path):
    """The peak counts from the case's start (conftest.py calls start_case) to its rows, past a stage measured
    inside the case, which resets the kernel's mark for its own peak; on the CPU no GPU peak is recorded."""
    session = memory_session(tmp_path, "cpu")
    case = Case("transformer", parse_shape("16x16x9"), "fp32")
    start_case(cuda=False)
    before = resident_bytes()
    spike = mmap.mmap(-1, 128 << 20)  # fresh pages, not free ones a heap already holds resident
    for page in range(0, len(spike), mmap.PAGESIZE):
        spike[page] = 1  # written, so resident
    spike.close()
    with stage("a later stage", []):
        pass
    session.record("parity", case, "torch", Measured({"rel_l2": 1e-3}, {"rel_l2": 1e-2}, {"rel_l2": True}))
    rows = load_run(tmp_path / "run-memory")
    peaks = {r.metric: r for r in rows if r.metric.startswith("case_peak")}
    assert set(peaks) == {HOST_PEAK}  # GPU_PEAK is absent: the run's device is the CPU
    host = peaks[HOST_PEAK]
    assert host.value * GiB >= before + (120 << 20) and host.passed is None and host.threshold is None
    assert (host.case, host.backend, host.precision) == (case.id, "torch", "fp32")
    text = write_summary(session.recorder).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| case") and "rel_l2" in line)
    assert HOST_PEAK in header and GPU_PEAK not in header and "verdict" in header
    assert MEMORY_NOTE in text
    memory = short_summary(tmp_path / "run-memory").split(MEMORY_NOTE)[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in memory.splitlines() if line.startswith("| ")]
    assert cells == [["case", "backend", HOST_PEAK], [case.id, "torch", f"{host.value:.4g}"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's peak memory needs a CUDA device; none here")
def test_a_cuda_case_carries_its_whole_peak_gpu_memory(tmp_path):
    """A timed round inside the case resets CUDA's counters for its own peak_mem_gib (harness.timing); the case's
    peak still counts what came before it."""
    session = memory_session(tmp_path, "cuda")
    torch.zeros(1, device="cuda")  # CUDA initialised, as any case on it has
    start_case(cuda=True)
    spike = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")
    del spike
    reset_gpu_peak()
    session.record("perf", Case("transformer", parse_shape("16x16x9"), "bf16"), "torch", Measured({"median_ms": 1.0}))
    peaks = {r.metric: r.value for r in load_run(tmp_path / "run-memory") if r.metric.startswith("case_peak")}
    assert set(peaks) == {HOST_PEAK, GPU_PEAK, GPU_RESERVED_PEAK}
    assert peaks[GPU_RESERVED_PEAK] >= peaks[GPU_PEAK] >= 0.25
