"""The completion drain: publish each Result, wait until it is durable, then settle the job.

Order is the whole point: a job is acked (or terminated) only after its Result is
confirmed by the results stream, so a crash at any instant leaves the job either answered
or still in the broker. Results carry `Nats-Msg-Id: <job id>`, so when a replayed job is
answered twice the results stream keeps one. A dead letter is published (and confirmed)
before the producer's error Result and before the job is terminated, so a poison job is
never dropped on the floor.

A publish is retried, with backoff, for as long as the broker may plausibly come back
(`publish_give_up_s`): across a server restart or a cluster fail-over the Result waits and
then goes out; only then does the job get nak'd instead of acked. While the results stream
is known to capture every allowed reply subject, "no stream answered" means JetStream is
not ready yet (a restart recovering its store), so it is retried too; otherwise it means a
core-NATS-only reply subject and the publish is done.

Deliveries run concurrently, at most `max_concurrent` at once; the queue in front is
bounded by what admission lets into flight. `abort` is the fatal path: deliveries already
publishing get a short grace, the rest are left to the caller to nak.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from schemas import Result, encode
from worker import failpoints

log = structlog.get_logger("drain")


class Settle(Enum):
    ACK = "ack"  # done: the Result is durable
    TERM = "term"  # done with an error that a retry cannot fix: never redeliver
    NAK = "nak"  # not done: redeliver now


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job given up on: its original bytes and why, for the dead-letter stream."""

    subject: str  # fabric.dlq.<jobs stream>
    data: bytes  # the job's payload exactly as the producer sent it, so replay is exact
    headers: dict[str, str]  # Fabric-* provenance; Nats-Msg-Id makes a second copy a no-op


@dataclass(slots=True)
class Delivery:
    msg: Msg
    result: Result
    reply_to: str | None  # None: nothing to publish (forbidden or unreadable reply subject)
    settle: Settle
    on_done: Callable[[bool], None] | None = None  # called with True when settled as asked
    dead_letter: DeadLetter | None = None  # published first, when the job is poison


class Drain:
    def __init__(self, js: JetStreamContext, maxsize: int, max_concurrent: int = 256,
                 publish_timeout_s: float = 5.0, publish_give_up_s: float = 60.0,
                 results_captured: bool = True):
        self.js = js
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=maxsize)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task] = set()
        self.publish_timeout_s = publish_timeout_s
        self.publish_give_up_s = publish_give_up_s
        self.results_captured = results_captured
        self.aborted = False
        self.published = 0
        self.dead_lettered = 0
        self.acked = 0
        self.termed = 0
        self.naked = 0

    def put(self, d: Delivery) -> None:
        # Admission bounds in-flight jobs and the queue is sized for them: a full queue is a bug.
        self.queue.put_nowait(d)

    async def run(self) -> None:
        while not self.aborted:
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

    async def abort(self, grace_s: float) -> None:
        """Stop taking deliveries; give those already under way `grace_s`, then cancel them.

        Whatever was not settled stays with the caller (the worker naks every message it
        still holds). A cancelled publish may still have reached the results stream: the
        redelivered job's Result then carries the same Nats-Msg-Id and is dropped there."""
        self.aborted = True
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in late:
                t.cancel()

    def _transient(self, e: BaseException) -> bool:
        if isinstance(e, nats.js.errors.NoStreamResponseError):
            return self.results_captured
        if isinstance(e, nats.js.errors.APIError):
            return isinstance(e, nats.js.errors.ServiceUnavailableError) or e.code == 503
        return isinstance(e, (asyncio.TimeoutError, nats.errors.TimeoutError,
                              nats.errors.ConnectionReconnectingError,
                              nats.errors.NoRespondersError,
                              nats.errors.OutboundBufferLimitError))

    async def _publish_once(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        # publish_async shares one reply subscription across all publishes: about twice the
        # rate of js.publish (a request each), and the PubAck is still awaited, per message.
        try:
            fut = await self.js.publish_async(subject, data, headers=headers,
                                              wait_stall=self.publish_timeout_s)
            await asyncio.wait_for(fut, self.publish_timeout_s)
        except nats.js.errors.NoStreamResponseError:
            if self.results_captured:
                raise
            # No stream captures this subject: core subscribers got it, done.
        except nats.js.errors.TooManyStalledMsgsError:
            raise asyncio.TimeoutError("too many publishes awaiting their PubAck") from None

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str],
                       res: Result) -> None:
        failpoints.hit("drain.publish", jobs=lambda: (res.id,))
        try:
            # The fast path: one try, no retry machinery (tenacity costs more than a publish).
            return await self._publish_once(subject, data, headers)
        except Exception as e:  # noqa: BLE001 - sorted by _transient just below
            if not self._transient(e):
                raise
        started = time.monotonic()
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(self.publish_give_up_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception(self._transient),
            reraise=True,
        ):
            with attempt:
                await self._publish_once(subject, data, headers)
        log.info("publish_recovered", job=res.id, attempt=res.attempt,
                 tries=attempt.retry_state.attempt_number + 1,
                 waited_s=round(time.monotonic() - started, 3))

    async def _deliver(self, d: Delivery) -> None:
        settle = d.settle
        try:
            if d.dead_letter is not None:
                dl = d.dead_letter
                await self._publish(dl.subject, dl.data, dl.headers, d.result)
                self.dead_lettered += 1
            if d.reply_to is not None:
                await self._publish(d.reply_to, encode(d.result), {"Nats-Msg-Id": d.result.id},
                                    d.result)
                self.published += 1
        except Exception as e:  # noqa: BLE001 - any publish failure means: not answered, redeliver
            log.warning("publish_failed", job=d.result.id, attempt=d.result.attempt, error=repr(e),
                        dead_letter=d.dead_letter is not None)
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
