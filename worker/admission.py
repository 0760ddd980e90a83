"""Admission: a job enters the executor only if the KV it adds fits under the budget.

A job's padded tokens are its prompt plus `max_new_tokens`, rounded up to whole KV blocks;
admission reserves exactly those blocks in the pool before the job goes on, so everything
downstream may assume the memory exists. What a job costs the budget is what it adds: a
prefix whose blocks another held job has, or the pool kept from an earlier job, is counted
once (`worker.engine.blocks.BlockPool.reserve`). Admission is FIFO and stops at the first
job that does not fit (it stays at the front, so nothing overtakes it and nothing starves).
Stopping switches admission to *holding*: nothing more enters until the tokens held fall
to `low_water`, and then a whole group enters at once. That hysteresis keeps prefill
batches large instead of trickling in one job per finished job.

`Intake` is the state around that rule: what was fetched and waits (pending), what was
admitted and runs (in flight), every message held unsettled, and how many more messages
to pull. Pure Python on plain data; the event loop owns the only instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.msg import Msg

from worker.broker.ingress import STARVE_AFTER_S
from worker.broker.validate import Ticket
from worker.engine.blocks import BlockPool

T = TypeVar("T")


class Admission:
    """The rule: FIFO, stop at the first job that does not fit, then hold until the tokens
    in flight fall to low water. Whether a job fits is the caller's `take` (which also
    reserves it): the block pool knows what a job shares."""

    def __init__(self, budget_tokens: int, low_water_tokens: int):
        if not 0 <= low_water_tokens < budget_tokens:
            raise ValueError("need 0 <= low_water < budget")
        self.budget_tokens = budget_tokens
        self.low_water_tokens = low_water_tokens
        self.holding = False  # True from the first job that did not fit until low water

    def admit(self, pending: deque[T], in_flight_tokens: int,
              take: Callable[[T], bool]) -> list[T]:
        """Pop from the front of `pending` every job admitted now, in order. `take(job)`
        reserves the job and says True, or says False when it does not fit."""
        if self.holding:
            if in_flight_tokens > self.low_water_tokens:
                return []
            self.holding = False
        out: list[T] = []
        while pending:
            if not take(pending[0]):
                self.holding = True
                break
            out.append(pending.popleft())
        return out


@dataclass(slots=True)
class Admitted:
    """One admission pass: jobs to run now, and jobs whose deadline passed while waiting."""

    run: list[Ticket] = field(default_factory=list)
    expired: list[Ticket] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.run or self.expired)


class Intake:
    """Everything this worker has taken from the broker and not yet settled.

    Fetch sizing: a worker that hoards a backlog starves its neighbours on the same
    consumer, so the pending queue holds one admission group (what admission lets in at
    once when it reopens at low water, and never less than one longest job), and a pull
    asks for what that room can take. A job's size is known only once it is decoded, so
    the pull is sized by the recent mean (the estimate errs by a batch).

    Poison: a job delivered `solo_from_attempt` times or more runs alone; while it runs
    nothing new is fetched, and around suspects (and right after a start, when a crash's
    redeliveries lead the queue) one message is fetched at a time (`cautious`), so a job
    that kills the engine takes as few bystanders with it as possible.
    """

    def __init__(self, pool: BlockPool, token_budget: int, low_water: int, max_seq_len: int,
                 fetch_batch: int, solo_from_attempt: int):
        block_size = pool.block_size
        self.pool = pool  # the engine's KV blocks: admission reserves them
        self.block_size = block_size
        self.budget_blocks = token_budget // block_size
        self.admission = Admission(token_budget, low_water)
        self.fetch_batch = fetch_batch  # most messages one pull asks for
        self.solo_from_attempt = solo_from_attempt
        self.pending: deque[Ticket] = deque()  # fetched, valid, not admitted (FIFO)
        self.pending_tokens = 0
        self.pending_cap_tokens = max(token_budget - low_water, max_seq_len)
        self.inflight: dict[int, Ticket] = {}  # admitted, by key, until their Completion
        self.held: dict[int, Msg] = {}  # id(msg) -> msg for every message not yet settled
        # Held messages' bound: every in-flight job (each reserves a block at least) with
        # its Result still publishing, plus two pulls' worth of edge answers.
        self.held_cap = 2 * (token_budget // block_size) + 2 * fetch_batch
        self.refused: list[Msg] = []  # fetched while stopping: nak'd by the teardown
        self.solo_inflight = 0  # suspected poison jobs admitted and not finished
        self.cautious = True  # fetch one message at a time (see above)
        self.draining = False  # stopping: fetch nothing, admit nothing new
        self.busy_since = 0.0  # monotonic time the in-flight set last became non-empty
        self._job_tokens_ewma = float(min(max_seq_len, 256))  # until jobs say otherwise

    # -- the pull --------------------------------------------------------------------

    def room(self) -> int:
        """How many messages the next pull may ask for."""
        if self.draining or self.solo_inflight:
            return 0  # a suspected poison job runs with as little else held as possible
        free = self.pending_cap_tokens - self.pending_tokens
        if free <= 0:
            return 0
        by_tokens = max(1, int(free / self._job_tokens_ewma))
        return max(0, min(1 if self.cautious else self.fetch_batch, by_tokens,
                          self.held_cap - len(self.held)))

    def hold(self, msg: Msg, attempt: int, last_fetch_len: int) -> None:
        """A delivery arrived (valid or not): hold it until it is settled."""
        self.held[id(msg)] = msg
        if attempt >= self.solo_from_attempt:
            self.cautious = True
        elif last_fetch_len == 1:
            self.cautious = False  # one fetch brought a healthy job: back to full pulls

    def settled(self, msg: Msg) -> None:
        self.held.pop(id(msg), None)

    def offer(self, t: Ticket) -> bool:
        """Queue a valid job for admission; False (and kept for a nak) while draining."""
        if self.draining:
            self.refused.append(t.msg)
            return False
        self._enqueue(t)
        self.pending_tokens += t.reserved_tokens
        self._job_tokens_ewma += 0.05 * (t.reserved_tokens - self._job_tokens_ewma)
        return True

    def _enqueue(self, t: Ticket) -> None:
        """Behind every pending job of its priority or a higher one (FIFO within a
        priority), and never ahead of one that has waited `STARVE_AFTER_S`: a stream of
        urgent jobs does not hold a pulled one back for longer than that."""
        pending, p = self.pending, t.job.priority
        if not pending or pending[-1].job.priority <= p:
            pending.append(t)
            return
        old = t.arrived_at - STARVE_AFTER_S
        i = len(pending)
        while i > 0 and pending[i - 1].job.priority > p and pending[i - 1].arrived_at > old:
            i -= 1
        pending.insert(i, t)

    # -- admission -------------------------------------------------------------------

    def is_solo(self, t: Ticket) -> bool:
        return t.attempt >= self.solo_from_attempt

    @property
    def in_flight_tokens(self) -> int:
        """Tokens of the KV blocks held by admitted jobs, shared blocks once."""
        return self.pool.used_blocks * self.block_size

    @property
    def occupancy(self) -> float:
        return self.in_flight_tokens / self.admission.budget_tokens

    def admit(self, now: float, now_unix: float) -> Admitted:
        """Every pending job admission lets in now, in order, its KV blocks reserved. One
        that expired while it waited is let through without blocks, to be answered."""
        out = Admitted()

        def take(t: Ticket) -> bool:
            if t.job.deadline_s is not None and t.job.deadline_s <= now_unix:
                out.expired.append(t)
                return True
            t.reservation = self.pool.reserve(t.key, t.hashes, t.reserved_tokens // self.block_size,
                                              limit=self.budget_blocks)
            return t.reservation is not None

        for t in self.admission.admit(self.pending, self.in_flight_tokens, take):
            self.pending_tokens -= t.reserved_tokens
            if t.reservation is None:
                continue  # expired: answered, never reserved
            if not self.inflight:
                self.busy_since = now
            t.admitted_at = now
            self.inflight[t.key] = t
            self.solo_inflight += self.is_solo(t)
            out.run.append(t)
        return out

    def finished(self, key: int) -> Ticket | None:
        """The job `key` left the executor (which gave its blocks back to the pool)."""
        t = self.inflight.pop(key, None)
        if t is not None:
            self.solo_inflight -= self.is_solo(t)
        return t

    def expire_pending(self, now_unix: float) -> list[Ticket]:
        """Take every pending job whose deadline has passed."""
        def late(t: Ticket) -> bool:
            return t.job.deadline_s is not None and t.job.deadline_s <= now_unix

        if not any(late(t) for t in self.pending):
            return []
        gone = [t for t in self.pending if late(t)]
        keep = [t for t in self.pending if not late(t)]
        self.pending = deque(keep)
        self.pending_tokens -= sum(t.reserved_tokens for t in gone)
        return gone

    def withdraw(self, job_ids: set[str]) -> list[Ticket]:
        """Take the pending jobs with these ids (cancelled before admission)."""
        gone = [t for t in self.pending if t.job.id in job_ids]
        if gone:
            self.pending = deque(t for t in self.pending if t.job.id not in job_ids)
            self.pending_tokens -= sum(t.reserved_tokens for t in gone)
        return gone

    def take_unadmitted(self) -> list[Msg]:
        """Every message fetched and never admitted: pending, and refused while stopping."""
        # A message of several jobs (an OpenAI line's parts) is in the list once.
        msgs = list({id(m): m for m in [t.msg for t in self.pending] + self.refused}.values())
        self.pending.clear()
        self.refused = []
        self.pending_tokens = 0
        return msgs
