"""Cancels: the stage that owns the ids producers cancelled, and acts on each cancel message.

Rule: a cancel ends what this worker holds of those ids -- a job waiting for admission is
answered `cancelled` at once, a running one ends at the next step boundary (the executor's
`end`, wired by the app) -- and the ids are remembered for the results' duplicate window, so
a job delivered after its cancel, or whose schema finished compiling after it, is answered
`cancelled` without device time (`screen`). The message format and the memory itself are
`worker.broker.cancels`.

Cancels are core messages, so a worker that is not running when one is sent never hears
it; the broker keeps them as well (`provision` makes a stream capture the cancel subject,
for the duplicate window): a worker that starts, or restarts, reads that stream once
before it says it is ready (`replay`), so a job delivered to it after a cancel it never
heard is still answered `cancelled` without device time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from worker.broker.cancels import CancelError, Cancelled, parse_cancel
from worker.broker.publisher import quiet
from worker.broker.replies import reply_json
from worker.broker.topology import Topology, Verified
from worker.broker.validate import Ticket
from worker.ops.stats import WorkerStats

log = structlog.get_logger("worker")


class Holding(Protocol):
    """What this stage reads of the jobs the worker holds (`worker.admission.Intake`)."""

    inflight: Mapping[int, Ticket]  # admitted, by key

    def withdraw(self, job_ids: set[str]) -> list[Ticket]: ...


class Cancels:
    def __init__(self, held: Holding, stats: WorkerStats, worker_id: str,
                 answer: Callable[[Ticket, str], None], end: Callable[[int, str], None],
                 room_changed: Callable[[], None], window_s: float = 120.0):
        self.remembered = Cancelled(window_s=window_s)  # ids cancelled lately
        self._held = held
        self._stats = stats
        self._worker_id = worker_id
        self._answer = answer  # answer a job that never ran as cancelled (the answers stage)
        self._end = end  # end a running job at the next step boundary (the executor)
        self._room_changed = room_changed  # ingress may pull again: pending jobs left

    def screen(self, t: Ticket, why: str) -> bool:
        """True when the job was cancelled and has been answered; False: it goes on."""
        if t.job.id not in self.remembered:
            return False
        self._answer(t, why)
        return True

    def forget_expired(self, now: float) -> None:
        self.remembered.forget_expired(now)

    async def listen(self, nc, js, topo: Topology, verified: Verified) -> None:
        """Hear every cancel on the cancel subject (no queue group: any worker may hold the
        job), from the moment this returns: the subscription is flushed to the server, so a
        cancel sent once the worker says it is ready is never missed; then remember those
        the broker kept from before (`replay`), when a stream keeps them."""
        await nc.subscribe(topo.cancel_subject, cb=self.on_message)
        await nc.flush()
        if verified.cancels_kept:
            try:
                n = await self.replay(js, topo.cancels_stream, topo.cancel_subject)
            except Exception as e:  # noqa: BLE001 - cancels still work as they are heard
                log.warning("cancels_not_replayed", stream=topo.cancels_stream, error=repr(e))
                return
            log.info("cancels_replayed", messages=n, remembered=len(self.remembered))

    async def replay(self, js, stream: str, subject: str, batch: int = 1000) -> int:
        """Remember the cancels `stream` kept (those of the last duplicate window, sent
        maybe while no worker ran), each for what is left of its window: an ephemeral
        consumer reads the stream once, to the end it had when this began. Returns the
        messages read."""
        state = (await js.stream_info(stream)).state
        if not state.messages:
            return 0
        sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0))
        wall, mono, read = time.time(), time.monotonic(), 0
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=2.0)
                except nats.errors.TimeoutError:
                    return read
                for m in msgs:
                    read += 1
                    try:
                        ids = parse_cancel(m.data)
                    except CancelError:
                        continue  # refused when it was sent, by whoever heard it
                    age = max(0.0, wall - m.metadata.timestamp.timestamp())
                    self.remembered.add(ids, mono - age)
                if msgs[-1].metadata.sequence.stream >= state.last_seq:
                    return read
        finally:
            await quiet(sub.unsubscribe())

    async def on_message(self, msg: Msg) -> None:
        try:
            ids = parse_cancel(msg.data)
        except CancelError as e:
            self._stats.cancels_refused += 1
            log.warning("cancel_refused", subject=msg.subject, reason=str(e))
            if msg.reply:
                await quiet(msg.respond(reply_json({"ok": False, "error": str(e)})))
            return
        self._stats.cancels += 1
        self.remembered.add(ids, time.monotonic())
        wanted = set(ids)
        unrun = self._held.withdraw(wanted)
        for t in unrun:
            self._answer(t, "cancelled while it waited for admission")
        inflight = self._held.inflight
        running = [k for k, t in inflight.items() if t.job.id in wanted]
        for key in running:
            self._end(key, "cancelled")
        log.info("cancel", ids=len(ids), waiting=len(unrun), running=len(running))
        if unrun:
            self._room_changed()
        if msg.reply:
            await quiet(msg.respond(reply_json({
                "ok": True, "worker": self._worker_id,
                "held": sorted({t.job.id for t in unrun}
                               | {inflight[k].job.id for k in running if k in inflight})})))
