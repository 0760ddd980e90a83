"""The Result publisher: publish each Result, wait until it is durable, then settle the job.

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

The fast path has no task, future or timer per Result (see `Publisher`); the queue in front
is bounded by what admission lets into flight. `abort` is the fatal path: Results already
published get a short grace for their PubAcks, the rest are left to the caller to nak.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from worker.ops import failpoints

log = structlog.get_logger("publisher")


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
    job_id: str
    attempt: int  # the job's delivery count, for the log
    payload: bytes  # the Result, encoded
    reply_to: str | None  # None: nothing to publish (forbidden or unreadable reply subject)
    settle: Settle
    on_done: Callable[[bool], None] | None = None  # called with True when settled as asked
    dead_letter: DeadLetter | None = None  # published first, when the job is poison


class Publisher:
    """Publishes Results and settles their jobs; see the module docstring for the order.

    The fast path costs one publish and one PubAck callback per Result: every Result is
    published with a reply subject under one private inbox (`<inbox>.<token>`), the PubAck
    comes back to a single subscription, and its callback settles the job. No task, future
    or timer per Result. Anything unusual -- a publish that raises, an error PubAck, no
    PubAck within `publish_timeout_s`, a dead letter to publish first -- moves that one
    delivery to the slow path: a task that publishes with retries (tenacity) as long as
    `publish_give_up_s` allows, and settles it. Republishing is safe: the Result carries
    `Nats-Msg-Id`, so the results stream keeps one copy.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, maxsize: int,
                 publish_timeout_s: float = 5.0, publish_give_up_s: float = 60.0,
                 results_captured: bool = True):
        self.nc = nc
        self.js = js
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=maxsize)
        self._awaiting: dict[str, tuple[Delivery, float]] = {}  # token -> (delivery, sent at)
        self._tokens = itertools.count()
        self._inbox = ""
        self._slow: set[asyncio.Task] = set()
        self.publish_timeout_s = publish_timeout_s
        self.publish_give_up_s = publish_give_up_s
        self.results_captured = results_captured
        self.aborted = False
        self.published = 0
        self.dead_lettered = 0
        self.acked = 0
        self.termed = 0
        self.naked = 0

    async def start(self) -> None:
        """Subscribe the PubAck inbox (before the first publish can need it)."""
        self._inbox = self.nc.new_inbox() + "."
        await self.nc.subscribe(self._inbox + "*", cb=self._on_puback,
                                pending_msgs_limit=-1, pending_bytes_limit=-1)

    def put(self, d: Delivery) -> None:
        # Admission bounds in-flight jobs and the queue is sized for them: a full queue is a bug.
        self.queue.put_nowait(d)

    @property
    def awaiting(self) -> int:
        """Results published and waiting for their PubAck (fast path) or being retried."""
        return len(self._awaiting) + len(self._slow)

    @property
    def depth(self) -> int:
        """Results not yet settled: queued, or published and awaiting their PubAck."""
        return self.queue.qsize() + self.awaiting

    @property
    def capacity(self) -> int:
        return self.queue.maxsize

    async def run(self) -> None:
        sweep = asyncio.ensure_future(self._sweep())
        try:
            while not self.aborted:
                d = await self.queue.get()
                await self._send(d)
                while not self.aborted and not self.queue.empty():
                    await self._send(self.queue.get_nowait())
        finally:
            sweep.cancel()

    async def _send(self, d: Delivery) -> None:
        if d.dead_letter is not None:
            self._to_slow(d)  # rare: the dead letter goes first, with retries
            return
        if d.reply_to is None:
            await self._settle(d, d.settle)  # nobody to answer: settle only
            return
        try:
            failpoints.hit("publisher.publish", jobs=lambda: (d.job_id,))
        except Exception as e:  # noqa: BLE001 - a raise failpoint: the publish failed
            log.warning("publish_failed", job=d.job_id, attempt=d.attempt, error=repr(e),
                        dead_letter=False)
            await self._settle(d, Settle.NAK)
            return
        token = str(next(self._tokens))
        self._awaiting[token] = (d, time.monotonic())
        try:
            await self.nc.publish(d.reply_to, d.payload, reply=self._inbox + token,
                                  headers={"Nats-Msg-Id": d.job_id})
        except Exception:  # noqa: BLE001 - disconnected, buffer full: the slow path retries
            if self._awaiting.pop(token, None) is not None:
                self._to_slow(d)

    async def _on_puback(self, msg: Msg) -> None:
        entry = self._awaiting.pop(msg.subject[len(self._inbox):], None)
        if entry is None:
            return  # late: timed out and handed to the slow path, or aborted
        d = entry[0]
        status = msg.headers.get("Status") if msg.headers else None
        # A 503 when no stream captures reply subjects: its core subscribers got it, done.
        core_only = status == "503" and not self.results_captured
        if (status is not None or b'"error":{' in msg.data) and not core_only:
            self._to_slow(d)  # an error PubAck or no stream: retried or given up there
            return
        self.published += 1
        await self._settle(d, d.settle)

    async def _sweep(self) -> None:
        """Hand every Result whose PubAck is overdue to the slow path (oldest first)."""
        while True:
            await asyncio.sleep(min(0.25, self.publish_timeout_s / 4))
            overdue = time.monotonic() - self.publish_timeout_s
            while self._awaiting:
                token, (d, sent_at) = next(iter(self._awaiting.items()))
                if sent_at > overdue:
                    break
                del self._awaiting[token]
                self._to_slow(d)

    def _to_slow(self, d: Delivery) -> None:
        t = asyncio.ensure_future(self._deliver(d))
        self._slow.add(t)
        t.add_done_callback(self._slow.discard)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is settled; False if the time ran out."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def abort(self, grace_s: float) -> None:
        """Stop taking deliveries; give those already under way `grace_s`, then drop them.

        Whatever was not settled stays with the caller (the worker naks every message it
        still holds). A Result published and not confirmed may still reach the results
        stream: the redelivered job's Result then carries the same Nats-Msg-Id and is
        dropped there."""
        self.aborted = True
        deadline = time.monotonic() + grace_s
        while self._awaiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._awaiting.clear()  # a PubAck from now on settles nothing
        if self._slow:
            _, late = await asyncio.wait(set(self._slow),
                                         timeout=max(0.0, deadline - time.monotonic()))
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
        # The slow path: a request per publish, so an error PubAck raises here as its APIError
        # (nats-py's publish_async raises it inside its reply callback instead, and the
        # future never resolves: an error looked like a timeout).
        try:
            await self.js.publish(subject, data, timeout=self.publish_timeout_s, headers=headers)
        except nats.js.errors.NoStreamResponseError:
            if self.results_captured:
                raise
            # No stream captures this subject: core subscribers got it, done.

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str],
                       d: Delivery) -> None:
        failpoints.hit("publisher.publish", jobs=lambda: (d.job_id,))
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
        log.info("publish_recovered", job=d.job_id, attempt=d.attempt,
                 tries=attempt.retry_state.attempt_number + 1,
                 waited_s=round(time.monotonic() - started, 3))

    async def _deliver(self, d: Delivery) -> None:
        settle = d.settle
        try:
            if d.dead_letter is not None:
                dl = d.dead_letter
                await self._publish(dl.subject, dl.data, dl.headers, d)
                self.dead_lettered += 1
            if d.reply_to is not None:
                await self._publish(d.reply_to, d.payload, {"Nats-Msg-Id": d.job_id}, d)
                self.published += 1
        except Exception as e:  # noqa: BLE001 - any publish failure means: not answered, redeliver
            log.warning("publish_failed", job=d.job_id, attempt=d.attempt, error=repr(e),
                        dead_letter=d.dead_letter is not None)
            settle = Settle.NAK
        await self._settle(d, settle)

    async def _settle(self, d: Delivery, settle: Settle) -> None:
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
            log.warning("settle_failed", job=d.job_id, attempt=d.attempt,
                        settle=settle.value, error=repr(e))
        if d.on_done:
            d.on_done(settle is d.settle)
        self.queue.task_done()


async def quiet(aw: Awaitable) -> None:
    """Settle a message; a failure only means the broker redelivers it after the ack wait."""
    try:
        await aw
    except Exception as e:  # noqa: BLE001 - the broker redelivers what we could not settle
        log.debug("settle_failed", error=repr(e))


async def heartbeats(held: Mapping[int, Msg], ack_wait_s: float) -> None:
    """Tell the broker held jobs are alive, so the ack wait can be short."""
    period = max(0.2, ack_wait_s / 3)
    while True:
        await asyncio.sleep(period)
        for msg in list(held.values()):
            await quiet(msg.in_progress())
