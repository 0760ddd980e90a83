"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/half.py (see runs.md)."""
import json, sys, tempfile
from pathlib import Path
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung
from loadgen.sessions import SessionSpec
cfg = BenchConfig(max_seq_len=1280)
work = Path(tempfile.mkdtemp())
with EmbeddedNats() as broker:
    for i in range(2):
        for n in (32, 16):
            spec = SessionSpec(sessions=n, system_prompts=2, turns=12, system_tokens=(100, 200), seed=0)
            r = run_rung(cfg, broker, work, f"h{i}s{n}", "continuous", [], cpus=("0",), sessions=spec, worker_args=("--kv-pool-blocks", "4096"))
            r.pop("token_log")
            print(json.dumps({"sessions": n, "tok_s": round(r["useful_tokens_per_s"]), "hit": round(r["cache_hit_fraction"], 3), "wall": round(r["wall_s"], 2), "rows": r["mean_batch_rows"]}), flush=True)
