"""Admission, lanes, the KV block pool and the scheduler on plain data: no NATS, no device."""

from __future__ import annotations

import random
from collections import deque

import pytest

from worker.admission import Admission
from worker.engine.blocks import BlockPool, OutOfBlocks, padded_tokens
from worker.engine.lanes import group_by_length, lane_of, lane_width
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Request

# -- admission ------------------------------------------------------------------------


class Ledger:
    """Tokens in flight, for the rule alone: `take` reserves a job of c tokens if it fits
    (the block pool plays this part in the worker, sharing prefixes)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0

    def take(self, c: int) -> bool:
        if self.used + c > self.budget:
            return False
        self.used += c
        return True

    def release(self, c: int) -> None:
        self.used -= c
        assert self.used >= 0


def admit(adm: Admission, led: Ledger, pending: deque[int]) -> list[int]:
    return adm.admit(pending, led.used, led.take)


def test_admission_never_exceeds_budget_and_holds_until_low_water() -> None:
    rng = random.Random(0)
    adm, led = Admission(budget_tokens=4096, low_water_tokens=2048), Ledger(4096)
    pending: deque[int] = deque(rng.choice([16, 64, 160, 512, 1088]) for _ in range(2000))
    inflight: list[int] = []
    order: list[int] = []
    while pending or inflight:
        was_holding = adm.holding
        before = led.used
        got = admit(adm, led, pending)
        if was_holding and before > 2048:
            assert got == [], "admitted while holding above low water"
        inflight += got
        order += got
        assert led.used == sum(inflight) <= 4096
        if got and pending:
            # Admission stopped at a job that does not fit: now holding.
            assert adm.holding and led.used + pending[0] > 4096
        # Finish a random subset.
        rng.shuffle(inflight)
        k = rng.randint(1, max(1, len(inflight)))
        for c in inflight[:k]:
            led.release(c)
        inflight = inflight[k:]
    assert led.used == 0


def test_admission_is_fifo_so_a_big_job_is_not_overtaken() -> None:
    adm, led = Admission(budget_tokens=1000, low_water_tokens=200), Ledger(1000)
    pending = deque([600, 900, 10, 10])
    assert admit(adm, led, pending) == [600]
    assert adm.holding
    led.release(300)  # 300 in flight, above low water: still holding
    assert admit(adm, led, pending) == []
    led.release(200)  # 100 in flight: resume, the 900 goes first
    assert admit(adm, led, pending) == [900]
    led.release(1000)
    assert admit(adm, led, pending) == [10, 10]


def test_admission_group_enters_at_once_after_low_water() -> None:
    adm, led = Admission(budget_tokens=1600, low_water_tokens=800), Ledger(1600)
    pending = deque([160] * 30)
    first = admit(adm, led, pending)
    assert len(first) == 10 and adm.holding
    for _ in range(4):
        led.release(160)  # 960 in flight: still above low water
        assert admit(adm, led, pending) == []
    led.release(160)  # 800: at low water, a group of five refills to the budget
    assert len(admit(adm, led, pending)) == 5


# -- KV block pool --------------------------------------------------------------------


def test_allocator_never_leaks_after_any_mix() -> None:
    rng = random.Random(1)
    a = BlockPool(256, 16, first=0, caching=False)
    held: dict[int, int] = {}
    for key in range(5000):
        if held and rng.random() < 0.5:
            k = rng.choice(list(held))
            assert a.release(k) == held.pop(k)
        n = rng.randint(1, 40)
        if n <= a.free_blocks:
            blocks = a.reserve(key, (), n).blocks
            assert len(set(blocks)) == n
            held[key] = n
        else:
            with pytest.raises(OutOfBlocks):
                a.reserve(key, (), n)
        assert a.used_blocks == sum(held.values())
    for k in list(held):
        a.release(k)
    assert a.free_blocks == 256 and a.holders() == 0
    assert a.release(12345) == 0  # idempotent


def test_padded_tokens_are_whole_blocks() -> None:
    assert padded_tokens(1, 16) == 16
    assert padded_tokens(16, 16) == 16
    assert padded_tokens(17, 16) == 32


# -- lanes ----------------------------------------------------------------------------


def test_lane_padding_is_bounded_by_lane_width() -> None:
    for n in range(1, 5000):
        lane = lane_of(n)
        assert n <= lane < n + lane_width(n)
        assert lane - n <= max(15, n // 8)


def test_group_by_length_bounds_spread() -> None:
    rng = random.Random(2)
    lengths = [rng.randint(1, 2000) for _ in range(500)]
    groups = group_by_length(lengths)
    assert sorted(i for g in groups for i in g) == list(range(500))
    for g in groups:
        longest = lengths[g[0]]
        assert all(longest - lengths[i] < lane_width(longest) for i in g)


# -- scheduler ------------------------------------------------------------------------


def _req(key: int, plen: int, max_new: int, solo: bool = False, stop=frozenset()) -> Request:
    # A prompt of its own per job: nothing shared by content (tests/unit/test_prefix.py shares).
    return Request(key=key, prompt=[key % 250 + 1] * plen, max_new_tokens=max_new,
                   reserved_tokens=padded_tokens(plen + max_new, 16), temperature=0.0,
                   top_k=0, top_p=1.0, seed=0, stop_ids=stop, solo=solo)


def _sched(blocks: int = 1024, cap: int = 512) -> Scheduler:
    return Scheduler(BlockPool(blocks, 16), 16, cap, eos_ids=(999,))


def test_scheduler_continuous_batching_join_and_leave() -> None:
    s = _sched(cap=64)
    s.add(_req(1, 40, 3), now=0.0)
    s.add(_req(2, 40, 1), now=0.1)
    p = s.schedule()
    assert [x.req.key for lane in p.prefill for x in lane] == [1]  # 2 does not fit the cap
    assert s.postprocess(p, [5], 1.0) == []
    p = s.schedule()
    assert [x.req.key for x in p.decode] == [1]
    assert [x.req.key for lane in p.prefill for x in lane] == [2]
    done = s.postprocess(p, [6, 7], 2.0)  # rows: prefill(2) first, then decode(1)
    assert [c.key for c in done] == [2] and done[0].tokens == [6]
    p = s.schedule()
    done = s.postprocess(p, [8], 3.0)
    assert [c.key for c in done] == [1] and done[0].tokens == [5, 7, 8]
    assert done[0].finish_reason == "length"
    assert not s.has_work() and s.pool.used_blocks == 0


def test_scheduler_stop_token_and_eos() -> None:
    s = _sched()
    s.add(_req(1, 10, 50, stop=frozenset({42})), 0.0)
    s.add(_req(2, 10, 50), 0.0)
    p = s.schedule()
    done = s.postprocess(p, [42, 999], 1.0)
    assert {c.key: c.finish_reason for c in done} == {1: "stop", 2: "stop"}
    assert s.pool.used_blocks == 0


def test_scheduler_oldest_lane_first_no_starvation() -> None:
    s = _sched(cap=300)
    s.add(_req(1, 290, 4), now=0.0)  # a long prompt, alone in its lane
    for k in range(2, 40):
        s.add(_req(k, 20, 4), now=float(k))  # a stream of short ones, all newer
    p = s.schedule()
    assert p.prefill[0][0].req.key == 1


def test_scheduler_solo_runs_alone() -> None:
    s = _sched()
    s.add(_req(1, 10, 2), 0.0)
    p = s.schedule()
    s.postprocess(p, [3], 0.0)
    s.add(_req(2, 10, 2, solo=True), 0.0)
    s.add(_req(3, 10, 2), 0.0)
    p = s.schedule()  # job 1 still running: the solo job waits, nothing new joins
    assert not p.prefill and [x.req.key for x in p.decode] == [1]
    s.postprocess(p, [4], 0.0)
    p = s.schedule()
    assert [[x.req.key for x in lane] for lane in p.prefill] == [[2]] and not p.decode


def test_add_all_is_add_one_by_one() -> None:
    reqs = [_req(1, 5, 3), _req(2, 40, 30), _req(3, 7, 1, solo=True), _req(4, 100, 60)]
    one, many = _sched(), _sched()
    for r in reqs:
        one.add(r, 0.0)
    many.add_all(reqs, 0.0)

    def view(s: Scheduler) -> dict:
        seqs = [x for q in s.lanes.values() for x in q] + list(s.solo)
        return {x.req.key: (x.lane, x.slots.tolist()) for x in seqs}
    assert view(one) == view(many)
    assert [x.req.key for x in many.solo] == [3]
    # Every reserved token has its own slot: block * 16 + offset, no slot shared.
    slots = [t for _, sl in view(many).values() for t in sl]
    assert len(slots) == len(set(slots)) == sum(r.reserved_tokens for r in reqs)


def test_padded_prefill_rows() -> None:
    from worker.engine.packing import SCRATCH_SLOT, Builder

    s = _sched()
    a = Request(key=1, prompt=[11, 12], max_new_tokens=1, reserved_tokens=16, temperature=0.0,
                top_k=0, top_p=1.0, seed=0, stop_ids=frozenset())
    b = Request(key=2, prompt=[21, 22, 23, 24], max_new_tokens=1, reserved_tokens=16,
                temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids=frozenset())
    s.add_all([a, b], 0.0)
    seqs = [x for q in s.lanes.values() for x in q]
    seqs.sort(key=lambda x: x.req.key)
    bld = Builder()
    bld.prefill(seqs, pad_to=4)  # static batching: both padded to 4 rows
    assert bld.tokens[0].tolist() == [11, 12, 0, 0, 21, 22, 23, 24]
    assert bld.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    sa, sb = seqs[0].slots.tolist(), seqs[1].slots.tolist()
    assert bld.slots[0].tolist() == sa[:2] + [SCRATCH_SLOT] * 2 + sb[:4]
    assert bld.logit_rows == [1, 7] and bld.rows == 8
    g = bld.groups[0]
    assert g["kv_slots"].tolist() == [sa[:2] + [SCRATCH_SLOT] * 2, sb[:4]]
    bld2 = Builder()
    bld2.prefill(seqs, pad_to=0)  # packed: no padding rows at all
    assert bld2.tokens[0].tolist() == [11, 12, 21, 22, 23, 24]
    assert bld2.positions[0].tolist() == [0, 1, 0, 1, 2, 3] and bld2.logit_rows == [1, 5]
