"""The priority table of `fabric-loadgen bench --priority-mix BULK,URGENT`: urgent work
behind a bulk backlog.

Rule: `BULK` jobs are published first, at the default priority on `fabric.jobs.bulk` (what
every producer did before priorities existed); the workers start; then `URGENT` jobs of
priority 0 are published on `fabric.prio.0.urgent` at a steady pace over the first part of
the run, while the backlog is being worked through. Reported per priority: the wait from
publish to admission (the Result's `queued_ms` is arrival to admission at the worker, so
publish to admission is the producer's latency less the worker's time after admission)
and publish to Result, p50 and p99; and that every job, bulk included, was answered once.
Run with one worker and with two.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from loadgen.broker import EmbeddedNats, delete_streams
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.report import percentiles
from loadgen.workload import WorkloadSpec, generate
from schemas import decode_result, encode
from schemas.subjects import job_subject

URGENT_EVERY_S = 0.05  # one urgent job per 50 ms: 200 over ten seconds


@dataclass
class Mix:
    sent: dict[str, float] = field(default_factory=dict)  # id -> publish time (monotonic)
    waits: dict[int, list[float]] = field(default_factory=dict)  # priority -> publish->admission s
    latency: dict[int, list[float]] = field(default_factory=dict)  # priority -> publish->Result s
    answered: dict[str, int] = field(default_factory=dict)  # id -> Results seen
    errors: int = 0
    bulk_done_s: float = 0.0  # the last bulk Result, from the workers' start


async def _publish_all(js, jobs, reply_to: str, priority: int, name: str, mix: Mix,
                       pace_s: float = 0.0) -> None:
    futs = []
    for spec in jobs:
        job = spec.to_job(reply_to)
        job.priority = priority
        mix.sent[job.id] = time.monotonic()
        futs.append(await js.publish_async(job_subject(job, name), encode(job),
                                           headers={"Nats-Msg-Id": job.id}))
        if pace_s:
            await asyncio.sleep(pace_s)
        if len(futs) >= 2000:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)


def run_priority_mix(cfg, broker: EmbeddedNats, work: Path, name: str, bulk: int, urgent: int,
                     cpus: tuple[str, ...]) -> dict[str, Any]:
    stream = f"BENCH_{name.upper()}"
    asyncio.run(delete_streams(broker.url, stream, "KV_FABRIC_WORKERS"))
    conf = write_engine_toml(work / f"{name}.toml", cfg.engine_fields(broker.url, stream))
    provision(conf)
    bulk_jobs = generate(WorkloadSpec(num_jobs=bulk, seed=cfg.seed, run_id=f"{name}bulk"))
    urgent_jobs = generate(WorkloadSpec(num_jobs=urgent, seed=cfg.seed + 1,
                                        run_id=f"{name}urgent"))
    prio = {j.id: 0 for j in urgent_jobs} | {j.id: 5 for j in bulk_jobs}
    mix = Mix()
    reply_to = f"fabric.results.{name}"
    workers = [WorkerProcess(conf, worker_id=f"{name}-{i}", log_path=work / f"{name}-{i}.log",
                             extra_args=("--cpus", c) if c else ())
               for i, c in enumerate(cpus)]

    async def main() -> None:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        done = asyncio.Event()
        started = 0.0

        async def on_result(msg) -> None:
            r = decode_result(msg.data)
            now = time.monotonic()
            n = mix.answered.get(r.id, 0)
            mix.answered[r.id] = n + 1
            if n or r.id not in prio:
                return
            if not r.ok:
                mix.errors += 1
            p = prio[r.id]
            e2e = now - mix.sent[r.id]
            after_admission = (r.timing.total_ms - r.timing.queued_ms) / 1000
            mix.latency.setdefault(p, []).append(e2e)
            mix.waits.setdefault(p, []).append(max(0.0, e2e - after_admission))
            if p == 5:
                mix.bulk_done_s = now - started
            if len(mix.answered) == len(prio):
                done.set()

        await nc.subscribe(reply_to, cb=on_result)
        await _publish_all(js, bulk_jobs, reply_to, 5, "bulk", mix)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: [w.start() for w in workers])
        await loop.run_in_executor(None, lambda: [w.wait_ready(300) for w in workers])
        started = time.monotonic()
        await asyncio.sleep(2.0)  # the workers are into the backlog
        await _publish_all(js, urgent_jobs, reply_to, 0, "urgent", mix, pace_s=URGENT_EVERY_S)
        await asyncio.wait_for(done.wait(), cfg.timeout_s)
        await asyncio.sleep(1.0)  # a duplicate would show up by now
        await nc.close()

    try:
        asyncio.run(main())
    finally:
        for w in workers:
            w.terminate(grace_s=30)
        asyncio.run(delete_streams(broker.url, stream))
    ms = 1000.0

    def pct(xs: list[float]) -> dict[str, float]:
        p = percentiles([x * ms for x in xs])
        return {"p50": p["p50"], "p99": p["p99"]}
    return {
        "workers": len(cpus), "bulk": bulk, "urgent": urgent,
        "wait_ms": {str(p): pct(v) for p, v in sorted(mix.waits.items())},
        "latency_ms": {str(p): pct(v) for p, v in sorted(mix.latency.items())},
        "answered": len(mix.answered), "duplicates": sum(n - 1 for n in mix.answered.values()),
        "errors": mix.errors, "bulk_done_s": round(mix.bulk_done_s, 1),
    }


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    r0 = rows[0]
    lines = ["", f"Priorities ({r0['bulk']:,} bulk jobs at the default priority published "
             f"first, then {r0['urgent']} urgent jobs of priority 0, one per "
             f"{URGENT_EVERY_S * 1000:.0f} ms, while the backlog is worked through):", "",
             "| workers | urgent wait p50 / p99 ms | urgent to Result p50 / p99 ms | "
             "bulk wait p50 / p99 ms | bulk done s | answered (duplicates) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        u, lu, b = r["wait_ms"].get("0", {}), r["latency_ms"].get("0", {}), r["wait_ms"].get("5", {})
        lines.append(f"| {r['workers']} | {u.get('p50', 0):,.0f} / {u.get('p99', 0):,.0f} | "
                     f"{lu.get('p50', 0):,.0f} / {lu.get('p99', 0):,.0f} | "
                     f"{b.get('p50', 0):,.0f} / {b.get('p99', 0):,.0f} | {r['bulk_done_s']} | "
                     f"{r['answered']:,} ({r['duplicates']}) |")
    return lines
