"""The admitter: the event loop's side of admission, between a job's path and the executor.

Rule: a valid job is offered to the intake (`worker.admission.Intake`, which owns what is
pending); admission runs at most once per loop pass, not per message -- a pull brings its
deliveries in one read, and they go to the executor as one submission (one wake-up, one
bigger step) -- and again whenever jobs finish. What it lets in goes to the executor as
`Request`s, plain data: a seed drawn here where the producer gave none, the job's stop
strings handed to the stop-string stage.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from worker.admission import Intake
from worker.broker.validate import Ticket
from worker.engine.sampling import fold_seed
from worker.engine.sequence import Request
from worker.ops.stats import WorkerStats

log = structlog.get_logger("worker")

_EXPIRED = "deadline passed while the job waited for admission"


class Admitter:
    def __init__(self, intake: Intake, stats: WorkerStats, loop: asyncio.AbstractEventLoop,
                 submit: Callable[[list[Request]], None], expired: Callable[[Ticket, str], None],
                 watch_stops: Callable[[int, str, list[str]], None],
                 room_changed: Callable[[], None]):
        self._intake = intake
        self._stats = stats
        self._loop = loop
        self._submit = submit  # to the executor
        self._expired = expired  # answer a job whose deadline passed while it waited
        self._watch_stops = watch_stops  # a job with stop strings goes in (the stops stage)
        self._room_changed = room_changed  # the pending queue shrank: ingress may pull
        self._rng = random.Random()
        self._admit_soon = False  # an `admit` is scheduled for this loop pass

    def offer(self, t: Ticket) -> None:
        if self._intake.offer(t) and not self._admit_soon:
            self._admit_soon = True
            self._loop.call_soon(self.admit)

    def admit(self) -> None:
        self._admit_soon = False
        intake = self._intake
        got = intake.admit(time.monotonic(), time.time())
        for t in got.expired:
            self._expired(t, _EXPIRED)
        if got.run:
            self._submit([self._request(t) for t in got.run])
        if got:
            self._room_changed()
        self._stats.occupancy(intake.occupancy, queued=bool(intake.pending))

    def _request(self, t: Ticket) -> Request:
        solo = self._intake.is_solo(t)
        if solo:
            log.info("job_solo", job=t.job.id, attempt=t.attempt)
        s = t.job.sampling
        seed = self._rng.getrandbits(63) if s.seed is None else s.seed
        if s.stop:
            self._watch_stops(t.key, t.job.id, s.stop)
        return Request(key=t.key, prompt=t.prompt, max_new_tokens=t.job.max_new_tokens or 0,
                       reserved_tokens=t.reserved_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, seed=fold_seed(seed),
                       stop_ids=frozenset(s.stop_token_ids), solo=solo, hashes=t.hashes,
                       reservation=t.reservation, ignore_eos=s.ignore_eos,
                       logprobs=s.logprobs, watch=bool(s.stop), job_id=t.job.id,
                       grammar=None if t.grammar is None else t.grammar.matcher())

    def expire_pending(self) -> None:
        """Between admissions: pending jobs whose deadline passed are answered, not kept."""
        expired = self._intake.expire_pending(time.time())
        for t in expired:
            self._expired(t, _EXPIRED)
        if expired:
            self._room_changed()
