"""The engine computes the same tokens for a job whatever else shares its batches.

Float32 on the CPU, the builtin tiny model: each job's greedy tokens through continuous
batching (ragged prompts, sequences joining and leaving mid-decode, stop tokens) equal
the tokens of the same job run alone, exactly.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from worker.engine.build import Engine, EngineError, build_engine, build_engine_off_main

from worker.engine.step import generate
from worker.engine.blocks import padded_tokens
from worker.engine.sequence import Request


def req(key: int, prompt: list[int], max_new: int, **kw) -> Request:
    d = dict(temperature=0.0, top_k=0, top_p=1.0, seed=key, stop_ids=frozenset())
    d.update(kw)
    return Request(key=key, prompt=prompt, max_new_tokens=max_new,
                   reserved_tokens=padded_tokens(len(prompt) + max_new, 16), **d)


def ragged(n: int, seed: int, **kw) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plen = max(4, min(600, int(rng.lognormvariate(4.3, 0.9))))
        out.append(req(i, [rng.randrange(256) for _ in range(plen)], rng.randint(1, 48), **kw))
    return out


def alone(engine: Engine, r: Request) -> list[int]:
    (c,) = generate(engine, [Request(**{f: getattr(r, f) for f in Request.__slots__})])
    return c.tokens


def test_batched_equals_alone_greedy(engine: Engine) -> None:
    reqs = ragged(60, seed=1)
    batched = {c.key: c for c in generate(engine, reqs)}
    assert len(batched) == len(reqs)
    for r in reqs:
        assert batched[r.key].tokens == alone(engine, r), f"job {r.key} differs"
        assert batched[r.key].finish_reason in ("length", "stop")


def test_join_and_leave_mid_decode(engine: Engine) -> None:
    """A small step cap forces prompts to be prefilled while others are decoding."""
    small = build_engine("builtin:tiny", "cpu", "float32", 32768, 1088, max_step_tokens=200)
    # The two engines share no state; same weights because builtins are seeded.
    reqs = ragged(40, seed=2)
    sched, runner = small.scheduler(), small.runner()
    for r in reqs:
        sched.add(r, 0.0)
    mixed_steps = 0
    done = {}
    while sched.has_work():
        plan = sched.schedule()
        mixed_steps += bool(plan.prefill and plan.decode)
        for c in sched.postprocess(plan, runner.run(runner.prepare(plan)), 0.0):
            done[c.key] = c
    assert mixed_steps > 5, "the workload did not exercise joins during decode"
    for r in reqs:
        assert done[r.key].tokens == alone(engine, r)
    assert small.pool.blocks.used_blocks == 0


def test_stop_tokens_end_a_sequence_early(engine: Engine) -> None:
    base = ragged(20, seed=3)
    full = {c.key: c.tokens for c in generate(engine, base)}
    # Stop each job at the token it would produce third (when it runs that long).
    stopped = []
    for r in base:
        toks = full[r.key]
        stop = frozenset({toks[2]}) if len(toks) > 3 else frozenset()
        stopped.append(req(100 + r.key, r.prompt, r.max_new_tokens, stop_ids=stop))
    out = {c.key: c for c in generate(engine, stopped)}
    for r in stopped:
        c, ref = out[r.key], full[r.key - 100]
        if r.stop_ids:
            first = next(i for i, t in enumerate(ref) if t in r.stop_ids)
            assert c.tokens == ref[: first + 1] and c.finish_reason == "stop"
        else:
            assert c.tokens == ref


def test_seeded_sampling_independent_of_batch(engine: Engine) -> None:
    reqs = ragged(24, seed=4, temperature=0.9, top_k=40, top_p=0.9)
    batched = {c.key: c.tokens for c in generate(engine, reqs)}
    for r in reqs[:8]:
        assert batched[r.key] == alone(engine, r)
    # Different seeds give different samples (with overwhelming probability).
    a = req(500, reqs[0].prompt, 32, temperature=1.0, seed=1)
    b = req(501, reqs[0].prompt, 32, temperature=1.0, seed=2)
    ta, tb = (c.tokens for c in sorted(generate(engine, [a, b]), key=lambda c: c.key))
    assert ta != tb


def test_top_k_one_is_greedy(engine: Engine) -> None:
    greedy = ragged(10, seed=5)
    topk1 = ragged(10, seed=5, temperature=1.5, top_k=1)
    g = {c.key: c.tokens for c in generate(engine, greedy)}
    t = {c.key: c.tokens for c in generate(engine, topk1)}
    assert g == t


@pytest.mark.parametrize("policy", ["serial", "window", "budget", "lanes"])
def test_ladder_policies_compute_the_same_tokens(engine: Engine, policy: str) -> None:
    """The benchmark's baseline policies pad for real, and still get every token right."""
    other = build_engine("builtin:tiny", "cpu", "float32", 32768, 1088, policy=policy)
    reqs = ragged(24, seed=8)
    out = {c.key: c for c in generate(other, reqs)}
    padded = 0
    for r in reqs:
        c = out[r.key]
        assert c.tokens == alone(engine, r)
        real = len(r.prompt) + len(c.tokens)
        assert c.computed_tokens >= real
        padded += c.computed_tokens - real
    assert (padded > 0) == (policy != "serial")
    assert other.pool.blocks.used_blocks == 0


def test_computed_tokens_have_no_padding(engine: Engine) -> None:
    reqs = ragged(30, seed=6)
    for c in generate(engine, reqs):
        r = reqs[c.key]
        assert c.computed_tokens == len(r.prompt) + len(c.tokens)


def test_kv_pool_returns_to_empty(engine: Engine) -> None:
    generate(engine, ragged(30, seed=7))
    assert engine.pool.blocks.used_blocks == 0
    assert engine.pool.blocks.holders() == 0


def test_model_refuses_unknown_builtin() -> None:
    from worker.engine.build import EngineError

    with pytest.raises(EngineError, match="model: unknown builtin"):
        build_engine("builtin:nope", "cpu", "float32", 4096, 1088)
    with pytest.raises(EngineError, match="max_seq_len"):
        build_engine("builtin:tiny", "cpu", "float32", 65536, 100_000)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="device"):
            build_engine("builtin:tiny", "cuda:0", "float32", 4096, 1088)


_TEAM_PROBE = """
import dataclasses, os, sys, time, torch
from worker.engine.build import build_engine, build_engine_off_main
from worker.engine.executor import Executor
torch.set_num_threads(2)
base = len(os.listdir("/proc/self/task"))
where = sys.argv[1]
if where in ("main", "off"):
    (build_engine_off_main if where == "off" else build_engine)("builtin:small", "cpu",
                                                                "float32", 8192, 1088)
else:  # the pipelined runner's buffers: by hand on this thread, or as the executor builds it
    eng = dataclasses.replace(build_engine_off_main("builtin:small", "cpu", "float32", 8192,
                                                    1088), runner_mode="pipelined")
    if where == "runner-main":
        eng.runner()
    else:
        Executor(eng, print, print, print)
# A finished thread's OpenMP workers are released, not joined: give them time to go.
for _ in range(100):
    extra = len(os.listdir("/proc/self/task")) - base
    if extra == 0:
        break
    time.sleep(0.05)
print(extra)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_loading_off_main_leaves_no_openmp_team_behind() -> None:
    """The worker loads its model off the main thread (see build_engine_off_main): the
    loader's OpenMP worker threads leave with it. Loading on the main thread keeps them:
    the probe itself must see that, or it proves nothing."""
    def extra_threads(where: str) -> int:
        out = subprocess.run([sys.executable, "-c", _TEAM_PROBE, where], capture_output=True,
                             text=True, timeout=120, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    assert extra_threads("main") >= 1
    assert extra_threads("off") == 0
    # The same for the pipelined runner's preallocated buffers (zero-filled: parallel ops).
    assert extra_threads("runner-main") >= 1
    assert extra_threads("runner-off") == 0


def test_loading_off_main_raises_the_loader_error() -> None:
    with pytest.raises(EngineError, match="max_seq_len"):
        build_engine_off_main("builtin:tiny", "cpu", "float32", 4096, 10**9)
