"""The benchmark ladder's older batching policies, on the product's own scheduler.

They exist only so `fabric-loadgen bench` can measure what each decision buys, on the same
code (`--policy`, never an engine field):

- `serial`: one job at a time.
- `window`, `budget`, `lanes`: static batching. A batch is formed when the previous one has
  ended, its prompts are padded to the longest, and every member keeps computing (padding
  rows) until the longest generation ends. `window` takes what has arrived (up to
  `window_max_jobs`), `budget` takes everything admission let in, `lanes` takes one lane.

Their padding is real computation, so their cost is measured, not modelled. Only `lanes`
and the product (`continuous`) keep prompts in lanes by length; the others queue in arrival
order.
"""

from __future__ import annotations

import numpy as np

from worker.engine.blocks import BlockPool
from worker.engine.modes import POLICIES
from worker.engine.scheduler import Scheduler, StepPlan
from worker.engine.sequence import Completion, Request, Sequence


def make_scheduler(policy: str, pool: BlockPool, block_size: int,
                   max_step_tokens: int, eos_ids: tuple[int, ...],
                   overlap: bool = False) -> Scheduler:
    """The product's scheduler for `continuous`, else the ladder rung named."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (have {', '.join(POLICIES)})")
    if policy == "continuous":
        return Scheduler(pool, block_size, max_step_tokens, eos_ids, overlap=overlap)
    if overlap:
        raise ValueError("overlapped steps need the continuous policy")
    return LadderScheduler(policy, pool, block_size, max_step_tokens, eos_ids)


class LadderScheduler(Scheduler):
    def __init__(self, policy: str, pool: BlockPool, block_size: int,
                 max_step_tokens: int, eos_ids: tuple[int, ...], window_max_jobs: int = 32):
        super().__init__(pool, block_size, max_step_tokens, eos_ids)
        self.batch = None  # padding rows of finished members: the per-sequence path
        self.policy = policy
        self.window_max_jobs = window_max_jobs
        self._reasons: dict[int, str] = {}  # static batch: finished members' finish reasons

    def _lane(self, req: Request) -> int:
        return super()._lane(req) if self.policy == "lanes" else 0

    def _add_prompts(self, plan: StepPlan) -> None:
        if self.running:
            return  # a static batch (or the serial job) runs to its end before the next
        if self.policy == "serial":
            self._fill(plan, 1, max_seqs=1)
        else:
            self._form_static_batch(plan)

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

    def end(self, key: int, reason: str, now: float) -> Completion | None:
        seq = self.live.get(key)
        if self.policy != "serial" and seq is not None and seq in self.running:
            if not seq.done:  # a static batch's member: it finishes with its batch
                seq.done = True
                self._reasons[key] = reason
            return None
        return super().end(key, reason, now)

    def postprocess(self, plan: StepPlan, tokens: list[int], now: float,
                    logprobs: np.ndarray | None = None) -> list[Completion]:
        if self.policy == "serial":
            return super().postprocess(plan, tokens, now, logprobs)
        still: list[Sequence] = []
        for i, (seq, tok) in enumerate(zip(plan.rows, tokens, strict=True)):
            if seq.done:
                seq.computed_tokens += 1  # a padding row: it has finished, the batch has not
            else:
                reason = self._append(seq, tok, plan.pad_to or len(seq.req.prompt), now,
                                      None if logprobs is None else logprobs[i])
                if reason is not None:
                    seq.done = True  # keeps computing padding rows until the batch ends
                    self._reasons[seq.req.key] = reason
            still.append(seq)
        self.running = still
        if still and all(s.done for s in still):
            self.running = []
            return [self._finish(s, self._reasons.pop(s.req.key), now) for s in still]
        return []
