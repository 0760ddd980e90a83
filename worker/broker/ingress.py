"""Ingress: pull only what admission has room for, and hand each delivery on once.

The pull consumer is the outermost buffer. Ingress asks the broker for at most as many
messages as the pending queue can take (`room()`: its bound is in tokens, one admission
group's worth, so a backlog of any size stays in the broker, not in this process). Each
delivery is validated (`worker.broker.validate`) into a `Ticket` or an `Outcome` and
handed to the worker's callbacks.

Stopping is the subtle part. A pull request outlives the moment we stop asking (until its
`expires`), and the server may deliver to it meanwhile. Those deliveries still reach our
callback, which hands them on as usual; the worker, draining, naks them. So the worker
stops the loop, waits out the last request's expiry and a round trip, lets the
subscription's buffer empty (`settle_deliveries`), and only then naks -- or they would sit
out the whole ack wait in a dead process.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import nats.errors
import structlog
from nats.aio.msg import Msg

from worker.ops import failpoints
from worker.broker.validate import Outcome, Ticket, Validator

log = structlog.get_logger("ingress")

# The 409 a pull request gets when it asks for more than the consumer's max_batch.
_MAX_BATCH = re.compile(r"MaxRequestBatch of (\d+)")


class Ingress:
    """The pull loop. `room()` says how many messages may be pulled now.

    A pull consumer without nats-py's `fetch`: that call costs a task, a timer and a uuid
    per message. Here one private inbox subscription receives every delivery and hands each
    to the validator from its callback; the loop keeps exactly one pull request open at a
    time (`{"batch": room, "expires": fetch_timeout_s}` to the consumer's next-message
    subject), so every delivery and status on the inbox belongs to it. A request is over
    when its batch has all arrived or a status (408 expired, 409 refused) says so; the next
    one is sized by the room then.
    """

    def __init__(self, nc, stream: str, consumer: str, validator: Validator,
                 room: Callable[[], int], on_ticket: Callable[[Ticket], None],
                 on_outcome: Callable[[Outcome], None], fetch_timeout_s: float = 1.0,
                 api_prefix: str = "$JS.API"):
        self.nc = nc
        self.next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.validator = validator
        self.room = room
        self.on_ticket = on_ticket
        self.on_outcome = on_outcome
        self.fetch_timeout_s = fetch_timeout_s
        self.room_changed = asyncio.Event()
        self._request_over = asyncio.Event()
        self._credit = 0  # deliveries the open request may still bring
        self._refused = False  # the server ended the last request with an error status
        self._failure: BaseException | None = None  # raised from a delivery's hand-on
        self.max_batch = 1 << 30  # lowered if the consumer says it caps a pull's batch
        self._inbox = ""
        self._sub = None
        self.stopping = False
        self.fetched = 0
        self.last_fetch_len = 0  # the batch the latest pull request asked for
        self.fetch_errors = 0
        self.requests_expire_at = 0.0  # monotonic time by which every pull request we made expired

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def run(self) -> None:
        expires_ns = int(self.fetch_timeout_s * 1e9)
        while not self.stopping:
            if self._failure is not None:
                raise self._failure
            n = min(self.room(), self.max_batch)
            if n <= 0:
                self.room_changed.clear()
                await self.room_changed.wait()
                continue
            self._credit = self.last_fetch_len = n
            self._refused = False
            self._request_over.clear()
            self.requests_expire_at = time.monotonic() + self.fetch_timeout_s
            try:
                await self.nc.publish(self.next_subject,
                                      b'{"batch":%d,"expires":%d}' % (n, expires_ns),
                                      reply=self._inbox)
                # A status lost with a broken connection must not wedge us: ask again after.
                await asyncio.wait_for(self._request_over.wait(), self.fetch_timeout_s + 0.5)
            except asyncio.TimeoutError:
                pass
            except nats.errors.Error as e:
                # Disconnected, reconnecting: wait and ask again. A broker that stays away is
                # the worker's watchdog's call, not ours.
                self._fetch_failed(repr(e))
                await asyncio.sleep(0.5)
                continue
            if self._refused:
                await asyncio.sleep(0.5)  # a 409 again at once would be a tight loop
            failpoints.hit("ingress.fetch")

    def _fetch_failed(self, why: str) -> None:
        self.fetch_errors += 1
        if self.fetch_errors == 1 or self.fetch_errors % 20 == 0:
            log.warning("fetch_failed", error=why, count=self.fetch_errors)

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            # A status, not a job (deliveries carry an ack subject): 408 the request expired,
            # 409 the server refused or ended it (leader change, consumer deleted...), 100 an
            # idle heartbeat. Either way this request brings nothing more.
            status = msg.headers.get("Status") if msg.headers else None
            if status == "100":
                return
            if status not in ("404", "408"):
                why = msg.headers.get("Description", "") if msg.headers else ""
                m = _MAX_BATCH.search(why)
                if m:
                    # The consumer caps a pull's batch (max_batch): ask for that much from now on.
                    self.max_batch = max(1, int(m[1]))
                self._refused = True
                self._fetch_failed(f"pull request ended: {status} {why}")
            self._request_over.set()
            return
        self._credit -= 1
        if self._credit <= 0:
            self._request_over.set()
        self.fetched += 1
        try:
            item = self.validator.check(msg, time.monotonic())
            if isinstance(item, Ticket):
                for part in self.validator.fan_out(item):  # n choices of an OpenAI line
                    self.on_ticket(part)
            else:
                self.on_outcome(item)
        except Exception as e:  # noqa: BLE001 - a bug here must stop the worker, not vanish
            # nats-py would only log an exception from a callback; the pull loop raises it
            # instead, and a stage that fails takes the worker down (fatal: all nak'd).
            self._failure = self._failure or e
            self._request_over.set()
            self.room_changed.set()

    def stop(self) -> None:
        self.stopping = True
        self.room_changed.set()
        self._request_over.set()

    async def settle_deliveries(self, timeout_s: float) -> None:
        """Let every delivery that reached us be handed on (see the top); bounded wait."""
        deadline = time.monotonic() + timeout_s
        while self._sub is not None and self._sub.pending_msgs and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
