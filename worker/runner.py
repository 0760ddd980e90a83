"""Turns a StepPlan into tensors, runs the model and the sampler, and syncs once.

Host-side metadata (token ids, positions, KV slots, attention masks) is built with numpy
and copied to the device in one go per tensor; the only device-to-host transfer of a step
is the sampled token ids, which the scheduler needs to decide who finished.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from worker.kv import KVPool
from worker.lanes import group_by_length
from worker.model import AttnGroup, StepInput, Transformer
from worker.sampling import SamplingBatch, sample
from worker.scheduler import StepPlan
from worker.sequence import Sequence


SCRATCH_SLOT = KVPool.SCRATCH_SLOT


@dataclass(slots=True)
class StepShape:
    """What a step computed, for the step report (real vs padded work)."""

    rows: int  # packed token rows through the dense layers (no padding by construction)
    attn_real: int  # query x key pairs that were needed
    attn_padded: int  # query x key pairs computed, padding included


class _Builder:
    """Accumulates one step's packed rows and attention groups on the host."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        self.groups: list[dict] = []  # AttnGroup fields, host side
        self.logit_rows: list[int] = []
        self.rows = 0
        self.attn_real = 0
        self.attn_padded = 0

    def prefill(self, seqs: list[Sequence], pad_to: int) -> None:
        """Whole prompts; with `pad_to`, each is padded to that many rows (static batching).

        Vectorized over the lane: the per-sequence Python is a length, a chain over the
        prompt ids and one slice of KV slots each (host time per step is device idle time)."""
        b = len(seqs)
        lens = np.fromiter((len(s.req.prompt) for s in seqs), np.int64, b)  # [B]
        rows = np.maximum(lens, pad_to) if pad_to else lens  # [B] rows each sequence occupies
        width = int(rows.max())
        ends = np.cumsum(rows)
        starts = self.rows + ends - rows  # [B]
        ar = np.arange(width, dtype=np.int64)  # [W]
        valid = ar[None, :] < rows[:, None]  # [B, W] rows that exist in the packed tensor
        real = ar[None, :] < lens[:, None] if pad_to else valid  # [B, W] prompt tokens
        total = int(lens.sum())
        # Row-major boolean assignment fills each sequence's row in order: exactly the
        # concatenation of the prompts (and of their first len(prompt) KV slots).
        kv_slots = np.full((b, width), SCRATCH_SLOT, dtype=np.int64)  # [B, W]
        kv_slots[real] = np.concatenate([s.slots[:n] for s, n in zip(seqs, lens.tolist())])
        tokens = np.fromiter(itertools.chain.from_iterable(s.req.prompt for s in seqs),
                             np.int64, total)
        if pad_to:
            padded = np.zeros((b, width), dtype=np.int64)
            padded[real] = tokens
            tokens = padded[valid]
        self.tokens.append(tokens)
        self.positions.append(np.broadcast_to(ar, (b, width))[valid])
        self.slots.append(kv_slots[valid])  # padding rows write to scratch
        q_rows = np.where(valid, starts[:, None] + ar[None, :], 0)  # [B, W]
        out_sel = np.flatnonzero(valid)
        self.groups.append(dict(kv_slots=kv_slots, mask=None, q_rows=q_rows,
                                out_rows=q_rows.reshape(-1)[out_sel], out_sel=out_sel))
        self.logit_rows.extend((starts + lens - 1).tolist())
        self.rows += int(ends[-1])
        self.attn_real += int((lens * (lens + 1) // 2).sum())
        self.attn_padded += b * width * (width + 1) // 2  # causal: the lower triangle

    def decode(self, seqs: list[Sequence]) -> None:
        """One row per sequence. Reorders `seqs` in place so that each attention group is
        a contiguous run of rows (the caller's plan, and so the logit rows, follow)."""
        first = self.rows
        # Keys each new token attends to, itself included. A sequence that finished inside
        # a static batch computes a padding row: it rereads its keys, writes to scratch.
        ctx = [s.num_tokens - 1 if s.done else s.num_tokens for s in seqs]
        groups = group_by_length(ctx)
        order = [i for g in groups for i in g]
        seqs[:] = [seqs[i] for i in order]
        ctx = [ctx[i] for i in order]
        self.tokens.append(np.array([0 if s.done else s.generated[-1] for s in seqs],
                                    dtype=np.int64))
        self.positions.append(np.array([s.num_tokens - 1 for s in seqs], dtype=np.int64))
        self.slots.append(np.array([SCRATCH_SLOT if s.done else s.slots[n - 1]
                                    for s, n in zip(seqs, ctx)], dtype=np.int64))
        start = first
        for g in groups:
            stop = start + len(g)
            group_ctx = ctx[start - first: stop - first]
            lens = np.array(group_ctx, dtype=np.int64)  # [G]
            width = int(lens[0])  # groups are sorted longest first
            mask = np.arange(width)[None, :] < lens[:, None]  # [G, K]
            kv_slots = np.full((len(g), width), SCRATCH_SLOT, dtype=np.int64)  # [G, K]
            kv_slots[mask] = np.concatenate([s.slots[:n] for s, n in
                                             zip(seqs[start - first: stop - first], group_ctx)])
            self.groups.append(dict(kv_slots=kv_slots, mask=mask[:, None, None, :],
                                    rows=(start, stop)))
            self.attn_real += int(lens.sum())
            self.attn_padded += len(g) * width
            start = stop
        self.logit_rows.extend(range(first, first + len(seqs)))
        self.rows += len(seqs)


class Runner:
    def __init__(self, model: Transformer, kv_pool: torch.Tensor, device: torch.device):
        self.model = model
        self.kv = kv_pool
        self.device = device
        self._on_cpu = device.type == "cpu"

    def _t(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        # On the CPU `.to` is a no-op that still drops and retakes the GIL (every torch call
        # does), handing the event loop's thread a wait each time: skip it.
        return t if self._on_cpu else t.to(self.device, non_blocking=True)

    def prepare(self, plan: StepPlan) -> tuple[StepInput, SamplingBatch, StepShape]:
        b = _Builder()
        for lane in plan.prefill:
            b.prefill(lane, plan.pad_to)
        if plan.decode:
            b.decode(plan.decode)
        inp = StepInput(
            tokens=self._t(np.concatenate(b.tokens)),
            positions=self._t(np.concatenate(b.positions)),
            write_slots=self._t(np.concatenate(b.slots)),
            groups=[AttnGroup(**{k: v if k == "rows" or v is None
                                 else self._t(np.ascontiguousarray(v))
                                 for k, v in g.items()}) for g in b.groups],
            logit_rows=self._t(np.array(b.logit_rows, dtype=np.int64)),
        )
        rows = plan.rows
        temp = np.array([s.req.temperature for s in rows], dtype=np.float32)
        top_k = np.array([s.req.top_k for s in rows], dtype=np.int64)
        top_p = np.array([s.req.top_p for s in rows], dtype=np.float32)
        sb = SamplingBatch(
            temperature=self._t(temp),
            top_k=self._t(top_k),
            top_p=self._t(top_p),
            seed=self._t(np.array([s.req.seed for s in rows], dtype=np.int64)),
            position=self._t(np.array([s.num_tokens for s in rows], dtype=np.int64)),
            any_random=bool((temp > 0).any()),
            any_top_k=bool(((top_k > 0) & (temp > 0)).any()),
            any_top_p=bool(((top_p < 1) & (temp > 0)).any()),
        )
        return inp, sb, StepShape(b.rows, b.attn_real, b.attn_padded)

    @torch.inference_mode()
    def run(self, inp: StepInput, sb: SamplingBatch) -> list[int]:
        logits = self.model(inp, self.kv)  # [B, V]
        return sample(logits, sb).tolist()  # the step's one host sync
