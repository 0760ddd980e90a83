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

import os
import random
import statistics
import time

PHASES = ("schedule", "prepare", "launch", "postprocess")


def steady(batch: int, new: int, model: str = "builtin:null", device: str = "cpu",
           dtype: str = "float32", prompt_range: tuple[int, int] = (32, 512),
           seed: int = 0) -> tuple:
    """(engine, scheduler, runner, step in flight) with `batch` sequences prefilled and
    ready to decode `new` tokens each (none of them ends before)."""
    from worker.engine.blocks import padded_tokens
    from worker.engine.build import build_engine
    from worker.engine.sequence import Request
    from worker.engine.scheduler import StepPlan
    from worker.engine.step import turn

    rng = random.Random(seed)
    lens = [rng.randint(*prompt_range) for _ in range(batch)]
    budget = sum(padded_tokens(n + new, 16) for n in lens)
    eng = build_engine(model, device, dtype, budget, prompt_range[1] + new)
    sched, runner = eng.scheduler(overlap=eng.overlaps), eng.runner()
    vocab = eng.loaded.args.vocab_size
    reqs = [Request.greedy(i, [rng.randrange(3, vocab) for _ in range(n)], new)
            for i, n in enumerate(lens)]
    for r in reqs:
        r.ignore_eos = True
    sched.add_all(reqs, time.monotonic())
    # Every prompt first, in prefill-only steps (as the kernel ceiling's phased schedule
    # does): a scheduler step would decode the first prompts while it prefills the rest,
    # and with long prompts those would end before the last one started.
    seqs = [s for q in sched.lanes.values() for s in q]
    sched.lanes.clear()
    inflight, i = None, 0
    while i < len(seqs):
        plan, rows = StepPlan(), 0
        plan.batch = sched.batch
        while i < len(seqs) and (not rows or rows + len(seqs[i].req.prompt)
                                 <= eng.max_step_tokens):
            plan.prefill.append([seqs[i]])
            rows += len(seqs[i].req.prompt)
            i += 1
        _, inflight, _ = turn(sched, runner, plan, inflight)
    sched.running = seqs  # (a step's postprocess keeps only its own rows running)
    sched._running_rows = None
    return eng, sched, runner, inflight


def measure(batch: int, steps: int = 200, warmup: int = 20, model: str = "builtin:null",
            prompt_range: tuple[int, int] = (32, 512), seed: int = 0,
            device: str = "cpu") -> dict:
    """Median ms per phase over `steps` decode steps at `batch` rows (after `warmup`)."""
    eng, sched, runner, inflight = steady(batch, warmup + steps + 8, model, device,
                                          prompt_range=prompt_range, seed=seed)
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


def trace(out: str, model: str = "builtin:1b", device: str = "cuda", dtype: str = "bfloat16",
          batch: int = 64, steps: int = 50, warmup: int = 10) -> dict:
    """A `torch.profiler` trace of `steps` decode steps at `batch` rows of the executor's own
    loop (`turn`: overlapped on CUDA), written gzipped in Chrome's format to `out`, and the
    operators' table beside it (`out` with .txt): where a step's time goes, host and
    device, for anyone to open in Perfetto."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    from worker.engine.step import turn

    eng, sched, runner, inflight = steady(batch, warmup + steps + 8, model, device, dtype)
    for _ in range(warmup):
        _, inflight, _ = turn(sched, runner, sched.schedule(), inflight)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            _, inflight, _ = turn(sched, runner, sched.schedule(), inflight)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    raw = out[:-3] if out.endswith(".gz") else out
    os.makedirs(os.path.dirname(os.path.abspath(raw)), exist_ok=True)
    prof.export_chrome_trace(raw)
    with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    with open(raw.rsplit(".", 1)[0] + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
    return {"trace": raw + ".gz", "steps": steps, "batch": batch, "model": model,
            "runner": eng.runner_mode, "ms_per_step": 1e3 * wall / steps}


def render(rows: list[dict]) -> str:
    head = "| batch | " + " | ".join(PHASES) + " | host (ms/step) |\n"
    head += "| ---: |" + " ---: |" * (len(PHASES) + 1) + "\n"
    return head + "".join(
        f"| {r['batch']} | " + " | ".join(f"{r[p]:.3f}" for p in PHASES)
        + f" | **{r['host']:.3f}** |\n" for r in rows)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="the host path table, or a profiler trace")
    ap.add_argument("--json", help="write the table's rows here")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--trace", help="instead: a trace of decode steps to this .json.gz")
    ap.add_argument("--model", default="builtin:1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    if a.trace:
        print(json.dumps(trace(a.trace, a.model, a.device, a.dtype, a.batch, a.steps)))
    else:
        rows = host_path_table(steps=a.steps)
        print(render(rows))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
