"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/neighbour.py (see runs.md).
One one-core worker (16 sessions) alone, then with a process streaming through 64 MiB on
the other core, which touches none of its memory: what sharing the machine costs it."""
import json, sys, tempfile, subprocess, os
from pathlib import Path
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung, log_event
from loadgen.sessions import SessionSpec
cfg = BenchConfig(max_seq_len=1280)
spec = SessionSpec(sessions=16, system_prompts=2, turns=12, system_tokens=(100, 200), seed=0)
work = Path(tempfile.mkdtemp())
hog = [sys.executable, "-c", "import torch; torch.set_num_threads(1); a=torch.ones(16<<20)\nwhile True: a.add_(1.0)"]
with EmbeddedNats() as broker:
    for i in range(2):
        for label in ("alone", "neighbour"):
            p = subprocess.Popen(["taskset", "-c", "1", *hog]) if label == "neighbour" else None
            try:
                r = run_rung(cfg, broker, work, f"nb{i}{label}", "continuous", [], cpus=("0",), sessions=spec, worker_args=("--kv-pool-blocks", "2048"))
            finally:
                if p: p.kill()
            s = log_event(work / f"nb{i}{label}-0.log", "worker_summary")
            print(label, round(r["useful_tokens_per_s"]), round(s["busy_s"] / s["steps"] / s["mean_batch_rows"] * 1000, 3), "ms/row", flush=True)
