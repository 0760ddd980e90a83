"""Where the cache's cost lives: the engine in-process, without the broker, cache on and off.

Run from the repository root: `python docs/bench/cpu-2core/kv-capacity/host_path.py [reps]`.
Ten agent-like sessions over two system prompts of 100-200 tokens (six turns, each the last
prompt, its reply and 8-32 new tokens), and ten ragged prompts of 200-700 unshared tokens
per round, through `worker.engine.step.generate`'s loop, builtin:small, budget 8,192, one
thread. Per variant: the host path's parts (add = reserve + hash, schedule, prepare,
postprocess) and the mean decode-only step. Variants, interleaved `reps` times:

  off         --no-prefix-cache
  on          the default (pool 4 x budget, cascades as the runner does them)
  on-nocasc   on, with the runner's cascade grouping switched off (`shared_prefixes` -> [])
  off-scatter off, its empty blocks shuffled (so a job's blocks lie apart, as cached ones do)
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import worker.engine.runner as runner_mod  # noqa: E402
from worker.engine.blocks import padded_tokens  # noqa: E402
from worker.engine.build import build_engine  # noqa: E402
from worker.engine.sequence import Request  # noqa: E402

torch.set_num_threads(1)
BS = 16
SHARED_PREFIXES = runner_mod.shared_prefixes


def rounds(engine, ragged: bool, seed: int = 1, n_rounds: int = 6, sessions: int = 10) -> dict:
    rng = random.Random(seed)
    systems = [[rng.randrange(320) for _ in range(rng.randint(100, 200))] for _ in range(2)]
    convs = [rng.choice(systems) + [rng.randrange(320) for _ in range(rng.randint(8, 32))]
             for _ in range(sessions)]
    t: dict[str, float] = defaultdict(float)
    sched, runner = engine.scheduler(), engine.runner()
    key = 0
    for _ in range(n_rounds):
        if ragged:
            convs = [[rng.randrange(320) for _ in range(rng.randint(200, 700))]
                     for _ in range(sessions)]
        reqs = []
        for p in convs:
            n = rng.randint(16, 48)
            reqs.append(Request(key=key, prompt=p, max_new_tokens=n,
                                reserved_tokens=padded_tokens(len(p) + n, BS), temperature=0.0,
                                top_k=0, top_p=1.0, seed=0, stop_ids=frozenset()))
            key += 1
        a = time.perf_counter()
        sched.add_all(reqs, time.monotonic())
        t["add_s"] += time.perf_counter() - a
        done = []
        while sched.has_work():
            a = time.perf_counter()
            plan = sched.schedule()
            b = time.perf_counter()
            step = runner.prepare(plan)
            c = time.perf_counter()
            launched = runner.launch(step)
            tokens = launched.wait()
            d = time.perf_counter()
            done += sched.postprocess(plan, tokens, time.monotonic(), launched.logprobs)
            e = time.perf_counter()
            t["schedule_s"] += b - a
            t["prepare_s"] += c - b
            t["forward_s"] += d - c
            t["postprocess_s"] += e - d
            if not plan.prefill:
                t["decode_steps"] += 1
                t["decode_rows"] += len(plan.decode)
                t["decode_s"] += d - b
        done.sort(key=lambda x: x.key)
        convs = [p + x.tokens + [rng.randrange(320) for _ in range(rng.randint(8, 32))]
                 for p, x in zip(convs, done)]
    return dict(t)


def variant(name: str, ragged: bool) -> dict:
    runner_mod.shared_prefixes = ((lambda *a, **k: []) if name == "on-nocasc"
                                  else SHARED_PREFIXES)
    engine = build_engine("builtin:small", "cpu", "float32", 8192, 1280,
                          prefix_cache=not name.startswith("off"))
    if name == "off-scatter":
        random.Random(0).shuffle(engine.pool.blocks._empty)
    rounds(engine, ragged, seed=0, n_rounds=1)  # warm-up
    engine.pool.blocks.drop_cached()
    a = time.perf_counter()
    t = rounds(engine, ragged)
    t["wall_s"] = time.perf_counter() - a
    t["decode_ms_per_step"] = 1e3 * t["decode_s"] / max(1, t["decode_steps"])
    t["hit_blocks"] = engine.pool.blocks.hit_blocks
    return {k: round(v, 4) for k, v in t.items()}


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    out = []
    for rep in range(reps):
        for ragged in (False, True):
            names = ["off", "on", "on-nocasc", "off-scatter"] if not ragged else ["off", "on"]
            for name in (names if rep % 2 == 0 else names[::-1]):
                r = variant(name, ragged)
                r.update(variant=name, workload="ragged" if ragged else "sessions", rep=rep)
                out.append(r)
                print(json.dumps(r), flush=True)
    json.dump(out, sys.stdout if len(sys.argv) < 3 else open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
