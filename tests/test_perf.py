"""The gated path's rounds, seen from outside: the CFG-step perf case of cases/test_perf.py in its own pytest."""
import csv
import json
import os
import statistics
import sys
from pathlib import Path

import pytest

from tests.helpers import run

pytestmark = pytest.mark.unit
# A pytest plugin for the run below: it logs every timed round (side, ms) and the rounds each speed-up judgement was
# given, one JSON line each, by wrapping harness.timing before cases/test_perf.py imports from it.
ROUND_LOG = '''
import json, os
import harness.timing as timing

def log(**entry):
    with open(os.environ["WAN_ROUND_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

timed, judge = timing.RoundRecorder.__call__, timing.judge_speedup

def call(self):
    timed(self)
    log(side=self.label, ms=self.times_ms[-1])

def judged(baseline, candidate, gate):
    log(judged=[baseline.rounds, candidate.rounds])
    return judge(baseline, candidate, gate)

timing.RoundRecorder.__call__, timing.judge_speedup = call, judged
'''


@pytest.fixture(scope="module")
def perf_cache(tmp_path_factory) -> Path:
    """One cache for the runs below: the second reuses the first's ONNX export."""
    return tmp_path_factory.mktemp("perf-cache")


@pytest.mark.parametrize("benchmark_option", ["--benchmark-json", "--benchmark-disable"])
def test_the_gated_rounds_alternate_and_pytest_benchmark_cannot_change_them(benchmark_option, perf_cache, tmp_path):
    """The CFG-step perf case of the tiny source with --perf-rounds=4, in its own pytest: its timed rounds
    alternate with the order flipped every round, the gate judges all 4 of each side whether pytest-benchmark is
    on or off, and pytest-benchmark's JSON carries exactly the candidate's rounds that were judged."""
    (tmp_path / "round_log.py").write_text(ROUND_LOG)
    log, report = tmp_path / "rounds.jsonl", tmp_path / "benchmark.json"
    option = f"{benchmark_option}={report}" if benchmark_option == "--benchmark-json" else benchmark_option
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "round_log", "-q", "cases/test_perf.py",
                "-m", "perf", "-k", "test_speed and cfg_step", "--device=cpu", "--backends=torch,onnxruntime",
                "--perf-rounds=4", f"--results-dir={tmp_path / 'results'}", f"--cache-dir={perf_cache}", option],
               PYTHONPATH=os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))),
               WAN_ROUND_LOG=str(log))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    rounds = [e for e in entries if "side" in e]
    assert [e["side"] for e in rounds] == ["torch", "onnxruntime", "onnxruntime", "torch"] * 2
    assert [e["judged"] for e in entries if "judged" in e] == [[4, 4]]
    if benchmark_option == "--benchmark-json":
        (bench,) = json.loads(report.read_text())["benchmarks"]
        candidate_s = [e["ms"] / 1e3 for e in rounds if e["side"] == "onnxruntime"]
        assert bench["stats"]["data"] == pytest.approx(candidate_s, rel=1e-9) and bench["stats"]["rounds"] == 4
        assert bench["options"]["timer"] == "harness.timing.alternate"
        assert bench["extra_info"]["candidate_median_ms"] == pytest.approx(statistics.median(candidate_s) * 1e3)
    else:
        assert not report.exists()


VIDEO_PLAN = """
import json, sys
from harness.__main__ import collected_plan
from harness.settings import settings_from
settings = settings_from({"backends": "torch,onnxruntime", "precisions": "fp32", "perf_rounds": 2,
                          "results_dir": sys.argv[1], "cache_dir": sys.argv[2]})
print(json.dumps(collected_plan(settings, ["-k", "end_to_end", "cases/test_perf.py"]).needs))
"""


@pytest.mark.slow
def test_a_whole_video_is_timed_in_both_regimes_with_its_moves_reported(tmp_path):
    """Resident, a video moves nothing; where the components take turns (a card the plan says is too small for them
    all), each video moves its components inside its time, and the rows say how many, how many GiB and how long;
    the parts, the moves and the composed 40-step video are recorded for both sides."""
    from harness.plan import GiB
    from tests.helpers import pytest_session

    done = run([sys.executable, "-c", VIDEO_PLAN, str(tmp_path / "plan"), str(tmp_path / "plan-cache")], timeout=300)
    assert done.returncode == 0, done.stderr
    needs = dict(json.loads(done.stdout.splitlines()[-1]))
    turns = min(needs.values())
    args = ["-m", "perf", "-k", "end_to_end", "--backends=torch,onnxruntime", "--precisions=fp32", "--perf-rounds=2",
            "cases/test_perf.py"]
    for name, card in (("resident", []), ("turns", [f"--gpu-memory={2 + turns * 1.01 / GiB!r}"])):
        ran = pytest_session(tmp_path / name, *args, *card)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
        (folder,) = (tmp_path / name / "results").iterdir()
        rows = {(r["backend"], r["metric"]): float(r["value"]) for r in csv.DictReader((folder / "perf.csv").open())
                if r["value"]}
        for side in ("torch", "onnxruntime"):
            parts = sum(rows[(side, m)] for m in ("video_text_encode_s", "video_transformer_s",
                                                   "video_transformer_2_s", "video_vae_decode_s", "video_moves_s"))
            assert 0 < parts and rows[(side, "video_s_40_steps_composed")] > rows[(side, "video_transformer_s")]
        # Eager's every component takes turns: three or four moves a video (the one left from the candidate's video,
        # which runs only the VAE eagerly, stays); the candidate's own runners hold their graphs and never move.
        moved = rows[("torch", "video_moves")]
        assert moved == 0 if name == "resident" else (moved >= 3 and rows[("torch", "video_moved_gib")] > 0), rows
        assert rows[("onnxruntime", "speedup")] > 0 and rows[("onnxruntime", "speedup_40_steps_composed")] > 0
        assert (folder / "video_breakdown.png").is_file()


def test_the_40_step_video_is_composed_from_each_experts_time_per_step_and_the_fixed_parts():
    from harness.perf import VideoBreakdown
    from harness.shapes import step_split

    call = {"text_encode": 1.0, "transformer_steps": 4.0, "transformer_2_steps": 6.0, "vae_decode": 2.0,
            "moves_s": 3.0, "moves": 4.0, "moved_gib": 50.0, "transformer_n": 2.0, "transformer_2_n": 2.0}
    slow = {**call, "transformer_steps": 40.0}
    breakdown = VideoBreakdown((call, slow, call), 0.875)
    high, low = step_split(40)
    assert breakdown.composed_40_steps() == pytest.approx(1 + 2 + 3 + high * 2.0 + low * 3.0)  # medians: 4 s a step pair
    metrics = breakdown.metrics()
    assert metrics["video_transformer_s"] == 4.0 and metrics["video_moves"] == 4.0 and metrics["video_moved_gib"] == 50
    assert "composed, not measured" in breakdown.notes()["video_s_40_steps_composed"]
