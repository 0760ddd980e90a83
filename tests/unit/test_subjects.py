"""Which subject a producer publishes a job to (`schemas.subjects`), and the owners of the
session partitions (`worker.broker.members`): plain functions, checked on their own."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from schemas import Job
from schemas.subjects import job_subject, session_token
from worker.broker.members import SessionLoads, member_key, owners, preferred, rebalance


def owned(me: str, members, partitions: int) -> frozenset[int]:
    """The partitions `owners` gives `me`."""
    return frozenset(k for k, m in enumerate(owners(members, partitions)) if m == me)


def _job(**kw) -> Job:
    return Job(id="j1", prompt=[1], max_new_tokens=1, reply_to="fabric.results.t", **kw)


def test_the_subject_follows_session_then_priority() -> None:
    assert job_subject(_job()) == "fabric.jobs.default"
    assert job_subject(_job(), "me") == "fabric.jobs.me"
    assert job_subject(_job(priority=5), "me") == "fabric.jobs.me"
    assert job_subject(_job(priority=0), "me") == "fabric.prio.0.me"
    assert job_subject(_job(priority=9)) == "fabric.prio.9.default"
    # A session's subject carries its priority before its token; the broker partitions
    # by the token alone, so every turn of a session shares a partition.
    assert job_subject(_job(session="chat-42")) == "fabric.session.5.chat-42"
    assert job_subject(_job(session="chat-42", priority=0)) == "fabric.session.0.chat-42"
    assert job_subject(_job(session="a b", priority=9)) == (
        "fabric.session.9." + hashlib.blake2b(b"a b", digest_size=16).hexdigest())


def test_a_session_token_is_the_session_or_its_digest() -> None:
    assert session_token("Agent_7-b") == "Agent_7-b"
    for s in ("a.b", "a b", "tenant/1", "é", "x" * 129, "*", ">"):
        tok = session_token(s)
        assert tok == hashlib.blake2b(s.encode(), digest_size=16).hexdigest()
        assert len(tok) == 32 and "." not in tok
    assert session_token("a.b") != session_token("a b")


def test_owners_cover_every_partition_once_evenly_and_move_little() -> None:
    workers = [f"host-{i}" for i in range(4)]
    parts = [owned(w, workers, 64) for w in workers]
    assert sorted(k for p in parts for k in p) == list(range(64))
    assert [len(p) for p in parts] == [16] * 4  # the cap: an even share each
    assert owners([], 8)[3] is None and owned("x", ["x"], 5) == frozenset(range(5))
    # Two workers, 16 partitions (the default): 8 each for any pair of names, where plain
    # rendezvous gave 5 and 11 to some.
    plain = []
    for i in range(40):
        pair = [f"w{i}-0", f"w{i}-1"]
        assert sorted(len(owned(w, pair, 16)) for w in pair) == [8, 8]
        plain.append(sum(preferred(k, pair) == pair[0] for k in range(16)))
    assert min(plain) <= 5 or max(plain) >= 11  # what the cap is for
    # A fifth worker takes its share; a few others move to make room, not many.
    five = workers + ["host-4"]
    by4, by5, by3 = owners(workers, 64), owners(five, 64), owners(workers[1:], 64)
    moved = [k for k in range(64) if by5[k] != by4[k]]
    took = [k for k in moved if by5[k] == "host-4"]
    assert 12 <= len(took) <= 13 and len(moved) - len(took) <= 6, (len(moved), len(took))
    # One that leaves hands over its own, and a few more move to even the shares.
    moved = [k for k in range(64) if by3[k] != by4[k]]
    assert sum(by4[k] == "host-0" for k in moved) == 16 and len(moved) <= 22
    spread = Counter(by5)
    assert sorted(spread.values()) == [12, 13, 13, 13, 13]
    # Three workers, 16 partitions: at most 6 each, every partition owned.
    assert sorted(Counter(owners(["a", "b", "c"], 16)).values()) in ([5, 5, 6], [4, 6, 6])


def test_member_keys_are_valid_kv_keys() -> None:
    assert member_key("gpu-node-3-1234") == "gpu-node-3-1234"
    assert member_key("host.example.com:1") == "host_example_com_1"


def _totals(own, load, members):
    return {m: sum(n for k, n in enumerate(load) if own[k] == m) for m in members}


def test_rebalance_moves_the_partition_that_narrows_the_gap_most() -> None:
    members = ["a", "b"]
    own = ["a", "a", "a", "b", "b", "a"]
    load = [3, 1, 4, 2, 2, 2]  # a: 10, b: 4, gap 6: the 3 closes it
    assert rebalance(own, load, members) == (0, "a", "b")
    assert rebalance(own, load, members, frozen=frozenset({0})) in {(5, "a", "b"), (2, "a", "b")}
    # A gap a move cannot narrow by two sessions stays (no move for one session's worth).
    assert rebalance(["a", "b"], [5, 4], members) is None
    assert rebalance(["a", "b", "b"], [3, 0, 0], members) is None  # the 3 would only flip it
    assert rebalance(["a", "a"], [1, 1], members) == (0, "a", "b")
    assert rebalance(own, load, ["a"]) is None  # one member: nothing to balance
    assert rebalance(["a", "b"], [0, 0], members) is None  # empty partitions never move
    # Hundreds of sessions a worker: a gap of a few is noise, not worth the moved histories.
    assert rebalance(["a", "a", "b"], [250, 4, 246], members) is None  # 254 against 246
    assert rebalance(["a", "a", "b"], [250, 40, 200], members) == (1, "a", "b")


def test_rebalance_converges_and_never_moves_a_partition_back() -> None:
    """Every move shrinks the spread between two members, so moves stop; the loads left
    can be no closer by one more move. Random fleets and loads, as hashing makes them."""
    rng = random.Random(7)
    for _ in range(300):
        members = [f"w{i}" for i in range(rng.randint(2, 5))]
        partitions = rng.choice([8, 16, 32])
        own = owners(members, partitions)
        load = [rng.choice([0, 0, 1, 1, 2, 3, 5]) for _ in range(partitions)]
        seen: set[tuple[int, str]] = set()
        for moves in range(partitions + 1):
            move = rebalance(own, load, members)
            if move is None:
                break
            k, frm, to = move
            assert own[k] == frm and (k, frm) not in seen  # never back where it was
            seen.add((k, to))
            own[k] = to
        else:
            raise AssertionError("did not converge")
        t = _totals(own, load, members)
        hi, lo = max(t.values()), min(t.values())
        busiest = [m for m in members if t[m] == hi]
        floor = max(2, 0.05 * sum(load) / len(members))
        for k, m in enumerate(own):  # no single move from the busiest closes the floor
            if m in busiest and load[k]:
                assert (hi - lo) - abs(hi - lo - 2 * load[k]) < floor


def test_session_loads_count_each_session_once_within_the_window() -> None:
    loads = SessionLoads(window_s=10.0)
    loads.saw(3, "chat-1", 100.0)
    loads.saw(3, "chat-1", 104.0)  # the same session's next turn
    loads.saw(3, "chat-2", 101.0)
    loads.saw(5, "chat-9", 95.0)
    assert loads.counts(now=105.0) == {3: 2, 5: 1}
    assert loads.counts(now=111.5) == {3: 1}  # chat-2 and chat-9 quiet for over 10 s
    assert loads.counts(now=200.0) == {}
