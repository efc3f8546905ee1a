#!/usr/bin/env bash
# The GPU tier on an H100/H200: parity, perf and one quality case on the proxy source (2 of 40
# layers), then the timing-only cases (one full 40-layer expert alone; the real VAE at 480p x 81),
# then a short table. Parts fit the device tool's 10-minute calls; `all` runs them back to back.
# Needs the wheels from `../shared/tools/gpu-wheels.sh torchao==0.18.0 nvidia-cudnn-frontend==1.32.0` in .whl/.
# Usage: bash gpu/tier.sh RESULTS_FOLDER {480p|720p|timing|all|smoke|fp8|bench RUN_ID SHAPE STEPS ROUNDS MARKERS [KEYWORDS]}
# TIER_BACKENDS and TIER_TIMEOUT (seconds per pytest session, default 540) override bench's defaults.
set -uo pipefail
out=${1:?results folder}
part=${2:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  2>&1 | grep -v "already exists" || true
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

bench() {  # bench RUN_ID SHAPE STEPS ROUNDS MARKERS [KEYWORDS]: one pytest session into $out/RUN_ID
  # Inductor on the VAE decoder (a Python loop over latent frames with a feature cache) compiles for
  # many minutes, so it is left out here; the eager VAE is timed in gpu/timing_only.py. End-to-end is
  # extrapolated from the per-step figures; quality runs one prompt.
  local skip="not end_to_end and not (inductor and vae_decoder) and not prompt1 and not lpips${6:+ and ($6)}"
  WAN_BENCH_RUN_ID=$1 timeout "${TIER_TIMEOUT:-540}" python3 -m pytest -p no:cacheprovider -m "$5" -k "$skip" \
    --model-source=proxy --proxy-layers=2 --shapes="$2" --precisions=bf16,fp8 \
    --backends="${TIER_BACKENDS:-torch,inductor,torch-fp8,tensorrt,tensorrt_rtx}" --candidate=torch-fp8 \
    --steps="$3" --perf-rounds="$4" --results-dir="$out" --benchmark-json="$out/benchmark-$1.json" \
    -q -rs --durations=12 2>&1 | tee "$out/$1.log" | tail -n 45
  python3 gpu/summary.py "$out/$1"
}

case $part in
  smoke) bench smoke 480p 2 3 "parity or quality or perf" ;;
  480p) bench tier-480p 480p 10 8 "parity or quality or perf" ;;
  720p) bench tier-720p 720p 10 6 "parity or perf" "not denoising_loop and not vae_decoder" ;;
  # Issue 8's session: the 40-step two-expert loop and its video, both shapes' parity and gate, in one
  # pytest session (~15 min: longer than one device call, so start it detached and poll), then the
  # 720p rows of the block profile. The bf16-only text encoder and VAE cases are left to the tiers above.
  fp8) TIER_BACKENDS=torch,torch-fp8 TIER_TIMEOUT=1500 bench fp8-session 480p,720p 40 6 "parity or quality or perf" \
         "not vae_decoder and not text_encoder and not tiny"
       python3 gpu/block_profile.py --out "$out" --shapes 720p --variants "eager bf16" torch-fp8 ;;
  bench) shift 2; bench "$@" ;;  # one custom session: bench RUN_ID SHAPE STEPS ROUNDS MARKERS [KEYWORDS]
  timing) python3 gpu/timing_only.py --out "$out" --shapes 480p,720p --rounds 3 ;;
  all) "$0" "$out" 480p; "$0" "$out" 720p; "$0" "$out" timing ;;
  *) echo "unknown part $part: use 480p, 720p, timing, all, smoke, fp8 or bench" >&2; exit 2 ;;
esac
