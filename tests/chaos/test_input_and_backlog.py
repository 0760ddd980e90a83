"""Issue tests 5 and 6: a flood of malformed payloads interleaved with good jobs, and a
backlog many times the budget. The worker stays up, answers or terminates every bad
message exactly once (nothing loops through redelivery), and holds no more than the budget
implies however deep the queue: the broker is the buffer."""

from __future__ import annotations

import asyncio
import random
import time

import msgpack
import nats
import psutil
import pytest

from schemas import Job
from tests.chaos.harness import (consumer_state, engine_toml, log_events, provision,
                                 redelivered_now, results, small_jobs, wait_results)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPLY = "fabric.results.flood"


def malformed(rng: random.Random, i: int) -> tuple[bytes, bool]:
    """One bad payload -> (bytes, whether it carries an id and a reply subject we may answer)."""
    jid = f"bad-{i}"
    kind = i % 9
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300)), False
    if kind == 1:
        return msgpack.packb({"id": jid, "prompt": "x", "max_new_tokens": "ten", "reply_to": REPLY}), True
    if kind == 2:
        return msgpack.packb({"id": jid, "prompt": [1, 2], "max_new_tokens": -rng.randint(1, 99),
                              "reply_to": REPLY}), True
    if kind == 3:
        return msgpack.packb({"id": jid, "prompt": [rng.randrange(256)] * rng.choice([1100, 5000, 60000]),
                              "max_new_tokens": 8, "reply_to": REPLY}), True
    if kind == 4:
        return msgpack.packb({"id": jid, "prompt": rng.randbytes(20), "max_new_tokens": 3,
                              "reply_to": REPLY}), True
    if kind == 5:
        subject = rng.choice(["$JS.API.STREAM.DELETE.FABRIC_RESULTS", "fabric.jobs.flood",
                              "_INBOX.steal", "fabric.dlq.x"])
        return msgpack.packb({"id": jid, "prompt": [1, 2], "max_new_tokens": 2, "reply_to": subject}), False
    if kind == 6:
        return msgpack.packb({"id": jid, "prompt": [1, -5, 2], "max_new_tokens": 2, "reply_to": REPLY}), True
    if kind == 7:
        return msgpack.packb({"id": jid, "prompt": [1, 2], "max_new_tokens": 2, "reply_to": REPLY,
                              "sampling": {"temperature": float("nan")}}), True
    return msgpack.packb([jid, [1, 2], 2, REPLY]), False


async def test_malformed_flood_interleaved_with_good_jobs(broker, fleet, tmp_path) -> None:
    cfg, stream, consumer = engine_toml(tmp_path, broker.url)
    provision(cfg, extra_args=["--ack-wait-s", "5"])
    w = fleet(cfg).start("w1")
    rng = random.Random(5)
    bad = [malformed(rng, i) for i in range(3000)]
    good = small_jobs("ok", 600, seed=6, reply_to=REPLY, max_new=8)
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    gate = asyncio.Semaphore(256)

    async def one(payload: bytes) -> None:
        async with gate:
            await js.publish("fabric.jobs.flood", payload, timeout=30)

    from schemas import encode
    order = [p for p, _ in bad] + [encode(j) for j in good]
    rng.shuffle(order)
    await asyncio.gather(*(one(p) for p in order))
    await nc.close()
    answerable = {f"bad-{i}" for i, (_, ok) in enumerate(bad) if ok}
    await wait_results(broker.url, REPLY, len(good) + len(answerable), 120, [w])
    await asyncio.sleep(1.0)  # anything that was going to loop would show up by now
    got = await results(broker.url, REPLY)
    assert got.keys() == {j.id for j in good} | answerable
    assert all(len(v) == 1 for v in got.values())
    assert all(got[j.id][0].ok for j in good)
    assert not any(got[i][0].ok for i in answerable)
    info = await consumer_state(broker.url, stream, consumer)
    assert info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0
    assert info.delivered.stream_seq == len(order)  # each message handed out exactly once
    assert w.returncode is None and not log_events(w, "job_redelivered")
    summary = w.terminate(grace_s=10)
    assert summary == 0


async def test_deep_backlog_stays_in_the_broker(broker, fleet, tmp_path) -> None:
    cfg, stream, consumer = engine_toml(tmp_path, broker.url)
    provision(cfg, extra_args=["--ack-wait-s", "10"])
    n = 200_000
    nc = await nats.connect(broker.url)
    from schemas import encode
    t0 = time.monotonic()
    # Core publishes (no per-message ack wait) captured by the stream: a backlog in seconds.
    for i in range(n):
        await nc.publish("fabric.jobs.deep", encode(Job(
            id=f"d{i}", prompt=[1 + i % 250, 2, 3, 4], max_new_tokens=2,
            reply_to="fabric.results.deep")))
        if i % 5000 == 0:
            await nc.flush()
    await nc.flush()
    js = nc.jetstream()
    for _ in range(100):
        if (await js.stream_info(stream)).state.messages >= n:
            break
        await asyncio.sleep(0.1)
    assert (await js.stream_info(stream)).state.messages == n
    publish_s = time.monotonic() - t0
    w = fleet(cfg).start("w1")
    proc = psutil.Process(w.pid)
    rss, held = [], []
    for _ in range(40):  # ~20 s of steady work on a queue it cannot empty
        await asyncio.sleep(0.5)
        rss.append(proc.memory_info().rss / 2**20)
        held.append((await js.consumer_info(stream, consumer)).num_ack_pending)
    info = await js.consumer_info(stream, consumer)
    await nc.close()
    done = info.delivered.stream_seq - info.num_ack_pending
    # What the budget implies: 4096 tokens of 16-token jobs in flight, as much again pending,
    # and the drain's share; the run's limit is 2 x in-flight jobs + 2 fetch batches.
    bound = 2 * (4096 // 16) + 2 * 256
    growth = max(rss[10:]) - rss[10]
    print(f"\n[backlog] {n} jobs published in {publish_s:.1f}s; {done} done in ~20 s; "
          f"held max {max(held)} (bound {bound}); RSS {rss[10]:.0f} -> max {max(rss[10:]):.0f} MiB")
    assert done > 2000  # it was working all along
    assert max(held) <= bound
    assert info.num_pending > n - done - bound - 1  # the rest waits in the broker
    assert growth < 40, rss
    assert w.terminate(grace_s=15) == 0
    # SIGTERM nak'd everything it held: all of it is handed out again at once.
    held_at_exit = (await consumer_state(broker.url, stream, consumer)).num_ack_pending
    assert await redelivered_now(broker.url, stream, consumer) == held_at_exit
