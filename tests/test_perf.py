"""The gated path's rounds, seen from outside: the CFG-step perf case of cases/test_perf.py in its own pytest."""
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
