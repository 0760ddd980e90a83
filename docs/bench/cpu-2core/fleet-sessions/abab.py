"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/abab.py (see runs.md)."""
import json, sys, tempfile
from pathlib import Path
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung, log_event
from loadgen.sessions import SessionSpec
sessions, turns, pairs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = BenchConfig(max_seq_len=1280)
spec = SessionSpec(sessions=sessions, system_prompts=2, turns=turns, system_tokens=(100, 200), seed=0)
work = Path(tempfile.mkdtemp())
with EmbeddedNats() as broker:
    for i in range(pairs):
        row = {}
        for label, cpus, args in (("one_core", ("0",), ("--kv-pool-blocks", "4096")), ("two_workers", ("0", "1"), ())):
            name = f"ab{i}{label.replace('_','')}"
            r = run_rung(cfg, broker, work, name, "continuous", [], cpus=cpus, sessions=spec, worker_args=args)
            r.pop("token_log")
            busy = []
            for w in range(len(cpus)):
                s = log_event(work / f"{name}-{w}.log", "worker_summary")
                busy.append(round(s["busy_s"] / r["wall_s"], 3))
            row[label] = {"tok_s": round(r["useful_tokens_per_s"]), "hit": round(r["cache_hit_fraction"], 3),
                          "wall": round(r["wall_s"], 2), "busy": busy, "by": r["jobs_by_worker"]}
        row["ratio"] = round(row["two_workers"]["tok_s"] / row["one_core"]["tok_s"], 3)
        print(json.dumps(row), flush=True)
