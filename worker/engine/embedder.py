"""The engine of an embedding worker: the same admission, lanes and packing, no decode.

An embedding checkpoint (sentence-transformers layout, `worker.model.embed_checkpoint`)
makes the worker an embedding worker. Its jobs need no KV: each is its input, prefilled
once and pooled. So a step is whole inputs taken from the length lanes, oldest lane head
first, until the step's token cap (the generation scheduler's `_fill`, without the running
batch); the dense layers run on the packed tokens, attention once per lane, and every job
of the step completes in it.

The pieces keep the shapes the executor drives (`scheduler()` / `runner()` / `turn`): the
scheduler plans, the runner prepares and launches, `Launched.wait` hands back one
embedding row per job, `postprocess` turns them into Completions. The block pool stays
the admission unit -- a job holds its input's blocks, rounded as for generation, from
admission to its step -- but there is no KV tensor behind it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.engine.blocks import BlockPool
from worker.engine.lanes import lane_of
from worker.engine.runner import StepShape
from worker.engine.scheduler import StepPlan
from worker.engine.sequence import Completion, Request, Sequence
from worker.model.embed_checkpoint import LoadedEncoder

_NO_SLOTS = np.zeros(0, dtype=np.int64)


class EmbedScheduler:
    overlap = False

    def __init__(self, pool: BlockPool, block_size: int, max_step_tokens: int):
        self.pool = pool
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens
        self.lanes: dict[int, deque[Sequence]] = {}
        self.running: list[Sequence] = []  # always empty: a job ends in its step
        self.live: dict[int, Sequence] = {}
        self.progress: list[tuple[int, int]] = []  # no tokens to report

    def add_all(self, reqs: Iterable[Request], now: float) -> None:
        bs = self.block_size
        for r in reqs:
            res = r.reservation or self.pool.reserve(r.key, (), r.reserved_tokens // bs)
            seq = Sequence(req=r, blocks=res.blocks, slots=_NO_SLOTS, lane=lane_of(len(r.prompt)),
                           waiting_since=now)
            self.live[r.key] = seq
            self.lanes.setdefault(seq.lane, deque()).append(seq)

    def has_work(self) -> bool:
        return bool(self.lanes)

    def schedule(self) -> StepPlan:
        """Whole inputs, oldest lane head first, while they fit the step's token cap (the
        first always goes: no input is longer than the cap)."""
        plan = StepPlan()
        room = self.max_step_tokens
        while self.lanes and room > 0:
            lane = min(self.lanes, key=lambda k: self.lanes[k][0].waiting_since)
            q = self.lanes[lane]
            taken = []
            while q and (len(q[0].req.prompt) <= room or not (plan.prefill or taken)):
                s = q.popleft()
                room -= len(s.req.prompt)
                taken.append(s)
            if not q:
                del self.lanes[lane]
            if not taken:
                break
            plan.prefill.append(taken)
        return plan

    def end(self, key: int, reason: str, now: float) -> Completion | None:
        seq = self.live.get(key)
        if seq is None:
            return None
        q = self.lanes[seq.lane]
        q.remove(seq)
        if not q:
            del self.lanes[seq.lane]
        return self._finish(seq, reason, now, None)

    def postprocess(self, plan: StepPlan, rows: list[np.ndarray], now: float,
                    _logprobs: Any = None) -> list[Completion]:
        return [self._finish(s, "stop", now, row) for s, row in zip(plan.rows, rows, strict=True)]

    def _finish(self, seq: Sequence, reason: str, now: float,
                row: np.ndarray | None) -> Completion:
        self.pool.release(seq.req.key)
        del self.live[seq.req.key]
        n = len(seq.req.prompt) if row is not None else 0
        return Completion(key=seq.req.key, tokens=[], finish_reason=reason, computed_tokens=n,
                          first_token_at=now, embedding=row)


@dataclass(slots=True)
class EmbedStep:
    plan: StepPlan
    shape: StepShape


@dataclass(slots=True)
class _Done:
    """A launched embedding step (it ran synchronously: the rows are on the host)."""

    plan: StepPlan
    rows: list[np.ndarray]
    logprobs: None = None
    row_of: dict = field(default_factory=dict)

    def wait(self) -> list[np.ndarray]:
        return self.rows


class EmbedRunner:
    mode = "eager"
    graphs = None

    def __init__(self, loaded: LoadedEncoder, device: torch.device):
        self.model = loaded.model
        self.device = device

    def prepare(self, plan: StepPlan, prev: Any = None) -> EmbedStep:
        lens = [[len(s.req.prompt) for s in lane] for lane in plan.prefill]
        rows = sum(map(sum, lens))
        real = sum(n * n for lane in lens for n in lane)
        padded = sum(len(lane) * max(lane) ** 2 for lane in lens)
        return EmbedStep(plan, StepShape(rows, real, padded))

    def launch(self, step: EmbedStep, prev: Any = None) -> _Done:
        seqs = [s.req.prompt for s in step.plan.rows]
        groups, at = [], 0
        for lane in step.plan.prefill:
            groups.append(list(range(at, at + len(lane))))
            at += len(lane)
        out = self.model.embed(seqs, groups, normalize=False)  # jobs normalize their own
        return _Done(step.plan, list(out.float().cpu().numpy()))

    def run(self, step: EmbedStep) -> list[np.ndarray]:
        return self.launch(step).wait()


class EmbedArgs:
    """What the executor reads of a model's shape (for its step-cost estimate)."""

    def __init__(self, loaded: LoadedEncoder):
        a = loaded.model.args
        self.dim, self.n_layers = a.dim, a.n_layers
        self._params = sum(p.numel() for p in loaded.model.parameters())
        self.vocab_size = a.vocab_size

    def num_params(self) -> int:
        return self._params


@dataclass(slots=True)
class EmbedModel:
    """`Engine.loaded` for an embedding worker: the encoder and its tokenizer."""

    encoder: LoadedEncoder
    args: EmbedArgs
    eos_ids: tuple[int, ...] = ()
    chat: None = None

    @property
    def tokenizer(self) -> Any:
        return self.encoder.tokenizer

    @property
    def info(self) -> Any:
        return self.encoder.info

    @property
    def name(self) -> str:
        return self.encoder.name


class BlocksOnly:
    """`Engine.pool` for an embedding worker: the admission unit without a KV tensor."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = BlockPool(num_blocks, block_size, first=1, caching=False)
        self.nbytes = 0


@dataclass(slots=True)
class EmbedEngine:
    loaded: EmbedModel
    pool: BlocksOnly
    device: torch.device
    block_size: int
    max_step_tokens: int
    policy: str = "continuous"
    runner_mode: str = "eager"
    max_seq_len: int = 0
    task = "embed"
    overlaps = False

    def scheduler(self, overlap: bool = False) -> EmbedScheduler:
        return EmbedScheduler(self.pool.blocks, self.block_size, self.max_step_tokens)

    def runner(self) -> EmbedRunner:
        return EmbedRunner(self.loaded.encoder, self.device)


def embed_now(engine: EmbedEngine, prompts: list[list[int]]) -> list[np.ndarray]:
    """Embed inputs in this thread, as the executor would (tests, the benchmark ceiling)."""
    from worker.engine.blocks import padded_tokens

    sched, runner = engine.scheduler(), engine.runner()
    reqs = [Request(key=i, prompt=p, max_new_tokens=0,
                    reserved_tokens=padded_tokens(len(p), engine.block_size), temperature=0.0,
                    top_k=0, top_p=1.0, seed=0, stop_ids=frozenset())
            for i, p in enumerate(prompts)]
    sched.add_all(reqs, time.monotonic())
    out: dict[int, np.ndarray] = {}
    while sched.has_work():
        plan = sched.schedule()
        for c in sched.postprocess(plan, runner.run(runner.prepare(plan)), time.monotonic()):
            out[c.key] = c.embedding
    return [out[i] for i in range(len(prompts))]
