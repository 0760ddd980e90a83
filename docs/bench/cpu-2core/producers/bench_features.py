"""What the producer features cost: the ragged workload (text prompts) plain, with logprobs
(top 5) on every job, with two stop strings on every job (matched on every token, never
found), and as chat jobs; interleaved closed loops through one worker. Then cancellation
latency: jobs cancelled while they run, the time from the cancel to its Result.

Run from the repository root: `python docs/bench/cpu-2core/producers/bench_features.py
[rounds] [seconds]`; writes bench_features.json beside this file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

import nats  # noqa: E402

from loadgen.arrivals import Closed  # noqa: E402
from loadgen.rung import BenchConfig, log_event, run_rung, saturating_outstanding  # noqa: E402
from loadgen.broker import EmbeddedNats  # noqa: E402
from loadgen.fleet import WorkerProcess, provision, write_engine_toml  # noqa: E402
from loadgen.workload import CHAT_SYSTEM, WorkloadSpec, generate  # noqa: E402
from schemas import Job, decode_result, encode  # noqa: E402

VARIANTS = {
    "plain": {},
    "logprobs": {"logprobs": 5},
    "stop": {"stop": ("<|none|>", "\n\n\n\n")},
    "chat": {"system": CHAT_SYSTEM},
}


def features(rounds: int, seconds: float, broker: EmbeddedNats, work: Path) -> list[dict]:
    cfg = BenchConfig()
    res = []
    for rnd in range(1, rounds + 1):
        names = list(VARIANTS) if rnd % 2 else list(reversed(VARIANTS))
        for mode in names:
            base = generate(WorkloadSpec(num_jobs=6000, seed=rnd, run_id=f"f{mode}{rnd}",
                                         text=True))
            jobs = [dataclasses.replace(j, **VARIANTS[mode]) for j in base]
            name = f"f{mode}{rnd}"
            r = run_rung(cfg, broker, work, name, "continuous", jobs, runner="eager",
                         arrival=Closed(saturating_outstanding(cfg)), duration_s=seconds)
            s = log_event(work / f"{name}-0.log", "worker_summary")
            row = {"mode": mode, "round": rnd,
                   "useful_tokens_per_s": round(r["sustained"]["useful_tokens_per_s"]),
                   "jobs_per_s": round(r["sustained"]["jobs_per_s"], 1),
                   "ms_per_step": round(1e3 * s["busy_s"] / s["steps"], 2) if s else None,
                   "mean_batch_rows": s.get("mean_batch_rows")}
            res.append(row)
            print(json.dumps(row), flush=True)
    return res


async def cancel_latency(broker: EmbeddedNats, work: Path, n: int = 40) -> dict:
    """n long jobs run together; each is cancelled in turn while running: cancel -> Result."""
    cfg = BenchConfig()
    conf = write_engine_toml(work / "cancel.toml", cfg.engine_fields(broker.url, "BENCH_CANCEL",
                                                                      None))
    provision(conf)
    w = WorkerProcess(conf, worker_id="cancel-0", log_path=work / "cancel-0.log").start()
    w.wait_ready(300)
    nc = await nats.connect(broker.url)
    got: dict[str, float] = {}
    results = {}

    async def on_result(m) -> None:
        r = decode_result(m.data)
        got[r.id] = time.perf_counter()
        results[r.id] = r

    await nc.subscribe("fabric.results.cancel", cb=on_result)
    js = nc.jetstream()
    for i in range(n):
        await js.publish("fabric.jobs.cancel", encode(Job(
            id=f"c{i}", prompt=[(7 * i + k) % 256 for k in range(64)], max_new_tokens=900,
            reply_to="fabric.results.cancel", sampling={"ignore_eos": True})))
    await asyncio.sleep(3.0)  # all admitted and decoding
    sent: dict[str, float] = {}
    for i in range(n):
        sent[f"c{i}"] = time.perf_counter()
        await nc.publish("fabric.cancel", json.dumps({"ids": [f"c{i}"]}).encode())
        await nc.flush()
        await asyncio.sleep(0.25)
    await asyncio.sleep(2.0)
    await nc.close()
    w.terminate(grace_s=10)
    s = log_event(work / "cancel-0.log", "worker_summary")
    lat = sorted(1e3 * (got[k] - sent[k]) for k in sent if k in got)
    cancelled = sum(1 for r in results.values() if r.error and r.error.code.value == "cancelled")
    step_ms = 1e3 * s["busy_s"] / s["steps"]
    return {"jobs": n, "cancelled": cancelled, "latency_ms_p50": round(statistics.median(lat), 1),
            "latency_ms_max": round(lat[-1], 1), "ms_per_step": round(step_ms, 2),
            "latency_p50_in_steps": round(statistics.median(lat) / step_ms, 2)}


def main(rounds: int = 2, seconds: float = 45.0) -> None:
    work = Path("/tmp/bench_features")
    work.mkdir(exist_ok=True)
    with EmbeddedNats() as broker:
        out = {"features": features(rounds, seconds, broker, work),
               "cancel": asyncio.run(cancel_latency(broker, work))}
    print(json.dumps(out["cancel"]))
    Path(__file__).with_name("bench_features.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*(float(a) if i else int(a) for i, a in enumerate(sys.argv[1:])))
