"""What the next step runs: every running sequence decodes, waiting prompts fill the rest.

Design, once: a step is one packed forward over (a) one new token for every running
sequence and (b) whole prompts taken from the waiting lanes, oldest lane head first, until
the step's token cap. Sequences join the running set the step they are prefilled and leave
it the step they finish, so the batch is continuous. Every sequence already holds its KV
blocks (reserved on entry), so scheduling never fails for memory and no sequence is ever
preempted. Taking the lane whose head has waited longest first is what keeps a long prompt
from starving behind a stream of short ones.

Shared prefixes: a sequence's blocks may hold a prefix another job computed (the block
pool found them by content when the job was reserved). At prefill it computes only from
its first block whose KV is neither written nor being written earlier in the same step
(`start`): the first sequence scheduled with an uncomputed shared prefix computes it, and
the others in the same step read it -- every layer writes the step's KV before any
attention reads it. A prompt found whole still computes its last token, for its logits.
A block's KV counts as written once its step is planned: steps run in order. Full blocks
of generated tokens get their content keys as they fill, so the next turn of a
conversation finds this one's reply too.

Overlap (`overlap=True`, the pipelined runner): the executor launches step N+1 before it
reads step N's tokens, so the device never waits for the host. The next step is then
scheduled one token behind: every running sequence decodes again (its input token is taken
from step N's output on the device), except one whose step-N token is its last by length,
which the host knows in advance. A sequence that stops on a stop token at N has also been
launched in N+1; that row is wasted and dropped when N+1 is postprocessed (its KV write
lands in its own, just released blocks, before any later step can reuse them: steps run
in order on the device). Tokens are the same as without overlap; completions are reported
one step later.

The benchmark ladder's older policies (serial and static batching) subclass this in
`worker.engine.ladder`. Pure Python on plain data: tested without a model or a device.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from worker.engine.batch import DecodeBatch
from worker.engine.blocks import BlockPool, block_hashes
from worker.engine.lanes import lane_of
from worker.engine.postprocess import Postprocess
from worker.engine.sequence import Completion, Request, Sequence


@dataclass(slots=True)
class StepPlan:
    """The scheduler's decision for one step."""

    prefill: list[list[Sequence]] = field(default_factory=list)  # one list per lane
    decode: list[Sequence] = field(default_factory=list)  # running sequences, one token each
    pad_to: int = 0  # static batching (ladder only): prompts padded to this length; 0 = none
    # The persistent batch the decode rows live in (None: the ladder's policies), and their
    # rows in it, in `decode` order once the runner has grouped them.
    batch: DecodeBatch | None = None
    decode_rows: np.ndarray | None = None

    @property
    def rows(self) -> list[Sequence]:
        """Sequences in logit-row order: prefills (lane by lane), then decodes."""
        return [s for lane in self.prefill for s in lane] + self.decode

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler(Postprocess):
    def __init__(self, pool: BlockPool, block_size: int, max_step_tokens: int,
                 eos_ids: tuple[int, ...], overlap: bool = False):
        self.overlap = overlap
        self.pool = pool
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens  # cap on packed tokens per forward
        self.eos_ids = frozenset(eos_ids)
        self.lanes: dict[int, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.solo: deque[Sequence] = deque()  # suspected poison jobs, each alone
        self.live: dict[int, Sequence] = {}  # every sequence added and not finished, by key
        # (key, token) of watched requests' tokens since the executor last took them.
        self.progress: list[tuple[int, int]] = []
        self.batch: DecodeBatch | None = DecodeBatch(block_size, self.eos_ids, overlap)
        self._running_rows: np.ndarray | None = None  # `running`'s batch rows; None: unknown

    # -- entry and exit ---------------------------------------------------------------

    def add(self, req: Request, now: float) -> None:
        """Reserve the request's blocks and queue it in its lane. OutOfBlocks is a bug upstream."""
        self.add_all((req,), now)

    def add_all(self, reqs: Iterable[Request], now: float) -> None:
        """`add` for a submission at once: one numpy pass maps all their blocks to KV slots.
        A request without a reservation (offline use) reserves its blocks here."""
        reqs = list(reqs)
        bs = self.block_size
        for r in reqs:
            if not r.hashes and self.pool.caching:
                r.hashes = tuple(block_hashes(r.prompt, bs))
        blocks = [(r.reservation or self.pool.reserve(r.key, r.hashes, r.reserved_tokens // bs))
                  .blocks for r in reqs]
        flat = np.fromiter(itertools.chain.from_iterable(blocks), np.int64,
                           sum(map(len, blocks)))
        slots = (flat[:, None] * bs + np.arange(bs, dtype=np.int64)[None, :]).reshape(-1)
        at = 0
        for req, got in zip(reqs, blocks):
            n = len(got) * bs
            seq = Sequence(req=req, blocks=got, slots=slots[at:at + n], lane=self._lane(req),
                           waiting_since=now, keys=list(req.hashes))
            at += n
            self.live[req.key] = seq
            if req.solo:
                self.solo.append(seq)
            else:
                q = self.lanes.get(seq.lane)
                if q is None:
                    q = self.lanes[seq.lane] = deque()
                q.append(seq)

    def _lane(self, req: Request) -> int:
        return lane_of(len(req.prompt))

    def has_work(self) -> bool:
        return bool(self.running or self.solo or self.lanes)

    # -- the step ---------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = self._plan()
        # The host tier's copies, once a step, before it is launched: it waits for those it
        # reads or overwrites, and the rest run beside it.
        self.pool.flush()
        return plan

    def _plan(self) -> StepPlan:
        self._planned: set[int] = set()  # blocks a sequence earlier in this step computes
        if self.solo and not self.running:
            # A suspected poison job runs with nothing else, so if it kills the step it dies alone.
            seq = self.solo.popleft()
            self._set_start(seq)
            plan = StepPlan(prefill=[[seq]])
            if self.overlap:
                self.running.extend(plan.prefill[0])  # running from launch on, as below
                self._running_rows = None
            return plan
        plan = StepPlan(decode=list(self.running), batch=self.batch,
                        decode_rows=self._running_rows)
        if self.overlap:
            self._one_behind(plan)
        if not self.solo:  # else let the running set drain before the solo job
            self._add_prompts(plan)
        return plan

    def _one_behind(self, plan: StepPlan) -> None:
        """Overlap: skip a sequence whose in-flight token is its last by length, and a
        constrained one whose in-flight token its grammar has not seen (its next mask
        depends on it): those decode every other step."""
        b = self.batch  # (the ladder's policies, which have none, never overlap)
        rows = plan.decode_rows
        if rows is None:
            rows = self._running_rows = b.rows_of(plan.decode)
        ok = (b.ngen[rows] + b.pend[rows] < b.max_new[rows]) & ~((b.pend[rows] > 0)
                                                                 & b.grammar[rows])
        if not ok.all():
            keep = np.flatnonzero(ok)
            plan.decode = [plan.decode[i] for i in keep.tolist()]
            rows = rows[keep]
        plan.decode_rows = rows

    def _add_prompts(self, plan: StepPlan) -> None:
        """Fill the step's remaining token room with waiting prompts."""
        self._fill(plan, self.max_step_tokens - len(plan.decode))
        if self.overlap:
            for lane in plan.prefill:  # running from launch on, not from postprocess
                self.running.extend(lane)
                self._running_rows = None

    def _oldest_lane(self) -> int:
        return min(self.lanes, key=lambda k: self.lanes[k][0].waiting_since)

    def _fill(self, plan: StepPlan, room: int, max_seqs: int = 1 << 30) -> None:
        """Whole prompts (what of them is not computed yet), oldest lane head first, while
        they fit `room` tokens."""
        while self.lanes and room > 0 and max_seqs > 0:
            lane = self._oldest_lane()
            q = self.lanes[lane]
            taken: list[Sequence] = []
            while q and max_seqs > 0:
                head = q[0]
                start = self._start_of(head)
                cost = len(head.req.prompt) - start
                if cost > room and (plan.prefill or taken or plan.decode):
                    break
                s = q.popleft()
                self._set_start(s, start)
                room -= cost
                max_seqs -= 1
                taken.append(s)
            if not q:
                del self.lanes[lane]
            if not taken:
                break  # the oldest lane's head does not fit this step: it goes first next step
            plan.prefill.append(taken)

    def _start_of(self, seq: Sequence) -> int:
        """Prompt tokens `seq` need not compute: its leading full blocks whose KV is written,
        or computed earlier in this step. Never the whole prompt: the last token's logits
        are wanted."""
        return min(self._cached_of(seq), len(seq.req.prompt) - 1)

    def _cached_of(self, seq: Sequence) -> int:
        if not self.pool.caching:
            return 0
        ready, planned = self.pool.ready, self._planned
        n = 0
        for b in seq.blocks[:len(seq.keys)]:
            if not (ready[b] or b in planned):
                break
            n += 1
        return n * self.block_size

    def _set_start(self, seq: Sequence, start: int | None = None) -> None:
        """`seq` is prefilled in this step from `start`: its full prompt blocks from there
        on are written by this step, for anyone scheduled after it."""
        seq.cached = self._cached_of(seq)
        seq.start = min(seq.cached, len(seq.req.prompt) - 1) if start is None else start
        bs = self.block_size
        mine = seq.blocks[seq.cached // bs:len(seq.req.prompt) // bs]
        self._planned.update(mine)
        self.pool.mark_ready(mine)

    def launched(self, plan: StepPlan) -> None:
        """Overlap only: the plan is on the device; its tokens come back at postprocess."""
        rows = plan.rows
        for s in rows:
            s.pending += 1
        b = self.batch
        if b is not None:  # every row is running from its launch on (the prompts join here)
            prompts = b.rows_of(rows[:len(rows) - len(plan.decode)])
            ids = np.concatenate((prompts, self._decode_rows(plan)))
            mine = ids[len(prompts):]  # (a prompt joined with its pending counted)
            b.pend[mine] += 1
            b.nctx[mine] += 1
            b.at[ids] = np.arange(len(ids))

    def end(self, key: int, reason: str, now: float,
            error: tuple[str, str] | None = None) -> Completion | None:
        """End a sequence before its time (cancelled, a stop string the loop found, or an
        error of its own: `error`), at a step boundary: out of its lane or the running
        batch, its blocks released, its tokens so far in the Completion. None: not here
        (finished already, or never came)."""
        seq = self.live.get(key)
        if seq is None:
            return None
        if error is not None:
            seq.failed = error
        if seq in self.running:
            if self.overlap:
                seq.retired = True  # rows of it still on the device are dropped when read
            self.running.remove(seq)
            self._running_rows = None
        elif seq.req.solo:
            self.solo.remove(seq)
        else:
            q = self.lanes[seq.lane]
            q.remove(seq)
            if not q:
                del self.lanes[seq.lane]
        return self._finish(seq, reason, now)
