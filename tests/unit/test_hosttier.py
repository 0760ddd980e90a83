"""The host tier's write-back: cached blocks copied out ahead of their eviction, a bounded
number a step from the LRU end; a step made to wait only for copies it depends on; the
load-or-recompute rule. All on the CPU, with a copier that runs each batch late (as a side
stream may) unless the step waits for it, so a missing wait shows up as wrong KV.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from worker.engine.blocks import BlockPool, block_hashes
from worker.engine.build import min_load_blocks
from worker.engine.hosttier import Copies, HostTier, worth_loading
from worker.engine.kv import KVPool
from worker.model.decoder import ModelArgs

BS = 16


class Recorder:
    """A copier that runs nothing and keeps what each flush issued and waited for."""

    def __init__(self) -> None:
        self.calls: list[tuple[Copies, Copies, int]] = []

    def __call__(self, owed: Copies, ahead: Copies, wait: int) -> None:
        self.calls.append((owed, ahead, wait))


def _cached_chain(p: BlockPool, key: int, tokens: list[int]) -> tuple[list[bytes], tuple]:
    h = block_hashes(tokens, BS)
    p.reserve(key, h, len(h))
    blocks = p.blocks_of(key)
    p.mark_ready(blocks)
    p.release(key)
    return h, blocks


def test_write_back_copies_the_lru_end_ahead_a_few_blocks_a_step() -> None:
    p = BlockPool(12, BS, tier=HostTier(32))
    p.copier = rec = Recorder()
    p.write_back_blocks, p.write_back_window = 2, 12
    a, a_blocks = _cached_chain(p, 1, list(range(4 * BS)))  # released last block first:
    b, b_blocks = _cached_chain(p, 2, [7] * (4 * BS))  # a's tail is the LRU end
    p.flush()  # 4 empty: the window holds 8 cached blocks, all of a and b
    owed, ahead, wait = rec.calls[-1]
    assert not owed and wait == 0
    assert ahead.batches == [("spill", [(a_blocks[3], 0), (a_blocks[2], 1)])]
    for _ in range(3):
        p.flush()
    assert p.tier.written_ahead == 8 and all(h in p.tier for h in a + b)
    p.flush()  # nothing left to write: no call at all
    assert len(rec.calls) == 4
    # Evicting written-back blocks costs no copy; the step that overwrites them waits for
    # the batches that copied them out (the latest covers the earlier: one stream).
    p.reserve(3, (), 8)  # 4 empty + 4 evicted: a's chain, leaves first
    assert p.tier.spills == 0 and p.evictions == 4
    p.flush()
    owed, ahead, wait = rec.calls[-1]
    assert not owed and not ahead and wait == rec.calls[1][1].mark  # a's head went second
    p.check()


def test_write_back_stays_within_the_window_of_eviction() -> None:
    p = BlockPool(40, BS, tier=HostTier(64))
    p.copier = rec = Recorder()
    p.write_back_window = 36
    _cached_chain(p, 1, list(range(8 * BS)))
    p.flush()  # 32 empty blocks go first: only the 4 oldest cached are near eviction
    assert p.tier.written_ahead == 4 and len(rec.calls) == 1
    p.write_back_blocks = 0  # off: copies happen at eviction only
    p.write_back_window = 1000
    p.flush()
    assert p.tier.written_ahead == 4


def test_a_step_waits_for_a_load_and_for_a_spill_it_overwrites_not_for_copies_beside_it() -> None:
    p = BlockPool(6, BS, tier=HostTier(16))
    p.copier = rec = Recorder()
    p.write_back_blocks = 0  # spills at eviction only, here
    a, _ = _cached_chain(p, 1, list(range(3 * BS)))
    p.reserve(2, (), 6)  # evicts a: spilled, its blocks reused by job 2
    p.flush()
    owed, _, wait = rec.calls[-1]
    assert [k for k, _ in owed.batches] == ["spill"] and wait == owed.mark
    p.release(2)
    r = p.reserve(3, a, 3)  # found in the tier: loaded, read by job 3's first step
    assert r.shared == 3 and p.tier.hits == 3
    p.flush()
    owed, _, wait = rec.calls[-1]
    assert [k for k, _ in owed.batches] == ["load"] and wait == owed.mark
    p.release(3)  # a stays in the tier (inclusive): nothing to write back of it
    p.write_back_blocks = 4
    _cached_chain(p, 4, [9] * (2 * BS))  # two empty blocks: no eviction
    p.flush()  # written ahead, nothing reused: the step does not wait
    owed, ahead, wait = rec.calls[-1]
    assert not owed and [len(pairs) for _, pairs in ahead.batches] == [2] and wait == 0
    p.check()


def _mark(key: bytes) -> float:
    return float(int.from_bytes(key[:3], "little"))


@pytest.mark.parametrize("write_back", [0, 3, 8])
def test_any_mix_with_late_copies_keeps_every_block_its_own_kv(write_back: int) -> None:
    """Random reservations, steps, registrations, releases and forced evictions on a pool
    with a host tier, its copies run in place but late: a batch runs when a step waits for
    it, or at random later. A step's KV is written right after its flush, as the device
    runs it. After every step each ready keyed block holds its key's KV (loaded, written
    back ahead or spilled, and read back), no slot holds two keys, nothing held is evicted,
    chains are never cut, refcounts never go negative."""
    rng = random.Random(write_back)
    args = ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
    kv = KVPool(args, 48, BS, torch.float32, torch.device("cpu"), host_blocks=40)
    p, dev = kv.blocks, kv.copier.dev
    p.write_back_blocks, p.write_back_window = write_back, 24
    queue: deque[Copies] = deque()

    def late(owed: Copies, ahead: Copies, wait: int) -> None:
        queue.extend(c for c in (owed, ahead) if c)
        while queue and (queue[0].mark <= wait or rng.random() < 0.3):
            kv.copier._copy(queue.popleft(), dev.device)

    p.copier = late
    prompts = [[rng.randrange(30) for _ in range(rng.randint(1, 100))] for _ in range(16)]
    held: dict[int, tuple[int, ...]] = {}

    def step(compute: list[int], register: tuple[tuple[int, ...], bytes] | None = None) -> None:
        """A scheduled step: blocks planned ready, the flush, then the step's KV writes."""
        fresh = [b for b in compute if not p.ready[b]]
        p.mark_ready(compute)
        p.flush()
        for b in fresh:
            if p._key[b] is not None:
                dev[:, b] = _mark(p._key[b])
        if register is not None and p._key[register[0][-1]] is None:  # generated tokens
            blocks, h = register
            dev[:, blocks[-1]] = _mark(h)
            p.register(blocks, len(blocks) - 1, h)
        for b, h in enumerate(p._key):
            if h is not None and p.ready[b]:
                assert torch.all(dev[:, b] == _mark(h)), b

    for key in range(3000):
        op = rng.random()
        if held and op < 0.3:
            k = rng.choice(list(held))
            p.release(k)
            held.pop(k)
        elif held and op < 0.55:
            blocks = held[rng.choice(list(held))]
            step(list(blocks[:rng.randint(0, len(blocks))]))
        elif held and op < 0.6:
            blocks = held[rng.choice(list(held))]
            step(list(blocks[:-1]), (blocks, rng.randbytes(16)))
        elif op < 0.63:
            p.evict_cached()
            step([])
        else:
            prompt = rng.choice(prompts) + [rng.randrange(30)] * rng.randint(0, 20)
            n = -(-(len(prompt) + rng.randint(1, 30)) // BS)
            before = {b for bs in held.values() for b in bs}
            r = p.reserve(key, block_hashes(prompt, BS), n, limit=24)
            if r is not None:
                assert not set(r.blocks[len(r.blocks) - r.added:]) & before
                held[key] = r.blocks
        if key % 25 == 0:
            p.check()
    for k in list(held):
        p.release(k)
    step([])
    p.check()
    t = p.tier
    assert t.hits > 0 and p.evictions > 0 and t.spills > 0
    assert (t.written_ahead > 0) == (write_back > 0)


def test_load_or_recompute() -> None:
    """The rule: a run of host hits is read back only if its copy beats its prefill; a run
    shorter than `min_load_blocks` is recomputed."""
    # A 1B model's 64 KiB block: 16 tokens prefill in 0.32 ms, copy in 23 us (+20 us).
    assert worth_loading(1, 64 << 10, 20e9, 20e-6, 2 * 1e9 * BS / 1e14)
    # builtin:small: a block's prefill (2 us) is cheaper than its copy (3 us), at any length.
    assert not worth_loading(64, 64 << 10, 20e9, 20e-6, 2 * 6.5e6 * BS / 1e14)
    # A middling one: short runs are recomputed, long ones loaded.
    n = min_load_blocks(100_000_000, 256 << 10)
    assert 1 < n < 64
    assert not worth_loading(n - 1, 256 << 10, 20e9, 20e-6, 2 * 1e8 * BS / 1e14)
    p = BlockPool(8, BS, tier=HostTier(8))
    p.copier = Recorder()
    p.min_load_blocks = 3
    a, _ = _cached_chain(p, 1, list(range(2 * BS)))
    p.evict_cached()
    assert all(h in p.tier for h in a)
    assert p.reserve(2, a, 2).shared == 0 and p.tier.hits == 0  # 2 < 3: recomputed
