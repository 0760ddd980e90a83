"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/halves.py (see runs.md)."""
import json, sys, tempfile, threading
from pathlib import Path
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung
from loadgen.sessions import SessionSpec
cfg = BenchConfig(max_seq_len=1280)
work = Path(tempfile.mkdtemp())
out = {}
with EmbeddedNats() as broker1, EmbeddedNats() as broker2:
    for i in range(2):
        def go(tag, cpu):
            broker = broker1 if tag == "a" else broker2
            spec = SessionSpec(sessions=16, system_prompts=2, turns=12, system_tokens=(100, 200), seed=0)
            r = run_rung(cfg, broker, work, f"p{i}{tag}", "continuous", [], cpus=(cpu,), sessions=spec, worker_args=("--kv-pool-blocks", "2048"))
            r.pop("token_log"); out[tag] = r
        ts = [threading.Thread(target=go, args=(t, c)) for t, c in (("a", "0"), ("b", "1"))]
        [t.start() for t in ts]; [t.join() for t in ts]
        a, b = out["a"], out["b"]
        tot = a["useful_tokens_per_s"] * a["wall_s"] + b["useful_tokens_per_s"] * b["wall_s"]
        print(json.dumps({"a_wall": round(a["wall_s"], 2), "b_wall": round(b["wall_s"], 2), "a_tok_s": round(a["useful_tokens_per_s"]), "b_tok_s": round(b["useful_tokens_per_s"]), "combined_tok_s": round(tot / max(a["wall_s"], b["wall_s"])), "hit": [a["cache_hit_fraction"], b["cache_hit_fraction"]]}), flush=True)
