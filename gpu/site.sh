# Sourced by gpu/tier.sh and gpu/full-size.sh: make the carried packages importable (wheels in .whl/, or
# `pip install --target` trees packed as .gpusite/*.tar.xz by gpu/pack-site.sh, half the size).
site=/tmp/site
for pack in .gpusite/*.tar.xz; do  # each archive once per machine: a warm machine keeps /tmp/site between calls
  [ -f "$pack" ] && [ ! -f "$site/.unpacked-$(basename "$pack")" ] || continue
  mkdir -p "$site" && tar xJf "$pack" -C "$site" && touch "$site/.unpacked-$(basename "$pack")"
done
if [ ! -d "$site" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
[ -d "$site" ] && export PYTHONPATH=$site:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
