"""Regression gating: noise-aware perf verdicts, parity/quality tolerances, baselines as checked data."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import tempfile

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from harness.__main__ import main
from harness.errors import HarnessError
from harness.regression import (Baseline, Entry, compare, compare_run, dumps_baseline, exit_code, load_baseline,
                                load_rules, run_entries, save_baseline)
from harness.results import Row, RunRecorder, SessionEnd

pytestmark = pytest.mark.unit

H100 = "NVIDIA H100 80GB HBM3 (sm_90)"
VERSIONS = "torch=2.11.0;tensorrt=10.13.0.35"
DIT, VIDEO = "transformer-proxy-480p-bf16-b1", "pipeline-proxy-480p-bf16-b1"
# (table, case, backend, metric) -> value: an accepted run of a bf16 candidate on one GPU.
ACCEPTED = {
    ("parity", DIT, "tensorrt", "max_abs"): 2e-2,
    ("parity", DIT, "tensorrt", "rel_l2"): 4e-3,
    ("parity", DIT, "tensorrt", "cosine"): 0.99999,
    ("parity", DIT, "tensorrt", "rel_l2@step=4"): 1e-2,
    ("quality", VIDEO, "tensorrt", "psnr_fp32"): 38.0,
    ("quality", VIDEO, "tensorrt", "ssim_frame_fp32"): 0.97,
    ("perf", DIT, "torch", "median_ms"): 150.0,
    ("perf", DIT, "torch", "iqr_ms"): 1.0,
    ("perf", DIT, "tensorrt", "median_ms"): 100.0,
    ("perf", DIT, "tensorrt", "iqr_ms"): 1.0,
    ("perf", DIT, "tensorrt", "tflops"): 410.0,  # no rule: not gated, not stored
}


def write_run(root: Path, run_id: str, numbers: dict, device: str = H100, versions: str = VERSIONS,
              test: str = "") -> Path:
    rec = RunRecorder(root, run_id)
    for (table, case, backend, metric), value in numbers.items():
        rec.add(table, Row(case, case.split("-")[0], backend, "bf16", "480p", 32760, metric, value, None, None,
                           device, versions, test=test))
    rec.finish(SessionEnd(0, 1, 1))  # its session ran every case it selected
    return rec.path


def with_changes(**changes: float) -> dict:
    """ACCEPTED with some values replaced: key 'backend__metric' (metrics with '@' use 'at')."""
    numbers = dict(ACCEPTED)
    for name, value in changes.items():
        backend, metric = name.split("__")
        key = next(k for k in numbers if k[2] == backend and k[3] == metric.replace("at", "@step="))
        numbers[key] = value
    return numbers


@pytest.fixture
def baseline(tmp_path) -> Path:
    return save_baseline(write_run(tmp_path, "run-accepted", ACCEPTED), "h100", tmp_path / "baselines")


def verdicts_against(baseline: Path, tmp_path: Path, numbers: dict, **kwargs):
    rules = load_rules()
    current, _ = run_entries(write_run(tmp_path, "run-current", numbers, **kwargs), rules)
    verdicts = compare(load_baseline(baseline, rules), current, rules)
    return {v.key: v.verdict for v in verdicts}, exit_code(verdicts)


def test_ten_percent_slowdown_outside_noise_regresses(baseline, tmp_path):
    verdicts, code = verdicts_against(baseline, tmp_path, with_changes(tensorrt__median_ms=110.0))
    assert verdicts[f"{DIT}|tensorrt|median_ms"] == "regressed" and code == 1


def test_two_percent_change_inside_noise_is_ok(baseline, tmp_path):
    verdicts, code = verdicts_against(baseline, tmp_path, with_changes(tensorrt__median_ms=102.0))
    assert set(verdicts.values()) == {"ok"} and code == 0


def test_slowdown_within_measured_spread_is_ok(baseline, tmp_path):
    # +10% but both runs' IQRs (1 + 12 ms) exceed the 10 ms change: noise, not a regression.
    noisy = with_changes(tensorrt__median_ms=110.0, tensorrt__iqr_ms=12.0)
    verdicts, _ = verdicts_against(baseline, tmp_path, noisy)
    assert verdicts[f"{DIT}|tensorrt|median_ms"] == "ok"


def test_speedup_is_improved_not_failing(baseline, tmp_path):
    verdicts, code = verdicts_against(baseline, tmp_path, with_changes(tensorrt__median_ms=80.0))
    assert verdicts[f"{DIT}|tensorrt|median_ms"] == "improved" and code == 0


def test_doubled_parity_error_regresses(baseline, tmp_path):
    verdicts, code = verdicts_against(baseline, tmp_path, with_changes(tensorrt__rel_l2=8e-3))
    assert verdicts[f"{DIT}|tensorrt|rel_l2"] == "regressed" and code == 1


def test_step_error_and_cosine_follow_their_rules(baseline, tmp_path):
    verdicts, _ = verdicts_against(baseline, tmp_path, with_changes(tensorrt__rel_l2at4=2.5e-2, tensorrt__cosine=0.9999))
    assert verdicts[f"{DIT}|tensorrt|rel_l2@step=4"] == "regressed"
    assert verdicts[f"{DIT}|tensorrt|cosine"] == "regressed"  # 1 - cosine went from 1e-5 to 1e-4


def test_cpu_float_noise_is_not_flagged(baseline, tmp_path):
    # Another CPU's SIMD path moves bf16 errors by some percent and PSNR by a hundredth of a dB.
    noisy = with_changes(tensorrt__rel_l2=4.3e-3, tensorrt__max_abs=2.4e-2, tensorrt__psnr_fp32=37.97,
                         tensorrt__ssim_frame_fp32=0.968)
    verdicts, code = verdicts_against(baseline, tmp_path, noisy)
    assert set(verdicts.values()) == {"ok"} and code == 0


def test_psnr_fall_of_three_db_regresses(baseline, tmp_path):
    verdicts, code = verdicts_against(baseline, tmp_path, with_changes(tensorrt__psnr_fp32=35.0))
    assert verdicts[f"{VIDEO}|tensorrt|psnr_fp32"] == "regressed" and code == 1


def test_nan_error_regresses(baseline, tmp_path):
    verdicts, _ = verdicts_against(baseline, tmp_path, with_changes(tensorrt__max_abs=math.nan))
    assert verdicts[f"{DIT}|tensorrt|max_abs"] == "regressed"


def test_nan_median_or_iqr_in_the_run_regresses(baseline, tmp_path):
    for i, changes in enumerate(({"tensorrt__median_ms": math.nan},
                                 {"tensorrt__iqr_ms": math.nan, "tensorrt__median_ms": 1000.0},
                                 {"tensorrt__iqr_ms": math.inf})):
        # A run folder each: appended into one, the later runs' rows repeat the first's keys.
        verdicts, code = verdicts_against(baseline, tmp_path / str(i), with_changes(**changes))
        assert verdicts[f"{DIT}|tensorrt|median_ms"] == "regressed" and code == 1, changes


# --- the perf and metric rules as properties (hypothesis) ---

PERF_KEY = f"{DIT}|tensorrt|median_ms"
medians = st.floats(min_value=1e-2, max_value=1e5)
shares = st.floats(min_value=0.0, max_value=0.45)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def perf_verdict(base: Entry, cur: Entry) -> str:
    (verdict,) = compare(Baseline("b", "run", {"device": H100}, {PERF_KEY: base}), {PERF_KEY: cur}, load_rules())
    return verdict.verdict


@given(median=medians, iqr_share=shares, bad=non_finite, where=st.sampled_from(["median", "iqr", "both"]),
       other=st.floats(min_value=0.0, max_value=1e6))
def test_a_nan_or_inf_in_a_perf_row_never_passes(median, iqr_share, bad, where, other):
    cur = Entry("perf", bad if where != "iqr" else other, bad if where != "median" else other)
    assert perf_verdict(Entry("perf", median, iqr_share * median), cur) == "regressed"


@given(metric=st.sampled_from(sorted(load_rules().metrics)), value=st.floats(min_value=0.0, max_value=1.0))
def test_a_nan_metric_never_passes(metric, value):
    key = f"{DIT}|tensorrt|{metric}"
    baseline = Baseline("b", "run", {"device": H100}, {key: Entry("parity", value)})
    (verdict,) = compare(baseline, {key: Entry("parity", math.nan)}, load_rules())
    assert verdict.verdict == "regressed"


@given(median=medians, slowdown=st.floats(min_value=0.10, max_value=10.0), base_share=shares, cur_share=shares)
def test_a_ten_percent_slowdown_with_small_iqrs_always_fails(median, slowdown, base_share, cur_share):
    # "Small": the two IQRs add up to less than the slowdown itself (each under 45% of it).
    delta = slowdown * median
    verdict = perf_verdict(Entry("perf", median, base_share * delta), Entry("perf", median + delta, cur_share * delta))
    assert verdict == "regressed"


def metric_values(metric: str):
    """Any finite value, and inf for PSNR (identical frames)."""
    finite = st.floats(min_value=-1e6, max_value=1e6)
    return st.one_of(finite, st.just(math.inf)) if metric.startswith("psnr") else finite


run_entries_strategy = st.dictionaries(
    st.tuples(st.sampled_from(["transformer-tiny-16x16x9-fp32-b1", "video-tiny-16x16x9-bf16-b1"]),
              st.sampled_from(["torch", "tensorrt"]), st.sampled_from(sorted(load_rules().metrics) + ["median_ms"])),
    st.none(), min_size=1, max_size=12)


@hypothesis_settings(max_examples=60, deadline=None)
@given(keys=run_entries_strategy, data=st.data())
def test_identical_runs_never_fail(keys, data):
    """Whatever the numbers, a run compared with its own saved baseline (through the JSON file) is all ok."""
    entries = {}
    for case, backend, metric in keys:
        if metric == "median_ms":
            median = data.draw(medians)
            entries[f"{case}|{backend}|{metric}"] = Entry("perf", median, data.draw(shares) * median)
        else:
            entries[f"{case}|{backend}|{metric}"] = Entry("parity", data.draw(metric_values(metric)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "b.json"
        path.write_text(dumps_baseline(Baseline("b", "run", {"device": H100}, entries)))
        verdicts = compare(load_baseline(path), entries, load_rules())
    assert {v.verdict for v in verdicts} == {"ok"} and exit_code(verdicts) == 0


def test_new_case_is_new_and_missing_case_fails(baseline, tmp_path):
    numbers = dict(ACCEPTED)
    del numbers[("quality", VIDEO, "tensorrt", "ssim_frame_fp32")]
    numbers[("parity", "vae_decoder-proxy-480p-bf16-b1", "tensorrt", "rel_l2")] = 1e-3
    rules = load_rules()
    current, _ = run_entries(write_run(tmp_path, "run-current", numbers), rules)
    verdicts = compare(load_baseline(baseline, rules), current, rules)
    by_key = {v.key: v.verdict for v in verdicts}
    assert by_key["vae_decoder-proxy-480p-bf16-b1|tensorrt|rel_l2"] == "new"
    assert by_key[f"{VIDEO}|tensorrt|ssim_frame_fp32"] == "missing"
    assert exit_code(verdicts) == 1 and exit_code(verdicts, allow_missing=True) == 0


def test_refuses_baseline_from_another_gpu(baseline, tmp_path):
    run = write_run(tmp_path, "run-a100", ACCEPTED, device="NVIDIA A100-SXM4-80GB (sm_80)")
    with pytest.raises(HarnessError, match="another machine.*device: baseline NVIDIA H100.*--cross-machine"):
        compare_run(baseline, run)
    report, code = compare_run(baseline, run, cross_machine=True)
    assert code == 0 and "note: device differs" in report


def test_refuses_another_tensorrt_version(baseline, tmp_path):
    run = write_run(tmp_path, "run-trt11", ACCEPTED, versions="torch=2.11.0;tensorrt=11.4.0.106")
    with pytest.raises(HarnessError, match="tensorrt: baseline 10.13.0.35, current 11.4.0.106"):
        compare_run(baseline, run)


def test_baseline_round_trips_and_compares_ok_with_itself(baseline, tmp_path):
    text = baseline.read_text()
    doc = json.loads(text)
    assert doc["schema"] and doc["about"] and doc["machine"] == {
        "device": H100, "tensorrt": "10.13.0.35", "tensorrt_rtx": None, "torch": "2.11.0"}
    assert doc["entries"][f"{DIT}|tensorrt|median_ms"] == {"iqr_ms": 1.0, "table": "perf", "value": 100.0}
    assert not any("tflops" in key for key in doc["entries"])
    entry_lines = [line for line in text.splitlines() if line.startswith('  "')]
    assert len(entry_lines) == len(doc["entries"]) and entry_lines == sorted(entry_lines)  # one per line, sorted
    report, code = compare_run(baseline, tmp_path / "run-accepted")
    assert code == 0 and f"{len(doc['entries'])} ok, 0 regressed, 0 improved, 0 new, 0 missing" in report


def test_case_peak_memory_rows_are_neither_gated_nor_stored(baseline, tmp_path):
    """Every row a case records carries the case's peak memory, repeated where a case records twice (the candidate's
    timing, then its speed-up): compare passes over them without calling them new, and a baseline keeps none."""
    run = write_run(tmp_path, "run-memory", ACCEPTED)
    recorder = RunRecorder(tmp_path, "run-memory")
    for table, case, backend, _ in list(ACCEPTED) * 2:
        for metric in ("case_peak_host_gib", "case_peak_gpu_gib", "case_peak_gpu_reserved_gib"):
            recorder.add(table, Row(case, case.split("-")[0], backend, "bf16", "480p", 32760, metric, 1.5, None, None,
                                    H100, VERSIONS))
    report, code = compare_run(baseline, run)
    entries = len(json.loads(baseline.read_text())["entries"])
    assert code == 0 and f"{entries} ok, 0 regressed, 0 improved, 0 new, 0 missing" in report, report
    assert "case_peak" not in report.split("\n", 1)[1]  # past the header line, which names the folders
    saved = save_baseline(run, "with-memory", tmp_path / "baselines")
    assert "case_peak" not in saved.read_text()


def test_identical_frames_psnr_inf_round_trips(tmp_path):
    numbers = {("quality", VIDEO, "torch", "psnr_fp32"): math.inf}
    path = save_baseline(write_run(tmp_path, "run-inf", numbers), "inf", tmp_path, tables=("quality",))
    assert json.loads(path.read_text())["entries"][f"{VIDEO}|torch|psnr_fp32"]["value"] == "inf"
    verdicts, code = verdicts_against(path, tmp_path, numbers)
    assert set(verdicts.values()) == {"ok"} and code == 0


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(schema="v0"), "'schema'"),
    (lambda d: d.pop("machine"), "'machine.device'"),
    (lambda d: d["entries"][f"{DIT}|tensorrt|rel_l2"].update(value="abc"), f'entries["{DIT}|tensorrt|rel_l2"].value'),
    (lambda d: d["entries"][f"{DIT}|tensorrt|median_ms"].update(iqr_ms=-1), "median_ms\"]' holds iqr_ms -1"),
    (lambda d: d["entries"][f"{DIT}|tensorrt|median_ms"].update(value=0), "median_ms\"]' holds median_ms 0"),
    (lambda d: d["entries"][f"{DIT}|tensorrt|median_ms"].update(value=-3), "median_ms\"]' holds median_ms -3"),
    (lambda d: d["entries"][f"{DIT}|tensorrt|rel_l2"].update(vaule=1), "rel_l2\"].vaule"),
    (lambda d: d["entries"][f"{DIT}|tensorrt|rel_l2"].update(table="speed"), "rel_l2\"].table"),
    (lambda d: d["entries"].update({"no-pipes": {"table": "parity", "value": 1}}), 'entries["no-pipes"]'),
])
def test_hand_edited_baseline_names_the_field(baseline, edit, field):
    doc = json.loads(baseline.read_text())
    edit(doc)
    baseline.write_text(json.dumps(doc))
    with pytest.raises(HarnessError, match=re.escape(field)):
        load_baseline(baseline)


def test_corrupt_baseline_json_is_a_clear_error(baseline):
    baseline.write_text(baseline.read_text()[:-40])
    with pytest.raises(HarnessError, match=r"not valid JSON \(.*: line \d+, column \d+\)"):
        load_baseline(baseline)


def test_a_baseline_that_is_not_utf8_is_a_clear_error(baseline):
    baseline.write_bytes(b"\xff\xfe\x00\x01garbage\n")
    with pytest.raises(HarnessError, match=rf"{re.escape(str(baseline))} is not UTF-8 text"):
        load_baseline(baseline)


@pytest.mark.parametrize("tolerance", [math.nan, math.inf, 1e9, 10.0, -1.0])
def test_a_perf_tolerance_that_would_hide_any_regression_is_refused(baseline, tmp_path, tolerance):
    slow = write_run(tmp_path, "run-slow", with_changes(tensorrt__median_ms=5000.0))
    with pytest.raises(HarnessError, match=r"--perf-tolerance \S+ must be a finite number >= 0 and < 10 \(1000%\)"):
        compare_run(baseline, slow, perf_tolerance=tolerance)
    assert compare_run(baseline, slow, perf_tolerance=9.9)[1] == 1  # 50x slower is past a 990% tolerance


@pytest.mark.parametrize("old, new", [("perf_tolerance = 0.05", "perf_tolerance = nan"), ("rtol = 0.5", "rtol = inf"),
                                      ("atol = 1e-5  # outputs", "atol = -1.0  # outputs")])
def test_thresholds_tolerances_are_checked_like_the_option(tmp_path, old, new):
    from harness.thresholds import THRESHOLDS

    path = tmp_path / "thresholds.toml"
    path.write_text(THRESHOLDS.read_text().replace(old, new, 1))
    with pytest.raises(HarnessError, match=re.escape(str(path))):
        load_rules(path)


def test_eager_timed_beside_two_candidates_is_judged_by_its_worse_timing(baseline, tmp_path):
    """Each candidate re-times eager torch beside itself, so a run holds torch's perf rows once per candidate's test:
    the worse timing is judged, so a NaN or a slowdown cannot hide behind a good first one."""
    key, rules = f"{DIT}|torch|median_ms", load_rules()
    for second, verdict in ((math.nan, "regressed"), (300.0, "regressed"), (149.0, "ok")):
        run = write_run(tmp_path, f"run-{second}", ACCEPTED, test="test_speed[tensorrt]")
        write_run(tmp_path, f"run-{second}", {("perf", DIT, "torch", "median_ms"): second,
                                              ("perf", DIT, "torch", "iqr_ms"): 1.0}, test="test_speed[inductor]")
        verdicts = compare(load_baseline(baseline, rules), run_entries(run, rules)[0], rules)
        (judged,) = [v for v in verdicts if v.key == key]
        assert judged.verdict == verdict, (second, judged)
    with pytest.raises(HarnessError, match=rf"{re.escape(key)} \(median_ms nan\): a NaN or Inf is never"):
        save_baseline(tmp_path / "run-nan", "nan", tmp_path)


def test_a_median_carries_the_spread_of_its_own_test_wherever_the_rows_stand(tmp_path):
    """The spread is found by key (case, backend and test), not as the next row: here each test's iqr_ms comes before
    its median and the tests interleave; a median whose test wrote no spread never borrows another test's."""
    iqr, median = ("perf", DIT, "torch", "iqr_ms"), ("perf", DIT, "torch", "median_ms")
    run = write_run(tmp_path, "run-keyed", {iqr: 7.0}, test="a")
    write_run(tmp_path, "run-keyed", {iqr: 2.0, median: 150.0}, test="b")
    write_run(tmp_path, "run-keyed", {median: 100.0}, test="a")
    entries, _ = run_entries(run, load_rules())
    assert entries[f"{DIT}|torch|median_ms"] == Entry("perf", 150.0, 2.0)  # the slower, with its own spread
    write_run(tmp_path, "run-keyed", {median: 90.0}, test="c")
    with pytest.raises(HarnessError, match=rf"{re.escape(DIT)}\|torch\|median_ms has no iqr_ms row beside it"):
        run_entries(run, load_rules())


def test_a_key_repeated_within_one_test_is_refused(tmp_path):
    numbers = {**ACCEPTED, ("export", DIT, "tensorrt", "build_s"): 10.0}
    run = write_run(tmp_path, "run-twice", numbers)
    write_run(tmp_path, "run-twice", {("export", DIT, "tensorrt", "build_s"): 12.0}, test="built again")
    assert run_entries(run, load_rules())[0]  # another test built it again (other engine options): no harm
    write_run(tmp_path, "run-twice", {("parity", DIT, "tensorrt", "rel_l2"): math.nan})
    with pytest.raises(HarnessError, match=rf"parity\.csv holds {DIT}\|tensorrt\|rel_l2 more than once"):
        run_entries(run, load_rules())


def test_comparing_nothing_is_an_error_that_says_why(baseline, tmp_path):
    run = tmp_path / "run-accepted"
    with pytest.raises(HarnessError, match=r"nothing to compare: .* holds parity, perf, quality, --tables asks for "
                                           r"export, and run .* has gateable numbers in none of those"):
        compare_run(baseline, run, tables=("export",))
    perf_only = save_baseline(run, "perf", tmp_path, tables=("perf",))
    with pytest.raises(HarnessError, match=r"holds perf, --tables asks for parity, .* gateable numbers in parity"):
        compare_run(perf_only, run, tables=("parity",))


def test_baseline_save_into_a_file_or_an_unwritable_folder_is_one_line(tmp_path):
    run = write_run(tmp_path, "run-accepted", ACCEPTED)
    (tmp_path / "a-file").write_text("")
    for folder in (tmp_path / "a-file", Path("/proc/no-such-folder")):
        with pytest.raises(HarnessError, match=rf"cannot write baseline {re.escape(str(folder))}/x\.json: .*--dir"):
            save_baseline(run, "x", folder)
    with pytest.raises(HarnessError, match="'.hidden': start with a letter or digit"):
        save_baseline(run, ".hidden", tmp_path)


def test_cli_exit_codes(baseline, tmp_path, capsys):
    slow = write_run(tmp_path, "run-slow", with_changes(tensorrt__median_ms=120.0))
    assert main(["compare", "--baseline", str(baseline), "--current", str(slow)]) == 1
    assert "regressed" in capsys.readouterr().out
    assert main(["compare", "--baseline", str(baseline), "--current", str(slow), "--tables", "parity,quality"]) == 0
    assert main(["compare", "--baseline", str(baseline), "--current", str(tmp_path / "nope")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["baseline", "save", "--from", str(slow), "--name", "a/b", "--dir", str(tmp_path)]) == 2
    assert main(["baseline", "save", "--from", str(slow), "--name", "ok", "--dir", str(tmp_path)]) == 0


def test_thresholds_cover_every_parity_and_quality_metric():
    rules = load_rules()
    for metric in ("max_abs", "rel_l2", "cosine", "p99_abs", "rel_l2@step=7", "psnr_fp32", "psnr_frame_fp32",
                   "ssim_fp32", "ssim_frame_fp32", "lpips_fp32", "lpips_frame_fp32", "vmaf_fp32", "vmaf_frame_fp32"):
        assert rules.for_metric(metric) is not None, metric
    assert 0 < rules.perf_tolerance < 1
