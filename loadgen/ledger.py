"""The ledger of one run: when each job went out and what came back for it.

Rule: the first Result for a job id is the one that counts; every later one is
counted as a duplicate (a worker bug or a replay that escaped deduplication) and
otherwise ignored, so a duplicate can never inflate throughput. Times are
`time.monotonic()` seconds in this process; the ledger holds plain records, not wire
models, so the report can be computed and tested without NATS or the schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Outcome", "RunStats"]


@dataclass(slots=True)
class Outcome:
    """What one Result said, reduced to what the report needs."""

    id: str  # job id
    ok: bool
    finish_reason: str  # "length" | "stop" | "error" | "expired"
    error_code: str | None  # machine-readable code when not ok
    prompt_tokens: int
    completion_tokens: int
    padded_tokens: int  # tokens the worker paid for, padding included
    worker_total_ms: float | None  # worker-side total time (timing.total_ms)
    first_token_ms: float | None  # worker-side time to first token, if it got one
    worker: str  # worker id that produced it
    attempt: int  # delivery attempt that produced it
    cached_tokens: int = 0  # prompt tokens the worker served from its prefix cache


@dataclass(slots=True)
class RunStats:
    """Everything a run collected. Mutated only by the client's event loop."""

    run_id: str
    job_ids: list[str]  # every job of the run, in publish order; fixed at creation
    sent_s: dict[str, float] = field(default_factory=dict)  # id -> publish start
    acked: set[str] = field(default_factory=set)  # ids JetStream acknowledged
    publish_errors: dict[str, str] = field(default_factory=dict)  # id -> last error
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # id -> first Result
    arrived_s: dict[str, float] = field(default_factory=dict)  # id -> first arrival
    duplicates: int = 0  # Results beyond the first for an id
    strays: int = 0  # Results for ids not in this run
    undecodable: int = 0  # reply messages that failed to decode
    timed_out: bool = False  # the run's deadline passed before every job answered
    arrival: dict[str, Any] = field(default_factory=dict)  # arrivals.describe() of the run
    lag_s: list[float] = field(default_factory=list)  # publish start minus scheduled time
    max_in_flight: int = 0  # most jobs sent and not yet answered (or failed) at once
    # Agent sessions only: (prompt, or prompt + reply once answered), in the order the
    # jobs were sent and answered -- what an unbounded prefix cache would have seen.
    token_log: list[tuple[str, list[int]]] = field(default_factory=list)
    _known: set[str] = field(init=False, repr=False)  # set(job_ids), for O(1) lookup

    def __post_init__(self) -> None:
        self._known = set(self.job_ids)

    def record_sent(self, job_id: str, at_s: float) -> None:
        # A retried publish keeps its first send time: latency is what the producer saw.
        self.sent_s.setdefault(job_id, at_s)

    def record_outcome(self, outcome: Outcome, at_s: float) -> bool:
        """Record a Result's outcome; False if it was a duplicate or a stray."""
        if outcome.id not in self._known:
            self.strays += 1
            return False
        if outcome.id in self.outcomes:
            self.duplicates += 1
            return False
        self.outcomes[outcome.id] = outcome
        self.arrived_s[outcome.id] = at_s
        return True

    def done(self) -> bool:
        return len(self.outcomes) == len(self.job_ids)

    @property
    def first_sent_s(self) -> float | None:
        return min(self.sent_s.values(), default=None)

    @property
    def last_arrived_s(self) -> float | None:
        return max(self.arrived_s.values(), default=None)
