"""Which subject a producer publishes a job to (`schemas.subjects`), and the owners of the
session partitions (`worker.broker.members`): plain functions, checked on their own."""

from __future__ import annotations

import hashlib
from collections import Counter

from schemas import Job
from schemas.subjects import job_subject, session_token
from worker.broker.members import member_key, owned, owners, preferred


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
