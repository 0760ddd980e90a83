"""The persistent batch: the running sequences' per-step host state, kept across steps.

A decode step needs, for every running sequence, its input token, position, KV write slot,
the KV slots it attends to, its sampling parameters, and afterwards the checks that say
whether the token it sampled ends it. Rebuilt from the sequences every step, that is a
dozen Python passes over the batch (1.4-2.2 ms at batch 256 on the 2-core machine: longer
than a 1B model's decode step on a datacenter GPU). Here each running sequence holds a row
of numpy arrays from the step it joins to the step it leaves; a step reads them with a
handful of vectorized gathers, and the only per-row Python left is appending the sampled
token to the sequence (vLLM v1's persistent batch, for the same reason).

Rows:
- static from the join: prompt length, token cap, sampling parameters, the slot table
  (the sequence's KV slots, in position order: every block it will ever use is reserved
  when it is admitted), whether it needs the host per token (`slow`: a grammar, logprobs,
  stop ids, a watched stream), whether the model's end ids end it;
- dynamic, mirrored from the sequence wherever the scheduler changes it: tokens generated
  (`ngen`), tokens on the device (`pend`), their sum with the prompt (`nctx`, the next
  token's context), the newest token on the host (`last`), the row it occupied in the
  last step launched (`at`, for feeding the token still in flight), and the decode rows
  it ran on the array path (`rows_run`, added to its computed tokens when it leaves).

A row left is free again only after the next postprocess (`settle`): with overlapped
steps, the step in flight may still name it. The attention groups and their key tables
live beside the rows (`worker.engine.groups`). The mirror is checked against the
sequences by `check` (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.engine.blocks import SCRATCH_SLOT
from worker.engine.groups import Groups, StepGroup
from worker.engine.sequence import Sequence

_NONE = np.zeros(0, dtype=np.int64)


def sampling_flags(temp: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> dict[str, bool]:
    """SamplingBatch's host-side flags: which parts of the sampler any row needs."""
    hot = temp > 0
    return dict(any_random=bool(hot.any()), any_top_k=bool(((top_k > 0) & hot).any()),
                any_top_p=bool(((top_p < 1) & hot).any()))


@dataclass(slots=True)
class DecodeRows:
    """A step's decode rows, host side (`DecodeBatch.decode_inputs`)."""

    order: np.ndarray  # [B] row ids in the step's row order
    ctx: np.ndarray  # [B] keys each row attends to, itself included
    tokens: np.ndarray  # [B] input tokens (0 where the token is still on the device)
    positions: np.ndarray  # [B]
    write_slots: np.ndarray  # [B]
    fed_dst: np.ndarray  # [F] packed rows whose input token is on the device
    fed_src: np.ndarray  # [F] its row in the step in flight's output
    groups: list[dict] = field(default_factory=list)  # AttnGroup fields, host side
    attn_real: int = 0
    attn_padded: int = 0


class DecodeBatch:
    """The running sequences' rows (`join` when one starts decoding, `leave` when it ends)."""

    def __init__(self, block_size: int, eos_ids: frozenset[int], overlap: bool = False):
        self.bs = block_size
        self.overlap = overlap  # tokens may be on the device when a step is prepared
        self.eos = np.array(sorted(eos_ids), dtype=np.int64)
        self.seqs: list[Sequence | None] = []
        self._free: list[int] = []
        # Rows left: free once no step in flight can name them (`settle`, after postprocess).
        self._cooling: list[int] = []
        self._cooled: list[int] = []
        self.cap = self.width = 0
        self._grow(64, 256)
        self.groups = Groups(self)
        self._joins = 0
        self._sampled: np.ndarray | None = None  # the order `sampling` last computed for
        self._sampling: tuple = ()

    # -- rows ----------------------------------------------------------------------------

    def _grow(self, cap: int, width: int) -> None:
        old, n = self.cap, self.cap
        cols = {"plen": np.int64, "max_new": np.int64, "ngen": np.int64, "pend": np.int64,
                "last": np.int64, "at": np.int64, "temp": np.float32, "top_k": np.int64,
                "top_p": np.float32, "seed": np.int64, "lp": np.int64, "slow": np.bool_,
                "grammar": np.bool_, "eos_ends": np.bool_, "held": np.bool_, "gen": np.int64,
                "rows_run": np.int64, "nctx": np.int64}
        for name, dt in cols.items():
            a = np.zeros(cap, dtype=dt)
            if n:
                a[:n] = getattr(self, name)[:n]
            setattr(self, name, a)
        table = np.full((cap, width), SCRATCH_SLOT, dtype=np.int64)
        if n:
            table[:n, :self.width] = self.slots[:n]
        self.slots = table
        self.seqs += [None] * (cap - old)
        self._free = list(range(cap - 1, old - 1, -1)) + self._free
        self.cap, self.width = cap, width

    def join(self, seq: Sequence) -> int:
        """Give `seq` a row (filled from it); its row id."""
        n = len(seq.slots)
        if not self._free or n > self.width:
            self._grow(self.cap * 2 if not self._free else self.cap, max(self.width, n))
        r = self._free.pop()
        req = seq.req
        self.seqs[r] = seq
        seq.row = r
        self.plen[r] = len(req.prompt)
        self.max_new[r] = req.max_new_tokens
        self.temp[r], self.top_k[r], self.top_p[r] = req.temperature, req.top_k, req.top_p
        self.seed[r] = req.seed
        self.lp[r] = req.logprobs
        self.grammar[r] = req.grammar is not None
        self.slow[r] = bool(req.grammar is not None or req.logprobs or req.watch
                            or req.stop_ids)
        self.eos_ends[r] = not req.ignore_eos
        self.slots[r, :n] = seq.slots
        self.slots[r, n:] = SCRATCH_SLOT
        self.sync(seq)
        self._joins += 1
        self.gen[r] = self._joins  # a row reused is another sequence to the groups
        self.held[r] = True
        self.groups.joined.append((r, self._joins))
        return r

    def leave(self, seq: Sequence) -> None:
        r = seq.row
        if r < 0:
            return
        seq.row = -1
        seq.computed_tokens += int(self.rows_run[r])  # its decode rows on the fast path
        self.rows_run[r] = 0
        self.seqs[r] = None
        self.held[r] = False
        self.groups.dirty = True
        self._cooling.append(r)

    def settle(self) -> None:
        """A step has been postprocessed: rows left before the one before it are free (with
        overlapped steps the step in flight may still name a row left since)."""
        self._free += self._cooled
        self._cooled, self._cooling = self._cooling, []

    def sync(self, seq: Sequence) -> None:
        """Copy a sequence's dynamic state into its row (after a change made one by one)."""
        r = seq.row
        self.ngen[r] = len(seq.generated)
        self.pend[r] = seq.pending
        self.nctx[r] = self.plen[r] + self.ngen[r] + seq.pending
        self.last[r] = seq.generated[-1] if seq.generated else 0

    def rows_of(self, seqs: list[Sequence]) -> np.ndarray:
        """The rows of `seqs` (joining those that have none), in their order."""
        for s in seqs:
            if s.row < 0:
                self.join(s)
        return np.fromiter((s.row for s in seqs), np.int64, len(seqs))

    def ctx(self, rows: np.ndarray) -> np.ndarray:
        """Keys each row's next token attends to, itself included (`Sequence.next_index`)."""
        return self.nctx[rows]  # plen + ngen + pend, kept where those change

    # -- a step's inputs -----------------------------------------------------------------

    def decode_inputs(self, order: np.ndarray, groups: list[StepGroup], first: int,
                      ctx: np.ndarray | None = None) -> DecodeRows:
        """The decode rows of a step whose packed rows before them number `first`: `order`
        (rows in group order, `Groups.step`), each one's input token, position and KV write
        slot, and per group its key table (no groups: one fixed-shape forward reads them)."""
        ctx = self.nctx[order] if ctx is None else ctx
        pos = ctx - 1
        tokens = self.last[order]
        if self.overlap and (pend := self.pend[order] > 0).any():
            # overlapped steps: these rows' tokens are still on the device
            fed = np.flatnonzero(pend)
            tokens[fed] = 0
            fed_dst, fed_src = first + fed, self.at[order[fed]]
        else:
            fed_dst = fed_src = _NONE
        out = DecodeRows(order=order, ctx=ctx, tokens=tokens, positions=pos,
                         write_slots=self.slots[order, pos], fed_dst=fed_dst, fed_src=fed_src)
        for g in groups:
            out.groups.append(dict(kv_slots=g.kv, mask=g.mask[:, None, None, :],
                                   rows=(first + g.start, first + g.stop),
                                   shared_slots=g.prefix, memo=g.memo))
            out.attn_padded += (g.stop - g.start) * (g.kv.shape[1] + g.shared)
        out.attn_real = int(ctx.sum())
        return out

    def block_table(self, order: np.ndarray, nblocks: int) -> np.ndarray:
        """[B, nblocks] the KV block ids of `order`'s rows (a sequence's slots run block by
        block: every bs-th one names a block)."""
        return self.slots[order, :nblocks * self.bs:self.bs] // self.bs

    def sampling(self, order: np.ndarray, ctx: np.ndarray
                 ) -> tuple[list[np.ndarray], np.ndarray, dict[str, bool]]:
        """SamplingBatch's five per-row arrays for `order`'s rows (`ctx`: their positions),
        the indices of the constrained ones, and the host-side flags. The same `order`
        object as the last step's (nobody joined or left) reuses what it computed."""
        if order is not self._sampled:
            temp, top_k, top_p = self.temp[order], self.top_k[order], self.top_p[order]
            self._sampled = order
            self._sampling = ([temp, top_k, top_p, self.seed[order]],
                              np.flatnonzero(self.grammar[order]),
                              sampling_flags(temp, top_k, top_p))
        arrays, constrained, flags = self._sampling
        return arrays + [ctx], constrained, flags

    # -- checks (tests) ------------------------------------------------------------------

    def check(self) -> None:
        """The mirror equals the sequences; free and held rows partition the table."""
        held = {r for r, s in enumerate(self.seqs) if s is not None}
        idle = self._free + self._cooling + self._cooled  # free, or soon (`settle`)
        assert len(set(idle)) == len(idle) and held.isdisjoint(idle)
        assert len(held) + len(idle) == self.cap
        assert held == set(np.flatnonzero(self.held).tolist())
        for r in held:
            s = self.seqs[r]
            assert s.row == r, (s.row, r)
            assert self.ngen[r] == len(s.generated), (r, self.ngen[r], len(s.generated))
            assert self.pend[r] == s.pending, (r, self.pend[r], s.pending)
            assert self.nctx[r] == s.next_index, (r, self.nctx[r], s.next_index)
            assert self.last[r] == (s.generated[-1] if s.generated else 0)
            assert (self.slots[r, :len(s.slots)] == s.slots).all()
