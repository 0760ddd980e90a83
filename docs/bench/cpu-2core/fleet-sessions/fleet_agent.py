"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/fleet_agent.py SESSIONS TURNS

One one-core worker (two workers' pool) vs two one-core workers, agent sessions named."""
import dataclasses, json, os, resource, sys, tempfile
from pathlib import Path
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung
from loadgen.sessions import SessionSpec
from loadgen.agentbench import unbounded_hit_fraction

sessions, turns = int(sys.argv[1]), int(sys.argv[2])
cfg = BenchConfig(max_seq_len=1280)
spec = SessionSpec(sessions=sessions, system_prompts=2, turns=turns, system_tokens=(100, 200), seed=0)
work = Path(tempfile.mkdtemp())
out = {}
with EmbeddedNats() as broker:
    for label, cpus, args, sp in (("one_core", ("0",), ("--kv-pool-blocks", "4096"), spec),
                                  ("two_workers", ("0", "1"), (), spec),
                                  ("two_anonymous", ("0", "1"), (), dataclasses.replace(spec, named=False))):
        def cpu_of(pid):
            f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        ru0 = resource.getrusage(resource.RUSAGE_SELF); n0 = cpu_of(broker.pid)
        r = run_rung(cfg, broker, work, f"fa{label.replace('_','')}", "continuous", [], cpus=cpus,
                     sessions=sp, worker_args=args)
        ru1 = resource.getrusage(resource.RUSAGE_SELF); n1 = cpu_of(broker.pid)
        prod = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
        ub = unbounded_hit_fraction(r.pop("token_log"), r["block_size"])
        out[label] = r
        print(json.dumps({"label": label, "sessions": sessions, "turns": turns,
                          "useful_tokens_per_s": round(r["useful_tokens_per_s"]),
                          "jobs_per_s": round(r["jobs_per_s"], 1),
                          "cache_hit": round(r["cache_hit_fraction"], 3), "unbounded": round(ub, 3),
                          "jobs_by_worker": r["jobs_by_worker"], "wall_s": r["wall_s"],
                          "p50_ms": round(r["latency_ms"]["p50"]),
                          "executor_busy": r["executor_busy_fraction"],
                          "producer_cpu_s": round(prod, 1), "nats_cpu_s": round(n1 - n0, 1)}), flush=True)
print("ratio", round(out["two_workers"]["useful_tokens_per_s"] / out["one_core"]["useful_tokens_per_s"], 3),
      "hit ratio", round(out["two_workers"]["cache_hit_fraction"] / out["one_core"]["cache_hit_fraction"], 3))
