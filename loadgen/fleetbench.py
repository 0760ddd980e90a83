"""The fleet table of `fabric-loadgen bench --fleet-jobs N`: does a second worker add its share?

Rule: one worker, then two, on one consumer, the same workload: the jobs/s ratio says whether
adding a worker adds its share. Twice -- pinned to one core each, and co-located with no
flags (the workers size their threads themselves and must not collapse on shared cores) --
and each both as a burst and under sustained load (`run_fleet`). Beside the co-located
pair, the lone worker is also run with `--threads` set to its CPUs: what the thread
governor must match from a cold start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung, run_sustained, saturating_outstanding
from loadgen.workload import WorkloadSpec, generate


# The fleet's two arrangements: one worker vs two on one consumer, pinned to a core each
# (`--cpus`), and co-located (no flags: both on every core, as `compose up --scale` runs them).
FLEET_ARRANGEMENTS = {"pinned": (("0",), ("0", "1")), "colocated": (("",), ("", ""))}


def cpu_count() -> int:
    """The CPUs this process may run on: what a worker with no flags sizes itself to."""
    return len(os.sched_getaffinity(0))


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
        runs = list(zip(("one", "two"), pair))
        if arrangement == "colocated" and cfg.fleet_jobs:
            # The lone unflagged worker's reference: the same worker told its thread count
            # (`--threads` = its CPUs), from a cold start on the same burst (issue 24).
            runs.insert(0, ("flagged", ("",)))
        for name, cpus in runs:
            what = (f"{len(cpus)} worker(s), one core each" if arrangement == "pinned"
                    else f"1 worker, --threads {cpu_count()}" if name == "flagged"
                    else f"{len(cpus)} worker(s) sharing the cores, no flags")
            tag = f"{arrangement[:3]}{name}"
            flags = ("--threads", str(cpu_count())) if name == "flagged" else ()
            if cfg.fleet_jobs:
                jobs = generate(WorkloadSpec(num_jobs=cfg.fleet_jobs, seed=cfg.seed,
                                             run_id=f"fleet{tag}"))
                log(f"fleet: {what}, {cfg.fleet_jobs} jobs ...")
                r = run_rung(cfg, broker, work, f"fleet{tag}", "continuous", jobs, cpus=cpus,
                             worker_args=flags)
                r.pop("completions")
                fleet[name] = r
                partial()
                log(f"  {r['jobs_per_s']:.1f} jobs/s, {r['useful_tokens_per_s']:,.0f} useful tok/s")
            if name == "flagged":
                continue
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
        if "flagged" in fleet:
            # Useful tokens/s: the lone unflagged worker against the flagged one, and the
            # unflagged pair against that lone worker (issue 24's 0.95x and 0.9x).
            tok = {k: fleet[k]["useful_tokens_per_s"] for k in ("flagged", "one", "two")}
            fleet["alone_vs_flagged"] = tok["one"] / tok["flagged"]
            fleet["pair_vs_alone"] = tok["two"] / tok["one"]
        if sustained:
            sustained["ratio"] = (sustained["two"]["sustained"]["jobs_per_s"]
                                  / sustained["one"]["sustained"]["jobs_per_s"])
            fleet["sustained"] = sustained
        if arrangement == "pinned":
            out.update(fleet)
        else:
            out["colocated"] = fleet
    return out


def markdown(f: dict[str, Any]) -> list[str]:
    """The fleet's lines of ladder.md (none when the fleet did not run)."""
    lines: list[str] = []
    for label, fl in (("two one-core workers", f), ("two workers sharing the cores, no flags",
                                                     f.get("colocated", {}))):
        if "ratio" in fl:
            lines += ["", f"Fleet, a burst of {fl['one']['jobs']} jobs: {label} on one "
                      f"consumer {fl['two']['jobs_per_s']:.1f} jobs/s, one "
                      f"{fl['one']['jobs_per_s']:.1f} jobs/s: ratio {fl['ratio']:.2f}."]
        if "alone_vs_flagged" in fl:
            lines += ["", f"Thread governor, the same burst from a cold start, useful tok/s: "
                      f"one worker with no flags {fl['one']['useful_tokens_per_s']:,.0f}, with "
                      f"`--threads` set to its CPUs {fl['flagged']['useful_tokens_per_s']:,.0f} "
                      f"({fl['alone_vs_flagged']:.2f}x); two with no flags sharing the cores "
                      f"{fl['two']['useful_tokens_per_s']:,.0f} ({fl['pair_vs_alone']:.2f}x the "
                      f"lone worker)."]
        if "sustained" in fl:
            st = fl["sustained"]
            one, two = st["one"]["sustained"], st["two"]["sustained"]
            lines += ["", f"Fleet, sustained ({one['start_s']:.0f}-{one['end_s']:.0f} s of a "
                      f"closed loop): {label} {two['jobs_per_s']:.1f} jobs/s, one "
                      f"{one['jobs_per_s']:.1f} jobs/s: ratio {st['ratio']:.2f}."]
    return lines
