#!/usr/bin/env bash
# The main job on one GPU: the selection `python -m harness bench` makes (-m "parity or quality or perf"), one pytest
# session per stage through gpu/tier.sh, with the candidates taking turns as the plan says, and the card's memory
# sampled by nvidia-smi every 0.5 s. Everything lands in RESULTS/<stage>/ (its summary.md puts each family's estimated
# time beside its actual one; steps.csv each step's) and RESULTS/stages.txt.
# Usage: bash gpu/main-job.sh RESULTS STAGE [pytest arguments...]
#   scaled: an 80 GB card scaled down so the session stays under 10 minutes: 8 of 40 layers on 24 GiB, 2 steps, eager
#           torch and two candidates (inductor bf16, torch-fp8 fp8), parity, quality and perf, no end-to-end case
#   full:   the 40-layer proxy at 480p, torch-fp8 and inductor taking turns: the CFG step and the gate, 3 rounds
#   e.g. bash gpu/main-job.sh /tmp/r scaled
set -uo pipefail
out=${1:?results folder}
stage=${2:?scaled or full}
shift 2
cases=(cases/test_parity.py cases/test_quality.py cases/test_perf.py)
case "$stage" in
  scaled) select=(-k "not end_to_end" --proxy-layers=8 --gpu-memory=24 --steps=2 --precisions=bf16,fp8) ;;
  full) select=(-k "(test_speed and cfg_step) or test_speedup_gate" --proxy-layers=40 --candidate=torch-fp8) ;;
  *) echo "unknown stage $stage: scaled or full" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # experts of 28.6 GB come and go: no fragments
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$out/memory-$stage.csv" &
sampler=$!
start=$(date +%s)
bash gpu/tier.sh "$out" "$stage" -m "parity or quality or perf" "${select[@]}" --model-source=proxy --shapes=480p \
  --backends=torch,inductor,torch-fp8 --perf-rounds=3 "$@" "${cases[@]}"
code=$?
kill "$sampler"
echo "$stage: exit ${code}, $(( $(date +%s) - start ))s, card peak $(sort -n "$out/memory-$stage.csv" | tail -1) MiB" \
  "(nvidia-smi)" | tee -a "$out/stages.txt"
exit "$code"
