"""The kernel-only ceiling: the same model on the same tokens, no broker, no event loop.

Rule: the ceiling is the best this code does on the device, so the gap a rung leaves is a
number: the better of two schedules (`kernel_ceiling`), each timed over its forwards only,
run in this process on the device's default runner. On the CPU in float32 the ceiling's
greedy lengths must equal the worker's.
"""

from __future__ import annotations

import time

from loadgen.rung import BenchConfig
from loadgen.workload import JobSpec


def kernel_ceiling(cfg: BenchConfig, jobs: list[JobSpec], completions: dict[str, int]) -> dict:
    """The same model on the same tokens with no broker and no event loop, in this process:
    the best of two schedules, each timed over its forwards only.

    `phased`: every prompt prefilled in packed forwards of the engine's full step size, then
    every generated token decoded in steps of exactly B sequences (B = the concurrency the
    budget affords at this workload's mean padded length), a finished sequence replaced at
    once by the next. `continuous`: the engine's own scheduler fed from a queue in this
    process, admission refilling the budget the moment a sequence ends (no hysteresis, no
    broker), so its steps mix new prompts with the running batch as the worker's do. On a
    CPU the second is often the faster (its steps are bigger matmuls than a 52-row decode
    step), and a ceiling the worker can beat is no ceiling. It runs the device's default
    runner (pipelined on CUDA: its steps overlap like the worker's), so the ceiling is the
    best this code does on the device; the ladder's rungs are measured against it.
    """
    from worker.engine.sequence import Request

    reqs = [Request.greedy(k, list(j.prompt), j.max_new_tokens) for k, j in enumerate(jobs)]
    runs = {"phased": _ceiling_phased(cfg, reqs), "continuous": _ceiling_continuous(cfg, reqs)}
    # The same greedy tokens, so the same lengths: exact in float32 on the CPU. In half
    # precision on a GPU, batch shapes change summation order and a near-tie may flip an
    # end-of-sequence token, so there the disagreements are counted, not fatal.
    exact = cfg.device == "cpu" and cfg.dtype == "float32"
    if exact and runs["phased"]["lengths"] != runs["continuous"]["lengths"]:
        raise AssertionError("the two ceiling schedules decoded different lengths")
    for name, run in runs.items():
        lengths = run["lengths"]
        disagree = [j.id for k, j in enumerate(jobs)
                    if j.id in completions and completions[j.id] != lengths[k]]
        if exact and disagree:
            raise AssertionError(f"ceiling ({name}) and worker disagree on {disagree[:5]}")
        run["length_disagreements"] = len(disagree)
        run["useful_tokens"] = sum(len(r.prompt) + lengths[r.key] for r in reqs)
        run["useful_tokens_per_s"] = run["useful_tokens"] / run["wall_s"]
    best = max(runs, key=lambda n: runs[n]["useful_tokens_per_s"])
    out = dict(runs[best])
    out["lengths"] = {j.id: out["lengths"][k] for k, j in enumerate(jobs)}
    out["schedule"] = best
    out["schedules"] = {n: {k: v for k, v in r.items() if k != "lengths"} for n, r in runs.items()}
    return out


def _ceiling_phased(cfg: BenchConfig, reqs: list) -> dict:
    from worker.engine.build import build_engine
    from worker.engine.step import turn
    from worker.engine.scheduler import StepPlan

    total = sum(r.reserved_tokens for r in reqs)
    eng = build_engine(cfg.model, cfg.device, cfg.dtype, total, cfg.max_seq_len,
                       runner=cfg.ceiling_runner)
    sched, runner = eng.scheduler(overlap=eng.overlaps), eng.runner()
    sched.add_all(reqs, 0.0)
    seqs = sorted((s for q in sched.lanes.values() for s in q), key=lambda s: s.lane)
    sched.lanes.clear()
    concurrency = max(1, round(cfg.token_budget / (total / len(reqs))))
    finished: dict[int, int] = {}
    inflight = None  # overlap: the step on the device, read after the next launch

    def step(plan: StepPlan) -> None:
        nonlocal inflight
        _, inflight, done = turn(sched, runner, plan, inflight)
        finished.update((c.key, len(c.tokens)) for c in done)

    t_prefill = time.perf_counter()
    i = 0
    while i < len(seqs):  # packed prefill, one attention group per lane, full steps
        plan, rows = StepPlan(), 0
        while i < len(seqs) and (rows + len(seqs[i].req.prompt) <= eng.max_step_tokens or not rows):
            if not plan.prefill or plan.prefill[-1][0].lane != seqs[i].lane:
                plan.prefill.append([])
            plan.prefill[-1].append(seqs[i])
            rows += len(seqs[i].req.prompt)
            i += 1
        step(plan)
    t_decode = time.perf_counter()
    live = [s for s in seqs if s.req.key not in finished]
    while live:
        # One token behind when steps overlap: a sequence whose last token is in flight
        # is not launched again (without overlap `pending` is 0 and this takes them all).
        step(StepPlan(decode=[s for s in live if len(s.generated) + s.pending
                              < s.req.max_new_tokens][:concurrency]))
        live = [s for s in live if s.req.key not in finished]
    t_end = time.perf_counter()
    return {"wall_s": t_end - t_prefill, "prefill_s": t_decode - t_prefill,
            "decode_s": t_end - t_decode, "runner": eng.runner_mode, "decode_batch": concurrency,
            "lengths": finished}


def _ceiling_continuous(cfg: BenchConfig, reqs: list) -> dict:
    from collections import deque

    from worker.engine.build import build_engine

    from worker.engine.step import turn
    from worker.engine.scheduler import StepPlan

    eng = build_engine(cfg.model, cfg.device, cfg.dtype, cfg.token_budget, cfg.max_seq_len,
                       runner=cfg.ceiling_runner)
    sched, runner = eng.scheduler(overlap=eng.overlaps), eng.runner()
    queue, reserved = deque(reqs), {r.key: r.reserved_tokens for r in reqs}
    finished: dict[int, int] = {}
    inflight = None
    in_flight_tokens = steps = 0
    t0 = time.perf_counter()
    while queue or sched.has_work():
        take = []
        while queue and in_flight_tokens + queue[0].reserved_tokens <= cfg.token_budget:
            in_flight_tokens += queue[0].reserved_tokens
            take.append(queue.popleft())
        if take:
            sched.add_all(take, 0.0)
        steps += 1
        _, inflight, done = turn(sched, runner, sched.schedule(), inflight)
        for c in done:
            finished[c.key] = len(c.tokens)
            in_flight_tokens -= reserved[c.key]
    if inflight is not None:  # overlapped: the last step is still to be read
        _, _, done = turn(sched, runner, StepPlan(), inflight)
        finished.update((c.key, len(c.tokens)) for c in done)
    return {"wall_s": time.perf_counter() - t0, "runner": eng.runner_mode, "steps": steps,
            "lengths": finished}
