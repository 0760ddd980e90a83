"""The persistent batch: its mirror of the sequences, its groups' key tables, and the tokens.

The decode batch (`worker.engine.batch`) keeps each running sequence's per-step state in
arrays from the step it joins to the step it leaves, and the attention groups keep key
tables that a step extends by one position per row (`worker.engine.groups`). These tests
drive the real scheduler and runner (builtin tiny model, float32, CPU) through random
traffic -- jobs admitted mid-decode, finishing on stop tokens and on length, cancelled,
prompts sharing prefixes -- and check after every step that the mirror equals the
sequences and every key table equals one built from scratch; and that the tokens are the
same with every rebuild forced at every step, with the tables' growth room shrunk to
nothing, and with overlapped steps.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from worker.engine import cascades, groups as groups_mod
from worker.engine.build import Engine, build_engine
from worker.engine.blocks import SCRATCH_SLOT
from worker.engine.step import turn
from worker.engine.scheduler import StepPlan
from tests.unit.test_engine import alone, req


SEEN = {"groups": 0, "cascades": 0}  # what the checks looked at (so they cannot be vacuous)


def check_tables(sched) -> None:
    """Every group's tables equal what a build from the batch's slot table would give, once
    brought up to date (as the next step's prepare does first)."""
    b = sched.batch
    b.check()
    g = b.groups
    g.update()
    assert sorted(g.rows.tolist()) == np.flatnonzero(b.held).tolist()  # each row once
    for grp in g.groups:
        kv, mask = g.tables(grp)
        for i, r in enumerate(grp.rows.tolist()):
            n = int(b.nctx[r]) - grp.shared
            assert mask[i, :n].all() and not mask[i, n:].any(), (r, n)
            assert (kv[i, :n] == b.slots[r, grp.shared:grp.shared + n]).all(), r
            assert (kv[i, n:] == SCRATCH_SLOT).all(), r
        SEEN["groups"] += 1
        if grp.shared:  # a cascade: every member holds the prefix in the same blocks
            SEEN["cascades"] += 1
            prefix = b.slots[grp.rows[0], :grp.shared]
            assert all((b.slots[r, :grp.shared] == prefix).all() for r in grp.rows.tolist())


def traffic(seed: int, n: int = 36) -> list:
    """Ragged jobs, a third of them behind one of two shared 40-token prefixes, some with a
    stop id the tiny model samples now and then."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(40)] for _ in range(2)]
    out = []
    for i in range(n):
        own = [rng.randrange(256) for _ in range(rng.randint(3, 150))]
        prompt = (prefixes[i % 2] + own) if i % 3 == 0 else own
        stop = frozenset({rng.randrange(256)}) if i % 4 == 0 else frozenset()
        out.append(req(i, prompt, rng.randint(1, 40), stop_ids=stop))
    return out


def run(engine: Engine, reqs: list, seed: int, overlap: bool = False, cancel: int = -1,
        checked: bool = True) -> dict[int, list[int]]:
    """Admit the jobs a few at a time while others decode; cancel job `cancel` mid-way."""
    rng = random.Random(seed)
    sched, runner = engine.scheduler(overlap=overlap), engine.runner()
    queue, out, inflight, steps = list(reqs), {}, None, 0
    while queue or sched.has_work() or inflight is not None:
        if queue and rng.random() < 0.4:
            take = queue[:rng.randint(1, 4)]
            queue = queue[len(take):]
            sched.add_all(take, time.monotonic())
        if steps == 12 and cancel >= 0:
            c = sched.end(cancel, "cancelled", time.monotonic())
            if c is not None:
                out[c.key] = ("cancelled", c.tokens)
        plan = sched.schedule() if sched.has_work() else StepPlan()
        _, inflight, done = turn(sched, runner, plan, inflight)
        for c in done:
            out[c.key] = c.tokens
        steps += 1
        if checked and sched.batch is not None and not overlap:
            check_tables(sched)
    assert sched.pool.holders() == 0  # every job's blocks went back
    return out


@pytest.fixture(scope="module")
def roomy() -> Engine:
    return build_engine("builtin:tiny", "cpu", "float32", 65536, 1088, max_step_tokens=160)


def test_tables_and_mirror_hold_through_random_traffic(roomy: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cascades, "DECODE_CASCADE_MIN_SAVED", 0)  # short prefixes cascade too
    reqs = traffic(1)
    SEEN.update(groups=0, cascades=0)
    out = run(roomy, reqs, seed=1, cancel=5)
    assert SEEN["groups"] > 100 and SEEN["cascades"] > 5, SEEN
    assert len(out) == len(reqs)
    for r in reqs:
        if r.key != 5:
            assert out[r.key] == alone(roomy, r), f"job {r.key} differs from running alone"


def test_tokens_unchanged_with_every_rebuild_forced(roomy: Engine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = traffic(2)
    base = run(roomy, reqs, seed=2, checked=False)
    monkeypatch.setattr(groups_mod, "REGROUP_STEPS", 1)  # a full regrouping at every join
    monkeypatch.setattr(groups_mod, "HEADROOM_BLOCKS", 1)  # tables outgrown every few steps
    assert run(roomy, reqs, seed=2) == base


def test_overlapped_steps_give_the_same_tokens(roomy: Engine) -> None:
    reqs = traffic(3)
    assert run(roomy, reqs, seed=3, overlap=True, checked=False) == run(roomy, reqs, seed=3,
                                                                        checked=False)


def test_rows_are_reused_only_after_the_step_in_flight() -> None:
    """A row left is free only after the next postprocess (overlap: the step in flight may
    still name it), and a row reused is another sequence to the groups."""
    from worker.engine.batch import DecodeBatch
    from worker.engine.sequence import Sequence

    b = DecodeBatch(16, frozenset({2}))
    seqs = [Sequence(req=req(i, [1] * 20, 8), blocks=(1, 2), slots=np.arange(32) + 16,
                     lane=0, waiting_since=0.0) for i in range(3)]
    rows = b.rows_of(seqs[:2])
    b.leave(seqs[0])
    assert seqs[0].row == -1 and not b.held[rows[0]]
    b.settle()  # the step that was in flight when it left
    assert b.join(seqs[2]) != rows[0]
    b.settle()
    assert rows[0] in b._free
    b.check()
