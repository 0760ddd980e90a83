"""Soak: one worker at saturation for a long time, its resident memory sampled throughout.

Rule: the worker must not grow. The KV pool and the model are allocated at start-up and
every queue is bounded, so after warm-up the resident set should be flat; a leak (a map
that is never pruned, a tensor kept per job) shows up here as a slope. The load is a closed
loop with more jobs outstanding than the budget admits, so jobs always wait for admission
and the worker never idles. Growth is read three ways (`growth`): last window's median over
the first's, the fitted trend, and each half's peak.

With a `Mix` the jobs ask for every producer feature (`loadgen.mix`): the soak is then also
a fault hunt. A worker that exits is recorded (when, its exit code, the log line that
said why) and replaced by a new one on the same consumer, so the run goes on and the
jobs the dead one held are redelivered; the verdict is every published job answered
exactly once and no worker exit. Publishing stops at the duration and the run waits for
what it sent, so no job is cut off by the clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from loadgen.arrivals import Closed
from loadgen.broker import EmbeddedNats
from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.mix import Mix, apply_mix
from loadgen.report import build_report
from loadgen.rung import BenchConfig, log_event, machine, saturating_outstanding
from loadgen.workload import WorkloadSpec, generate

DRAIN_S = 120.0  # after the last publish, how long the run waits for the jobs it sent


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float):
        super().__init__(daemon=True, name="rss-sampler")
        self.proc = psutil.Process(pid)  # replaced when a dead worker is (`Supervisor`)
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.wait(self.every_s):
            try:
                self.samples.append((time.monotonic() - t0, self.proc.memory_info().rss))
            except psutil.Error:
                continue  # the worker died: the supervisor gives us its successor

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class Supervisor(threading.Thread):
    """Watches the soak's worker; one that exits is recorded and replaced at once."""

    def __init__(self, first: WorkerProcess, make: Any, sampler: RssSampler,
                 every_s: float = 0.5):
        super().__init__(daemon=True, name="soak-supervisor")
        self._make = make  # n -> the started WorkerProcess after n exits (not waited for)
        self.worker = first
        self.sampler = sampler
        self.every_s = every_s
        self.exits: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            code = self.worker.returncode
            if code is None:
                continue
            self.exits.append({"at_s": round(time.monotonic() - self._t0, 1), "code": code,
                               "why": _why(self.worker.log_path)})
            self.worker = self._make(len(self.exits))
            self.worker.wait_ready(300)
            self.sampler.proc = psutil.Process(self.worker.pid)

    def stop(self) -> WorkerProcess:
        self._halt.set()
        self.join(timeout=330)
        return self.worker


def _why(log_path: Path) -> str | None:
    """The last fault a worker's log names (its fatal teardown's reason), if any."""
    why = None
    for line in log_path.read_text(errors="replace").splitlines():
        if '"executor_failed"' in line or '"fatal' in line or '"stage_failed"' in line:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            why = f"{ev.get('event')}: {ev.get('error') or ev.get('detail') or ''}"[:2000]
    return why


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
             runner: str = "auto", mix: Mix | None = None,
             outstanding: int | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with EmbeddedNats() as broker:
        conf = write_engine_toml(out / "soak.toml", cfg.engine_fields(broker.url, "SOAK"))
        provision(conf)
        for old in out.glob("soak-worker*.log"):
            old.unlink()  # a rerun into the same folder: the logs are this run's

        def make(n: int) -> WorkerProcess:
            """The n-th worker of the run (0: the first; n: the one after n exits)."""
            name, log_name = ("soak", "soak-worker.log") if n == 0 else (
                f"soak-{n + 1}", f"soak-worker-{n + 1}.log")
            return WorkerProcess(conf, worker_id=name, log_path=out / log_name,
                                 extra_args=("--runner", runner)).start()

        first = make(0)
        sup = None
        try:
            first.wait_ready(300)
            sampler = RssSampler(first.pid, sample_every_s)
            sup = Supervisor(first, make, sampler)
            sampler.start()
            sup.start()
            # Enough jobs for the whole run at any plausible rate; publishing stops at duration.
            jobs = generate(WorkloadSpec(num_jobs=max(1000, int(duration_s * 400)), seed=cfg.seed,
                                         run_id="soak", text=mix is not None))
            if mix is not None:
                jobs = apply_mix(jobs, mix, cfg.seed)
            # Jobs always wait, the worker never idles.
            outstanding = outstanding or saturating_outstanding(cfg)
            log(f"soak: {duration_s:.0f} s at {outstanding} outstanding"
                f"{'' if mix is None else f', mixed ({mix})'} ...")
            stats = asyncio.run(run_jobs(broker.url, jobs, run_id="soak",
                                         timeout_s=duration_s + DRAIN_S, progress=False,
                                         arrival=Closed(outstanding), publish_for_s=duration_s))
            sampler.stop()
        finally:
            (sup.stop() if sup is not None else first).terminate(grace_s=30)
    rep = build_report(stats)
    last_log = (out / "soak-worker.log" if not sup.exits
                else out / f"soak-worker-{len(sup.exits) + 1}.log")
    result = {
        "machine": machine(), "duration_s": duration_s, "warmup_s": warmup_s,
        "device": cfg.device, "model": cfg.model,
        "runner": log_event(out / "soak-worker.log", "runner_ready").get("mode"),
        "mix": None if mix is None else dataclasses.asdict(mix),
        "outstanding": outstanding,
        "jobs_published": rep["jobs_published"],
        "jobs_ok": rep["jobs_ok"], "jobs_error": rep["jobs_error"],
        "jobs_cancelled": rep["jobs_cancelled"], "cancels_sent": rep["cancels_sent"],
        "errors_by_code": rep["errors_by_code"],
        "jobs_unanswered": len(stats.acked - stats.outcomes.keys()),
        "useful_tokens_per_s": rep["useful_tokens_per_s"], "duplicates": rep["duplicates"],
        "worker_exits": sup.exits,
        "rss": growth(sampler.samples, warmup_s, window_s),
        "rss_samples": sampler.samples,
        "worker_summary": log_event(last_log, "worker_summary"),
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
