"""Turns a StepPlan into tensors, runs the model and the sampler, and syncs once.

Host-side metadata (token ids, positions, KV slots, attention masks) is built with numpy
and copied to the device in one go per tensor; the only device-to-host transfer of a step
is the sampled token ids, which the scheduler needs to decide who finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worker.lanes import group_by_length
from worker.model import AttnGroup, StepInput, Transformer
from worker.sampling import SamplingBatch, sample
from worker.scheduler import StepPlan
from worker.sequence import Sequence


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
        self.groups: list[tuple[np.ndarray, ...]] = []
        self.logit_rows: list[int] = []
        self.rows = 0
        self.attn_real = 0
        self.attn_padded = 0

    def prefill(self, seqs: list[Sequence]) -> None:
        lens = np.array([len(s.req.prompt) for s in seqs], dtype=np.int64)  # [B]
        width = int(lens.max())
        starts = self.rows + np.concatenate(([0], np.cumsum(lens)[:-1]))  # [B]
        ar = np.arange(width, dtype=np.int64)  # [W]
        valid = ar[None, :] < lens[:, None]  # [B, W]
        q_rows = np.where(valid, starts[:, None] + ar[None, :], 0)  # [B, W]
        kv_slots = np.zeros((len(seqs), width), dtype=np.int64)  # [B, W]
        for i, s in enumerate(seqs):
            n = int(lens[i])
            self.tokens.append(np.asarray(s.req.prompt, dtype=np.int64))
            self.positions.append(ar[:n])
            self.slots.append(s.slots[:n])
            kv_slots[i, :n] = s.slots[:n]
        # Causal within a sequence; padded queries see the real keys so no row is all-masked.
        mask = (ar[None, None, :] <= ar[None, :, None]) & valid[:, None, :]  # [B, W, W]
        out_sel = np.flatnonzero(valid)
        self.groups.append((q_rows, kv_slots, mask[:, None], q_rows.reshape(-1)[out_sel], out_sel))
        self.logit_rows.extend((starts + lens - 1).tolist())
        self.rows += int(lens.sum())
        self.attn_real += int((lens * (lens + 1) // 2).sum())
        self.attn_padded += len(seqs) * width * width

    def decode(self, seqs: list[Sequence]) -> None:
        first = self.rows
        ctx = [s.num_tokens for s in seqs]  # keys each new token attends to, itself included
        self.tokens.append(np.array([s.generated[-1] for s in seqs], dtype=np.int64))
        self.positions.append(np.array(ctx, dtype=np.int64) - 1)
        self.slots.append(np.array([s.slots[n - 1] for s, n in zip(seqs, ctx)], dtype=np.int64))
        for idx in group_by_length(ctx):
            lens = np.array([ctx[i] for i in idx], dtype=np.int64)  # [G]
            width = int(lens[0])  # groups are sorted longest first
            kv_slots = np.zeros((len(idx), width), dtype=np.int64)  # [G, K]
            for j, i in enumerate(idx):
                kv_slots[j, : ctx[i]] = seqs[i].slots[: ctx[i]]
            rows = first + np.array(idx, dtype=np.int64)
            mask = np.arange(width)[None, :] < lens[:, None]  # [G, K]
            self.groups.append((rows[:, None], kv_slots, mask[:, None, None, :], rows,
                                np.arange(len(idx), dtype=np.int64)))
            self.attn_real += int(lens.sum())
            self.attn_padded += len(idx) * width
        self.logit_rows.extend(range(first, first + len(seqs)))
        self.rows += len(seqs)


class Runner:
    def __init__(self, model: Transformer, kv_pool: torch.Tensor, device: torch.device):
        self.model = model
        self.kv = kv_pool
        self.device = device

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def prepare(self, plan: StepPlan) -> tuple[StepInput, SamplingBatch, StepShape]:
        b = _Builder()
        for lane in plan.prefill:
            b.prefill(lane)
        if plan.decode:
            b.decode(plan.decode)
        inp = StepInput(
            tokens=self._t(np.concatenate(b.tokens)),
            positions=self._t(np.concatenate(b.positions)),
            write_slots=self._t(np.concatenate(b.slots)),
            groups=[AttnGroup(*(self._t(np.ascontiguousarray(a)) for a in g)) for g in b.groups],
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
