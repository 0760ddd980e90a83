"""Structured output's cost: the ragged workload plain, and with half its jobs constrained
by a mix of the schemas in json_schemas.py, interleaved closed loops through one worker.

Run from the repository root: `python docs/bench/cpu-2core/structured/bench_structured.py
[rounds] [seconds] [first round]` (rounds alternate which mode goes first). Prints and writes bench_structured.json beside this file: sustained
useful tokens/s and jobs/s of each run, and from the worker's summary the mask time per
masked step, the compiles and their mean time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from loadgen.arrivals import Closed  # noqa: E402
from loadgen.rung import BenchConfig, log_event, run_rung, saturating_outstanding  # noqa: E402
from loadgen.broker import EmbeddedNats  # noqa: E402
from loadgen.workload import JobSpec, WorkloadSpec, generate  # noqa: E402
from schemas import Job  # noqa: E402
from json_schemas import SCHEMAS  # noqa: E402


@dataclasses.dataclass(slots=True)
class Constrained(JobSpec):
    response_format: dict | None = None

    def to_job(self, reply_to: str) -> Job:
        job = JobSpec.to_job(self, reply_to)
        if self.response_format is None:
            return job
        return Job.model_validate({**job.model_dump(mode="json"),
                                   "response_format": self.response_format})


def half_constrained(jobs: list[JobSpec]) -> list[JobSpec]:
    formats = [{"type": "json_schema", "schema": s} for s in SCHEMAS.values()]
    out = []
    for i, j in enumerate(jobs):
        fields = {f.name: getattr(j, f.name) for f in dataclasses.fields(JobSpec)}
        out.append(Constrained(**fields, response_format=formats[(i // 2) % len(formats)]
                               if i % 2 else None))
    return out


def main(rounds: int = 2, seconds: float = 60.0, first: int = 1) -> None:
    cfg = BenchConfig()
    work = Path("/tmp/bench_structured")
    work.mkdir(exist_ok=True)
    res = []
    with EmbeddedNats() as broker:
        for rnd in range(first, first + rounds):
            order = ("plain", "half") if rnd % 2 else ("half", "plain")
            for mode in order:
                jobs = generate(WorkloadSpec(num_jobs=6000, seed=rnd, run_id=f"s{mode}{rnd}"))
                if mode == "half":
                    jobs = half_constrained(jobs)
                name = f"s{mode}{rnd}"
                r = run_rung(cfg, broker, work, name, "continuous", jobs, runner="eager",
                             arrival=Closed(saturating_outstanding(cfg)), duration_s=seconds)
                s = log_event(work / f"{name}-0.log", "worker_summary")
                row = {"mode": mode, "round": rnd,
                       "useful_tokens_per_s": round(r["sustained"]["useful_tokens_per_s"]),
                       "jobs_per_s": round(r["sustained"]["jobs_per_s"], 1),
                       "masked_steps": s.get("masked_steps"),
                       "mask_ms_per_masked_step": s.get("mask_ms_per_masked_step"),
                       "steps": s.get("steps"), "mean_batch_rows": s.get("mean_batch_rows"),
                       "grammar_compiles": s.get("grammar_compiles"),
                       "grammar_compile_ms_mean": s.get("grammar_compile_ms_mean")}
                res.append(row)
                print(json.dumps(row), flush=True)
    out = Path(__file__).with_name("bench_structured.json")
    old = json.loads(out.read_text()) if out.exists() and first > 1 else []
    out.write_text(json.dumps(old + res, indent=1))


if __name__ == "__main__":
    main(*(float(a) if i == 1 else int(a) for i, a in enumerate(sys.argv[1:])))
