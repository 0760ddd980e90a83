"""One measured run of the bench: workers on one consumer, a workload through them, figures back.

Rule: every table of `fabric-loadgen bench` is made of these runs, so each is measured the
same way: the same worker binary started by `loadgen.fleet`, one fresh stream per run, the
load client's report (`loadgen.report`) for what producers see and the worker's own
`worker_summary` log line for what it saw. `BenchConfig` is the bench's whole configuration;
`machine` names what a figure was measured on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import threading
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
from loadgen.workload import JobSpec, WorkloadSpec, generate
from worker.broker.topology import RESULTS_STREAM


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
    # A bulk backlog and urgent jobs published during it (loadgen.prioritybench), on one
    # worker and on two; (0, 0) = skip.
    priority_mix: tuple[int, int] = (0, 0)
    # An embedding checkpoint (sentence-transformers directory): the embedding table, with
    # this many texts; "" = skip (loadgen.embedbench).
    embed_model: str = ""
    embed_jobs: int = 2000
    host_path_steps: int = 200  # decode steps per batch size for the host-path table (0: skip)
    peer_jobs: int = 0  # the same jobs through transformers' generate_batch (0: skip)
    peer_max_new: int = 128
    agent_turns: int = 4
    agent_system_prompts: int = 4
    agent_system_tokens: tuple[int, int] = (300, 700)
    agent_kv_pool_blocks: int = 0  # the agent workers' device KV pool (0: the default size)
    # The agent table compares the host tier on and off (GPU workers) instead of the cache
    # on, off and on two workers: with a small pool, what the tier buys.
    agent_host_tier: bool = False
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
             worker_args: tuple[str, ...] = (), kill_after_s: float = 0.0,
             ack_wait_s: float | None = None) -> dict[str, Any]:
    """One worker per entry of `cpus` ("" = unpinned) on one consumer, the workload at once
    (or as `arrival` says). With `duration_s` the run stops then, whatever is left, and its
    `sustained` rate is read over the last three quarters of it (`window_rate`). With
    `sessions`, agent traffic instead of `jobs` (`loadgen.sessions`). With `kill_after_s`,
    the last worker is killed with SIGKILL that long after the traffic starts (its unacked
    jobs come back to the others after the consumer's ack wait, `ack_wait_s`), and the
    results stream is counted: `results_stored` holds how many Results it kept per job."""
    stream = f"BENCH_{name.upper()}"
    asyncio.run(delete_streams(broker.url, stream))
    conf = write_engine_toml(work / f"{name}.toml", cfg.engine_fields(broker.url, stream, model))
    provision(conf, extra_args=("--ack-wait-s", f"{ack_wait_s:g}") if ack_wait_s else ())
    workers = [WorkerProcess(conf, worker_id=f"{name}-{i}", log_path=work / f"{name}-{i}.log",
                             extra_args=("--policy", policy, "--runner", runner, *worker_args)
                             + (("--cpus", c) if c else ()))
               for i, c in enumerate(cpus)]
    killer = threading.Timer(kill_after_s, workers[-1].kill) if kill_after_s else None
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(300)
        if killer is not None:
            killer.start()
        with BusySampler(cfg.device) as busy:
            if sessions is not None:
                stats = asyncio.run(run_sessions(broker.url, dataclasses.replace(
                    sessions, run_id=name), timeout_s=cfg.timeout_s))
            else:
                stats = asyncio.run(run_jobs(broker.url, jobs, run_id=name, progress=False,
                                             timeout_s=duration_s or cfg.timeout_s,
                                             arrival=arrival))
        rss_mib = peak_rss_mib(workers[0].pid)
        stored = (asyncio.run(results_stored(broker.url, reply_subject(stats.run_id)))
                  if killer is not None else None)
    finally:
        if killer is not None:
            killer.cancel()
        for w in workers:
            w.terminate(grace_s=30)
    asyncio.run(delete_streams(broker.url, stream))
    rep = build_report(stats)
    log = workers[0].log_path
    s = log_event(log, "worker_summary")
    ready = log_event(log, "runner_ready")
    engine = log_event(log, "engine_ready")
    return {
        "policy": policy, "runner": ready.get("mode"), "decode_graphs": ready.get("decode_graphs"),
        "graphed_step_fraction": s.get("graphed_step_fraction"), "jobs": len(stats.job_ids),
        "jobs_ok": rep["jobs_ok"], "jobs_by_worker": rep["workers"], "wall_s": rep["wall_s"],
        "worker_done_s": rep["worker_done_s"],
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
        # The first worker's KV pool (blocks; the budget's share of them) and peak RSS.
        "kv_blocks": engine.get("kv_blocks"), "kv_budget_blocks": engine.get("kv_budget_blocks"),
        "block_size": engine.get("block_size"), "rss_mib": rss_mib,
        "kv": s.get("kv"),  # the first worker's KV counters: hits and copies by tier
        # With a kill: the Results the results stream kept (one per job: the duplicates a
        # replay publishes again are dropped by the stream's duplicate window), and the
        # Results seen twice on the reply subject itself (core delivery, before that).
        "killed_after_s": kill_after_s or None, "results_stored": stored,
        "redelivered": s.get("redelivered"),  # the first worker's: jobs that came back to it
        "duplicates_on_reply_subject": rep.get("duplicates"),
        **({"token_log": stats.token_log} if sessions is not None else {}),
    }


async def results_stored(url: str, subject: str) -> int:
    """How many messages the results stream holds on `subject`."""
    import nats
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(RESULTS_STREAM, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def peak_rss_mib(pid: int | None) -> float | None:
    """A live process's peak resident memory (VmHWM), None if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


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
