"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/spill.py (see runs.md)."""
import json, sys, tempfile
from pathlib import Path
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung, log_event
from loadgen.sessions import SessionSpec
cfg = BenchConfig(max_seq_len=1280)
spec = SessionSpec(sessions=32, system_prompts=2, turns=12, system_tokens=(100, 200), seed=0)
work = Path(tempfile.mkdtemp())
extra = tuple(sys.argv[1:])
with EmbeddedNats() as broker:
    for i in range(2):
        name = f"sp{i}"
        r = run_rung(cfg, broker, work, name, "continuous", [], cpus=("0", "1"), sessions=spec, worker_args=extra)
        r.pop("token_log")
        print(round(r["useful_tokens_per_s"]), r["cache_hit_fraction"], r["jobs_by_worker"])
        for w in range(2):
            s = log_event(work / f"{name}-{w}.log", "worker_summary")
            print("  ", {k: s.get(k) for k in ("jobs_ok", "steps", "mean_batch_rows", "session_spilled", "fetched_by_queue", "prompt_cache_hit_fraction")}, round(s["busy_s"] / s["steps"] * 1000, 1))
