"""The engine on a CUDA device: same tokens as the CPU in float32, sane in bfloat16.

Skipped without a GPU (CI has none); run on a GPU host with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import random

import pytest
import torch

from worker.engine.build import build_engine

from worker.engine.step import generate, overlapped_turn
from worker.engine.sequence import Request

from tests.unit.test_pipelined import run_all

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def ragged(n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        plen = max(4, min(900, int(rng.lognormvariate(4.5, 0.8))))
        new = rng.randint(1, 64)
        out.append(Request.greedy(k, [rng.randrange(256) for _ in range(plen)], new, seed=k))
    return out


def test_cuda_float32_matches_cpu_mostly() -> None:
    reqs = ragged(64, seed=1)
    cpu = {c.key: c.tokens for c in generate(build_engine("builtin:small", "cpu", "float32",
                                                          65536, 1088), reqs)}
    gpu = {c.key: c.tokens for c in generate(build_engine("builtin:small", "cuda:0", "float32",
                                                          65536, 1088), reqs)}
    # Different kernels sum in different orders: allow a rare near-tie to flip late.
    same_prefix = [sum(1 for a, b in zip(cpu[k], gpu[k]) if a == b) / max(1, len(cpu[k]))
                   for k in cpu]
    assert sum(same_prefix) / len(same_prefix) > 0.95


def test_cuda_bfloat16_runs_and_frees_everything() -> None:
    eng = build_engine("builtin:small", "cuda:0", "bfloat16", 65536, 1088)
    out = generate(eng, ragged(128, seed=2))
    assert len(out) == 128 and all(c.tokens for c in out)
    assert eng.pool.blocks.used_blocks == 0


def test_pipelined_runner_replays_graphs_and_matches_eager() -> None:
    reqs = ragged(64, seed=3)
    eager, _, _ = run_all(build_engine("builtin:small", "cuda:0", "float32", 65536, 1088,
                                    max_step_tokens=1024, runner="eager"), reqs)
    eng = build_engine("builtin:small", "cuda:0", "float32", 65536, 1088,
                       max_step_tokens=1024, runner="pipelined")
    piped, graphed, runner = run_all(eng, reqs)
    g = runner.graphs
    assert g.disabled is None, g.disabled  # the start-up self-check passed
    assert graphed > 0 and g.replays == graphed and len(g.graphs) >= 1
    assert runner.stager.pinned and all(h.is_pinned() for h in runner.stager._host)
    same = [sum(1 for a, b in zip(eager[k], piped[k]) if a == b) / max(1, len(eager[k]))
            for k in eager]
    assert sum(same) / len(same) > 0.95
    assert eng.pool.blocks.used_blocks == 0


def test_pipelined_runner_bfloat16_runs() -> None:
    eng = build_engine("builtin:small", "cuda:0", "bfloat16", 65536, 1088, runner="pipelined")
    out, graphed, runner = run_all(eng, ragged(128, seed=4))
    assert len(out) == 128 and all(out.values()) and runner.graphs.disabled is None
    assert graphed > 0 and eng.pool.blocks.used_blocks == 0


def _overlapped(eng, runner, reqs):
    """The executor's overlapped loop, offline: launch a step, then read the one before."""
    sched = eng.scheduler(overlap=True)
    sched.add_all(reqs, 0.0)
    out, inflight = {}, None
    while sched.has_work() or inflight is not None:
        _, inflight, done = overlapped_turn(sched, runner, sched.schedule(), inflight)
        out.update((c.key, c.tokens) for c in done)
    return out


def test_overlapped_steps_never_sync_the_host_but_to_read_tokens() -> None:
    """"No host sync in the step beyond one per step": with CUDA's sync debug mode set to
    error, any synchronizing call (an .item(), a copy to pageable memory, a synchronize)
    raises. The one intended wait is an event on the pinned token copy, which the mode
    does not count. The first pass captures the graphs (capture synchronizes); the second
    replays the same shapes and must not sync at all."""
    eng = build_engine("builtin:small", "cuda:0", "bfloat16", 65536, 1088,
                       max_step_tokens=1024, runner="pipelined")
    runner = eng.runner()
    reqs = ragged(64, seed=5)
    first = _overlapped(eng, runner, reqs)
    captured = len(runner.graphs.graphs)
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = _overlapped(eng, runner, [r for r in ragged(64, seed=5)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert second == first and len(runner.graphs.graphs) == captured
    assert runner.graphs.replays > 0 and eng.pool.blocks.used_blocks == 0


def test_logprobs_come_back_with_the_tokens_without_another_sync() -> None:
    """Logprob rows are copied to pinned memory before the token event: the one wait covers
    them (sync debug mode "error" on the second pass), and they equal the CPU's (float32)."""
    import dataclasses

    def with_logprobs(seed: int) -> list[Request]:
        return [dataclasses.replace(r, logprobs=5 if r.key % 2 else 0)
                for r in ragged(32, seed=seed)]

    eng = build_engine("builtin:small", "cuda:0", "float32", 65536, 1088,
                       max_step_tokens=1024, runner="pipelined")
    runner = eng.runner()
    sched = eng.scheduler(overlap=True)

    def run() -> dict:
        sched.add_all(with_logprobs(6), 0.0)
        out, inflight = {}, None
        while sched.has_work() or inflight is not None:
            _, inflight, done = overlapped_turn(sched, runner, sched.schedule(), inflight)
            out.update((c.key, c) for c in done)
        return out

    first = run()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = {c.key: c for c in generate(build_engine("builtin:small", "cpu", "float32", 65536,
                                                   1088), with_logprobs(6))}
    for k, c in second.items():
        assert c.tokens == first[k].tokens
        if k % 2 == 0:
            assert c.logprobs is None
            continue
        assert c.logprobs.shape == (len(c.tokens), 11)
        same = 0
        while same < len(c.tokens) and c.tokens[same] == cpu[k].tokens[same]:
            same += 1
        assert abs(c.logprobs[:same, 0] - cpu[k].logprobs[:same, 0]).max(initial=0) < 1e-3


def test_fp8_logits_follow_bfloat16_and_the_pipelined_runner_runs() -> None:
    """FP8 projections on the tensor cores (`_scaled_mm`, bfloat16 out) against bfloat16."""
    from tests.unit.test_fp8 import all_position_logits, prompts

    bf = build_engine("builtin:small", "cuda:0", "bfloat16", 65536, 1088)
    f8 = build_engine("builtin:small", "cuda:0", "fp8", 65536, 1088)
    ps = prompts(12, seed=1)
    cos = torch.cat([torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
                     for a, b in zip(all_position_logits(bf, ps), all_position_logits(f8, ps))])
    print(f"fp8 vs bf16 logits cosine: mean {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() >= 0.98
    piped = build_engine("builtin:small", "cuda:0", "fp8", 65536, 1088, runner="pipelined")
    out, graphed, runner = run_all(piped, ragged(64, seed=7))
    assert len(out) == 64 and all(out.values()) and piped.pool.blocks.used_blocks == 0
