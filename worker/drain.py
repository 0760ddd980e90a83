"""The completion drain: publish each Result, wait until it is durable, then settle the job.

Order is the whole point: a job is acked (or terminated) only after its Result is
confirmed by the results stream, so a crash at any instant leaves the job either answered
or still in the broker. Results carry `Nats-Msg-Id: <job id>`, so when a replayed job is
answered twice the results stream keeps one. A reply subject that no stream captures is
still delivered (core NATS); there is then nothing to confirm. A publish that keeps
failing naks the job instead of acking it: it comes back, nothing is lost.

Deliveries run concurrently, at most `max_concurrent` at once; the queue in front is
bounded by what admission lets into flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from schemas import Result, encode

log = structlog.get_logger("drain")


class Settle(Enum):
    ACK = "ack"  # done: the Result is durable
    TERM = "term"  # done with an error that a retry cannot fix: never redeliver
    NAK = "nak"  # not done: redeliver now


@dataclass(slots=True)
class Delivery:
    msg: Msg
    result: Result
    reply_to: str | None  # None: nothing to publish (forbidden or unreadable reply subject)
    settle: Settle
    on_done: Callable[[bool], None] | None = None  # called with True when settled as asked


class Drain:
    def __init__(self, js: JetStreamContext, maxsize: int, max_concurrent: int = 256,
                 publish_timeout_s: float = 5.0):
        self.js = js
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=maxsize)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task] = set()
        self.publish_timeout_s = publish_timeout_s
        self.published = 0
        self.acked = 0
        self.termed = 0
        self.naked = 0

    def put(self, d: Delivery) -> None:
        # Admission bounds in-flight jobs and the queue is sized for them: a full queue is a bug.
        self.queue.put_nowait(d)

    async def run(self) -> None:
        while True:
            d = await self.queue.get()
            await self._slots.acquire()
            t = asyncio.create_task(self._deliver(d))
            self._tasks.add(t)
            t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        self._slots.release()
        self.queue.task_done()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is settled; False if the time ran out."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _publish(self, d: Delivery) -> None:
        data = encode(d.result)
        headers = {"Nats-Msg-Id": d.result.id}
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type((asyncio.TimeoutError, nats.errors.TimeoutError,
                                           nats.errors.ConnectionReconnectingError)),
            reraise=True,
        ):
            with attempt:
                try:
                    await self.js.publish(d.reply_to, data, timeout=self.publish_timeout_s,
                                          headers=headers)
                except nats.js.errors.NoStreamResponseError:
                    pass  # no stream captures this subject: core subscribers got it, done
        self.published += 1

    async def _deliver(self, d: Delivery) -> None:
        settle = d.settle
        try:
            if d.reply_to is not None:
                await self._publish(d)
        except Exception as e:  # noqa: BLE001 - any publish failure means: not answered, redeliver
            log.warning("publish_failed", job=d.result.id, attempt=d.result.attempt, error=repr(e))
            settle = Settle.NAK
        try:
            if settle is Settle.ACK:
                await d.msg.ack()
                self.acked += 1
            elif settle is Settle.TERM:
                await d.msg.term()
                self.termed += 1
            else:
                await d.msg.nak()
                self.naked += 1
        except Exception as e:  # noqa: BLE001 - the broker will redeliver after ack_wait
            log.warning("settle_failed", job=d.result.id, attempt=d.result.attempt,
                        settle=settle.value, error=repr(e))
        if d.on_done:
            d.on_done(settle is d.settle)
