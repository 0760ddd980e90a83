"""Soak: one worker at saturation for a long time, its resident memory sampled throughout.

Rule: the worker must not grow. The KV pool and the model are allocated at start-up and
every queue is bounded, so after warm-up the resident set should be flat; a leak (a map
that is never pruned, a tensor kept per job) shows up here as a slope. The load is a closed
loop with more jobs outstanding than the budget admits, so jobs always wait for admission
and the worker never idles. Growth is read three ways (`growth`): last window's median over
the first's, the fitted trend, and each half's peak.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from loadgen.arrivals import Closed
from loadgen.rung import BenchConfig, log_event, machine, saturating_outstanding
from loadgen.broker import EmbeddedNats
from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.report import build_report
from loadgen.workload import WorkloadSpec, generate


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float):
        super().__init__(daemon=True, name="rss-sampler")
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.wait(self.every_s):
            try:
                self.samples.append((time.monotonic() - t0, self.proc.memory_info().rss))
            except psutil.Error:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def growth(samples: list[tuple[float, int]], warmup_s: float, window_s: float) -> dict[str, Any]:
    """Three readings of the RSS after warm-up, for three kinds of memory behaviour.

    - `growth_fraction`: the median of the last window over the median of the first. Right
      for a flat resident set; when the RSS swings up and down (the allocator returning
      pages and taking them again), it says whatever the two windows' phases say.
    - `trend_fraction`: a least-squares line through every sample after warm-up, its rise
      over the run relative to where it starts. A leak is a slope; a swing is not.
    - the peak of each half: a leak raises the second half's high-water mark.
    """
    after = [(t, r) for t, r in samples if t >= warmup_s]
    if len(after) < 2:
        return {"growth_fraction": None, "trend_fraction": None}
    first = [r for t, r in after if t < warmup_s + window_s]
    last_t = after[-1][0]
    last = [r for t, r in after if t > last_t - window_s]
    base, end = statistics.median(first), statistics.median(last)
    ts, rs = [t for t, _ in after], [r for _, r in after]
    slope, intercept = statistics.linear_regression(ts, rs)
    fit_start = intercept + slope * ts[0]
    half = len(rs) // 2
    return {"baseline_rss_mib": base / 2**20, "final_rss_mib": end / 2**20,
            "max_rss_mib": max(rs) / 2**20, "min_rss_mib": min(rs) / 2**20,
            "growth_fraction": (end - base) / base,
            "trend_fraction": slope * (ts[-1] - ts[0]) / fit_start,
            "first_half_max_mib": max(rs[:half]) / 2**20,
            "second_half_max_mib": max(rs[half:]) / 2**20}


def run_soak(cfg: BenchConfig, duration_s: float, out: Path, warmup_s: float = 120.0,
             window_s: float = 120.0, sample_every_s: float = 5.0, log=print,
             runner: str = "auto") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with EmbeddedNats() as broker:
        conf = write_engine_toml(out / "soak.toml", cfg.engine_fields(broker.url, "SOAK"))
        provision(conf)
        w = WorkerProcess(conf, worker_id="soak", log_path=out / "soak-worker.log",
                          extra_args=("--runner", runner))
        w.start()
        try:
            w.wait_ready(300)
            sampler = RssSampler(w.pid, sample_every_s)
            sampler.start()
            # Enough jobs for the whole run at any plausible rate; the run stops at duration.
            jobs = generate(WorkloadSpec(num_jobs=max(1000, int(duration_s * 200)), seed=cfg.seed,
                                         run_id="soak"))
            # Jobs always wait, the worker never idles.
            outstanding = saturating_outstanding(cfg)
            log(f"soak: {duration_s:.0f} s at {outstanding} outstanding ...")
            stats = asyncio.run(run_jobs(broker.url, jobs, run_id="soak", timeout_s=duration_s,
                                         progress=False, arrival=Closed(outstanding)))
            sampler.stop()
        finally:
            w.terminate(grace_s=30)
    rep = build_report(stats)
    result = {
        "machine": machine(), "duration_s": duration_s, "warmup_s": warmup_s,
        "device": cfg.device, "runner": log_event(out / "soak-worker.log", "runner_ready").get("mode"),
        "jobs_ok": rep["jobs_ok"], "jobs_error": rep["jobs_error"],
        "useful_tokens_per_s": rep["useful_tokens_per_s"], "duplicates": rep["duplicates"],
        "rss": growth(sampler.samples, warmup_s, window_s),
        "rss_samples": sampler.samples,
        "worker_summary": log_event(out / "soak-worker.log", "worker_summary"),
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
