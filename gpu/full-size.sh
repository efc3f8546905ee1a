#!/usr/bin/env bash
# The full-size stages of the fp8 stack on one GPU, each one pytest session through gpu/tier.sh (calibrate: one
# `python -m harness calibrate`), with the card's memory sampled by nvidia-smi every 0.5 s (its peak counts the CUDA
# context and the allocator's cache, which torch's own peaks do not). Everything lands in RESULTS/<stage>-<layers>/
# and RESULTS/stages.txt.
# Usage: bash gpu/full-size.sh RESULTS STAGE LAYERS [pytest arguments, or calibrate's options...]
#   STAGE: perf (the CFG step and the gate), parity (both experts' forwards), quality (one prompt, 4 steps: the fp8
#   video and eager bf16's against the true-fp32 video), attribution (eager bf16's video with only the experts, only
#   the text encoder, only the VAE in bf16: two more fp32-expert videos at 40 layers, so run it after quality, whose
#   stored fp32 video it reads), umt5 (the 24-layer UMT5-XXL's bf16 drift from fp32, tests/test_models.py),
#   calibrate (`python -m harness calibrate`: the stack's static fp8 scales into the cache, nothing timed; the entries
#   are copied to RESULTS/calibration, to carry to the next machine as .cache/calibration, where perf reads them:
#   its log and rows then say "cache hit"), video (seconds per video: eager bf16 and torch-fp8 whole videos at 4 steps,
#   alternating, the components taking turns where they must, each video's parts and moves; run calibrate first, so
#   the static scales come from the cache)
#   e.g. bash gpu/full-size.sh /tmp/r perf 40
#   TAG=nvidia bash gpu/full-size.sh /tmp/r perf 40 --fp8-recipe=nvidia   (TAG names the variant's folder: perf-40-nvidia)
#   bash gpu/full-size.sh /tmp/r calibrate 40 --shapes=720p, then (on this machine, or with the entries carried)
#   bash gpu/full-size.sh /tmp/r perf 40 --shapes=720p   (the 720p static-scale gate from the cached scales)
set -uo pipefail
out=${1:?results folder}
stage=${2:?perf, parity, quality, attribution, umt5, calibrate or video}
layers=${3:?proxy layers}
shift 3
case "$stage" in
  perf) select=(-m perf -k "(test_speed and cfg_step) or test_speedup_gate") ;;
  parity) select=(-m parity -k "component_parity") ;;
  quality) select=(-m quality -k "video_quality and prompt0" --steps=4) ;;
  attribution) select=(-m quality -k "drift_attribution" --steps=4 --attribution=bf16) ;;
  umt5) select=(tests/test_models.py -k "rounds_like_a_trained_one") ;;
  video) select=(-m perf -k "test_speed and end_to_end" --steps=4 --perf-rounds=3) ;;
  calibrate) ;;
  *) echo "unknown stage $stage: perf, parity, quality, attribution, umt5, calibrate or video" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # experts of 28.6 GB come and go: no fragments
run="$stage-$layers${TAG:+-$TAG}"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$out/memory-$run.csv" &
sampler=$!
start=$(date +%s)
stack=(--model-source=proxy --proxy-layers="$layers" --shapes=480p --precisions=fp8 --attention=fa3-fp8)
if [ "$stage" = calibrate ]; then
  . gpu/site.sh
  python3 -m harness calibrate "${stack[@]}" --backends=torch-fp8 "$@" 2>&1 | tee "$out/$run.log"
  code=${PIPESTATUS[0]}
  mkdir -p "$out/calibration" && cp -r "${WAN_BENCH_CACHE:-.cache}/calibration/." "$out/calibration/"
else
  # --perf-rounds=5 first, so a stage's own (video: 3) and the caller's arguments come after it and win
  bash gpu/tier.sh "$out" "$run" --perf-rounds=5 "${select[@]}" "${stack[@]}" --backends=torch,torch-fp8 \
    --candidate=torch-fp8 --fp8-scales=static "$@"
  code=$?
fi
kill "$sampler"
echo "$run: exit ${code}, ${SECONDS}s wall since the script began, $(( $(date +%s) - start ))s this stage," \
  "card peak $(sort -n "$out/memory-$run.csv" | tail -1) MiB (nvidia-smi)" | tee -a "$out/stages.txt"
exit "$code"
