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
timeout 120 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?" >> "$OUT/device-check.log"
# The ladder on the GPU with builtin:1b (a ~1B Llama shape, seeded weights: builtin:small
# left the first H200 run host-bound), sized to fit one call: the rungs that matter first
# (4: continuous batching, 5: pipelined with graphs) in bfloat16, then in fp8, then the
# baselines on a smaller workload. Each bench has its own time limit.
timeout 150 python3 -m loadgen bench --out "$OUT/ladder45" --device cuda --dtype bfloat16 \
    --model builtin:1b --rungs 4,5 --jobs 1000 --null-jobs 0 >> "$OUT/device-check.log" 2>&1
echo "bench rungs 4,5 bf16 exit $?" >> "$OUT/device-check.log"
timeout 120 python3 -m loadgen bench --out "$OUT/ladder45fp8" --device cuda --dtype fp8 \
    --model builtin:1b --rungs 4,5 --jobs 800 --null-jobs 0 >> "$OUT/device-check.log" 2>&1
echo "bench rungs 4,5 fp8 exit $?" >> "$OUT/device-check.log"
timeout 100 python3 -m loadgen bench --out "$OUT/ladder01" --device cuda --dtype bfloat16 \
    --model builtin:1b --rungs 0,1 --jobs 200 --serial-jobs 50 --null-jobs 0 >> "$OUT/device-check.log" 2>&1
echo "bench rungs 0,1 exit $?" >> "$OUT/device-check.log"
for d in ladder45 ladder45fp8 ladder01; do
  for f in ladder.md ladder.json ladder.partial.json; do
    cp "$OUT/$d/$f" "$OUT/$d-$f" 2>/dev/null
  done
  rm -rf "$OUT/$d"
done
cat "$OUT/device-check.log"
