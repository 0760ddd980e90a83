"""What the next step runs: every running sequence decodes, waiting prompts fill the rest.

Design, once: a step is one packed forward over (a) one new token for every running
sequence and (b) whole prompts taken from the waiting lanes, oldest lane head first, until
the step's token cap. Sequences join the running set the step they are prefilled and
leave it the step they finish, so the batch is continuous. Every sequence already holds
its KV blocks (reserved on entry), so scheduling never fails for memory, and no sequence is
ever preempted. Taking the lane whose head has waited longest first is what keeps a long
prompt from starving behind a stream of short ones.

Pure Python on plain data: tested without a model or a device.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from worker.kv import BlockAllocator
from worker.lanes import lane_of
from worker.sequence import Completion, Request, Sequence


@dataclass(slots=True)
class StepPlan:
    """The scheduler's decision for one step."""

    prefill: list[list[Sequence]] = field(default_factory=list)  # one list per lane
    decode: list[Sequence] = field(default_factory=list)  # running sequences, one token each

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(s.req.prompt) for lane in self.prefill for s in lane)

    @property
    def rows(self) -> list[Sequence]:
        """Sequences in logit-row order: prefills (lane by lane), then decodes."""
        return [s for lane in self.prefill for s in lane] + self.decode

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_step_tokens: int,
                 eos_ids: tuple[int, ...]):
        self.allocator = allocator
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens  # cap on packed tokens per forward
        self.eos_ids = frozenset(eos_ids)
        self.lanes: dict[int, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.solo: deque[Sequence] = deque()  # suspected poison jobs, each alone

    # -- entry and exit ---------------------------------------------------------------

    def add(self, req: Request, now: float) -> None:
        """Reserve the request's blocks and queue it in its lane. OutOfBlocks is a bug upstream."""
        blocks = np.asarray(self.allocator.allocate(req.key, req.reserved_tokens // self.block_size),
                            dtype=np.int64)
        offs = np.arange(self.block_size, dtype=np.int64)
        slots = (blocks[:, None] * self.block_size + offs[None, :]).reshape(-1)
        seq = Sequence(req=req, slots=slots, lane=lane_of(len(req.prompt)), waiting_since=now)
        if req.solo:
            self.solo.append(seq)
        else:
            self.lanes.setdefault(seq.lane, deque()).append(seq)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.lanes.values()) + len(self.solo)

    def has_work(self) -> bool:
        return bool(self.running or self.solo or self.lanes)

    def abort_all(self, reason: str) -> list[Completion]:
        """Drop every sequence (fatal teardown); their blocks go back to the pool."""
        now = time.monotonic()
        seqs = self.running + list(self.solo) + [s for q in self.lanes.values() for s in q]
        self.running, self.solo, self.lanes = [], deque(), {}
        return [self._finish(s, "error", now, reason) for s in seqs]

    # -- the step ---------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan(decode=list(self.running))
        if self.solo:
            # A suspected poison job runs with nothing else, so if it kills the step it dies alone.
            if not self.running:
                plan.prefill.append([self.solo.popleft()])
            return plan
        room = self.max_step_tokens - len(plan.decode)
        while self.lanes and room > 0:
            lane = min(self.lanes, key=lambda k: self.lanes[k][0].waiting_since)
            q = self.lanes[lane]
            taken: list[Sequence] = []
            while q and (len(q[0].req.prompt) <= room or not (plan.prefill or taken or plan.decode)):
                s = q.popleft()
                room -= len(s.req.prompt)
                taken.append(s)
            if not q:
                del self.lanes[lane]
            if not taken:
                break  # the oldest lane's head does not fit this step: it goes first next step
            plan.prefill.append(taken)
        return plan

    def postprocess(self, plan: StepPlan, tokens: list[int], now: float) -> list[Completion]:
        """Append each row's sampled token; retire finished sequences. tokens follow plan.rows."""
        done: list[Completion] = []
        still: list[Sequence] = []
        for seq, tok in zip(plan.rows, tokens, strict=True):
            prefilled = not seq.generated
            # Positions this job occupied: its prompt rows, then one per sampled token.
            seq.computed_tokens += (len(seq.req.prompt) if prefilled else 0) + 1
            if prefilled:
                seq.first_token_at = now
            seq.generated.append(tok)
            if tok in seq.req.stop_ids or tok in self.eos_ids:
                done.append(self._finish(seq, "stop", now))
            elif len(seq.generated) >= seq.req.max_new_tokens:
                done.append(self._finish(seq, "length", now))
            else:
                still.append(seq)
        self.running = still
        return done

    def _finish(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> Completion:
        self.allocator.release(seq.req.key)
        return Completion(key=seq.req.key, tokens=seq.generated, finish_reason=reason,
                          computed_tokens=seq.computed_tokens,
                          first_token_at=seq.first_token_at or now, finished_at=now, error=error)
