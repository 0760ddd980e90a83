#!/bin/sh
cd /tmp
for i in 1 2; do
 for side in old new; do
  if [ $side = old ]; then PP=/work/wt-old; else PP=/work/main; fi
  for rng in short long; do
  echo "== $side $rng $i"; PYTHONPATH=$PP /work/main/.venv/bin/python -c "
import sys; sys.path.insert(0, '/tmp/hpold')
import torch; torch.set_num_threads(1)
import hostpath_ab as h, json
pr = (32, 512) if '$rng' == 'short' else (1024, 3072)
rows = [h.measure(b, 200, prompt_range=pr) for b in (1, 32, 256)]
print(h.render(rows)); print('JSON', json.dumps(rows))"
  done
 done
done
