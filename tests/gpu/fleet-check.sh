#!/bin/sh
# Run THERE, on a lent device machine, from the repo root, with .whl carried
# (tests/gpu/fetch-wheels.sh first, here), as a second call after device-check.sh when the
# session has 330 s or more of device time left. It needs no GPU: it is the fleet figure of
# issue 26 on CPUs that do not share one small L3 and memory bus, which this 2-core machine
# cannot give (docs/bench/cpu-2core/fleet-sessions/runs.md). Two rounds of triple.py on
# builtin:small, on two cores of different physical cores: one one-core worker, the fleet
# of two, and two independent halves, alternated.
#   device run: sh tests/gpu/fleet-check.sh      carry: [".whl"]     timeout_s: 300
. tests/gpu/site.sh  # $OUT, the carried wheels, the paths
lscpu > "$OUT/lscpu.txt" 2>&1
# The first logical CPU of each physical core, two of them, as far apart as listed.
CPUS=$(lscpu -p=CPU,CORE | grep -v '^#' | awk -F, '!seen[$2]++ {print $1}' | sed -n '1p;$p' | paste -sd, -)
echo "cpus $CPUS" > "$OUT/fleet-check.log"
FLEET_CPUS=$CPUS timeout 270 python3 docs/bench/cpu-2core/fleet-sessions/triple.py 2 \
    >> "$OUT/fleet-check.log" 2>&1
echo "triple exit $?" >> "$OUT/fleet-check.log"
grep -E '^\{|^cpus|exit' "$OUT/fleet-check.log"
