"""The pull loop against a real nats-server: one open pull request at a time, deliveries
handed on from the inbox callback, including those that arrive after `stop()`."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import nats
import pytest
from nats.js.api import StreamConfig

from schemas import Job, encode
from worker.broker.ingress import Ingress
from worker.broker.validate import Limits, Ticket, Validator
from worker.model.tokenizer import ByteTokenizer

pytestmark = pytest.mark.timeout(120)


async def _setup(url: str, max_batch: int | None = None):
    tag = secrets.token_hex(4)
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream, subject = f"IN_{tag}", f"itest.{tag}.jobs"
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    config = {"durable_name": "w", "ack_policy": "explicit", "ack_wait": 60 * 10**9}
    if max_batch:
        config["max_batch"] = max_batch  # not in nats-py's ConsumerConfig: the raw API
    resp = await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}.w",
                            json.dumps({"stream_name": stream, "config": config}).encode())
    assert b'"error"' not in resp.data, resp.data
    return nc, js, stream, subject


async def _publish(js, subject: str, ids: range) -> None:
    for i in ids:
        await js.publish(subject, encode(Job(id=f"j{i}", prompt=[1, 2, 3], max_new_tokens=1,
                                             reply_to="fabric.results.itest")))


def _ingress(nc, stream: str, tickets: list[Ticket], room: int = 256) -> Ingress:
    limits = Limits(vocab_size=256, max_seq_len=1088, budget_tokens=4096, block_size=16,
                    reply_prefix="fabric.results.")

    def on_outcome(o) -> None:
        raise AssertionError(f"unexpected outcome {o}")
    return Ingress(nc, stream, "w", Validator(limits, ByteTokenizer()), lambda: room,
                   tickets.append, on_outcome, fetch_timeout_s=1.0)


async def _until(pred, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


def test_a_consumer_batch_cap_is_learned_not_looped_on(nats_url: str) -> None:
    async def main() -> None:
        nc, js, stream, subject = await _setup(nats_url, max_batch=5)
        await _publish(js, subject, range(40))
        tickets: list[Ticket] = []
        ing = _ingress(nc, stream, tickets)
        await ing.start()
        task = asyncio.create_task(ing.run())
        await _until(lambda: len(tickets) == 40)
        assert ing.max_batch == 5  # from "Exceeded MaxRequestBatch of 5"
        assert 1 <= ing.fetch_errors <= 2  # refused once, not in a loop
        assert sorted(t.job.id for t in tickets) == sorted(f"j{i}" for i in range(40))
        for t in tickets:
            await t.msg.ack()
        ing.stop()
        await task
        await js.delete_stream(stream)
        await nc.close()

    asyncio.run(main())


def test_deliveries_after_stop_are_still_handed_on(nats_url: str) -> None:
    """The request open at stop() lives until it expires: what the server sends it meanwhile
    reaches on_ticket (the worker, draining, naks it) instead of sitting out the ack wait."""
    async def main() -> None:
        nc, js, stream, subject = await _setup(nats_url)
        tickets: list[Ticket] = []
        ing = _ingress(nc, stream, tickets)
        await ing.start()
        task = asyncio.create_task(ing.run())
        await asyncio.sleep(0.2)  # the stream is empty: a one-message watch is open
        assert ing.sources[0].watching
        ing.stop()
        await task
        await _publish(js, subject, range(3))
        await asyncio.sleep(max(0.0, ing.requests_expire_at - time.monotonic()))
        await nc.flush()
        await ing.settle_deliveries(2.0)
        assert [t.job.id for t in tickets] == ["j0"]  # the watch's one message, handed on
        assert ing.fetched == 1
        info = await js.consumer_info(stream, "w")
        assert info.num_pending == 2 and info.num_ack_pending == 1  # the rest stayed put
        await js.delete_stream(stream)
        await nc.close()

    asyncio.run(main())


def test_a_failure_handing_on_a_delivery_fails_the_pull_loop(nats_url: str) -> None:
    """nats-py only logs what a subscription callback raises; the pull loop re-raises it, so
    the worker's stage supervision turns a bug into a fatal stop, not a silently lost job."""
    async def main() -> None:
        nc, js, stream, subject = await _setup(nats_url)
        await _publish(js, subject, range(2))

        def broken(_t: Ticket) -> None:
            raise RuntimeError("bug in on_ticket")
        ing = _ingress(nc, stream, [])
        ing.on_ticket = broken
        await ing.start()
        with pytest.raises(RuntimeError, match="bug in on_ticket"):
            await asyncio.wait_for(ing.run(), 10)
        await js.delete_stream(stream)
        await nc.close()

    asyncio.run(main())
