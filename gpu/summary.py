"""Print the short table a GPU-tier run ends with: eager time and TFLOP/s, speed-ups, parity, quality."""
from __future__ import annotations

import sys
from pathlib import Path

from tabulate import tabulate

from harness.results import load_run


def main(run: Path, gate: float = 1.5) -> None:
    rows = load_run(run)
    perf = {(r.case, r.backend, r.metric): r.value for r in rows if r.metric in
            ("median_ms", "tflops", "speedup")}
    table = []
    for case, backend, metric in sorted(perf):
        if metric != "speedup":
            continue
        speedup = perf[case, backend, metric]
        table.append([case, backend, f"{perf.get((case, 'torch', 'median_ms'), float('nan')):.1f}",
                      f"{perf.get((case, 'torch', 'tflops'), float('nan')):.0f}",
                      f"{perf.get((case, backend, 'median_ms'), float('nan')):.1f}",
                      f"{speedup:.2f}x", "pass" if speedup >= gate else "FAIL"])
    print(tabulate(table, ["case", "candidate", "eager ms", "eager TFLOP/s", "cand ms", "speed-up",
                           f">= {gate}x"], tablefmt="github"))
    checks = [[r.case, r.backend, r.metric, f"{r.value:.4g}", r.threshold, r.passed] for r in rows
              if r.metric in ("rel_l2", "cosine", "loop_rel_l2", "psnr_mean", "ssim_mean")
              and r.backend != "torch"]
    print(tabulate(checks, ["case", "backend", "metric", "value", "threshold", "passed"], tablefmt="github"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 1.5)
