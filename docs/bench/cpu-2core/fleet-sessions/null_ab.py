"""Null-model broker path, one worker, 30,000 jobs from a backlog: run from a tree's root."""
import dataclasses, json, sys, tempfile
from pathlib import Path
from loadgen.broker import EmbeddedNats, delete_streams
from loadgen.rung import BenchConfig, run_backlog
from loadgen.workload import Uniform, WorkloadSpec, generate
import asyncio
cfg = dataclasses.replace(BenchConfig(), token_budget=65536, low_water=32768)
jobs = generate(WorkloadSpec(num_jobs=30000, seed=0, run_id="null", prompt_lengths=Uniform(4, 12), max_new_tokens=1))
with EmbeddedNats() as broker:
    asyncio.run(delete_streams(broker.url, "KV_FABRIC_WORKERS"))
    r = run_backlog(cfg, broker, Path(tempfile.mkdtemp()), "null", jobs, model="builtin:null")
print(json.dumps({"tree": sys.argv[1], "jobs_per_s": round(r["jobs_per_s"]), "unique": r["unique"], "results": r["results"]}), flush=True)
