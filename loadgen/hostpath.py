"""The host path per step: the executor's own work, the model excluded, by phase.

On a GPU the host must prepare the next step while the device runs this one; whatever the
host spends beyond the device's step time is device idle time. This measures it on
`builtin:null` (no layers: the forward is an embedding and a 320-wide head, so what is
left is the scheduler, the runner's metadata, sampling and postprocess) at fixed decode
batch sizes, in steady state: every row decoding, none finishing, contexts growing, the
sequences' prompts ragged (so they fall in several length groups, as real traffic does).

Phases, per step (milliseconds, the median over the measured steps):
- `schedule`: the scheduler's plan (who runs);
- `prepare`: the step's host arrays (token ids, positions, KV slots, attention groups,
  sampling parameters) and their hand-over to torch;
- `launch`: queueing the forward and the sampler (on the CPU this runs them: with no
  layers that is the embedding, the head and the sampler);
- `postprocess`: the sampled tokens read back and appended, finish checks, cache keys.

`host` is schedule + prepare + postprocess: the executor's own bookkeeping, the target of
issue 24 (at most 0.5 ms at batch 256 and 0.12 ms at batch 1 on the 2-core machine).
"""

from __future__ import annotations

import random
import statistics
import time

PHASES = ("schedule", "prepare", "launch", "postprocess")


def measure(batch: int, steps: int = 200, warmup: int = 20, model: str = "builtin:null",
            prompt_range: tuple[int, int] = (32, 512), seed: int = 0,
            device: str = "cpu") -> dict:
    """Median ms per phase over `steps` decode steps at `batch` rows (after `warmup`)."""
    from worker.engine.blocks import padded_tokens
    from worker.engine.build import build_engine
    from worker.engine.sequence import Request
    from worker.engine.step import turn

    rng = random.Random(seed)
    new = warmup + steps + 8  # nobody finishes while measured
    lens = [rng.randint(*prompt_range) for _ in range(batch)]
    budget = sum(padded_tokens(n + new, 16) for n in lens)
    eng = build_engine(model, device, "float32", budget, prompt_range[1] + new)
    sched, runner = eng.scheduler(overlap=eng.overlaps), eng.runner()
    vocab = eng.loaded.args.vocab_size
    reqs = [Request.greedy(i, [rng.randrange(3, vocab) for _ in range(n)], new)
            for i, n in enumerate(lens)]
    for r in reqs:
        r.ignore_eos = True
    sched.add_all(reqs, time.monotonic())
    inflight = None
    while sched.lanes:  # the prompts, as the scheduler packs them
        _, inflight, _ = turn(sched, runner, sched.schedule(), inflight)
    times = {p: [] for p in PHASES}
    pc = time.perf_counter
    for i in range(warmup + steps):
        t0 = pc()
        plan = sched.schedule()
        t1 = pc()
        step = runner.prepare(plan, inflight)
        t2 = pc()
        launched = runner.launch(step, inflight)
        if sched.overlap:
            sched.launched(plan)
            done_plan, waited = inflight, inflight
        else:
            done_plan, waited = launched, launched
        tokens = waited.wait() if waited is not None else None
        t3 = pc()
        if tokens is not None:
            sched.postprocess(done_plan.plan, tokens, time.monotonic(), waited.logprobs)
        t4 = pc()
        inflight = launched if sched.overlap else None
        if i >= warmup:
            for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[p].append(dt * 1e3)
    out = {p: round(statistics.median(v), 4) for p, v in times.items()}
    out["host"] = round(out["schedule"] + out["prepare"] + out["postprocess"], 4)
    out.update(batch=batch, steps=steps, runner=eng.runner_mode, model=model)
    return out


def host_path_table(batches: tuple[int, ...] = (1, 32, 256), steps: int = 200,
                    device: str = "cpu") -> list[dict]:
    """`measure` at each batch size, on one intra-op thread (the model's share of the step,
    `launch`, is not what is measured, and a thread pool waking on a busy machine is noise)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [measure(b, steps, device=device) for b in batches]
    finally:
        torch.set_num_threads(threads)


def render(rows: list[dict]) -> str:
    head = "| batch | " + " | ".join(PHASES) + " | host (ms/step) |\n"
    head += "| ---: |" + " ---: |" * (len(PHASES) + 1) + "\n"
    return head + "".join(
        f"| {r['batch']} | " + " | ".join(f"{r[p]:.3f}" for p in PHASES)
        + f" | **{r['host']:.3f}** |\n" for r in rows)


if __name__ == "__main__":
    import json
    import sys

    rows = host_path_table(steps=int(sys.argv[2]) if len(sys.argv) > 2 else 200)
    print(render(rows))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
