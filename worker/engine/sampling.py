"""Batched next-token sampling on the device, reproducible per job, with no host sync.

Randomness is counter-based: the uniform draw for (job seed, position, vocab id) is a hash
of those three numbers, computed with integer tensor ops. So a job's tokens depend only on
its own seed and logits, never on what else shares the batch or on any global RNG state,
and nothing here waits on the device. Sampling is the Gumbel-max trick over logits that
temperature, top-k and top-p have already shaped; temperature 0 is plain argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters for one step, already on the device."""

    temperature: Tensor  # [B] float32, 0 = greedy
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] float32, 1 = off
    seed: Tensor  # [B] int64, 0..2**32-1 (jobs' 63-bit seeds are folded on the host)
    position: Tensor  # [B] int64 index of the token being sampled in its sequence
    any_random: bool  # host-side: skip the whole sampling path for an all-greedy batch
    any_top_k: bool
    any_top_p: bool
    # Structured output: the constrained rows, and each one's allowed-token bitmask
    # (int32 words, bit t % 32 of word t // 32 = token t). None: no row is constrained.
    mask_rows: Tensor | None = None  # [C] int64
    mask_bits: Tensor | None = None  # [C, ceil(V / 32)] int32


def _mix32(x: Tensor) -> Tensor:
    # lowbias32 (Chris Wellons): a strong 32-bit integer finaliser. Products may wrap int64;
    # only the low 32 bits are kept, and those are exact under wraparound.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def fold_seed(seed: int) -> int:
    """A job's 63-bit seed to the 32-bit key the device hash takes."""
    return (seed ^ (seed >> 32)) & _M32


def uniform(seed: Tensor, position: Tensor, vocab: int) -> Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed, position, vocab id)."""
    key = _mix32(_mix32(seed) ^ _mix32(position + 0x9E3779B9))  # [B]
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)  # [V]
    bits = _mix32(key[:, None] ^ _mix32(ids * 0x2545F491 + 0x68E31DA4)[None, :])  # [B, V]
    return (bits.to(torch.float64) + 0.5).div_(2.0**32).float()


def allowed(bits: Tensor, vocab: int) -> Tensor:
    """[C, W] int32 bitmasks -> [C, vocab] bool."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)[:, :vocab]


def sample(logits: Tensor, sb: SamplingBatch) -> Tensor:
    """logits [B, V] float32 -> next tokens [B] int64. Constrained rows sample only among
    the tokens their masks allow (on a copy: the caller's logits stay raw)."""
    if sb.mask_rows is not None:
        vocab = logits.shape[-1]
        rows = logits.index_select(0, sb.mask_rows)  # [C, V]
        rows = rows.masked_fill(~allowed(sb.mask_bits, vocab), float("-inf"))
        logits = logits.index_copy(0, sb.mask_rows, rows)
    greedy = logits.argmax(dim=-1)  # [B]
    if not sb.any_random:
        return greedy
    temp = sb.temperature.clamp_min(1e-5)[:, None]  # [B, 1]
    x = logits / temp  # [B, V]
    vocab = x.shape[-1]
    if sb.any_top_k:
        k = torch.where(sb.top_k > 0, sb.top_k, vocab).clamp_max(vocab)  # [B]
        kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if sb.any_top_p:
        probs, order = x.softmax(dim=-1).sort(dim=-1, descending=True)  # [B, V]
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= sb.top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform(sb.seed, sb.position, vocab)))  # [B, V]
    sampled = (x + gumbel).argmax(dim=-1)  # [B]
    return torch.where(sb.temperature > 0, sampled, greedy)
