"""Ingress: pull only what admission has room for, highest priority first, and hand each
delivery on once.

The pull consumers are the outermost buffer. Ingress asks the broker for at most as many
messages as the pending queue can take (`room()`: its bound is in tokens, one admission
group's worth, so a backlog of any size stays in the broker, not in this process). Each
delivery is validated (`worker.broker.validate`) into its `Ticket`s or an `Outcome` and
handed to the worker's callbacks.

Several consumers, one room (`Source`, one per `worker.broker.topology.Queue`): a pass
asks each source in order -- priority 0 first; within a priority the session partitions
this worker owns (a partition's queue of a class ranks as the class's first priority),
then the priority's own queue, then the partitions others own -- for what room
is left, with `no_wait` (the answer is at once: what there is, then a 404), so a lower
queue is asked only for what the higher ones could not fill. A source found empty gets a
*watch*: a one-message long-poll, so an arrival wakes the loop instead of being polled
for. Watches are not counted against the room (that would leave every pull short by the
number of quiet queues); each brings at most one message, so the room can be overshot by
at most one message per source. A source passed over for `starve_after_s` while it may
hold work goes first in the next pass: a low priority is never starved for longer.

A session partition this worker does not own is pulled with `min_pending` (the `overflow`
priority group of ADR-42): the server delivers from it only while `spill_after` or more of
its jobs wait undelivered -- its owner is not keeping up -- so a session's jobs go to the
worker holding its KV unless that would leave them queued.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nats.errors
import structlog
from nats.aio.msg import Msg

from worker.ops import failpoints
from worker.broker.members import SessionLoads
from worker.broker.topology import DEFAULT_PRIORITY, Queue
from worker.broker.validate import Outcome, Ticket, Validator

log = structlog.get_logger("ingress")

# The 409 a pull request gets when it asks for more than the consumer's max_batch.
_MAX_BATCH = re.compile(r"MaxRequestBatch of (\d+)")

SPILL_AFTER = 4  # a partition's jobs waiting undelivered before a non-owner takes them
STARVE_AFTER_S = 5.0


@dataclass(slots=True, eq=False)
class Source:
    """One consumer this worker pulls from, and its one open request (if any)."""

    queue: Queue
    next_subject: str
    reply: str  # this source's inbox: deliveries and statuses of its requests only
    min_pending: int = 0  # > 0: a partition someone else owns (overflow)
    credit: int = 0  # deliveries the open request may still bring
    batch: int = 0  # what the open (or last) request asked for
    watching: bool = False  # the open request is a watch (one message, long poll)
    pulling: bool = False  # the open request is a no_wait pull being waited on
    over: asyncio.Event = field(default_factory=asyncio.Event)  # the no_wait pull ended
    last_pull: float = 0.0  # monotonic time a pull last reached it
    short: bool = False  # the last pull ended before its batch: nothing more there
    retry_at: float = 0.0  # refused (409...): not asked again before this monotonic time
    fetched: int = 0

    @property
    def open(self) -> bool:
        return self.watching or self.pulling

    def rank(self) -> tuple[int, int]:
        q = self.queue
        within = 1 if q.partition is None else (2 if self.min_pending else 0)
        return q.priority, within

    def request(self, batch: int, expires_ns: int, *, no_wait: bool) -> bytes:
        parts = [b'"batch":%d' % batch]
        parts.append(b'"no_wait":true' if no_wait else b'"expires":%d' % expires_ns)
        if self.queue.group:
            parts.append(b'"group":"%s"' % self.queue.group.encode())
            if self.min_pending:
                parts.append(b'"min_pending":%d' % self.min_pending)
        return b"{" + b",".join(parts) + b"}"


class Ingress:
    """The pull loop over the worker's sources. `room()` says how many messages may be
    pulled now.

    A pull consumer without nats-py's `fetch`: that call costs a task, a timer and a uuid
    per message. Here one private inbox subscription per source (`<inbox>.<source>`) receives every
    delivery and status of that source's requests and hands each delivery to the validator
    from its callback.
    """

    def __init__(self, nc, stream: str, queues: Iterable[Queue] | str, validator: Validator,
                 room: Callable[[], int], on_ticket: Callable[[Ticket], None],
                 on_outcome: Callable[[Outcome], None], fetch_timeout_s: float = 1.0,
                 api_prefix: str = "$JS.API", starve_after_s: float = STARVE_AFTER_S,
                 spill_after: int = SPILL_AFTER):
        if isinstance(queues, str):  # one consumer by name: the default queue alone
            queues = [Queue(queues, DEFAULT_PRIORITY, None, ())]
        self.nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}."
        self.queues = list(queues)
        self.validator = validator
        self.room = room
        self.on_ticket = on_ticket
        self.on_outcome = on_outcome
        self.fetch_timeout_s = fetch_timeout_s
        self.starve_after_s = starve_after_s
        self.spill_after = spill_after
        self.room_changed = asyncio.Event()
        self._failure: BaseException | None = None  # raised from a delivery's hand-on
        self.max_batch = 1 << 30  # lowered if the consumer says it caps a pull's batch
        self.sources: list[Source] = []
        self._subs: list = []
        self.stopping = False
        self.fetched = 0
        self.spilled = 0  # jobs taken from partitions another worker owns
        self.loads = SessionLoads()  # sessions pulled per partition, for the owners' balance
        self.last_fetch_len = 0  # the batch of the request that brought the latest delivery
        self.fetch_errors = 0
        self.requests_expire_at = 0.0  # monotonic time by which every pull request we made expired

    async def start(self) -> None:
        inbox = self.nc.new_inbox()
        for i, q in enumerate(self.queues):
            s = Source(q, self._next + q.consumer, f"{inbox}.{i}", last_pull=time.monotonic())
            self.sources.append(s)

            async def on_msg(msg: Msg, s: Source = s) -> None:
                await self._on_msg(s, msg)
            # One subscription each: a delivery's subject is the job's, not the inbox.
            self._subs.append(await self.nc.subscribe(s.reply, cb=on_msg, pending_msgs_limit=-1,
                                                      pending_bytes_limit=-1))

    def set_owned(self, owned: frozenset[int] | None) -> None:
        """The session partitions this worker owns now (None: all of them, as with no
        members bucket). Takes effect at each source's next request."""
        for s in self.sources:
            p = s.queue.partition
            s.min_pending = 0 if p is None or owned is None or p in owned else self.spill_after

    def fetched_by_queue(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            q = s.queue
            label = "session" if q.partition is not None else f"p{q.priority}"
            out[label] = out.get(label, 0) + s.fetched
        return out

    def summary(self) -> dict:
        """For the worker's summary: what came from which queue, and the session jobs
        taken from partitions another worker owns."""
        return {"fetched_by_queue": self.fetched_by_queue(), "session_spilled": self.spilled}

    def _credit(self) -> int:
        return sum(s.credit for s in self.sources if s.pulling)

    def _order(self, now: float) -> list[Source]:
        starved = now - self.starve_after_s
        return sorted((s for s in self.sources if not s.open and s.retry_at <= now),
                      key=lambda s: (not (s.last_pull < starved and not s.short), s.rank()))

    async def run(self) -> None:
        while not self.stopping:
            if self._failure is not None:
                raise self._failure
            n = self.room() - self._credit()
            if n <= 0 or all(s.open for s in self.sources):
                self.room_changed.clear()
                await self.room_changed.wait()
                continue
            self.room_changed.clear()
            for s in self._order(time.monotonic()):
                # Until it is empty or the room is full (a batch can be capped by max_batch).
                while (n := min(self.room() - self._credit(), self.max_batch)) > 0:
                    if self.stopping or self._failure is not None:
                        break
                    await self._pull(s, n)
                    if s.short or s.retry_at:
                        break
                if s.short and not self.stopping and self.room() > 1:
                    await self._watch(s)  # (a room of 1 is caution: nothing extra held)
                if n <= 0 or self.stopping:
                    break
            if not self.room_changed.is_set():
                # Room left and every source asked: wait for a watch, room, or a tick
                # (a source that filled its batch is asked again then).
                try:
                    await asyncio.wait_for(self.room_changed.wait(), self.fetch_timeout_s)
                except asyncio.TimeoutError:
                    pass
            failpoints.hit("ingress.fetch")

    async def _pull(self, s: Source, n: int) -> None:
        """Ask `s` for up to `n` messages, now (no_wait), and wait for the answer."""
        s.credit = s.batch = n
        s.pulling, s.short, s.retry_at = True, False, 0.0
        s.over.clear()
        s.last_pull = now = time.monotonic()
        self.requests_expire_at = max(self.requests_expire_at, now + 0.5)
        try:
            await self.nc.publish(s.next_subject, s.request(n, 0, no_wait=True), reply=s.reply)
            # A status lost with a broken connection must not wedge us: move on after.
            await asyncio.wait_for(s.over.wait(), self.fetch_timeout_s + 0.5)
        except asyncio.TimeoutError:
            s.short = True
        except nats.errors.Error as e:
            # Disconnected, reconnecting: wait and ask again. A broker that stays away is
            # the worker's watchdog's call, not ours.
            self._fetch_failed(repr(e))
            await asyncio.sleep(0.5)
        finally:
            s.pulling, s.credit = False, 0

    async def _watch(self, s: Source) -> None:
        """A one-message long poll on an empty source: its first arrival wakes the loop."""
        s.watching, s.batch = True, 1
        s.credit = 1
        self.requests_expire_at = max(self.requests_expire_at,
                                      time.monotonic() + self.fetch_timeout_s)
        try:
            await self.nc.publish(s.next_subject,
                                  s.request(1, int(self.fetch_timeout_s * 1e9), no_wait=False),
                                  reply=s.reply)
        except nats.errors.Error as e:
            s.watching = False
            self._fetch_failed(repr(e))

    def _fetch_failed(self, why: str) -> None:
        self.fetch_errors += 1
        if self.fetch_errors == 1 or self.fetch_errors % 20 == 0:
            log.warning("fetch_failed", error=why, count=self.fetch_errors)

    async def _on_msg(self, s: Source, msg: Msg) -> None:
        if not msg.reply:
            # A status, not a job (deliveries carry an ack subject): 404 nothing there (a
            # no_wait pull), 408 the watch expired, 409 the server refused or ended it
            # (leader change, consumer deleted...), 100 an idle heartbeat.
            status = msg.headers.get("Status") if msg.headers else None
            if status == "100":
                return
            if status not in ("404", "408"):
                why = msg.headers.get("Description", "") if msg.headers else ""
                m = _MAX_BATCH.search(why)
                if m:
                    # The consumer caps a pull's batch (max_batch): ask for that much from now on.
                    self.max_batch = max(1, int(m[1]))
                self._fetch_failed(f"pull request ended: {s.queue.consumer} {status} {why}")
                # Asked again at once it would be refused again: a tight loop.
                s.retry_at = time.monotonic() + 0.5
            self._ended(s, short=status in ("404", "408"))
            if status == "408" and not self.stopping and self.room() > 1:
                # A watch that saw nothing: the source is still empty; watch it again.
                await self._watch(s)
            return
        s.credit -= 1
        s.fetched += 1
        self.fetched += 1
        if s.min_pending:
            self.spilled += 1
        if s.queue.partition is not None:  # `<prefix><p>.<k>.<session token>`
            self.loads.saw(s.queue.partition, msg.subject.rpartition(".")[2], time.monotonic())
        self.last_fetch_len = s.batch
        if s.credit <= 0:
            self._ended(s, short=False)
        try:
            item = self.validator.check(msg, time.monotonic())
            if isinstance(item, Outcome):
                self.on_outcome(item)
            else:
                for part in item:  # several: the choices and prompts of an OpenAI line
                    self.on_ticket(part)
        except Exception as e:  # noqa: BLE001 - a bug here must stop the worker, not vanish
            # nats-py would only log an exception from a callback; the pull loop raises it
            # instead, and a stage that fails takes the worker down (fatal: all nak'd).
            self._failure = self._failure or e
            self.room_changed.set()
            for src in self.sources:
                src.over.set()

    def _ended(self, s: Source, short: bool) -> None:
        """`s`'s open request brings nothing more."""
        if s.pulling:
            s.short = short
            s.over.set()
        elif s.watching:
            s.watching = False
            s.credit = 0
            s.short = short
            if not short:
                self.room_changed.set()  # a watch caught an arrival: pull that source

    def stop(self) -> None:
        self.stopping = True
        self.room_changed.set()
        for s in self.sources:
            s.over.set()

    async def settle_deliveries(self, timeout_s: float) -> None:
        """Let every delivery that reached us be handed on (see the top); bounded wait."""
        deadline = time.monotonic() + timeout_s
        while any(sub.pending_msgs for sub in self._subs) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
