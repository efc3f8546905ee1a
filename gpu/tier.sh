#!/usr/bin/env bash
# The GPU tier, a thin driver over one pytest session: make the carried packages importable (gpu/site.sh), run
# the session into RESULTS/RUN_ID with its pytest-benchmark JSON, then print the short table of verdicts.
# Usage: bash gpu/tier.sh RESULTS RUN_ID [pytest arguments...]
#   e.g. bash gpu/tier.sh $OUT fp8 -m "parity or quality or perf" --model-source=proxy --candidate=torch-fp8 --shapes=480p,720p
set -uo pipefail
out=${1:?results folder}
run=${2:?run id}
shift 2
. gpu/site.sh
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
WAN_BENCH_RUN_ID=$run python3 -m pytest -p no:cacheprovider --results-dir="$out" --benchmark-json="$out/benchmark-$run.json" \
  -q -rs --durations=10 "$@" 2>&1 | tee "$out/$run.log" | tail -n 40
code=${PIPESTATUS[0]}  # pytest's status, not tail's: a failed case fails the stage
if [ -d "$out/$run" ]; then python3 -m harness summary "$out/$run"; else echo "no rows recorded in $out/$run (see the log above)"; fi
exit "$code"
