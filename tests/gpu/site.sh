# Sourced (`. tests/gpu/site.sh`) by the device scripts, from the repo root on the device
# machine: $OUT made, the carried wheels (.whl) installed to /tmp/site (nothing can be
# fetched there), and the paths set to use them and this checkout.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
