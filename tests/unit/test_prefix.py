"""Prefix caching: the block pool on plain data, and the engine's tokens with it on and off.

Tokens must not change with caching (float32 CPU): identical prompts, a prompt that is a
strict prefix of another, prefixes ending on and just off a block boundary, a conversation
whose next turn contains the last one's reply, jobs that share a prefix nobody has computed
yet (in one step), a sharer that goes away before computing it, and eviction pressure.
"""

from __future__ import annotations

import random

import pytest

from worker.engine.blocks import BlockPool, OutOfBlocks, block_hashes, padded_tokens
from worker.engine.build import Engine, KvSizing, build_engine
from worker.engine.sequence import Request
from worker.engine.step import generate

BS = 16


# -- the pool ----------------------------------------------------------------------------


def test_block_keys_chain_their_parents() -> None:
    a = block_hashes(list(range(40)), BS)
    b = block_hashes(list(range(32)) + [7] * 8, BS)
    assert len(a) == 2 and a == b  # full blocks only; the partial third one has no key
    c = block_hashes([99] + list(range(1, 40)), BS)
    assert c[0] != a[0] and c[1] != a[1]  # a different first block changes every key after
    assert block_hashes(list(range(40)), BS, parent=a[0], start=1) == a[1:]


def test_a_second_job_shares_what_the_first_reserved_and_costs_only_what_it_adds() -> None:
    p = BlockPool(8, BS)
    h = block_hashes(list(range(48)), BS)  # 3 full blocks
    r1 = p.reserve(1, h, 4)
    assert (r1.shared, r1.added, p.used_blocks) == (0, 4, 4)
    assert p.cost(h, 4) == 1  # the three shared blocks are held already: only the last is new
    r2 = p.reserve(2, h, 4)
    assert r2.blocks[:3] == r1.blocks[:3] and r2.blocks[3] != r1.blocks[3]
    assert (r2.shared, r2.added, p.used_blocks) == (3, 1, 5)
    p.check()


def test_released_blocks_stay_cached_only_once_computed() -> None:
    p = BlockPool(8, BS)
    h = block_hashes(list(range(48)), BS)
    r = p.reserve(1, h, 4)
    p.release(1)  # never computed: nothing to keep
    assert (p.cached_blocks, p.used_blocks) == (0, 0) and p.reserve(2, h, 4).shared == 0
    p.mark_ready(p.blocks_of(2)[:3])
    p.release(2)
    assert p.cached_blocks == 3  # the computed, keyed blocks; the 4th had no key
    r3 = p.reserve(3, h, 4)
    assert (r3.shared, r3.added) == (3, 4)  # cached blocks return to use: they count again
    assert r.blocks  # (the first reservation's ids are reused freely)
    p.check()


def test_eviction_takes_the_least_recently_used_and_never_a_held_block() -> None:
    p = BlockPool(6, BS)
    hs = [block_hashes([k] * 32, BS) for k in range(3)]  # three prompts of 2 blocks each
    for k in range(3):
        p.reserve(k, hs[k], 2)
        p.mark_ready(p.blocks_of(k))
    p.release(0)
    p.release(1)  # cached: 0's blocks (older), then 1's
    assert p.cached_blocks == 4 and p.free_blocks == 4
    p.reserve(10, (), 2)  # takes 0's blocks: the least recently used
    assert p.evictions == 2 and p.cost(hs[0], 2) == 2 and p.cost(hs[1], 2) == 2
    assert p.reserve(11, hs[1], 2).shared == 2  # 1's survived
    with pytest.raises(OutOfBlocks):
        p.reserve(12, (), 1)  # everything is held: nothing may be evicted
    p.check()


def test_reserve_respects_the_limit_and_leaves_nothing_behind_when_it_refuses() -> None:
    p = BlockPool(10, BS)
    p.reserve(1, (), 6)
    assert p.reserve(2, (), 5, limit=10) is None and p.used_blocks == 6 and p.holders() == 1
    assert p.reserve(2, (), 4, limit=10) is not None and p.used_blocks == 10


# Any mix of reserve, compute, register and release: tests/unit/test_kvcapacity.py.


# -- the engine, tokens with caching on and off -------------------------------------------


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    on = build_engine("builtin:tiny", "cpu", "float32", 32768, 1088)
    off = build_engine("builtin:tiny", "cpu", "float32", 32768, 1088, prefix_cache=False)
    assert on.pool.blocks.caching and not off.pool.blocks.caching
    return on, off


def req(key: int, prompt: list[int], max_new: int = 12) -> Request:
    return Request(key=key, prompt=prompt, max_new_tokens=max_new,
                   reserved_tokens=padded_tokens(len(prompt) + max_new, BS), temperature=0.0,
                   top_k=0, top_p=1.0, seed=0, stop_ids=frozenset())


def run(engine: Engine, prompts: list[list[int]], max_new: int = 12):
    out = {c.key: c for c in generate(engine, [req(i, p, max_new) for i, p in enumerate(prompts)])}
    engine.pool.blocks.check()
    assert engine.pool.blocks.used_blocks == 0
    return [out[i] for i in range(len(prompts))]


def tokens(engine: Engine, prompts, max_new: int = 12) -> list[list[int]]:
    return [c.tokens for c in run(engine, prompts, max_new)]


def rand(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


@pytest.mark.parametrize("shared_len", [64, 63, 65, 16, 5, 200])
def test_shared_prefixes_on_and_just_off_block_boundaries(engines, shared_len: int) -> None:
    on, off = engines
    rng = random.Random(shared_len)
    system = rand(rng, shared_len)
    prompts = [system + rand(rng, rng.randint(1, 40)) for _ in range(6)] + [system]
    on.pool.blocks.drop_cached()
    got = run(on, prompts)
    assert [c.tokens for c in got] == tokens(off, prompts)
    full = (shared_len // BS) * BS
    if full:  # jobs admitted together shared the prefix nobody had computed yet
        assert sum(c.cached_tokens for c in got) >= (len(prompts) - 1) * full - BS
    # And again, now from the cache: every job finds the shared blocks computed.
    again = run(on, prompts)
    assert [c.tokens for c in again] == [c.tokens for c in got]
    assert all(c.cached_tokens >= min(full, len(p) - 1) for c, p in zip(again, prompts))


def test_identical_prompts_and_a_prompt_found_whole(engines) -> None:
    on, off = engines
    rng = random.Random(2)
    p = rand(rng, 48)  # three full blocks: the second time, all of it is cached
    on.pool.blocks.drop_cached()
    first = run(on, [p, p, p])
    again = run(on, [p])
    assert [c.tokens for c in first] == [c.tokens for c in again] * 3 == tokens(off, [p]) * 3
    assert again[0].cached_tokens == 47  # all but the last token, computed for its logits


def test_a_strict_prefix_of_another_prompt(engines) -> None:
    on, off = engines
    rng = random.Random(3)
    long = rand(rng, 120)
    prompts = [long[:40], long, long[:96], long[:97]]
    on.pool.blocks.drop_cached()
    assert tokens(on, prompts) == tokens(off, prompts)
    assert tokens(on, list(reversed(prompts))) == tokens(off, list(reversed(prompts)))


def test_a_conversation_finds_its_last_turn_reply_included(engines) -> None:
    on, off = engines
    rng = random.Random(4)
    on.pool.blocks.drop_cached()
    prompt_on = prompt_off = rand(rng, 70)
    for turn in range(4):
        (c_on,) = run(on, [prompt_on], max_new=20)
        (c_off,) = run(off, [prompt_off], max_new=20)
        assert c_on.tokens == c_off.tokens
        if turn:  # last turn's prompt and all but its last reply token's block are cached
            assert c_on.cached_tokens >= ((len(prompt_on) - 20 - 8) // BS) * BS
        user = rand(rng, 8)
        prompt_on = prompt_on + c_on.tokens + user
        prompt_off = prompt_off + c_off.tokens + user


def test_a_sharer_that_goes_away_before_computing_leaves_the_other_to_compute_it(engines) -> None:
    on, off = engines
    rng = random.Random(6)
    system = rand(rng, 64)
    a, b = system + rand(rng, 10), system + rand(rng, 20)
    on.pool.blocks.drop_cached()
    pool = on.pool.blocks
    ha, hb = block_hashes(a, BS), block_hashes(b, BS)
    ra = pool.reserve(100, ha, padded_tokens(len(a) + 12, BS) // BS)
    rb = pool.reserve(101, hb, padded_tokens(len(b) + 12, BS) // BS)
    assert rb.shared == 4 and rb.blocks[:4] == ra.blocks[:4]
    pool.release(100)  # `a` expires (or is cancelled) before it ever reaches a step
    r = req(101, b)
    r.hashes, r.reservation = tuple(hb), rb
    (c,) = generate(on, [r])
    assert c.tokens == tokens(off, [b])[0] and c.cached_tokens == 0  # it computed all of it
    pool.check()


def test_eviction_pressure_changes_no_token() -> None:
    """A pool of 40 blocks for jobs of up to 9: caching and evicting all the way through."""
    small = build_engine("builtin:tiny", "cpu", "float32", 640, 144, kv=KvSizing(pool_blocks=40))
    off = build_engine("builtin:tiny", "cpu", "float32", 640, 144, prefix_cache=False)
    rng = random.Random(7)
    systems = [rand(rng, rng.choice([16, 40, 64])) for _ in range(5)]
    for round_ in range(6):
        prompts = [rng.choice(systems) + rand(rng, rng.randint(1, 30)) for _ in range(4)]
        assert tokens(small, prompts) == tokens(off, prompts), round_
    assert small.pool.blocks.evictions > 0 and small.pool.blocks.hit_blocks > 0


def test_a_shared_prefix_does_not_put_short_and_long_tails_in_one_attention_call() -> None:
    """Chat traffic: one short system prompt under conversations of every length is split
    by what follows the prefix (padding 40 short tails to ~900 would cost far more than
    reading 64 prefix tokens again); sessions over a long shared prompt stay together."""
    from worker.engine.cascades import by_tail_length

    chat = [70 + i % 10 for i in range(40)] + [960, 970, 980]
    groups = by_tail_length([(4, list(range(len(chat))))], chat, BS)
    assert sorted(sorted(idx) for _, idx in groups) == [list(range(40)), [40, 41, 42]]
    assert all(shared == 64 for shared, _ in groups)
    agent = [1024 + t for t in range(30, 300, 14)]  # 20 sessions, tails 30-296
    groups = by_tail_length([(64, list(range(len(agent))))], agent, BS)
    assert groups == [(1024, sorted(range(len(agent)), key=lambda i: -agent[i]))]
