"""What the next step runs: every running sequence decodes, waiting prompts fill the rest.

Design, once (policy `continuous`, the product): a step is one packed forward over (a) one
new token for every running sequence and (b) whole prompts taken from the waiting lanes,
oldest lane head first, until the step's token cap. Sequences join the running set the
step they are prefilled and leave it the step they finish, so the batch is continuous.
Every sequence already holds its KV blocks (reserved on entry), so scheduling never fails
for memory and no sequence is ever preempted. Taking the lane whose head has waited
longest first is what keeps a long prompt from starving behind a stream of short ones.

The other policies exist only so the benchmark ladder can measure what each decision
buys, on the same code: `serial` runs one job at a time; `window`, `budget` and `lanes`
are static batching — a batch is formed when the previous one has ended, its prompts are
padded to the longest, and every member keeps computing (padding rows) until the longest
generation ends. `window` takes what has arrived (up to `window_max_jobs`), `budget` takes
everything admission let in, `lanes` takes one lane. Their padding is real computation,
so their cost is measured, not modelled.

Overlap (`overlap=True`, the pipelined runner's continuous batching): the executor
launches step N+1 before it reads step N's tokens, so the device never waits for the host.
The next step is then scheduled one token behind: every running sequence decodes again
(its input token is taken from step N's output on the device), except one whose step-N
token is its last by length, which the host knows in advance. A sequence that stops on a
stop token at N has also been launched in N+1; that row is wasted and dropped when N+1 is
postprocessed (its KV write lands in its own, just released blocks, before any later
step can reuse them: steps run in order on the device). Tokens are the same as without
overlap; completions are reported one step later.

Pure Python on plain data: tested without a model or a device.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from worker.kv import BlockAllocator
from worker.lanes import lane_of
from worker.sequence import Completion, Request, Sequence

Policy = Literal["serial", "window", "budget", "lanes", "continuous"]
POLICIES: tuple[str, ...] = ("serial", "window", "budget", "lanes", "continuous")
STATIC: frozenset[str] = frozenset({"window", "budget", "lanes"})


@dataclass(slots=True)
class StepPlan:
    """The scheduler's decision for one step."""

    prefill: list[list[Sequence]] = field(default_factory=list)  # one list per lane
    decode: list[Sequence] = field(default_factory=list)  # running sequences, one token each
    pad_to: int = 0  # static batching: prompts padded to this length (0 = no padding)

    @property
    def rows(self) -> list[Sequence]:
        """Sequences in logit-row order: prefills (lane by lane), then decodes."""
        return [s for lane in self.prefill for s in lane] + self.decode

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_step_tokens: int,
                 eos_ids: tuple[int, ...], policy: Policy = "continuous",
                 window_max_jobs: int = 32, overlap: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (have {', '.join(POLICIES)})")
        if overlap and policy != "continuous":
            raise ValueError("overlapped steps need the continuous policy")
        self.overlap = overlap
        self.allocator = allocator
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens  # cap on packed tokens per forward
        self.eos_ids = frozenset(eos_ids)
        self.policy = policy
        self.window_max_jobs = window_max_jobs
        self.lanes: dict[int, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.solo: deque[Sequence] = deque()  # suspected poison jobs, each alone

    # -- entry and exit ---------------------------------------------------------------

    def add(self, req: Request, now: float) -> None:
        """Reserve the request's blocks and queue it in its lane. OutOfBlocks is a bug upstream."""
        self.add_all((req,), now)

    def add_all(self, reqs: Iterable[Request], now: float) -> None:
        """`add` for a submission at once: one numpy pass maps all their blocks to KV slots."""
        reqs = list(reqs)
        bs = self.block_size
        blocks = [self.allocator.allocate(r.key, r.reserved_tokens // bs) for r in reqs]
        flat = np.fromiter(itertools.chain.from_iterable(blocks), np.int64,
                           sum(map(len, blocks)))
        slots = (flat[:, None] * bs + np.arange(bs, dtype=np.int64)[None, :]).reshape(-1)
        # Static policies other than `lanes` ignore length: one lane, arrival order.
        by_length = self.policy in ("continuous", "lanes")
        at = 0
        for req, got in zip(reqs, blocks):
            n = len(got) * bs
            seq = Sequence(req=req, slots=slots[at:at + n],
                           lane=lane_of(len(req.prompt)) if by_length else 0, waiting_since=now)
            at += n
            if req.solo:
                self.solo.append(seq)
            else:
                q = self.lanes.get(seq.lane)
                if q is None:
                    q = self.lanes[seq.lane] = deque()
                q.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.solo or self.lanes)

    def abort_all(self, reason: str) -> list[Completion]:
        """Drop every sequence (fatal teardown); their blocks go back to the pool."""
        now = time.monotonic()
        seqs = self.running + list(self.solo) + [s for q in self.lanes.values() for s in q]
        self.running, self.solo, self.lanes = [], deque(), {}
        return [self._finish(s, "error", now, reason) for s in seqs if not s.done]

    # -- the step ---------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        if self.solo and not self.running:
            # A suspected poison job runs with nothing else, so if it kills the step it dies alone.
            plan = StepPlan(prefill=[[self.solo.popleft()]])
            if self.overlap:
                self.running.extend(plan.prefill[0])  # running from launch on, as below
            return plan
        if self.overlap:
            # One token behind: skip a sequence whose in-flight token is its last by length.
            plan = StepPlan(decode=[s for s in self.running
                                    if len(s.generated) + s.pending < s.req.max_new_tokens])
        else:
            plan = StepPlan(decode=list(self.running))
        if self.solo or (self.running and self.policy != "continuous"):
            return plan  # let the running set drain (before a solo job, or a static batch)
        if self.policy == "continuous":
            self._fill(plan, self.max_step_tokens - len(plan.decode))
            if self.overlap:
                for lane in plan.prefill:  # running from launch on, not from postprocess
                    self.running.extend(lane)
        elif self.policy == "serial":
            self._fill(plan, 1, max_seqs=1)
        else:
            self._form_static_batch(plan)
        return plan

    def _oldest_lane(self) -> int:
        return min(self.lanes, key=lambda k: self.lanes[k][0].waiting_since)

    def _fill(self, plan: StepPlan, room: int, max_seqs: int = 1 << 30) -> None:
        """Whole prompts, oldest lane head first, while they fit `room` tokens."""
        while self.lanes and room > 0 and max_seqs > 0:
            lane = self._oldest_lane()
            q = self.lanes[lane]
            taken: list[Sequence] = []
            while q and max_seqs > 0 and (
                    len(q[0].req.prompt) <= room or not (plan.prefill or taken or plan.decode)):
                s = q.popleft()
                room -= len(s.req.prompt)
                max_seqs -= 1
                taken.append(s)
            if not q:
                del self.lanes[lane]
            if not taken:
                break  # the oldest lane's head does not fit this step: it goes first next step
            plan.prefill.append(taken)

    def _form_static_batch(self, plan: StepPlan) -> None:
        if not self.lanes:
            return
        lane = self._oldest_lane() if self.policy == "lanes" else 0
        q = self.lanes[lane]
        n = min(len(q), self.window_max_jobs) if self.policy == "window" else len(q)
        batch = [q.popleft() for _ in range(n)]
        # Padded prefill must respect the step cap too: B x longest prompt rows.
        longest = max(len(s.req.prompt) for s in batch)
        keep = max(1, self.max_step_tokens // longest)
        for s in reversed(batch[keep:]):
            q.appendleft(s)
        batch = batch[:keep]
        if not q:
            del self.lanes[lane]
        plan.prefill.append(batch)
        plan.pad_to = max(len(s.req.prompt) for s in batch)

    def launched(self, plan: StepPlan) -> None:
        """Overlap only: the plan is on the device; its tokens come back at postprocess."""
        for s in plan.rows:
            s.pending += 1

    def postprocess(self, plan: StepPlan, tokens: list[int], now: float) -> list[Completion]:
        """Append each row's sampled token; retire finished sequences. tokens follow plan.rows."""
        if self.overlap:
            return self._postprocess_overlapped(plan, tokens, now)
        done: list[Completion] = []
        still: list[Sequence] = []
        for seq, tok in zip(plan.rows, tokens, strict=True):
            prefilled = not seq.generated
            width = plan.pad_to if prefilled and plan.pad_to else len(seq.req.prompt)
            # Positions this job occupied: its prompt rows (padding included), then one per
            # sampled token -- or per padding row once it has finished in a static batch.
            seq.computed_tokens += (width if prefilled else 0) + 1
            if seq.done:
                still.append(seq)
                continue
            if prefilled:
                seq.first_token_at = now
            seq.generated.append(tok)
            reason = ("stop" if tok in seq.req.stop_ids or tok in self.eos_ids
                      else "length" if len(seq.generated) >= seq.req.max_new_tokens else None)
            if reason is None:
                still.append(seq)
            elif self.policy in STATIC:
                seq.done = True  # keeps computing padding rows until the batch ends
                seq.generated_reason = reason
                still.append(seq)
            else:
                done.append(self._finish(seq, reason, now))
        self.running = still
        if self.policy in STATIC and still and all(s.done for s in still):
            done.extend(self._finish(s, s.generated_reason, now) for s in still)
            self.running = []
        return done

    def _postprocess_overlapped(self, plan: StepPlan, tokens: list[int],
                                now: float) -> list[Completion]:
        done: list[Completion] = []
        for seq, tok in zip(plan.rows, tokens, strict=True):
            seq.pending -= 1
            if seq.retired:
                continue  # launched before the host saw its stop token: a wasted row
            prefilled = not seq.generated
            seq.computed_tokens += (len(seq.req.prompt) if prefilled else 0) + 1
            if prefilled:
                seq.first_token_at = now
            seq.generated.append(tok)
            reason = ("stop" if tok in seq.req.stop_ids or tok in self.eos_ids
                      else "length" if len(seq.generated) >= seq.req.max_new_tokens else None)
            if reason is not None:
                seq.retired = True
                done.append(self._finish(seq, reason, now))
        if done:
            self.running = [s for s in self.running if not s.retired]
        return done

    def _finish(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> Completion:
        self.allocator.release(seq.req.key)
        return Completion(key=seq.req.key, tokens=seq.generated, finish_reason=reason,
                          computed_tokens=seq.computed_tokens,
                          first_token_at=seq.first_token_at or now, finished_at=now, error=error)
