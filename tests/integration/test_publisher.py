"""The Result publisher against a real nats-server: Results confirmed before their jobs are settled,
and every way a publish can fail ends in a nak (the job comes back), never in an ack."""

from __future__ import annotations

import asyncio
import secrets

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from worker.broker.publisher import Delivery, Publisher, Settle

pytestmark = pytest.mark.timeout(120)


async def _setup(url: str, n: int, max_result_bytes: int = -1):
    tag = secrets.token_hex(4)
    nc = await nats.connect(url)
    js = nc.jetstream()
    jobs, results = f"DJ_{tag}", f"DR_{tag}"
    await js.add_stream(StreamConfig(name=jobs, subjects=[f"dtest.{tag}.jobs"]))
    await js.add_stream(StreamConfig(name=results, subjects=[f"dtest.{tag}.res.>"],
                                     max_msg_size=max_result_bytes, duplicate_window=60))
    for i in range(n):
        await js.publish(f"dtest.{tag}.jobs", f"job-{i}".encode())
    sub = await js.pull_subscribe(f"dtest.{tag}.jobs", durable="d", stream=jobs,
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                        ack_wait=60))
    msgs = await sub.fetch(n, timeout=5)
    assert len(msgs) == n
    return nc, js, tag, jobs, results, sub, msgs


async def _cleanup(js, *streams: str) -> None:
    for s in streams:
        await js.delete_stream(s)


def _delivery(msg, tag: str, i: int, settled: dict, payload: bytes = b"result",
              subject: str | None = None) -> Delivery:
    def done(as_asked: bool) -> None:
        settled[i] = as_asked
    return Delivery(msg, f"job-{i}", 1, payload, subject or f"dtest.{tag}.res.x", Settle.ACK,
                    on_done=done)


async def _wait(pred, timeout_s: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.02)


def test_results_are_confirmed_then_jobs_acked(nats_url: str) -> None:
    async def main() -> None:
        nc, js, tag, jobs, results, sub, msgs = await _setup(nats_url, 500)
        pub = Publisher(nc, js, maxsize=1000)
        await pub.start()
        task = asyncio.create_task(pub.run())
        settled: dict[int, bool] = {}
        for i, m in enumerate(msgs):
            pub.put(_delivery(m, tag, i, settled))
        # A second Result for job-0 (a replay) is published and acked, and dropped by the stream.
        assert await pub.flush(10.0)
        assert len(settled) == 500 and all(settled.values())
        assert (pub.published, pub.acked, pub.naked) == (500, 500, 0)
        assert (await js.stream_info(results)).state.messages == 500
        info = await js.consumer_info(jobs, "d")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
        task.cancel()
        await _cleanup(js, jobs, results)
        await nc.close()

    asyncio.run(main())


def test_an_error_puback_naks_the_job(nats_url: str) -> None:
    async def main() -> None:
        nc, js, tag, jobs, results, sub, msgs = await _setup(nats_url, 2, max_result_bytes=64)
        pub = Publisher(nc, js, maxsize=10, publish_give_up_s=1.0)
        await pub.start()
        task = asyncio.create_task(pub.run())
        settled: dict[int, bool] = {}
        pub.put(_delivery(msgs[0], tag, 0, settled))  # fits
        pub.put(_delivery(msgs[1], tag, 1, settled, payload=b"x" * 500))  # the stream refuses it
        assert await pub.flush(10.0)
        assert settled == {0: True, 1: False}
        assert (pub.acked, pub.naked) == (1, 1)
        again = await sub.fetch(1, timeout=5)  # the nak'd job is back, on its second delivery
        assert again[0].data == b"job-1" and again[0].metadata.num_delivered == 2
        task.cancel()
        await _cleanup(js, jobs, results)
        await nc.close()

    asyncio.run(main())


@pytest.mark.parametrize("captured", [True, False])
def test_no_stream_for_the_reply_subject(nats_url: str, captured: bool) -> None:
    """Nobody stores or hears the subject: a 503. While the results stream is known to capture
    every reply subject that means JetStream is not ready (retried, then nak'd); otherwise
    it is a core-NATS reply subject and the publish is done."""
    async def main() -> None:
        nc, js, tag, jobs, results, sub, msgs = await _setup(nats_url, 1)
        pub = Publisher(nc, js, maxsize=10, publish_give_up_s=1.0, results_captured=captured)
        await pub.start()
        task = asyncio.create_task(pub.run())
        settled: dict[int, bool] = {}
        pub.put(_delivery(msgs[0], tag, 0, settled, subject=f"nowhere.{tag}"))
        assert await pub.flush(15.0)
        assert settled == {0: not captured}
        assert (pub.acked, pub.naked) == ((0, 1) if captured else (1, 0))
        task.cancel()
        await _cleanup(js, jobs, results)
        await nc.close()

    asyncio.run(main())


def test_abort_leaves_unconfirmed_deliveries_to_the_caller(nats_url: str) -> None:
    async def main() -> None:
        nc, js, tag, jobs, results, sub, msgs = await _setup(nats_url, 3)
        pub = Publisher(nc, js, maxsize=10)
        await pub.start()
        await pub.abort(grace_s=0.1)
        task = asyncio.create_task(pub.run())  # aborted: takes nothing
        settled: dict[int, bool] = {}
        pub.put(_delivery(msgs[0], tag, 0, settled))
        await asyncio.sleep(0.3)
        assert settled == {} and pub.published == 0
        task.cancel()
        await _cleanup(js, jobs, results)
        await nc.close()

    asyncio.run(main())
