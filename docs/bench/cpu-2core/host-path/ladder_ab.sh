#!/bin/sh
cd /tmp
PYTHONPATH=/work/main /work/main/.venv/bin/python -c "
import sys; sys.path.insert(0, '/tmp/hpold')
import torch; torch.set_num_threads(1)
import hostpath_ab as h
print(h.render([h.measure(b, 200) for b in (1, 32, 256)]))"
for i in 1 2; do
PYTHONPATH=/work/main /work/main/.venv/bin/python -m loadgen bench --out /tmp/bn$i --rungs 4 --jobs 300 --null-jobs 0 --host-path-steps 0
PYTHONPATH=/work/wt-old /work/main/.venv/bin/python -m loadgen bench --out /tmp/bo$i --rungs 4 --jobs 300 --null-jobs 0
done
