#!/bin/sh
# Run THERE, on a lent GPU machine, from the repo root, with .whl carried
# (tests/gpu/fetch-wheels.sh first, here). One call: the GPU tests, then the ladder on CUDA.
# Everything it reports lands in $OUT (device-check.log, gpu-tests.log, ladder.*).
#   device run: sh tests/gpu/device-check.sh      carry: [".whl"]     timeout_s: 540
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  command -v nats-server || find /tmp/site -name 'nats-server*' -type f | head -3
} > "$OUT/device-check.log" 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?" >> "$OUT/device-check.log"
# The ladder on the GPU: a workload big enough that the device, not start-up, is measured.
timeout 360 python3 -m loadgen bench --out "$OUT/ladder" --device cuda --dtype bfloat16 \
    --jobs 3000 --serial-jobs 300 --null-jobs 30000 >> "$OUT/device-check.log" 2>&1
echo "bench exit $?" >> "$OUT/device-check.log"
cp "$OUT/ladder/ladder.md" "$OUT/ladder/ladder.json" "$OUT/ladder/ladder.png" \
   "$OUT/ladder/ladder.partial.json" "$OUT/" 2>/dev/null
rm -rf "$OUT/ladder"
cat "$OUT/device-check.log"
