"""A KV pool sized by memory: pool invariants with the pool larger than the budget,
leaves-first eviction, the host tier's bookkeeping and copies, tokens unchanged by the pool's
size and by evictions at every step, and admission never over the budget whatever the
cache holds.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from worker.admission import Admission
from worker.engine.blocks import BlockPool, block_hashes, padded_tokens
from worker.engine.build import EngineError, KvSizing, build_engine, min_load_blocks, pool_blocks
from worker.engine.hosttier import HostTier, runs, worth_loading
from worker.engine.kv import KVPool
from worker.engine.sequence import Request
from worker.engine.step import generate
from worker.model.decoder import ModelArgs

BS = 16


def _cached_keys(p: BlockPool) -> set[bytes]:
    return {p._key[b] for b in p._cached}


# -- the pool ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks, budget, host", [(64, 64, 0), (160, 48, 0), (160, 48, 40)])
def test_any_mix_keeps_the_invariants(num_blocks: int, budget: int, host: int) -> None:
    """No block both free and held, refcounts never negative, nothing held evicted, keyed
    blocks a tree whose chains are never cut, held blocks never over the budget -- with the
    pool the budget, larger, and larger with a host tier taking every eviction."""
    rng = random.Random(11)
    tier = HostTier(host) if host else None
    p = BlockPool(num_blocks, BS, tier=tier)
    p.copier = lambda owed, ahead, wait: None  # the bookkeeping only: copies are tested below
    prompts = [[rng.randrange(30) for _ in range(rng.randint(1, 120))] for _ in range(20)]
    held: dict[int, tuple[int, ...]] = {}
    for key in range(4000):
        op = rng.random()
        if held and op < 0.35:
            k = rng.choice(list(held))
            p.release(k)
            held.pop(k)
        elif held and op < 0.55:
            blocks = held[rng.choice(list(held))]
            p.mark_ready(blocks[:rng.randint(0, len(blocks))])
        elif held and op < 0.6:
            blocks = held[rng.choice(list(held))]
            p.mark_ready(blocks)
            p.register(blocks, len(blocks) - 1, rng.randbytes(16))
        elif op < 0.62:
            p.flush()
        else:
            prompt = rng.choice(prompts) + [rng.randrange(30)] * rng.randint(0, 20)
            n = -(-(len(prompt) + rng.randint(1, 30)) // BS)
            before = {b for bs in held.values() for b in bs}
            r = p.reserve(key, block_hashes(prompt, BS), n, limit=budget)
            if r is not None:
                assert len(set(r.blocks)) == n
                # Fresh blocks come from the empty or cached: never from another job.
                assert not set(r.blocks[r.shared:]) & before
                held[key] = r.blocks
        assert p.used_blocks <= budget
        if key % 50 == 0:
            p.check()
    for k in list(held):
        p.release(k)
    p.check()
    assert p.used_blocks == 0 and p.free_blocks == num_blocks and p.evictions > 0
    assert tier is None or tier.spills > 0


def test_eviction_takes_leaves_before_their_parents() -> None:
    """A session's chain is cut from its end: at every eviction what stays cached of it is
    a prefix, so its next turn still finds the head."""
    p = BlockPool(12, BS)
    chain = block_hashes(list(range(8 * BS)), BS)  # 8 blocks
    p.reserve(1, chain, 8)
    p.mark_ready(p.blocks_of(1))
    p.release(1)
    other = block_hashes([7] * (2 * BS), BS)
    p.reserve(2, other, 2)  # newer than the chain
    p.mark_ready(p.blocks_of(2))
    p.release(2)
    for taken in range(1, 11):
        p.reserve(100 + taken, (), 1)
        left = _cached_keys(p)
        kept = [h in left for h in chain]
        assert kept == sorted(kept, reverse=True), taken  # a prefix of the chain
        p.check()
    assert p.cost(chain, 8) == 8  # all of it gone by now, leaves first


def test_a_chain_under_a_held_block_is_never_evicted_and_a_parent_waits_for_its_leaves() -> None:
    p = BlockPool(6, BS)
    h = block_hashes(list(range(4 * BS)), BS)
    p.reserve(1, h, 4)
    p.mark_ready(p.blocks_of(1))
    p.reserve(2, h[:2], 2)  # holds the first two blocks
    p.release(1)  # blocks 3 and 4 of the chain are cached, hanging from a held block
    assert p.cached_blocks == 2
    p.reserve(3, (), 3)  # 2 empty + 1 evicted: the chain's last block, not its third
    assert p.cost(h, 4) == 2 and p.blocks_of(2) == p.reserve(4, h, 3).blocks[:2]
    p.check()


# -- the host tier -----------------------------------------------------------------------


def test_the_host_tier_is_a_ring_in_eviction_order_and_keeps_what_it_read_back() -> None:
    t = HostTier(3)
    for i, h in enumerate((b"a", b"b", b"c")):
        t.spill(h, 10 + i)
    t.load(b"a", 20)
    t.spill(b"a", 21)  # inclusive: already here, no second copy
    t.spill(b"d", 22)  # overwrites the oldest
    assert b"a" not in t and all(h in t for h in (b"b", b"c", b"d"))
    c, ahead = t.take()
    assert c.batches == [("spill", [(10, 0), (11, 1), (12, 2)]), ("load", [(0, 20)]),
                         ("spill", [(22, 0)])]
    assert not ahead and (c.mark, ahead.mark) == (1, 2)
    assert (t.spills, t.hits, t.evictions, t.used_blocks) == (4, 1, 1, 3) and not any(t.take())
    t.check()
    assert runs([(10, 0), (11, 1), (12, 2), (22, 0)], 1) == [(0, 3, 0), (3, 4, 0)]
    assert worth_loading(4, 2 << 20, 20e9, 20e-6, 2.5e-3)  # an 8B model: copy
    assert not worth_loading(4, 64 << 10, 20e9, 20e-6, 3e-6)  # a tiny one: recompute


def test_a_host_hit_its_own_reservation_overwrote_is_computed_instead() -> None:
    """Reserving evicts (and spills) before it loads: a key its own spills pushed out of
    the ring is not read back."""
    p = BlockPool(4, BS, tier=HostTier(3))
    a, b = block_hashes(list(range(3 * BS)), BS), block_hashes([5] * (4 * BS), BS)
    for key, h in ((1, a), (2, b)):
        p.reserve(key, h, len(h))
        p.mark_ready(p.blocks_of(key))
        p.release(key)  # the second evicts the first: a's three blocks are in the ring
    assert all(h in p.tier for h in a) and not any(h in p.tier for h in b)
    r = p.reserve(3, a, 4)  # four fresh blocks: b's spills overwrite a in the ring
    assert r.shared == 0 and p.tier.hits == 0 and not any(h in p.tier for h in a)
    assert [k for k, _ in p.tier.take()[0].batches] == ["spill"]
    p.check()


def _kv(num_blocks: int, host_blocks: int) -> KVPool:
    args = ModelArgs(vocab_size=32, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)
    return KVPool(args, num_blocks, BS, torch.float32, torch.device("cpu"), host_blocks=host_blocks)


def _write_out_and_read_back(kv: KVPool) -> None:
    """Fill a chain's blocks, evict them into the host tier, reserve it again: the blocks
    it gets back hold the same KV, bit for bit."""
    p, dev = kv.blocks, kv.copier.dev
    p.min_load_blocks = 1
    h = block_hashes(list(range(3 * BS)), BS)
    p.reserve(1, h, 3)
    first = p.blocks_of(1)
    for b in first:
        dev[:, b] = torch.randn_like(dev[:, b])
    want = dev[:, list(first)].clone()
    p.mark_ready(first)
    p.release(1)
    p.reserve(2, (), kv.num_blocks)  # every block: the chain is evicted and spilled
    p.flush()
    p.release(2)
    p.drop_cached()
    dev.zero_()
    r = p.reserve(3, h, 3)
    assert r.shared == 3 and p.tier.hits == 3
    p.flush()
    assert torch.equal(dev[:, list(r.blocks)].cpu(), want.cpu())
    p.check()


def test_a_block_written_out_and_read_back_is_the_same_block() -> None:
    _write_out_and_read_back(_kv(8, 4))


# -- sizing ------------------------------------------------------------------------------


def test_the_pool_is_sized_by_memory_and_never_below_the_budget() -> None:
    blk = 64 << 10
    assert pool_blocks(KvSizing(), 512, blk, None) == (2048, "4 x token_budget")
    assert pool_blocks(KvSizing(pool_blocks=600), 512, blk, None)[0] == 600
    assert pool_blocks(KvSizing(pool_gib=1.0), 512, blk, None)[0] == 16384
    assert pool_blocks(KvSizing(memory_fraction=0.5), 512, blk, 10 << 30) == (81920,
                                                                             "kv_memory_fraction")
    assert pool_blocks(KvSizing(pool_gib=1.0), 512, 0, 10 << 30)[0] == 512  # no KV at all
    # A host hit is read back for a large model; builtin:small would always recompute.
    assert min_load_blocks(8_000_000_000, 2 << 20) == 1 and min_load_blocks(6_500_000, blk) > 64
    with pytest.raises(EngineError, match="kv_pool_blocks"):
        pool_blocks(KvSizing(pool_blocks=100), 512, blk, None)
    with pytest.raises(EngineError, match="kv_memory_fraction"):
        pool_blocks(KvSizing(memory_fraction=1.5), 512, blk, 10 << 30)
    assert build_engine("builtin:null", "cpu", "float32", 640, 144).pool.num_blocks == 40
    with pytest.raises(EngineError, match="host_tier_gib"):
        build_engine("builtin:tiny", "cpu", "float32", 640, 144, kv=KvSizing(host_gib=1.0))


# -- tokens ------------------------------------------------------------------------------


def _reqs(prompts: list[list[int]], max_new: int = 10) -> list[Request]:
    return [Request(key=i, prompt=p, max_new_tokens=max_new,
                    reserved_tokens=padded_tokens(len(p) + max_new, BS), temperature=0.0,
                    top_k=0, top_p=1.0, seed=0, stop_ids=frozenset()) for i, p in enumerate(prompts)]


def _turns(engine, rounds: int, seed: int, between=lambda: None) -> list[list[int]]:
    """Sessions over shared system prompts, each turn its last prompt and reply plus more."""
    rng = random.Random(seed)
    systems = [[rng.randrange(256) for _ in range(rng.choice([20, 40, 70]))] for _ in range(3)]
    convs = [rng.choice(systems) + [rng.randrange(256) for _ in range(5)] for _ in range(4)]
    out: list[list[int]] = []
    for _ in range(rounds):
        done = sorted(generate(engine, _reqs(convs)), key=lambda c: c.key)
        engine.pool.blocks.check()
        assert engine.pool.blocks.used_blocks == 0
        out += [c.tokens for c in done]
        convs = [p + c.tokens + [rng.randrange(256) for _ in range(7)] for p, c in zip(convs, done)]
        between()
    return out


def _spilling(make, write_back_first: bool):
    """An engine whose pool of exactly the budget has a host tier, and whose cache is
    evicted at every step: before the step's flush (every eviction a spill), or after it
    (what the flush wrote back ahead costs no copy)."""
    eng = make(kv=KvSizing(pool_blocks=64))
    eng.pool = kv = KVPool(eng.loaded.args, 64, BS, torch.float32, torch.device("cpu"),
                           host_blocks=256)
    pool = kv.blocks
    pool.min_load_blocks = 1
    flush = pool.flush

    def evict_everything_and_flush() -> None:
        if write_back_first:
            flush()
        pool.evict_cached()
        flush()

    pool.flush = evict_everything_and_flush
    return eng


def test_tokens_are_the_same_with_the_larger_pool_and_with_evictions_at_every_step() -> None:
    """The default pool (4 budgets), a pool of exactly the budget, no cache, and a pool whose
    cache is evicted into the host tier at every step (each hit then read back)."""
    make = lambda **kw: build_engine("builtin:tiny", "cpu", "float32", 1024, 256, **kw)  # noqa: E731
    big, exact, off = make(), make(kv=KvSizing(pool_blocks=64)), make(prefix_cache=False)
    assert big.pool.num_blocks == 256
    want = _turns(off, 4, 3)
    assert _turns(big, 4, 3) == want and _turns(exact, 4, 3) == want
    for write_back_first in (False, True):
        eng = _spilling(make, write_back_first)
        pool = eng.pool.blocks
        assert _turns(eng, 4, 3, between=pool.evict_cached) == want
        assert pool.tier.hits > 0 and pool.evictions > 0 and pool.tier.spills > 0
        assert (pool.tier.written_ahead > 0) == write_back_first


# -- admission ---------------------------------------------------------------------------


def test_admission_never_goes_over_the_budget_whatever_the_cache_holds() -> None:
    rng = random.Random(2)
    budget_blocks = 32
    p = BlockPool(4 * budget_blocks, BS)
    adm = Admission(budget_blocks * BS, budget_blocks * BS // 2)
    prompts = [[rng.randrange(40) for _ in range(rng.randint(16, 200))] for _ in range(15)]
    pending: deque[tuple[int, list[int], int]] = deque()
    held: list[int] = []
    most_cached = 0
    for key in range(3000):
        if rng.random() < 0.5:
            prompt = rng.choice(prompts) + [rng.randrange(40)] * rng.randint(0, 40)
            pending.append((key, prompt, -(-(len(prompt) + rng.randint(1, 40)) // BS)))
        elif held:
            k = held.pop(rng.randrange(len(held)))
            p.mark_ready(p.blocks_of(k))
            p.release(k)

        def take(job) -> bool:
            k, prompt, n = job
            return p.reserve(k, block_hashes(prompt, BS), n, limit=budget_blocks) is not None

        held += [k for k, _, _ in adm.admit(pending, p.used_blocks * BS, take)]
        assert p.used_blocks <= budget_blocks
        most_cached = max(most_cached, p.cached_blocks)
    assert most_cached > budget_blocks  # the cache held more than the budget meanwhile
    p.check()


def test_the_worker_takes_the_pool_size_as_options() -> None:
    from worker.cli import build_parser

    a = build_parser().parse_args(["run", "--config", "e.toml", "--kv-pool-blocks", "600",
                                   "--host-tier-gib", "0"])
    assert (a.kv_pool_blocks, a.kv_pool_gib, a.kv_memory_fraction, a.host_tier_gib) == (600, 0.0,
                                                                                       0.8, 0.0)
    kv = KVPool(build_engine("builtin:tiny", "cpu", "float32", 640, 144).loaded.args, 40, BS,
                torch.float32, torch.device("cpu"), sized_by="kv_pool_blocks")
    assert kv.describe() == {"kv_pool_sized_by": "kv_pool_blocks", "host_tier_blocks": 0,
                             "host_tier_mib": 0}
