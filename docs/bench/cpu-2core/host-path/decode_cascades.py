# Run from the repository root: python docs/bench/cpu-2core/host-path/decode_cascades.py
import json, random, sys, time
import torch
torch.set_num_threads(1)
import worker.engine.cascades as G
from worker.engine.blocks import padded_tokens
from worker.engine.build import build_engine
from worker.engine.sequence import Request
SP = G.shared_prefixes

def run(sys_len, variant, seed=0):
    G.DECODE_CASCADE_MIN_SAVED = 2048 if variant == "casc" else 10**9
    eng = build_engine("builtin:small", "cpu", "float32", 8192, 2048)
    rng = random.Random(seed)
    systems = [[rng.randrange(320) for _ in range(sys_len)] for _ in range(2)]
    sched, runner = eng.scheduler(), eng.runner()
    # warm the system prompts' KV
    reqs = [Request.greedy(100 + i, s + [1], 1) for i, s in enumerate(systems)]
    sched.add_all(reqs, 0.0)
    while sched.has_work():
        p = sched.schedule(); l = runner.launch(runner.prepare(p)); sched.postprocess(p, l.wait(), 0.0)
    reqs = []
    for i in range(12):
        p = systems[i % 2] + [rng.randrange(320) for _ in range(rng.randint(8, 64))]
        reqs.append(Request.greedy(i, p, 48))
    for r in reqs:
        r.ignore_eos = True
    sched.add_all(reqs, 0.0)
    dec, n = 0.0, 0
    while sched.has_work():
        p = sched.schedule()
        a = time.perf_counter()
        l = runner.launch(runner.prepare(p)); toks = l.wait()
        b = time.perf_counter()
        sched.postprocess(p, toks, 0.0)
        if not p.prefill:
            dec += b - a; n += 1
    return 1e3 * dec / n

for sys_len in (160, 480, 960):
    res = {"casc": [], "flat": []}
    for rep in range(3):
        for v in (("casc", "flat") if rep % 2 == 0 else ("flat", "casc")):
            res[v].append(run(sys_len, v, seed=rep))
    print(sys_len, {k: [round(x, 2) for x in v] for k, v in res.items()}, flush=True)
