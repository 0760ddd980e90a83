"""The fleet as one cache, through real nats-servers and real worker processes: a session's
turns go to one worker while it lives, to the others when it is killed (a three-node
cluster, R3 streams), to a worker that joins for some sessions; a burst on one session
spills to the other worker; urgent jobs overtake a backlog. One Result per job always,
equal to the reference tokens."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict

import pytest

from schemas import Job
from schemas.subjects import job_subject
from tests.chaos.harness import (engine_toml, provision, publish, reference_tokens, results,
                                 wait_meta_leader, wait_results)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _turns(round_: int, sessions: int, reply: str, seed: int) -> list[Job]:
    rng = random.Random(seed * 1000 + round_)
    return [Job(id=f"s{i}-t{round_}", session=f"sess-{i}", reply_to=reply,
                prompt=[rng.randrange(1, 256) for _ in range(rng.randint(8, 40))],
                max_new_tokens=rng.randint(2, 8)) for i in range(sessions)]


def _owners(got, rounds) -> dict[str, Counter]:
    """session -> how many of its turns in `rounds` each worker answered."""
    out: dict[str, Counter] = defaultdict(Counter)
    for jid, rs in got.items():
        if "-t" not in jid:
            continue  # the warm-up
        s, t = jid.split("-t")
        if int(t) in rounds:
            out[s][rs[0].worker] += 1
    return out


async def test_sessions_stay_then_move_when_their_worker_dies_and_to_one_that_joins(
        cluster, fleet, tmp_path) -> None:
    urls = ",".join(n.url for n in cluster)
    await wait_meta_leader(urls)
    cfg, _, _ = engine_toml(tmp_path, urls)
    provision(cfg, extra_args=["--replicas", "3", "--ack-wait-s", "5"])
    f = fleet(cfg)
    a, b = f.start("a"), f.start("b")
    reply = "fabric.results.sess"
    sessions, sent = 12, []

    async def round_(r: int, alive) -> None:
        jobs = _turns(r, sessions, reply, seed=7)
        sent.extend(jobs)
        await publish(urls, jobs, job_subject)
        await wait_results(urls, reply, len(sent), 90, alive)

    # A warm-up round without sessions: a worker fetches one message at a time right
    # after it starts (caution against a crash's redeliveries), and that is not affinity.
    warm = [Job(id=f"warm-{i}", prompt=[1, 2, 3], max_new_tokens=1, reply_to=reply)
            for i in range(8)]
    sent.extend(warm)
    await publish(urls, warm, "fabric.jobs.warm")
    # Owners settle within a refresh (2 s): until a sees b, both pull b's partitions.
    await asyncio.sleep(3)
    for r in range(4):
        await round_(r, [a, b])
    got = await results(urls, reply)
    before = _owners(got, range(4))
    # Every session ran all its turns on one worker, and both workers have sessions.
    assert all(len(c) == 1 for c in before.values()), before
    served = Counter(next(iter(c)) for c in before.values())
    assert set(served) == {"a", "b"}, served

    # Kill -9 the worker with more sessions mid-conversation: the other serves them all.
    victim = a if served["a"] >= served["b"] else b
    survivor = b if victim is a else a
    victim.kill()
    t0 = time.monotonic()
    for r in range(4, 7):
        await round_(r, [survivor])
    print(f"\n[sessions] {served[victim.worker_id]} sessions of {victim.worker_id} moved to "
          f"{survivor.worker_id}; three rounds in {time.monotonic() - t0:.1f}s")
    got = await results(urls, reply)
    assert all(set(c) == {survivor.worker_id} for c in _owners(got, range(5, 7)).values())

    # A worker that joins takes its share of the sessions within a refresh or two.
    c = f.start("c")
    await asyncio.sleep(5)  # its membership is seen by the survivor (2 s refreshes)
    for r in range(7, 10):
        await round_(r, [survivor, c])
    got = await results(urls, reply)
    after = _owners(got, range(8, 10))
    assert any("c" in cnt for cnt in after.values()), after
    assert all(len(cnt) == 1 for cnt in after.values()), after  # settled: one worker each

    # One Result per job, equal to the reference: nothing lost, nothing run twice.
    assert got.keys() == {j.id for j in sent}
    assert all(len(v) == 1 for v in got.values())
    ref = reference_tokens(sent)
    assert all(got[j.id][0].ok and got[j.id][0].tokens == ref[j.id] for j in sent)


async def test_a_burst_on_one_session_spills_to_the_other_worker(broker, fleet, tmp_path) -> None:
    cfg, _, _ = engine_toml(tmp_path, broker.url)
    provision(cfg, extra_args=["--ack-wait-s", "10"])
    f = fleet(cfg)
    workers = [f.start("a"), f.start("b")]
    reply = "fabric.results.burst"
    rng = random.Random(3)
    jobs = [Job(id=f"burst-{i}", session="one-hot-session", reply_to=reply,
                prompt=[rng.randrange(1, 256) for _ in range(rng.randint(8, 64))],
                max_new_tokens=rng.randint(4, 16)) for i in range(400)]
    await publish(broker.url, jobs, job_subject)
    await wait_results(broker.url, reply, len(jobs), 180, workers)
    got = await results(broker.url, reply)
    by_worker = Counter(v[0].worker for v in got.values())
    print(f"\n[sessions] a burst of 400 turns of one session: {dict(by_worker)}")
    assert set(by_worker) == {"a", "b"}, by_worker  # the owner did not keep it all waiting
    assert got.keys() == {j.id for j in jobs} and all(len(v) == 1 for v in got.values())


async def test_urgent_jobs_overtake_a_backlog(broker, fleet, tmp_path) -> None:
    cfg, _, _ = engine_toml(tmp_path, broker.url)
    provision(cfg)
    reply = "fabric.results.prio"
    rng = random.Random(5)

    def job(jid: str, priority: int) -> Job:
        return Job(id=jid, priority=priority, reply_to=reply,
                   prompt=[rng.randrange(1, 256) for _ in range(rng.randint(8, 64))],
                   max_new_tokens=rng.randint(4, 16))
    bulk = [job(f"bulk-{i}", 9) for i in range(600)]
    await publish(broker.url, bulk, job_subject)
    w = fleet(cfg).start("a")
    await wait_results(broker.url, reply, 50, 60, [w])  # well into the backlog
    urgent = [job(f"urgent-{i}", 0) for i in range(10)] + [job(f"normal-{i}", 5) for i in range(10)]
    await publish(broker.url, urgent, job_subject)
    await wait_results(broker.url, reply, len(bulk) + len(urgent), 180, [w])
    # The results stream's order is the order the worker answered in.
    from tests.chaos.harness import read_stream
    from worker.broker.topology import RESULTS_STREAM
    from schemas import decode_result
    order = [decode_result(d).id for _, d in await read_stream(broker.url, RESULTS_STREAM, reply)]
    assert len(order) == len(set(order)) == len(bulk) + len(urgent)
    last_urgent = max(order.index(f"urgent-{i}") for i in range(10))
    last_normal = max(order.index(f"normal-{i}") for i in range(10))
    bulk_after = sum(1 for jid in order[last_normal:] if jid.startswith("bulk-"))
    # Behind the urgent and normal jobs only what the worker held when they came (one
    # pending group) was answered first: most of the backlog comes after them.
    assert last_urgent < last_normal or last_urgent - last_normal < 10
    assert bulk_after > 300, (last_urgent, last_normal, bulk_after)
