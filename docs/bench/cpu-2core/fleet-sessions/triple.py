"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/triple.py PAIRS [MODEL]
(see runs.md). Per round, alternated: one one-core worker with two pools (32 sessions);
two one-core workers on one broker (the fleet, the same 32 sessions); two independent
halves at once (each a one-core worker with its own broker and 16 sessions of its own),
their traffic started together (a barrier: staggered starts would overlap less and flatter
the halves). The halves are what the machine gives two workers with no fleet at all."""
import json, os, sys, tempfile, threading, asyncio
from pathlib import Path
import loadgen.rung as rung
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung, log_event
from loadgen.sessions import SessionSpec

CPUS = os.environ.get("FLEET_CPUS", "0,1").split(",")  # two cores: one per worker
cfg = BenchConfig(max_seq_len=1280, model=sys.argv[2] if len(sys.argv) > 2 else "builtin:small")
work = Path(tempfile.mkdtemp())
barrier = threading.Barrier(2)
plain = rung.run_sessions


async def together(*a, **k):
    if threading.current_thread() is not threading.main_thread():
        await asyncio.to_thread(barrier.wait)
    return await plain(*a, **k)

rung.run_sessions = together


def spec(n, seed=0):
    return SessionSpec(sessions=n, system_prompts=2, turns=12, system_tokens=(100, 200), seed=seed)


def fleet(broker, name, cpus, args):
    r = run_rung(cfg, broker, work, name, "continuous", [], cpus=cpus, sessions=spec(32), worker_args=args)
    r.pop("token_log")
    return {"tok_s": round(r["useful_tokens_per_s"]), "hit": round(r["cache_hit_fraction"], 3),
            "by": list(r["jobs_by_worker"].values()), "done": list(r["worker_done_s"].values())}


with EmbeddedNats() as b1, EmbeddedNats() as b2:
    for i in range(int(sys.argv[1])):
        row = {"one_core": fleet(b1, f"t{i}one", (CPUS[0],), ("--kv-pool-blocks", "4096")),
               "fleet": fleet(b1, f"t{i}two", tuple(CPUS), ())}
        out = {}

        def go(tag, cpu, broker, seed):
            r = run_rung(cfg, broker, work, f"t{i}h{tag}", "continuous", [], cpus=(cpu,),
                         sessions=spec(16, seed), worker_args=("--kv-pool-blocks", "2048"))
            out[tag] = r
        ts = [threading.Thread(target=go, args=a) for a in (("a", CPUS[0], b1, 0), ("b", CPUS[1], b2, 1))]
        [t.start() for t in ts]
        [t.join() for t in ts]
        a, b = out["a"], out["b"]
        tokens = a["useful_tokens_per_s"] * a["wall_s"] + b["useful_tokens_per_s"] * b["wall_s"]
        row["halves"] = {"tok_s": round(tokens / max(a["wall_s"], b["wall_s"])),
                         "walls": [round(a["wall_s"], 2), round(b["wall_s"], 2)]}
        one = row["one_core"]["tok_s"]
        row["fleet_x"] = round(row["fleet"]["tok_s"] / one, 3)
        row["halves_x"] = round(row["halves"]["tok_s"] / one, 3)
        print(json.dumps(row), flush=True)
