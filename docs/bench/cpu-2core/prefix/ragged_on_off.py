"""Ragged jobs (nothing shared) with the prefix cache on and off, interleaved closed loops.

Run from the repository root: `python docs/bench/cpu-2core/prefix/ragged_on_off.py`. Rounds
1-2 ran on then off, rounds 3-4 off then on (this file as it ran for 3-4).
"""
import os, sys, json
from pathlib import Path
sys.path.insert(0, os.getcwd())
from loadgen.rung import BenchConfig, run_rung, saturating_outstanding
from loadgen.arrivals import Closed
from loadgen.broker import EmbeddedNats
from loadgen.workload import WorkloadSpec, generate
cfg = BenchConfig(); work = Path("/tmp/ragged_ab"); work.mkdir(exist_ok=True)
res = []
with EmbeddedNats() as broker:
    for rnd in (3, 4):
        for mode, args in (("off", ("--no-prefix-cache",)), ("on", ())):
            jobs = generate(WorkloadSpec(num_jobs=6000, seed=0, run_id=f"rg{mode}{rnd}"))
            r = run_rung(cfg, broker, work, f"rg{mode}{rnd}", "continuous", jobs, runner="eager",
                         arrival=Closed(saturating_outstanding(cfg)), duration_s=60, worker_args=args)
            w = r["sustained"]
            res.append((mode, rnd, round(w["useful_tokens_per_s"]), r["cache_hit_fraction"]))
            print(mode, rnd, round(w["useful_tokens_per_s"]), "tok/s sustained; hit", round(r["cache_hit_fraction"], 4), flush=True)
json.dump(res, open("/tmp/ragged_ab/res2.json", "w"))
