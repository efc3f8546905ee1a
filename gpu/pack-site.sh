#!/usr/bin/env bash
# Packs what a bare GPU machine lacks (its image has torch, transformers and pytest, not diffusers) into
# .gpusite/site.tar.xz for gpu/tier.sh: one `pip install --target` tree, xz-compressed. Unpacked and recompressed,
# diffusers, torchao, fa3-fwd and imageio-ffmpeg (whose ffmpeg carries libvmaf, for VMAF) take about 59 MiB, where
# their wheels take 104 MB: the only way all four fit a 64 MiB transfer beside the checkout.
# Usage: bash gpu/pack-site.sh WHEELS [NAME]   (a folder of wheels for Python 3.12, manylinux x86_64; the archive is
#   .gpusite/NAME.tar.xz, NAME "site" by default. Another NAME packs another set, e.g. ModelOpt's for the sensitivity
#   report, carried by itself as `.gpusite/NAME.tar.xz` when both would not fit one transfer.)
set -euo pipefail
wheels=${1:?folder of wheels}
name=${2:-site}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
# The GPU machine's Python is 3.12 whatever this one's is: pick wheels by its tags.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$tree" --only-binary=:all: \
  --implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$wheels"/*.whl
mkdir -p .gpusite
tar cf - -C "$tree" . | xz -T0 -9e > ".gpusite/$name.tar.xz.part"
mv ".gpusite/$name.tar.xz.part" ".gpusite/$name.tar.xz"
du -h ".gpusite/$name.tar.xz"
