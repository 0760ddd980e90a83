"""Turns a StepPlan into tensors, runs the model and the sampler, and syncs once.

Host-side metadata (token ids, positions, KV slots, attention masks) is built with numpy;
the only device-to-host transfer of a step is the sampled token ids, which the scheduler
needs to decide who finished.

Two modes (`RUNNER_MODES`):
- `eager`: every step runs the packed forward as built, each input tensor handed over as
  is (on the CPU, `torch.from_numpy` views: no copy at all).
- `pipelined` (the default on CUDA; rung 5 of the ladder): a step's metadata goes to the
  device in one asynchronous copy from pinned memory (`worker.engine.staging`), and a decode-only
  step runs at a fixed bucketed shape, replaying a captured CUDA graph (`worker.engine.graphs`)
  where that pays. Prefill and mixed steps run the packed forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from worker.engine.batch import DecodeBatch, DecodeRows, sampling_flags
from worker.engine.cascades import by_tail_length, shared_prefixes
from worker.engine.fetch import Fetch, Launched, token_logprobs
from worker.engine.graphs import DecodeGraphs, GraphStep
from worker.engine.kv import KVPool
from worker.engine.modes import RUNNER_MODES
from worker.engine.packing import Builder, row_inputs
from worker.model.decoder import AttnGroup, StepInput, Transformer
from worker.engine.sampling import SamplingBatch, sample
from worker.engine.scheduler import StepPlan
from worker.engine.sequence import Sequence
from worker.engine.staging import Stager
from worker.model.grammar import masks_for


SCRATCH_SLOT = KVPool.SCRATCH_SLOT


@dataclass(slots=True)
class StepShape:
    """What a step computed, for the step report (real vs padded work)."""

    rows: int  # packed token rows through the dense layers (no padding by construction)
    attn_real: int  # query x key pairs that were needed
    attn_padded: int  # query x key pairs computed, padding included
    graphed: bool = False  # a fixed-shape decode step (a graph replay on CUDA)
    mask_s: float = 0.0  # host time filling structured-output masks for this step


def _sampling(rows: list[Sequence], vocab: int, batch: DecodeBatch | None = None,
              d: DecodeRows | None = None) -> tuple[list[np.ndarray], dict[str, bool]]:
    """SamplingBatch's tensors (host side, in its field order: five, then the two mask
    fields when a row is constrained) and its host-side flags. Constrained rows' masks are
    filled here, from their grammars' state after every token the host has seen. With
    `batch`, the last `len(d.order)` rows are its decode rows, read from their batch rows."""
    head = rows[:len(rows) - len(d.order)] if d is not None else rows
    arrays = [np.array([s.req.temperature for s in head], dtype=np.float32),
              np.array([s.req.top_k for s in head], dtype=np.int64),
              np.array([s.req.top_p for s in head], dtype=np.float32),
              np.array([s.req.seed for s in head], dtype=np.int64),
              np.array([s.next_index for s in head], dtype=np.int64)] if head else []
    constrained = [i for i, s in enumerate(head) if s.req.grammar is not None]
    flags = None
    if d is not None:
        tail, tail_constrained, flags = batch.sampling(d.order, d.ctx)
        if head:
            arrays = [np.concatenate((a, t)) for a, t in zip(arrays, tail)]
            flags = None
        else:
            arrays = tail
        if len(tail_constrained):
            constrained += (len(head) + tail_constrained).tolist()
    temp, top_k, top_p = arrays[:3]
    if constrained:
        masks, why = masks_for([rows[i].req.grammar for i in constrained], vocab)
        for i, mask, w in zip(constrained, masks, why):
            s = rows[i]
            s.mask = mask  # postprocess checks the token against it
            if w is not None and s.failed is None:
                s.failed = ("grammar_failed", w)  # its token is not taken: the job ends
        arrays += [np.array(constrained, dtype=np.int64), masks]
    return arrays, flags or sampling_flags(temp, top_k, top_p)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _block_table(seqs: list[Sequence], ctx: list[int], block_size: int) -> np.ndarray:
    """[B, nblocks] the KV block ids each sequence's first `ctx` positions lie in."""
    table = np.zeros((len(seqs), -(-max(ctx) // block_size)), dtype=np.int64)
    for i, (s, n) in enumerate(zip(seqs, ctx)):
        k = -(-n // block_size)
        table[i, :k] = s.blocks[:k]
    return table


class Runner:
    def __init__(self, model: Transformer, kv_pool: torch.Tensor, device: torch.device,
                 mode: str = "eager", block_size: int = 16, max_ctx: int = 0,
                 max_batch: int = 512):
        if mode not in RUNNER_MODES:
            raise ValueError(f"unknown runner mode {mode!r} (have {', '.join(RUNNER_MODES)})")
        self.model = model
        self.kv = kv_pool
        self.device = device
        self.mode = mode
        self.block_size = block_size
        self._on_cpu = device.type == "cpu"
        if device.type == "cuda":
            # Streams, events and graph capture use the thread's current device: make it
            # this one (the executor thread does the same when it starts).
            torch.cuda.set_device(device)
        self.stager = Stager(device) if mode == "pipelined" else None
        self.graphs = (DecodeGraphs(model, kv_pool, device, block_size, max_ctx, max_batch)
                       if mode == "pipelined" and max_ctx and model.args.n_layers else None)
        self._fetch = Fetch(device)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        # On the CPU `.to` is a no-op that still drops and retakes the GIL (every torch call
        # does), handing the event loop's thread a wait each time: skip it.
        return t if self._on_cpu else t.to(self.device, non_blocking=True)

    def prepare(self, plan: StepPlan, prev: Launched | None = None) -> Step:
        """The step's device inputs, in one staged copy. `prev`: the step still in flight
        (overlap), whose output holds the input tokens of this step's decode rows.

        With decode graphs, the decode rows go to a fixed-shape forward (a graph replay)
        and only the prompts, if any, to the packed forward: the two touch disjoint KV
        slots and their logits are concatenated in `plan.rows` order (prompts first)."""
        b = Builder()
        for lane, shared in self._prefill_groups(plan):
            b.prefill(lane, plan.pad_to, shared)
        batch, graphs, key, d = plan.batch, self.graphs, None, None
        # (A failed start-up check keeps decode on the packed forward, which is tested;
        # static batching's finished rows, never in a batch, are that forward's business.)
        use_graphs = graphs is not None and not graphs.disabled and bool(plan.decode)
        if plan.decode and batch is not None:
            rows = plan.decode_rows if plan.decode_rows is not None else batch.rows_of(plan.decode)
            order, groups, ctx = batch.groups.step(rows)
            if order is not rows:  # (the same object: the rows are already in group order)
                plan.decode[:] = [batch.seqs[r] for r in order.tolist()]  # logit rows follow
                plan.decode_rows = order
            if use_graphs:
                key = graphs.choose(batch.ctx(order), len(groups))
            d = batch.decode_inputs(order, groups if key is None else [],
                                    0 if key is not None else b.rows, ctx)
            if key is None:
                b.decode_rows(d)
        elif plan.decode:
            ctx = [s.next_index for s in plan.decode]
            use_graphs = use_graphs and not any(s.done for s in plan.decode)
            key = graphs.choose(ctx) if use_graphs else None
            if key is None:
                b.decode(plan.decode, self.block_size)  # reorders plan.decode into its groups
        t_mask = time.perf_counter()
        sampling, flags = _sampling(plan.rows, self.model.args.vocab_size, d and batch, d)
        mask_s = time.perf_counter() - t_mask if len(sampling) > 5 else 0.0
        top_n = max((s.req.logprobs for lane in plan.prefill for s in lane), default=0)
        top_n = max(top_n, int(batch.lp[d.order].max()) if d is not None else
                    max((s.req.logprobs for s in plan.decode), default=0))
        host: list[np.ndarray] = []
        if self.stager is None:  # tables that persist across steps: tensors made once
            for g in b.groups:
                memo = g.pop("memo", None)
                if memo is not None:
                    if not memo:
                        memo.update((k, self._t(v)) for k, v in g.items()
                                    if k != "rows" and v is not None)
                    g.update(memo)
        fields = [(k, v) for g in b.groups for k, v in g.items()
                  if k not in ("rows", "memo") and isinstance(v, np.ndarray)]
        logit_rows = b.logit_rows_array()
        if b.rows:
            host += [_cat(b.tokens), _cat(b.positions), _cat(b.slots)]
            host += [] if logit_rows is None else [logit_rows]
            host += [np.ascontiguousarray(v) for _, v in fields]
        fed = _feed(b.fed, prev)
        if d is not None and len(d.fed_dst):
            if prev is None:
                raise RuntimeError("a sequence has a token on the device but no step is in flight")
            fed = [np.concatenate([fed[0], d.fed_dst]), np.concatenate([fed[1], d.fed_src])] \
                if fed else [d.fed_dst, d.fed_src]
        if key is not None:
            seqs = plan.decode
            if d is not None:
                table = batch.block_table(d.order, key[1] // self.block_size)
                host.append(graphs.host_inputs(key, d.tokens, d.positions, d.write_slots,
                                               d.ctx, table))
                b.attn_real += d.attn_real
            else:
                host.append(graphs.host_inputs(key, *row_inputs(seqs, ctx), ctx=ctx,
                                               table=_block_table(seqs, ctx, self.block_size)))
                fed = _feed([(i, s) for i, s in enumerate(seqs) if s.pending], prev)
                b.attn_real += sum(ctx)
            b.attn_padded += key[0] * key[1]
        host += sampling + fed
        dev = self.stager.stage(host) if self.stager else [self._t(a) for a in host]
        it = iter(dev)
        inp = graph = None
        if b.rows:
            tokens, positions, write_slots = (next(it) for _ in range(3))
            logit_rows = None if logit_rows is None else next(it)
            groups = [AttnGroup(**{k: next(it) if isinstance(v, np.ndarray) else v
                                   for k, v in g.items() if k != "memo"}) for g in b.groups]
            inp = StepInput(tokens=tokens, positions=positions, write_slots=write_slots,
                            groups=groups, logit_rows=logit_rows)
        if key is not None:
            graph = GraphStep(key, len(plan.decode), next(it))
        got = [next(it) for _ in range(len(sampling))]
        sb = SamplingBatch(*got[:5], **flags, **dict(zip(("mask_rows", "mask_bits"), got[5:])))
        feed = (next(it), next(it)) if fed else None
        shape = StepShape(b.rows + (key[0] if key else 0), b.attn_real, b.attn_padded,
                          graphed=key is not None, mask_s=mask_s)
        return Step(plan, inp, graph, sb, shape, feed, top_n)

    def _prefill_groups(self, plan: StepPlan) -> list[tuple[list[Sequence], int]]:
        """The step's prompts as attention groups: those that start after a prefix they
        hold in the same blocks, cascade groups per prefix and tail length; the rest in
        their lanes.
        Regroups `plan.prefill` in place (the logit rows follow it)."""
        bs = self.block_size
        lanes = plan.prefill
        if plan.pad_to or not any(s.start for lane in lanes for s in lane):
            return [(lane, 0) for lane in lanes]
        cached = [s for lane in lanes for s in lane if s.start]
        cascades = by_tail_length(shared_prefixes(cached, [s.start for s in cached], bs),
                                  [len(s.req.prompt) for s in cached], bs)
        taken = {id(cached[i]) for _, idx in cascades for i in idx}
        groups = [([cached[i] for i in idx], shared) for shared, idx in cascades]
        groups += [(rest, 0) for lane in lanes
                   if (rest := [s for s in lane if id(s) not in taken])]
        plan.prefill[:] = [g for g, _ in groups]
        return groups

    @torch.inference_mode()
    def launch(self, step: Step, prev: Launched | None = None) -> Launched:
        """Queue the step's forwards and sampling; nothing here waits for the device."""
        fed = None
        if step.feed is not None:
            if prev is None:
                raise RuntimeError("a step with tokens still on the device needs that step")
            dst, src = step.feed
            fed = (dst, prev.tokens.index_select(0, src))  # [F] ids from the step in flight
        parts = []
        if step.inp is not None:
            if fed is not None and step.graph is None:
                step.inp.tokens.index_copy_(0, *fed)
            parts.append(self.model(step.inp, self.kv))  # [Bp, V]
        if step.graph is not None:
            parts.append(self.graphs.run(step.graph, fed))  # [Bd, V]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        tokens = sample(logits, step.sb)  # [B] int64, on the device
        lp = token_logprobs(logits, tokens, step.top_n) if step.top_n else None
        return Launched(step.plan, tokens, *self._fetch.start(tokens, lp))

    def run(self, step: Step) -> list[int]:
        """Launch and wait: the step's tokens on the host (its one sync)."""
        return self.launch(step).wait()


def _feed(fed: list[tuple[int, Sequence]], prev: Launched | None) -> list[np.ndarray]:
    """[dst rows, src rows]: this step's rows whose input token is row src of `prev`'s output."""
    if not fed:
        return []
    if prev is None:
        raise RuntimeError("a sequence has a token on the device but no step is in flight")
    return [np.array([i for i, _ in fed], dtype=np.int64),
            np.array([prev.row_of[s.req.key] for _, s in fed], dtype=np.int64)]


@dataclass(slots=True)
class Step:
    """A prepared step: what `launch` needs."""

    plan: StepPlan
    inp: StepInput | None  # the packed forward (prompts; decode rows without graphs)
    graph: GraphStep | None  # the fixed-shape decode forward
    sb: SamplingBatch
    shape: StepShape
    feed: tuple[torch.Tensor, torch.Tensor] | None = None  # (dst rows, src rows of prev)
    top_n: int = 0  # logprobs: the widest top-n a row asked for; 0: none asked
