"""The benchmark ladder: each rung one scheduler decision, measured side by side in one run.

Rule: same machine, same model, same seeded workload, same worker binary, one run. A rung
is only a policy switch on the worker (`--policy`, benchmark-only), so the difference
between two rungs is attributable to that decision and nothing else:

  0 serial       one job at a time
  1 window       static batches of whatever arrived (up to 32), padded to the longest
                 prompt, run to the longest generation; admission refills as room frees
  2 budget       static batches formed by token-budget admission with hysteresis
  3 lanes        static batches taken from one length lane (pad-minimal prompts)
  4 continuous   sequences join and leave at step boundaries, packed (no padding)
  5 pipelined    rung 4's scheduler with the pipelined runner: each step's metadata in one
                 pinned asynchronous copy, decode steps replayed as CUDA graphs

Every rung runs at saturation: the whole workload is published at once and the broker
holds the backlog. With `sustained_s` every rung runs again under a closed loop that keeps
more jobs outstanding than the budget admits, read over its last three quarters (a burst
ends in a tail; continuous work does not); the fleet comparison can run both ways too.

Beside the ladder: the kernel-only ceiling (the same engine in this process, no broker, no
event loop; the better of a phased and a continuous schedule, see `kernel_ceiling`, so the
gap the worker leaves is a number) and a null-model run (the broker path alone: ingress,
admission, executor loop and drain with no model compute; the jobs are published before
the worker starts, so the figure is the worker's, see `loadgen.backlog`).

Rungs 0-4 run the eager runner, so the scheduler's decisions are measured apart from the
device plumbing; rung 5 changes only the runner (`--runner pipelined`). It is a GPU rung:
on a CPU the "device" is the same cores, a copy buys nothing and a fixed-shape decode step
only adds padding, so it is not in the default CPU ladder (`--rungs 0,1,2,3,4,5` runs it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from loadgen.arrivals import Arrival, Burst, Closed
from loadgen.backlog import collect, publish_backlog
from loadgen.broker import EmbeddedNats, delete_streams
from loadgen.client import reply_subject, run_jobs
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.gpubusy import BusySampler
from loadgen.report import build_report, window_rate
from loadgen.sessions import SessionSpec, run_sessions
from loadgen.workload import JobSpec, Uniform, WorkloadSpec, generate
from worker.broker.topology import RESULTS_STREAM

NULL_BUDGET = 65536  # 4096 one-block jobs in flight: the budget never limits the null run
# rung -> (name, scheduler policy, runner mode)
RUNGS: dict[int, tuple[str, str, str]] = {
    0: ("serial", "serial", "eager"), 1: ("window", "window", "eager"),
    2: ("budget", "budget", "eager"), 3: ("lanes", "lanes", "eager"),
    4: ("continuous", "continuous", "eager"), 5: ("pipelined", "continuous", "pipelined")}


def default_rungs(device: str) -> tuple[int, ...]:
    return tuple(RUNGS) if device.startswith("cuda") else (0, 1, 2, 3, 4)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    jobs: int = 300
    seed: int = 0
    model: str = "builtin:small"
    device: str = "cpu"
    dtype: str = "float32"
    token_budget: int = 8192
    low_water: int = 6144  # 75%: admission groups stay large and occupancy stays above 90%
    max_seq_len: int = 1088
    rungs: tuple[int, ...] = (0, 1, 2, 3, 4)
    serial_jobs: int = 0  # rung 0 on a subset (it is slow); 0 = the whole workload
    null_jobs: int = 20000
    fleet_jobs: int = 0  # jobs for the fleet-scaling run (one vs two one-core workers); 0 = skip
    # Seconds of sustained load (a closed loop) for the same comparison; 0 = skip. Its
    # rate is read over the last three quarters: no ramp, and no tail of a finite run.
    fleet_sustained_s: float = 0.0
    # Each rung again under this many seconds of sustained load (closed loop), read the
    # same way; 0 = skip. A burst of `jobs` ends in a tail; continuous work does not.
    sustained_s: float = 0.0
    # Agent traffic (loadgen.sessions): this many sessions, 0 = skip; run with the prefix
    # cache on and off, and on two workers sharing one consumer.
    agent_sessions: int = 0
    # An embedding checkpoint (sentence-transformers directory): the embedding table, with
    # this many texts; "" = skip (loadgen.embedbench).
    embed_model: str = ""
    embed_jobs: int = 2000
    agent_turns: int = 4
    agent_system_prompts: int = 4
    agent_system_tokens: tuple[int, int] = (300, 700)
    ceiling_runs: int = 3  # the ceiling reported is the median of these
    ceiling_runner: str = "auto"  # the device's default: pipelined on CUDA, eager on the CPU
    timeout_s: float = 1800.0

    def engine_fields(self, url: str, stream: str, model: str | None = None) -> dict[str, Any]:
        return {"nats_url": url, "stream": stream, "consumer": "bench", "model": model or self.model,
                "device": self.device, "dtype": self.dtype, "token_budget": self.token_budget,
                "low_water": self.low_water, "max_seq_len": self.max_seq_len}


def saturating_outstanding(cfg: BenchConfig, workers: int = 1) -> int:
    """Jobs a closed loop keeps outstanding so that every worker always has jobs waiting:
    twice what one budget admits at once at about 160 padded tokens a job."""
    return max(64, 2 * cfg.token_budget // 160) * workers


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "commit": commit or None}


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


def log_event(log_path: Path, event: str) -> dict[str, Any]:
    """The last `event` line of a worker's JSON log, parsed ({} if there is none)."""
    for line in reversed(log_path.read_text().splitlines()):
        if f'"{event}"' in line:
            return json.loads(line)
    return {}


def run_rung(cfg: BenchConfig, broker: EmbeddedNats, work: Path, name: str, policy: str,
             jobs: list[JobSpec], model: str | None = None,
             cpus: tuple[str, ...] = ("",), runner: str = "auto", arrival: Arrival = Burst(),
             duration_s: float = 0.0, sessions: SessionSpec | None = None,
             worker_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One worker per entry of `cpus` ("" = unpinned) on one consumer, the workload at once
    (or as `arrival` says). With `duration_s` the run stops then, whatever is left, and its
    `sustained` rate is read over the last three quarters of it (`window_rate`). With
    `sessions`, agent traffic instead of `jobs` (`loadgen.sessions`)."""
    stream = f"BENCH_{name.upper()}"
    asyncio.run(delete_streams(broker.url, stream))
    conf = write_engine_toml(work / f"{name}.toml", cfg.engine_fields(broker.url, stream, model))
    provision(conf)
    workers = [WorkerProcess(conf, worker_id=f"{name}-{i}", log_path=work / f"{name}-{i}.log",
                             extra_args=("--policy", policy, "--runner", runner, *worker_args)
                             + (("--cpus", c) if c else ()))
               for i, c in enumerate(cpus)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(300)
        with BusySampler(cfg.device) as busy:
            if sessions is not None:
                stats = asyncio.run(run_sessions(broker.url, dataclasses.replace(
                    sessions, run_id=name), timeout_s=cfg.timeout_s))
            else:
                stats = asyncio.run(run_jobs(broker.url, jobs, run_id=name, progress=False,
                                             timeout_s=duration_s or cfg.timeout_s,
                                             arrival=arrival))
    finally:
        for w in workers:
            w.terminate(grace_s=30)
    asyncio.run(delete_streams(broker.url, stream))
    rep = build_report(stats)
    log = workers[0].log_path
    s = log_event(log, "worker_summary")
    ready = log_event(log, "runner_ready")
    return {
        "policy": policy, "runner": ready.get("mode"), "decode_graphs": ready.get("decode_graphs"),
        "graphed_step_fraction": s.get("graphed_step_fraction"), "jobs": len(stats.job_ids),
        "jobs_ok": rep["jobs_ok"], "jobs_by_worker": rep["workers"], "wall_s": rep["wall_s"],
        "jobs_per_s": rep["jobs_per_s"], "useful_tokens_per_s": rep["useful_tokens_per_s"],
        "padding_fraction": rep["padding_fraction"], "latency_ms": rep["latency_ms"],
        "cache_hit_fraction": rep["cache_hit_fraction"],
        "ttft_ms": rep["ttft_ms"],
        "budget_occupancy_while_queued": s.get("budget_occupancy_while_queued"),
        "attn_padding_fraction": s.get("attn_padding_fraction"),
        "mean_batch_rows": s.get("mean_batch_rows"),
        "idle_while_queued_s": s.get("idle_while_queued_s"),
        # Time in executor steps over the run's wall time: how saturated the executor was
        # (on a GPU each step ends in its one sync, so this bounds device busy from above;
        # fabric_gpu_utilization on /metrics is NVML's own figure).
        "executor_busy_fraction": (s["busy_s"] / rep["wall_s"]
                                   if s.get("busy_s") is not None and rep["wall_s"] else None),
        # NVML's kernel-running share, sampled every 0.1 s over the run (None without a GPU).
        "device_busy_fraction": busy.mean,
        "completions": {o.id.split("-", 1)[1]: o.completion_tokens
                        for o in stats.outcomes.values()},
        "sustained": window_rate(stats, duration_s / 4, duration_s) if duration_s else None,
        "outstanding": arrival.concurrency if isinstance(arrival, Closed) else None,
    }


def run_sustained(cfg: BenchConfig, broker: EmbeddedNats, work: Path, name: str, policy: str,
                  seconds: float, cpus: tuple[str, ...] = ("",),
                  runner: str = "auto") -> dict[str, Any]:
    """`run_rung` under `seconds` of a closed loop keeping every worker's queue full, on
    the seeded workload made long enough for any plausible rate (the run stops at its
    duration, whatever is left); its `sustained` rate is read over the last three quarters."""
    jobs = generate(WorkloadSpec(num_jobs=int(seconds * 100 * len(cpus)) + 1000, seed=cfg.seed,
                                 run_id=name))
    r = run_rung(cfg, broker, work, name, policy, jobs, cpus=cpus, runner=runner,
                 arrival=Closed(saturating_outstanding(cfg, len(cpus))), duration_s=seconds)
    r.pop("completions")
    return r


# The fleet's two arrangements: one worker vs two on one consumer, pinned to a core each
# (`--cpus`), and co-located (no flags: both on every core, as `compose up --scale` runs them).
FLEET_ARRANGEMENTS = {"pinned": (("0",), ("0", "1")), "colocated": (("",), ("", ""))}


def run_fleet(cfg: BenchConfig, broker: EmbeddedNats, work: Path, log,
              partial=lambda: None) -> dict[str, Any]:
    """One worker, then two, on one consumer: the jobs/s ratio says whether adding a worker
    adds its share. Twice: pinned to one core each, and co-located with no flags (the
    workers size their threads themselves and must not collapse on shared cores). Each is
    measured two ways: a burst of `fleet_jobs` timed from the first publish to the last
    Result (a finite run's tail -- one worker finishing its last admission while the other
    has nothing left -- counts), and `fleet_sustained_s` of a closed loop that keeps every
    worker's queue full, read over its last three quarters (what a fleet on continuous
    work does). The pinned burst stays at the top level of the result (`one`, `two`,
    `ratio`, `sustained`) as before; the co-located pair is `colocated`."""
    out: dict[str, Any] = {}
    for arrangement, pair in FLEET_ARRANGEMENTS.items():
        fleet: dict[str, Any] = {}
        sustained: dict[str, Any] = {}
        for name, cpus in zip(("one", "two"), pair):
            what = (f"{len(cpus)} worker(s), one core each" if arrangement == "pinned"
                    else f"{len(cpus)} worker(s) sharing the cores, no flags")
            tag = f"{arrangement[:3]}{name}"
            if cfg.fleet_jobs:
                jobs = generate(WorkloadSpec(num_jobs=cfg.fleet_jobs, seed=cfg.seed,
                                             run_id=f"fleet{tag}"))
                log(f"fleet: {what}, {cfg.fleet_jobs} jobs ...")
                r = run_rung(cfg, broker, work, f"fleet{tag}", "continuous", jobs, cpus=cpus)
                r.pop("completions")
                fleet[name] = r
                partial()
                log(f"  {r['jobs_per_s']:.1f} jobs/s")
            if cfg.fleet_sustained_s:
                log(f"fleet: {what}, {cfg.fleet_sustained_s:.0f} s at "
                    f"{saturating_outstanding(cfg, len(cpus))} outstanding ...")
                r = run_sustained(cfg, broker, work, f"steady{tag}", "continuous",
                                  cfg.fleet_sustained_s, cpus=cpus)
                sustained[name] = r
                partial()
                log(f"  {r['sustained']['jobs_per_s']:.1f} jobs/s sustained")
        if fleet:
            fleet["ratio"] = fleet["two"]["jobs_per_s"] / fleet["one"]["jobs_per_s"]
        if sustained:
            sustained["ratio"] = (sustained["two"]["sustained"]["jobs_per_s"]
                                  / sustained["one"]["sustained"]["jobs_per_s"])
            fleet["sustained"] = sustained
        if arrangement == "pinned":
            out.update(fleet)
        else:
            out["colocated"] = fleet
    return out


def run_agent(cfg: BenchConfig, broker: EmbeddedNats, work: Path, log,
              partial=lambda: None) -> dict[str, Any]:
    """Agent traffic on rung 4's worker: prefix caching on, off (`--no-prefix-cache`), and
    on two one-core workers sharing the consumer (sessions spread over both, so a session's
    next turn lands on the worker that holds its prefix about half the time)."""
    spec = SessionSpec(sessions=cfg.agent_sessions, system_prompts=cfg.agent_system_prompts,
                       turns=cfg.agent_turns, system_tokens=cfg.agent_system_tokens,
                       seed=cfg.seed)
    if spec.longest_job() > cfg.max_seq_len:
        raise ValueError(f"agent jobs reach {spec.longest_job()} tokens, over max_seq_len "
                         f"{cfg.max_seq_len}: fewer turns or shorter system prompts")
    out: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    for label, cpus, args in (("cache", ("",), ()), ("no_cache", ("",), ("--no-prefix-cache",)),
                              ("two_workers", ("0", "1"), ())):
        log(f"agent traffic, {label.replace('_', ' ')}: {spec.sessions} sessions x "
            f"{spec.turns} turns ...")
        r = run_rung(cfg, broker, work, f"agent{label.replace('_', '')}", "continuous", [],
                     cpus=cpus, sessions=spec, worker_args=args)
        r.pop("completions")
        out[label] = r
        partial()
        log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s, prompt from cache "
            f"{r['cache_hit_fraction']:.3f}")
    out["ratio"] = out["cache"]["useful_tokens_per_s"] / out["no_cache"]["useful_tokens_per_s"]
    return out


def run_embed(cfg: BenchConfig, broker: EmbeddedNats, work: Path, log,
              partial=lambda: None) -> dict[str, Any]:
    """The embedding table (`loadgen.embedbench`): an embedding worker through NATS, a
    consumer as a user would write it, and the kernel-only ceiling, on the same texts."""
    import torch

    from loadgen import embedbench as eb
    from worker.model.embed_checkpoint import load_encoder

    limit = load_encoder(Path(cfg.embed_model), torch.float32,
                         torch.device("cpu")).info.max_seq_len
    jobs = eb.embed_jobs(cfg.embed_jobs, cfg.seed, limit, "emb")
    ids = eb.token_counts(cfg.embed_model, [j.prompt for j in jobs])
    tokens = sum(map(len, ids))
    out: dict[str, Any] = {"texts": len(jobs), "tokens": tokens, "model_limit": limit}
    log(f"embeddings, worker: {len(jobs)} texts, {tokens} tokens ...")
    ecfg = dataclasses.replace(cfg, max_seq_len=limit)
    r = run_rung(ecfg, broker, work, "embed", "continuous", jobs, model=cfg.embed_model)
    r.pop("completions", None)
    out["worker"] = r
    partial()
    log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s")
    log("embeddings, a consumer with SentenceTransformer.encode ...")
    out["consumer"] = eb.consumer(broker.url, cfg.embed_model, jobs, "bench",
                                  {j.id: len(i) for j, i in zip(jobs, ids)})
    partial()
    if out["consumer"]:
        log(f"  {out['consumer']['useful_tokens_per_s']:.0f} useful tok/s, padding "
            f"{out['consumer']['padding_fraction']:.3f}")
    log("embeddings, kernel-only ceiling ...")
    out["ceiling"] = eb.ceiling(cfg.embed_model, ids, max(limit, 2048))  # the worker's step cap
    if out["consumer"]:
        out["worker_over_consumer"] = (r["useful_tokens_per_s"]
                                       / out["consumer"]["useful_tokens_per_s"])
    out["worker_over_ceiling"] = r["useful_tokens_per_s"] / out["ceiling"]["useful_tokens_per_s"]
    log(f"  {out['ceiling']['useful_tokens_per_s']:.0f} useful tok/s; worker / ceiling "
        f"{out['worker_over_ceiling']:.3f}")
    return out


def run_backlog(cfg: BenchConfig, broker: EmbeddedNats, work: Path, name: str,
                jobs: list[JobSpec], model: str | None = None) -> dict[str, Any]:
    """The workload published first, then one worker started on it (`loadgen.backlog`)."""
    stream = f"BENCH_{name.upper()}"
    asyncio.run(delete_streams(broker.url, stream))
    conf = write_engine_toml(work / f"{name}.toml", cfg.engine_fields(broker.url, stream, model))
    provision(conf)
    reply = reply_subject(name)
    asyncio.run(publish_backlog(broker.url, jobs, f"fabric.jobs.{name}", reply))
    w = WorkerProcess(conf, worker_id=f"{name}-0", log_path=work / f"{name}-0.log",
                      extra_args=("--policy", "continuous"))
    try:
        w.start()
        w.wait_ready(300)
        run = asyncio.run(collect(broker.url, RESULTS_STREAM, reply, jobs, cfg.timeout_s))
    finally:
        w.terminate(grace_s=30)
    asyncio.run(delete_streams(broker.url, stream))
    return {"method": "backlog", "jobs": len(jobs), "results": run.results, "unique": run.unique,
            "ok": run.ok, "missing": len(run.missing), "span_s": run.span_s,
            "jobs_per_s": run.jobs_per_s}


def run_bench(cfg: BenchConfig, out: Path, log=print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)

    def partial(result: dict[str, Any]) -> None:
        # Everything measured so far, so a run cut short (a lent machine's time limit)
        # still leaves its figures; ladder.json replaces it at the end.
        (out / "ladder.partial.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    result: dict[str, Any] = {"machine": machine(), "config": dataclasses.asdict(cfg),
                              "rungs": {}}
    with EmbeddedNats() as broker:
        for rung, (label, policy, runner) in RUNGS.items():
            if rung not in cfg.rungs:
                continue
            n = cfg.serial_jobs if rung == 0 and cfg.serial_jobs else cfg.jobs
            jobs = generate(WorkloadSpec(num_jobs=n, seed=cfg.seed, run_id=f"r{rung}"))
            log(f"rung {rung} ({label}): {n} jobs ...")
            r = run_rung(cfg, broker, work, f"r{rung}", policy, jobs, runner=runner)
            r["rung"] = label
            result["rungs"][str(rung)] = r
            partial(result)
            log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s, padding {r['padding_fraction']:.3f}")
            if cfg.sustained_s:
                log(f"rung {rung} ({label}): {cfg.sustained_s:.0f} s sustained ...")
                r = run_sustained(cfg, broker, work, f"s{rung}", policy, cfg.sustained_s,
                                  runner=runner)
                r["rung"] = label
                result.setdefault("sustained", {})[str(rung)] = r
                partial(result)
                log(f"  {r['sustained']['useful_tokens_per_s']:.0f} useful tok/s sustained")
        if cfg.null_jobs:
            # Small jobs under a big budget: the broker path is measured, not the budget.
            jobs = generate(WorkloadSpec(num_jobs=cfg.null_jobs, seed=cfg.seed, run_id="null",
                                         prompt_lengths=Uniform(4, 12), max_new_tokens=1))
            log(f"null model: {cfg.null_jobs} jobs ...")
            null_cfg = dataclasses.replace(cfg, token_budget=NULL_BUDGET, low_water=NULL_BUDGET // 2)
            r = run_backlog(null_cfg, broker, work, "null", jobs, model="builtin:null")
            result["null_model"] = r
            partial(result)
            log(f"  {r['jobs_per_s']:.0f} jobs/s ({r['unique']} of {r['jobs']} answered, "
                f"{r['results'] - r['unique']} duplicates)")
        if cfg.fleet_jobs or cfg.fleet_sustained_s:
            result["fleet"] = run_fleet(cfg, broker, work, log, partial=lambda: partial(result))
        if cfg.agent_sessions:
            result["agent"] = run_agent(cfg, broker, work, log, partial=lambda: partial(result))
        if cfg.embed_model:
            result["embed"] = run_embed(cfg, broker, work, log, partial=lambda: partial(result))
    jobs = generate(WorkloadSpec(num_jobs=cfg.jobs, seed=cfg.seed, run_id="r4"))
    top = result["rungs"].get("4", {}).get("completions", {})
    log(f"kernel-only ceiling ({cfg.ceiling_runs} runs, median) ...")
    # One run swings by 10-30 % with whatever else the machine does; the median of a few
    # is what the rungs are compared with, and every run is kept in the JSON.
    runs = sorted((kernel_ceiling(cfg, jobs, {f"r4-{k}": v for k, v in top.items()})
                   for _ in range(cfg.ceiling_runs)), key=lambda c: c["useful_tokens_per_s"])
    for c in runs:
        c.pop("lengths")
    ceiling = dict(runs[len(runs) // 2])
    ceiling["runs_useful_tokens_per_s"] = [c["useful_tokens_per_s"] for c in runs]
    result["ceiling"] = ceiling
    log(f"  {ceiling['useful_tokens_per_s']:.0f} useful tok/s "
        f"(runs: {', '.join(f'{c:.0f}' for c in ceiling['runs_useful_tokens_per_s'])}; "
        f"schedules: {', '.join(c['schedule'] for c in runs)})")
    for r in result["rungs"].values():
        r.pop("completions", None)
    (out / "ladder.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ladder.partial.json").unlink(missing_ok=True)
    (out / "ladder.md").write_text(markdown(result))
    chart(result, out / "ladder.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    ceil = result["ceiling"]["useful_tokens_per_s"]
    base = result["rungs"].get("1", {}).get("useful_tokens_per_s")
    serial = result["rungs"].get("0", {}).get("useful_tokens_per_s")
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch "
             f"{m['torch']}, commit {m['commit']}", "",
             "| rung | policy | useful tok/s | x window | x serial | % of ceiling | padding | "
             "occupancy while queued | executor busy | device busy | p50 / p99 latency ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in sorted(result["rungs"].items()):
        tps = r["useful_tokens_per_s"]
        occ = r["budget_occupancy_while_queued"]
        busy = r.get("executor_busy_fraction")
        dev = r.get("device_busy_fraction")
        x = f"{tps / base:.2f}" if base else "-"
        xs = f"{tps / serial:.1f}" if serial else "-"
        lines.append(
            f"| {k} | {r.get('rung', r['policy'])} | {tps:,.0f} | {x} | {xs} | "
            f"{100 * tps / ceil:.1f}% | "
            f"{100 * r['padding_fraction']:.1f}% | {'-' if occ is None else f'{100 * occ:.1f}%'} | "
            f"{'-' if busy is None else f'{100 * busy:.1f}%'} | "
            f"{'-' if dev is None else f'{100 * dev:.1f}%'} | "
            f"{r['latency_ms']['p50']:,.0f} / {r['latency_ms']['p99']:,.0f} |")
    runs = ", ".join(f"{c:,.0f}" for c in result["ceiling"].get("runs_useful_tokens_per_s", []))
    sched = result["ceiling"].get("schedule", "phased")
    lines.append(f"| - | kernel-only ceiling ({sched}; median of {runs}) | {ceil:,.0f} | | | "
                 "100% | 0.0% | | | | |")
    sus = result.get("sustained", {})
    if sus:
        first = next(iter(sus.values()))
        w = first["sustained"]
        sbase = sus.get("1", {}).get("sustained", {}).get("useful_tokens_per_s")
        sserial = sus.get("0", {}).get("sustained", {}).get("useful_tokens_per_s")
        secs = result["config"]["sustained_s"]
        lines += ["", f"Sustained load: each rung again for {secs:.0f} s "
                  f"of a closed loop keeping {first['outstanding']} jobs outstanding, "
                  f"read over {w['start_s']:.0f}-{w['end_s']:.0f} s:", "",
                  "| rung | policy | useful tok/s | x window | x serial | % of ceiling | jobs/s |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in sorted(sus.items()):
            tps = r["sustained"]["useful_tokens_per_s"]
            lines.append(f"| {k} | {r['rung']} | {tps:,.0f} | "
                         f"{f'{tps / sbase:.2f}' if sbase else '-'} | "
                         f"{f'{tps / sserial:.1f}' if sserial else '-'} | "
                         f"{100 * tps / ceil:.1f}% | {r['sustained']['jobs_per_s']:.1f} |")
    graphed = {k: r for k, r in sorted(result["rungs"].items()) if r.get("runner") == "pipelined"}
    for k, r in graphed.items():
        frac = r.get("graphed_step_fraction")
        lines += ["", f"Rung {k} runner: decode graphs {r.get('decode_graphs')}; fixed-shape "
                  f"decode steps {'-' if frac is None else f'{100 * frac:.1f}%'} of all steps."]
    f = result.get("fleet", {})
    for label, fl in (("two one-core workers", f), ("two workers sharing the cores, no flags",
                                                     f.get("colocated", {}))):
        if "ratio" in fl:
            lines += ["", f"Fleet, a burst of {fl['one']['jobs']} jobs: {label} on one "
                      f"consumer {fl['two']['jobs_per_s']:.1f} jobs/s, one "
                      f"{fl['one']['jobs_per_s']:.1f} jobs/s: ratio {fl['ratio']:.2f}."]
        if "sustained" in fl:
            st = fl["sustained"]
            one, two = st["one"]["sustained"], st["two"]["sustained"]
            lines += ["", f"Fleet, sustained ({one['start_s']:.0f}-{one['end_s']:.0f} s of a "
                      f"closed loop): {label} {two['jobs_per_s']:.1f} jobs/s, one "
                      f"{one['jobs_per_s']:.1f} jobs/s: ratio {st['ratio']:.2f}."]
    if "agent" in result:
        a = result["agent"]
        sp = a["spec"]
        lines += ["", f"Agent traffic ({sp['sessions']} sessions x {sp['turns']} turns, "
                  f"{sp['system_prompts']} system prompts of {sp['system_tokens'][0]}-"
                  f"{sp['system_tokens'][1]} tokens, each turn's prompt the last one plus "
                  "its reply and a user message):", "",
                  "| worker | useful tok/s | jobs/s | prompt from cache | p50 / p99 latency ms |",
                  "|---|---|---|---|---|"]
        for label in ("cache", "no_cache", "two_workers"):
            r = a[label]
            lat = r["latency_ms"]
            lines.append(f"| {label.replace('_', ' ')} | {r['useful_tokens_per_s']:,.0f} | "
                         f"{r['jobs_per_s']:.1f} | {100 * r['cache_hit_fraction']:.1f}% | "
                         f"{lat['p50']:,.0f} / {lat['p99']:,.0f} |")
        lines += ["", f"Prefix caching on over off: {a['ratio']:.2f}x useful tokens/s."]
    if "embed" in result:
        e = result["embed"]
        lines += ["", f"Embeddings ({e['texts']:,} texts, {e['tokens']:,} tokens, lognormal "
                  f"lengths up to the model's {e['model_limit']}):", "",
                  "| way | useful tok/s | dense padding | attention padding |", "|---|---|---|---|"]
        w = e["worker"]
        lines.append(f"| worker through NATS | {w['useful_tokens_per_s']:,.0f} | 0.0% | "
                     f"{100 * (w.get('attn_padding_fraction') or 0):.1f}% |")
        if e["consumer"]:
            c = e["consumer"]
            lines.append(f"| consumer, SentenceTransformer.encode, 32 a batch | "
                         f"{c['useful_tokens_per_s']:,.0f} | {100 * c['padding_fraction']:.1f}% | "
                         "(padded batch) |")
        lines.append(f"| kernel-only ceiling, perfectly packed | "
                     f"{e['ceiling']['useful_tokens_per_s']:,.0f} | 0.0% | - |")
        if e.get("worker_over_consumer"):
            lines += ["", f"Worker over consumer: {e['worker_over_consumer']:.2f}x; worker over "
                      f"ceiling: {100 * e['worker_over_ceiling']:.1f}%."]
    if "null_model" in result:
        n = result["null_model"]
        lines += ["", f"Null model (broker path alone): {n['jobs_per_s']:,.0f} jobs/s through one "
                  f"worker ({n['jobs']:,} jobs published first, timed by the results stream; "
                  f"{n['unique']:,} answered, {n['results'] - n['unique']} duplicates)."]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the `bench` extra is not installed: JSON and markdown still written
    names = [f"{k} {r.get('rung', r['policy'])}" for k, r in sorted(result["rungs"].items())]
    names.append("ceiling")
    vals = [r["useful_tokens_per_s"] for _, r in sorted(result["rungs"].items())]
    vals.append(result["ceiling"]["useful_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, vals, color=["#888"] * (len(vals) - 1) + ["#2a6"])
    ax.set_ylabel("useful tokens/s")
    m = result["machine"]
    ax.set_title(f"Inference Fabric ladder — {m['gpu'] or m['cpu']} ({m['cores']} cores)",
                 fontsize=9)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
