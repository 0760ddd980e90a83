"""When each job of a run is published: the arrival process, apart from the jobs themselves.

Rule: an arrival process either fixes every publish time before the run starts
(`Schedule`: an open-loop Poisson process, or a trace's recorded times) or reacts to the
system under test (`Closed`: a new job goes out only when an earlier one is answered).
`Burst` publishes everything at once, which is saturation: the broker holds the backlog.
Schedules are pure functions of their parameters and seed, tested without NATS; the
client (`loadgen.client.run_jobs`) is the only thing that acts on them.

Open loop is what a fleet of independent users looks like (arrivals do not slow down
when the service does, so queueing shows up as latency); closed loop is what a fixed
pool of clients looks like (throughput at a given concurrency, latency bounded by it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Arrival", "Burst", "Closed", "Schedule", "describe", "poisson", "replay"]


@dataclass(frozen=True, slots=True)
class Burst:
    """Every job published at once (up to the client's publish window): saturation."""


@dataclass(frozen=True, slots=True)
class Closed:
    """Keep `concurrency` jobs outstanding: publish the next when a Result comes back
    (ok or error), or when a job's publish fails for good."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"closed-loop concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True, slots=True)
class Schedule:
    """Job n is published `offsets_s[n]` seconds after the run starts (non-decreasing)."""

    offsets_s: tuple[float, ...]
    kind: str  # "open" (Poisson) or "trace" (replay), for the report
    params: tuple[tuple[str, float | int], ...] = ()  # rate, seed, speed...: for the report

    def __post_init__(self) -> None:
        if any(b < a for a, b in zip(self.offsets_s, self.offsets_s[1:])):
            raise ValueError("schedule offsets must be non-decreasing")
        if self.offsets_s and self.offsets_s[0] < 0:
            raise ValueError("schedule offsets must be >= 0")

    @property
    def duration_s(self) -> float:
        return self.offsets_s[-1] if self.offsets_s else 0.0


Arrival = Burst | Closed | Schedule


def poisson(num_jobs: int, rate_per_s: float, seed: int = 0) -> Schedule:
    """An open loop: a Poisson process at `rate_per_s`, the first job at t=0.

    Gaps are exponential with mean 1/rate, drawn from their own seeded generator (not the
    workload's), so the same workload can be replayed at several rates and a rate change
    does not change a single prompt.
    """
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"open-loop rate must be a positive number of jobs/s, got {rate_per_s}")
    rng = random.Random(f"arrivals:{seed}")
    offsets, t = [], 0.0
    for n in range(num_jobs):
        if n:
            t += rng.expovariate(rate_per_s)
        offsets.append(t)
    return Schedule(tuple(offsets), "open", (("rate_per_s", rate_per_s), ("seed", seed)))


def replay(arrivals_s: Sequence[float], speed: float = 1.0) -> Schedule:
    """A trace's own times, relative to its first row, played `speed` times faster."""
    if not (speed > 0 and math.isfinite(speed)):
        raise ValueError(f"replay speed must be a positive number, got {speed}")
    t0 = arrivals_s[0] if arrivals_s else 0.0
    return Schedule(tuple((a - t0) / speed for a in arrivals_s), "trace", (("speed", speed),))


def describe(arrival: Arrival, num_jobs: int) -> dict[str, Any]:
    """The arrival process as the report states it."""
    if isinstance(arrival, Burst):
        return {"process": "burst"}
    if isinstance(arrival, Closed):
        return {"process": "closed", "concurrency": arrival.concurrency}
    out: dict[str, Any] = {"process": arrival.kind, **dict(arrival.params),
                           "schedule_s": arrival.duration_s}
    n = min(num_jobs, len(arrival.offsets_s))
    # Jobs over the schedule's span: n - 1 gaps cover it; one job offers no rate.
    span = arrival.offsets_s[n - 1] if n else 0.0
    out["offered_jobs_per_s"] = (n - 1) / span if n > 1 and span > 0 else None
    return out
