"""Priorities and session partitions against a real nats-server: the topology `provision`
makes, pulled by `Ingress` over several consumers, with the owners `Membership` computes."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

import nats
import pytest

from schemas import Job, encode
from worker.broker.ingress import Ingress
from worker.broker.members import Membership, owners
from worker.broker.topology import Topology, provision, verify
from worker.broker.validate import Limits, Ticket, Validator
from worker.model.tokenizer import ByteTokenizer

pytestmark = pytest.mark.timeout(120)


def _topology(tag: str, partitions: int = 4, member_ttl_s: float = 6.0) -> Topology:
    p = f"q{tag}."
    return Topology(jobs_stream=f"QJ_{tag}", consumer="w", jobs_subjects=p + "jobs.>",
                    results_stream=f"QR_{tag}", results_prefix=p + "results.",
                    dlq_stream=f"QD_{tag}", dlq_prefix=p + "dlq.", cancel_subject=p + "cancel",
                    cancels_stream=f"QC_{tag}", prio_prefix=p + "prio.",
                    session_prefix=p + "session.", partitions=partitions,
                    members_bucket=f"QM_{tag}", member_ttl_s=member_ttl_s)


class Broker:
    def __init__(self, url: str, **kw):
        self.url, self.kw = url, kw

    async def __aenter__(self):
        tag = secrets.token_hex(3)
        self.topo = _topology(tag, **self.kw)
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        await provision(self.js, self.topo)
        self.verified = await verify(self.js, self.topo)
        return self

    async def __aexit__(self, *exc):
        t = self.topo
        for name in (t.jobs_stream, t.results_stream, t.dlq_stream, t.cancels_stream,
                     f"KV_{t.members_bucket}"):
            await self.js.delete_stream(name)
        await self.nc.close()

    async def publish(self, subject: str, ids, **fields) -> None:
        for i in ids:
            job = Job(id=str(i), prompt=[1, 2, 3], max_new_tokens=1,
                      reply_to=self.topo.results_prefix + "t", **fields)
            await self.js.publish(subject, encode(job))

    def ingress(self, tickets: list[Ticket], room, **kw) -> Ingress:
        limits = Limits(vocab_size=256, max_seq_len=1088, budget_tokens=4096, block_size=16,
                        reply_prefix=self.topo.results_prefix)

        def on_outcome(o) -> None:
            raise AssertionError(f"unexpected outcome {o}")
        return Ingress(self.nc, self.topo.jobs_stream, self.verified.queues,
                       Validator(limits, ByteTokenizer()), room, tickets.append, on_outcome,
                       fetch_timeout_s=0.5, **kw)


async def _until(pred, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def _stop(*pairs) -> None:
    for ing, task in pairs:
        ing.stop()
        await task


def test_provision_makes_one_consumer_per_queue_and_verify_finds_them(nats_url: str) -> None:
    async def main() -> None:
        async with Broker(nats_url, partitions=3) as b:
            names = [q.consumer for q in b.verified.queues]
            assert names[0] == "w"  # the default queue first: priority 5
            assert sorted(names[1:10]) == sorted(f"w-p{p}" for p in range(10) if p != 5)
            # Each partition: a queue per class of priorities (0-4, 5, 6-9).
            assert names[10:] == ["w-s0p0", "w-s1p0", "w-s2p0", "w-s0", "w-s1", "w-s2",
                                  "w-s0p6", "w-s1p6", "w-s2p6"]
            parts = {q.consumer: (q.priority, q.partition) for q in b.verified.queues}
            assert parts["w-s1p0"] == (0, 1) and parts["w-s2"] == (5, 2)
            assert parts["w-s0p6"] == (6, 0)
            assert b.verified.members
            # Provisioning again changes nothing and fails on nothing.
            await provision(b.js, b.topo)
            assert (await verify(b.js, b.topo)).queues == b.verified.queues
    asyncio.run(main())


def test_higher_priorities_are_pulled_first_and_fifo_within_one(nats_url: str) -> None:
    async def main() -> None:
        async with Broker(nats_url) as b:
            t = b.topo
            await b.publish(t.prio_prefix + "9.bulk", range(900, 930))
            await b.publish(t.jobs_subjects[:-1] + "me", range(500, 530))  # priority 5
            await b.publish(t.prio_prefix + "0.urgent", range(0, 5))
            tickets: list[Ticket] = []
            cap = [12]
            ing = b.ingress(tickets, lambda: cap[0] - len(tickets))
            await ing.start()
            task = asyncio.create_task(ing.run())
            await _until(lambda: len(tickets) == 12)
            for _ in range(6):  # room opens a few at a time, as admission frees it
                cap[0] += 11
                ing.room_changed.set()
                await _until(lambda: len(tickets) == min(cap[0], 65))
            ids = [int(tk.job.id) for tk in tickets]
            assert ids == list(range(5)) + list(range(500, 530)) + list(range(900, 930))
            await _stop((ing, task))
    asyncio.run(main())


def test_session_jobs_are_ordered_by_their_class_among_the_priorities(nats_url: str) -> None:
    """A bulk session's turns wait behind default work, an urgent session's go before it,
    and each keeps its session's partition (one partition, whatever the priority)."""
    async def main() -> None:
        async with Broker(nats_url, partitions=2) as b:
            t = b.topo
            await b.publish(t.session_prefix + "9.s-bulk", range(900, 910), priority=9,
                            session="s-bulk")
            await b.publish(t.jobs_subjects[:-1] + "me", range(500, 510))  # priority 5
            await b.publish(t.session_prefix + "5.s-mid", range(520, 525), session="s-mid")
            await b.publish(t.session_prefix + "1.s-hot", range(100, 105), priority=1,
                            session="s-hot")
            await b.publish(t.prio_prefix + "0.urgent", range(0, 5))
            await b.publish(t.session_prefix + "5.s-hot", range(530, 533), session="s-hot")
            tickets: list[Ticket] = []
            cap = [5]
            ing = b.ingress(tickets, lambda: cap[0] - len(tickets))
            await ing.start()
            ing.set_owned(None)  # owns every partition: order alone is under test
            task = asyncio.create_task(ing.run())
            await _until(lambda: len(tickets) == 5)
            for _ in range(8):
                cap[0] += 5
                ing.room_changed.set()
                await _until(lambda: len(tickets) == min(cap[0], 38))
            ids = [int(tk.job.id) for tk in tickets]
            # Urgent first: the urgent sessions' class ranks as priority 0, and within a
            # priority a partition this worker owns goes before the priority's queue; then
            # priority 5 (sessions and default), bulk sessions last.
            assert ids[:10] == list(range(100, 105)) + list(range(0, 5)), ids
            assert sorted(ids[10:28]) == list(range(500, 510)) + list(range(520, 525)) + [
                530, 531, 532], ids
            assert ids[28:] == list(range(900, 910)), ids
            # One partition per session, whatever the priority of its turns.
            hot = {tk.msg.subject.split(".")[-2] for tk in tickets if tk.job.session == "s-hot"}
            assert len(hot) == 1, hot
            await _stop((ing, task))
    asyncio.run(main())


def test_a_low_priority_is_not_starved_past_the_bound(nats_url: str) -> None:
    async def main() -> None:
        async with Broker(nats_url) as b:
            t = b.topo
            await b.publish(t.prio_prefix + "9.bulk", range(900, 903))
            await b.publish(t.prio_prefix + "0.urgent", range(0, 400))
            tickets: list[Ticket] = []
            cap = [4]
            ing = b.ingress(tickets, lambda: cap[0] - len(tickets), starve_after_s=0.5)
            await ing.start()
            task = asyncio.create_task(ing.run())
            start = time.monotonic()
            while not any(tk.job.id.startswith("90") for tk in tickets):
                assert time.monotonic() - start < 3.0, "priority 9 starved"
                cap[0] += 4  # urgent work keeps the room busy
                ing.room_changed.set()
                await asyncio.sleep(0.05)
            waited = time.monotonic() - start
            urgent_left = 400 - sum(int(tk.job.id) < 900 for tk in tickets)
            assert urgent_left > 0 and 0.4 <= waited <= 2.0, (waited, urgent_left)
            await _stop((ing, task))
    asyncio.run(main())


def test_session_jobs_go_to_the_owner_and_spill_only_past_the_bound(nats_url: str) -> None:
    async def main() -> None:
        async with Broker(nats_url, partitions=2) as b:
            t = b.topo
            got_a: list[Ticket] = []
            got_b: list[Ticket] = []
            room_a = [100]
            a = b.ingress(got_a, lambda: room_a[0] - len(got_a), spill_after=3)
            bb = b.ingress(got_b, lambda: 100 - len(got_b), spill_after=3)
            for ing in (a, bb):
                await ing.start()
            a.set_owned(frozenset({0, 1}))
            bb.set_owned(frozenset())
            tasks = [asyncio.create_task(i.run()) for i in (a, bb)]
            await asyncio.sleep(0.3)  # both idle: watches open everywhere
            await b.publish(t.session_prefix + "5.sess-1", range(6), session="sess-1")
            await _until(lambda: len(got_a) == 6)
            await asyncio.sleep(0.3)
            assert got_b == []  # the owner keeps up: all of it went there
            # The broker put the session in one partition (its subject says which).
            assert len({tk.msg.subject for tk in got_a}) == 1
            assert got_a[0].msg.subject.startswith(t.session_prefix)
            assert got_a[0].job.session == "sess-1"
            room_a[0] = len(got_a)  # the owner is full: its jobs queue in the broker
            await b.publish(t.session_prefix + "5.sess-1", range(6, 16), session="sess-1")
            # The other worker takes them while 3 or more wait and leaves 2 to the owner;
            # the owner's open watch (one message, past its room) may have caught the first.
            part = got_a[0].msg.subject.split(".")[-2]
            info = None

            async def settled() -> bool:
                nonlocal info
                info = await b.js.consumer_info(t.jobs_stream, f"w-s{part}")
                return info.num_pending == 2
            end = time.monotonic() + 10
            while not await settled():
                assert time.monotonic() < end
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert len(got_a) <= 7 and len(got_b) == 10 - 2 - (len(got_a) - 6) >= 7
            assert bb.spilled == len(got_b)
            room_a[0] += 10
            a.room_changed.set()
            await _until(lambda: len(got_a) + len(got_b) == 16)
            assert sorted(int(tk.job.id) for tk in got_a + got_b) == list(range(16))
            await _stop((a, tasks[0]), (bb, tasks[1]))
    asyncio.run(main())


def test_members_split_the_partitions_and_take_over_from_one_that_leaves(nats_url: str) -> None:
    async def main() -> None:
        async with Broker(nats_url, partitions=16, member_ttl_s=1.5) as b:
            pulls: dict[str, frozenset[int]] = {}
            ms = {w: Membership(b.nc, b.js, b.topo, w, 16,
                                on_change=lambda o, w=w: pulls.__setitem__(w, o))
                  for w in ("alpha", "beta", "gamma")}
            for m in ms.values():
                assert await m.join()
            for m in ms.values():
                await m.refresh()  # the first to join saw itself alone
            owned = {w: m.owned for w, m in ms.items()}
            assert sorted(k for p in owned.values() for k in p) == list(range(16))  # each once
            assert all(owned.values())
            # What a worker pulls freely is what it owns and, for one refresh, what it owned.
            assert pulls["alpha"] == frozenset(range(16))  # alone at first
            await ms["alpha"].refresh()
            assert pulls["alpha"] == ms["alpha"].owned
            # beta leaves cleanly: the others take its partitions and keep their own. Its
            # refresh loop runs on until teardown ends: that must not put the entry back.
            await ms["beta"].leave()
            await ms["beta"].refresh()
            assert await ms["alpha"].read() == ("alpha", "gamma")
            for w in ("alpha", "gamma"):
                await ms[w].refresh()
            assert ms["alpha"].owned | ms["gamma"].owned == frozenset(range(16))
            assert owned["alpha"] <= ms["alpha"].owned and owned["gamma"] <= ms["gamma"].owned
            # gamma stops being heard from (killed): after the TTL alpha owns everything.
            await asyncio.sleep(2.5)
            await ms["alpha"].refresh()
            assert ms["alpha"].owned == frozenset(range(16))
            assert ms["alpha"].members == ("alpha",)
    asyncio.run(main())


def test_pools_on_one_broker_share_the_members_bucket_but_not_the_owners(nats_url: str) -> None:
    """Workers of another jobs stream, or of another consumer on this one, are not members:
    they would own partitions they never pull. (The bench ran a one-core pool and then two
    workers on one broker; the one-core worker's entry made it own partitions of the next.)"""
    async def main() -> None:
        async with Broker(nats_url, partitions=16) as b:
            other_stream = dataclasses.replace(b.topo, jobs_stream=b.topo.jobs_stream + "X")
            other_consumer = dataclasses.replace(b.topo, consumer="v")
            ms = [Membership(b.nc, b.js, t, w, 16, on_change=lambda o: None)
                  for t, w in ((b.topo, "alpha"), (other_stream, "beta"), (other_consumer, "gamma"))]
            for m in ms:
                assert await m.join()
            for m in ms:
                await m.refresh()
                assert m.members == (m.me,) and m.owned == frozenset(range(16))
    asyncio.run(main())


def test_the_leader_evens_out_the_sessions_and_every_member_follows(nats_url: str) -> None:
    """Hash and cap give each member 8 partitions; here alpha's carry 3 sessions each and
    beta's 1 (24 against 8). The leader (alpha, first by name) moves one partition a
    refresh until a move could not narrow the gap; beta reads the same owners; then
    nothing moves any more. Each worker reports the sessions of the partitions it pulls."""
    async def main() -> None:
        async with Broker(nats_url, partitions=16) as b:
            names = ("alpha", "beta")
            start = owners(names, 16)
            sessions = [3 if start[k] == "alpha" else 1 for k in range(16)]
            ms: dict[str, Membership] = {}
            for w in names:
                ms[w] = Membership(b.nc, b.js, b.topo, w, 16, on_change=lambda o: None,
                                   loads=lambda w=w: {k: sessions[k] for k in ms[w].pulls})
            for m in ms.values():
                assert await m.join()

            def totals() -> dict[str, int]:
                return {w: sum(sessions[k] for k in m.owned) for w, m in ms.items()}
            seen = []
            for _ in range(16):  # a move is made at the second refresh that proposes it
                for m in ms.values():
                    await m.refresh()
                seen.append(totals())
            assert ms["alpha"].owned | ms["beta"].owned == frozenset(range(16))
            assert not ms["alpha"].owned & ms["beta"].owned
            assert totals() == {"alpha": 16, "beta": 16}, seen
            assert ms["beta"].moved == 0 and 2 <= ms["alpha"].moved <= 5, seen
            moved, owned = ms["alpha"].moved, {w: m.owned for w, m in ms.items()}
            for _ in range(3):  # settled: no more moves
                for m in ms.values():
                    await m.refresh()
            assert ms["alpha"].moved == moved and {w: m.owned for w, m in ms.items()} == owned
    asyncio.run(main())


def test_a_joiner_is_heard_at_once_not_at_the_next_refresh(nats_url: str) -> None:
    """Refreshes 10 s apart here: alpha still learns of beta as soon as beta puts its entry
    (its put is a message alpha hears), so alpha stops pulling beta's partitions freely."""
    async def main() -> None:
        async with Broker(nats_url, partitions=16, member_ttl_s=60.0) as b:
            pulls: dict[str, frozenset[int]] = {}
            ms = {w: Membership(b.nc, b.js, b.topo, w, 16,
                                on_change=lambda o, w=w: pulls.__setitem__(w, o))
                  for w in ("alpha", "beta")}
            assert await ms["alpha"].join()
            task = asyncio.create_task(ms["alpha"].run())
            assert ms["alpha"].members == ("alpha",)
            t0 = time.monotonic()
            assert await ms["beta"].join()
            await _until(lambda: ms["alpha"].members == ("alpha", "beta"))
            assert time.monotonic() - t0 < 2.0
            assert not ms["alpha"].owned & ms["beta"].owned
            await _until(lambda: pulls["alpha"] == ms["alpha"].owned, 2.0)
            task.cancel()
    asyncio.run(main())
