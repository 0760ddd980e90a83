"""Run from the repository root: python docs/bench/cpu-2core/fleet-sessions/diag.py SESSIONS TURNS PAIRS (see runs.md).
Fleet diagnostics: per worker the sessions it served, its jobs, computed tokens, and when
it answered its last job."""
import json, sys, tempfile, collections
from pathlib import Path
import loadgen.rung as rung
from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung, log_event
from loadgen.sessions import SessionSpec
captured = {}
orig = rung.build_report
def cap(stats, *a, **k):
    captured["stats"] = stats
    return orig(stats, *a, **k)
rung.build_report = cap
sessions, turns, pairs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
labels = sys.argv[4].split(",") if len(sys.argv) > 4 else ["one_core", "two_workers"]
extra = tuple(sys.argv[5:])
cfg = BenchConfig(max_seq_len=1280)
spec = SessionSpec(sessions=sessions, system_prompts=2, turns=turns, system_tokens=(100, 200), seed=0)
work = Path(tempfile.mkdtemp())
conf = {"one_core": (("0",), ("--kv-pool-blocks", "4096")), "two_workers": (("0", "1"), extra)}
with EmbeddedNats() as broker:
    for i in range(pairs):
        row = {}
        for label in labels:
            cpus, args = conf[label]
            name = f"dg{i}{label.replace('_','')}"
            r = run_rung(cfg, broker, work, name, "continuous", [], cpus=cpus, sessions=spec, worker_args=args)
            r.pop("token_log")
            st = captured["stats"]
            per = collections.defaultdict(lambda: {"sess": set(), "computed": 0, "jobs": 0})
            for o in st.outcomes.values():
                if not o.ok: continue
                s = o.id.rsplit("-t", 1)[0]
                d = per[o.worker]; d["sess"].add(s); d["jobs"] += 1
                d["computed"] += o.prompt_tokens + o.completion_tokens - o.cached_tokens
            ws = {}
            for w, d in sorted(per.items()):
                ws[w[-1]] = {"sess": len(d["sess"]), "jobs": d["jobs"], "computed": d["computed"],
                             "done": r["worker_done_s"][w]}
            busy = []
            for w in range(len(cpus)):
                s = log_event(work / f"{name}-{w}.log", "worker_summary")
                busy.append((round(s["busy_s"] / r["wall_s"], 3), s.get("steps"), s.get("mean_batch_rows"), s.get("session_spilled")))
            row[label] = {"tok_s": round(r["useful_tokens_per_s"]), "hit": round(r["cache_hit_fraction"], 3),
                          "wall": round(r["wall_s"], 2), "busy": busy, "w": ws}
        if len(labels) == 2:
            row["ratio"] = round(row["two_workers"]["tok_s"] / row["one_core"]["tok_s"], 3)
        print(json.dumps(row), flush=True)
