#!/bin/sh
# Run THERE, on a lent GPU machine, from the repo root, with .whl carried
# (tests/gpu/fetch-wheels.sh first, here). One call leaves the evidence issues 24 and 25 ask
# for, each part in its own time limit (535 s in all) so a part that fails leaves the rest:
#   the GPU tests (the host tier's streams and events among them); rungs 0, 4, 5 on
#   builtin:1b in bfloat16 (with the host path table on the device) and rungs 4, 5 in fp8
#   (device busy from NVML is a column of each); a torch.profiler trace of 50 decode steps
#   at batch 64; the transformers generate_batch peer on the same jobs; agent sessions on a
#   small KV pool with the host tier and without (hits by tier, copies out by when).
# Everything lands in $OUT (device-check.log, gpu-tests.log, bf16-*, fp8-*, trace*, peer*,
# tier-*).
#   device run: sh tests/gpu/device-check.sh      carry: [".whl"]     timeout_s: 590
. tests/gpu/site.sh  # $OUT, the carried wheels, the paths
LOG="$OUT/device-check.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  command -v nats-server || find /tmp/site -name 'nats-server*' -type f | head -3
} > "$LOG" 2>&1
timeout 90 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?" >> "$LOG"
# builtin:1b: a ~1B Llama shape with seeded weights (builtin:small left the first H200 run
# host-bound). Rung 0 (serial) on a few jobs only, and in bfloat16 only: it is the slow one.
timeout 140 python3 -m loadgen bench --out "$OUT/bf16" --device cuda --dtype bfloat16 \
    --model builtin:1b --rungs 0,4,5 --jobs 800 --serial-jobs 30 --null-jobs 0 \
    --ceiling-runs 1 --host-path-steps 100 >> "$LOG" 2>&1
echo "bench bf16 exit $?" >> "$LOG"
timeout 75 python3 -m loadgen bench --out "$OUT/fp8" --device cuda --dtype fp8 \
    --model builtin:1b --rungs 4,5 --jobs 800 --null-jobs 0 \
    --ceiling-runs 1 --host-path-steps 0 >> "$LOG" 2>&1
echo "bench fp8 exit $?" >> "$LOG"
timeout 45 python3 -m loadgen.hostpath --trace "$OUT/trace-b64.json.gz" --model builtin:1b \
    --device cuda --dtype bfloat16 --batch 64 --steps 50 >> "$LOG" 2>&1
echo "trace exit $?" >> "$LOG"
timeout 80 python3 -m loadgen.peer --out "$OUT/peer" --model builtin:1b --device cuda \
    --dtype bfloat16 --jobs 192 --max-new 128 >> "$LOG" 2>&1
echo "peer exit $?" >> "$LOG"
# The host tier (issue 25): 32 agent sessions on a device pool of 640 blocks (the budget's
# 512 and 128 of cache, where the sessions want about 1,100), with the default 4 GiB tier
# and with none; the agent table reports hits by tier and copies out ahead / at eviction.
# (A rung of 40 jobs and one ceiling run are the bench's frame; ladder.partial.json keeps
# the agent runs if the frame runs out of time.)
timeout 105 python3 -m loadgen bench --out "$OUT/tier" --device cuda --dtype bfloat16 \
    --model builtin:1b --rungs 4 --jobs 40 --null-jobs 0 --ceiling-runs 1 \
    --host-path-steps 0 --agent-sessions 32 --agent-turns 8 --agent-system-prompts 2 \
    --agent-system-tokens 100,200 --max-seq-len 1280 --agent-kv-pool-blocks 640 \
    --agent-host-tier >> "$LOG" 2>&1
echo "bench tier exit $?" >> "$LOG"
for d in bf16 fp8 peer tier; do
  for f in ladder.md ladder.json ladder.partial.json peer.md peer.json; do
    cp "$OUT/$d/$f" "$OUT/$d-$f" 2>/dev/null
  done
  rm -rf "$OUT/$d"
done
cat "$LOG"
