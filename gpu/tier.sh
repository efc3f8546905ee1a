#!/usr/bin/env bash
# The GPU tier, a thin driver over one pytest session: install the carried wheels (if any), run the
# session into RESULTS/RUN_ID with its pytest-benchmark JSON, then print the short table of verdicts.
# Usage: bash gpu/tier.sh RESULTS RUN_ID [pytest arguments...]
#   e.g. bash gpu/tier.sh $OUT fp8 -m "parity or quality or perf" --model-source=proxy --candidate=torch-fp8 --shapes=480p,720p
set -uo pipefail
out=${1:?results folder}
run=${2:?run id}
shift 2
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "already exists" || true
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
WAN_BENCH_RUN_ID=$run python3 -m pytest -p no:cacheprovider --results-dir="$out" --benchmark-json="$out/benchmark-$run.json" \
  -q -rs --durations=10 "$@" 2>&1 | tee "$out/$run.log" | tail -n 40
python3 -m harness summary "$out/$run"
