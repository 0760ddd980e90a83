"""A step's packed rows on the host: prompts and decode rows laid end to end, with their
attention groups.

The dense layers run on packed tokens and never pad; attention runs per group
(`worker.model.decoder.AttnGroup`). `Builder` accumulates a step: prompts lane by lane
(`prefill`, vectorized over the lane), then the decode rows, either from the persistent
batch (`decode_rows`: its key tables already built, `worker.engine.groups`) or, for the
ladder's static batches, from the sequences (`decode`).
"""

from __future__ import annotations

import itertools

import numpy as np

from worker.engine.batch import DecodeRows
from worker.engine.blocks import SCRATCH_SLOT
from worker.engine.cascades import decode_groups
from worker.engine.sequence import Sequence


class Builder:
    """Accumulates one step's packed rows and attention groups on the host."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        self.groups: list[dict] = []  # AttnGroup fields, host side
        self.logit_rows: list[int] = []
        self.fed: list[tuple[int, Sequence]] = []  # rows whose token is on the device
        self.rows = 0
        self.decoded = 0  # rows appended by `decode_rows`, all sampled, at the end
        self.attn_real = 0
        self.attn_padded = 0

    def prefill(self, seqs: list[Sequence], pad_to: int, shared: int = 0) -> None:
        """Prompts from each one's `start` (the KV before it is already in the pool); with
        `pad_to` (static batching, starts at 0), each padded to that many rows. `shared`:
        the first `shared` positions are KV blocks all of `seqs` hold (cascade attention
        reads them once); the group's keys then start there.

        Vectorized over the lane: the per-sequence Python is a length, a chain over the
        prompt ids and slices of KV slots (host time per step is device idle time)."""
        b = len(seqs)
        lens = np.fromiter((len(s.req.prompt) for s in seqs), np.int64, b)  # [B]
        starts = np.fromiter((s.start for s in seqs), np.int64, b)  # [B]
        cached = np.fromiter((s.cached for s in seqs), np.int64, b)  # [B] KV there up to here
        q = lens - starts  # [B] prompt rows computed
        rows = np.maximum(q, pad_to) if pad_to else q  # [B] rows each sequence occupies
        width = int(rows.max())  # Q
        kwidth = int((starts + rows).max())  # K: keys up to each one's last row
        ends = np.cumsum(rows)
        first = self.rows + ends - rows  # [B]
        ar = np.arange(width, dtype=np.int64)  # [Q]
        valid = ar[None, :] < rows[:, None]  # [B, Q] rows that exist in the packed tensor
        real = ar[None, :] < q[:, None]  # [B, Q] rows that are prompt tokens
        pos = starts[:, None] + ar[None, :]  # [B, Q] positions
        qs, ls, cs = starts.tolist(), lens.tolist(), cached.tolist()
        tokens = np.fromiter(itertools.chain.from_iterable(
            s.req.prompt[a:] if a else s.req.prompt for s, a in zip(seqs, qs)),
            np.int64, int(q.sum()))
        if pad_to:
            padded = np.zeros((b, width), dtype=np.int64)
            padded[real] = tokens
            tokens = padded[valid]
        self.tokens.append(tokens)
        self.positions.append(pos[valid])
        # KV writes: the rows computed, except a position whose KV is already there (the
        # last token of a prompt found whole): padding and those write to scratch.
        write = np.full((b, width), SCRATCH_SLOT, dtype=np.int64)  # [B, Q]
        fresh = real & (pos >= cached[:, None])
        if fresh.any():
            write[fresh] = np.concatenate([s.slots[max(a, c):n] for s, a, c, n
                                           in zip(seqs, qs, cs, ls)])
        self.slots.append(write[valid])
        kwidth -= shared
        ak = shared + np.arange(kwidth, dtype=np.int64)  # [K] positions of the group's keys
        kv_slots = np.full((b, kwidth), SCRATCH_SLOT, dtype=np.int64)  # [B, K]
        kv_slots[ak[None, :] < lens[:, None]] = np.concatenate(
            [s.slots[shared:n] for s, n in zip(seqs, ls)])
        mask = None
        if starts.any():
            # Queries start at different positions: key j is visible to query row i of
            # sequence b iff j <= starts[b] + i (causal, offset by what was cached).
            mask = (ak[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, Q, K]
        q_rows = np.where(valid, first[:, None] + ar[None, :], 0)  # [B, Q]
        out_sel = np.flatnonzero(valid)
        self.groups.append(dict(kv_slots=kv_slots, mask=mask, q_rows=q_rows,
                                out_rows=q_rows.reshape(-1)[out_sel], out_sel=out_sel,
                                shared_slots=seqs[0].slots[:shared] if shared else None))
        self.logit_rows.extend((first + q - 1).tolist())
        self.rows += int(ends[-1])
        self.attn_real += int((q * starts + q * (q + 1) // 2).sum())
        self.attn_padded += (b * width * (kwidth + shared) if mask is not None
                             else b * width * (width + 1) // 2)  # causal: the lower triangle

    def decode(self, seqs: list[Sequence], block_size: int = 16) -> None:
        """One row per sequence. Reorders `seqs` in place so that each attention group is
        a contiguous run of rows (the caller's plan, and so the logit rows, follow):
        sequences that hold a prefix in the same KV blocks first, one cascade group per
        prefix, then the rest in groups of similar context length."""
        first = self.rows
        # Keys each new token attends to, itself included. A sequence that finished inside
        # a static batch computes a padding row: it rereads its keys, writes to scratch.
        # One whose last token is still on the device (overlapped steps) counts it.
        ctx = [s.num_tokens - 1 if s.done else s.next_index for s in seqs]
        groups = decode_groups(seqs, ctx, block_size)
        order = [i for _, g in groups for i in g]
        seqs[:] = [seqs[i] for i in order]
        ctx = [ctx[i] for i in order]
        tokens, positions, write_slots = row_inputs(seqs, ctx)
        self.tokens.append(np.array(tokens, dtype=np.int64))
        self.positions.append(np.array(positions, dtype=np.int64))
        self.slots.append(np.array(write_slots, dtype=np.int64))
        self.fed.extend((first + i, s) for i, s in enumerate(seqs) if s.pending)
        start = first
        for shared, g in groups:
            stop = start + len(g)
            group_seqs = seqs[start - first: stop - first]
            lens = np.array(ctx[start - first: stop - first], dtype=np.int64) - shared  # [G]
            width = int(lens.max())
            mask = np.arange(width)[None, :] < lens[:, None]  # [G, K]
            kv_slots = np.full((len(g), width), SCRATCH_SLOT, dtype=np.int64)  # [G, K]
            kv_slots[mask] = np.concatenate([s.slots[shared:shared + n] for s, n in
                                             zip(group_seqs, lens.tolist())])
            self.groups.append(dict(kv_slots=kv_slots, mask=mask[:, None, None, :],
                                    rows=(start, stop),
                                    shared_slots=group_seqs[0].slots[:shared] if shared else None))
            self.attn_real += int(lens.sum()) + shared * len(g)
            self.attn_padded += len(g) * (width + shared)
            start = stop
        self.logit_rows.extend(range(first, first + len(seqs)))
        self.rows += len(seqs)


    def logit_rows_array(self) -> np.ndarray | None:
        """The packed rows that sample, in order; None when that is every row (rows are
        taken in increasing order, so as many as there are rows means all of them)."""
        if len(self.logit_rows) + self.decoded == self.rows:
            return None
        return np.concatenate((np.array(self.logit_rows, dtype=np.int64),
                               np.arange(self.rows - self.decoded, self.rows)))

    def decode_rows(self, d: DecodeRows) -> None:
        """The persistent batch's decode rows (`DecodeBatch.decode_inputs`, whose groups are
        already laid out from this builder's row count)."""
        n = len(d.order)
        self.tokens.append(d.tokens)
        self.positions.append(d.positions)
        self.slots.append(d.write_slots)
        self.groups += d.groups
        self.rows += n
        self.decoded = n  # its logit rows: the last n (`logit_rows_array`)
        self.attn_real += d.attn_real
        self.attn_padded += d.attn_padded

def row_inputs(seqs: list[Sequence], ctx: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Each decode row's input token, position and KV write slot, given its context (the
    keys it attends to, itself included). A row that finished inside a static batch is
    padding: token 0, its last position again, written to scratch. A row whose input token
    is still on the device (overlapped steps) gets 0 here; the token is fed on the device."""
    tokens = [0 if s.done or s.pending else s.generated[-1] for s in seqs]
    positions = [s.num_tokens - 1 if s.done else n - 1 for s, n in zip(seqs, ctx)]
    write_slots = [SCRATCH_SLOT if s.done else s.slots[n - 1] for s, n in zip(seqs, ctx)]
    return tokens, positions, write_slots
