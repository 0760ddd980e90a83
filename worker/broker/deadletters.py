"""Dead letters: list the jobs the fleet gave up on, and replay them once the cause is fixed.

A dead letter is the job's original payload, stored in the DLQ stream on
`fabric.dlq.<jobs stream>`, with `Fabric-*` headers saying where it came from and why it
was given up (see `worker.broker.replies.dead_letter`). Replay publishes the payload again,
unchanged, to the subject it was first published to, and then deletes the dead letter
(unless asked to keep it); the replayed job is a new message with a fresh delivery count. The jobs stream
would drop a replay that carried the job id as its Msg-Id inside its duplicate window, so a
replay carries `<job id>/replay-<dlq seq>`.

This is an operator's tool: it reads and deletes from the DLQ stream, which the worker's
least-privilege user may not do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext

from worker.broker.topology import Topology


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    seq: int  # sequence in the DLQ stream: what `replay --seq` takes
    job_id: str
    subject: str  # where the job was first published; replay goes there
    deliveries: int
    error: str
    worker: str
    dead_at: float  # unix seconds
    data: bytes

    def line(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.dead_at))
        return (f"{self.seq}\t{when}\t{self.job_id}\t{self.subject}\tdeliveries={self.deliveries}"
                f"\tworker={self.worker}\t{self.error}")


async def list_dead_letters(js: JetStreamContext, topo: Topology,
                            limit: int | None = None) -> list[DeadLetterRecord]:
    out: list[DeadLetterRecord] = []
    seq = 1
    while limit is None or len(out) < limit:
        try:
            m = await js.get_msg(topo.dlq_stream, seq=seq, subject=topo.dlq_subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        h = m.headers or {}
        out.append(DeadLetterRecord(
            seq=m.seq, job_id=h.get("Fabric-Job-Id", ""), subject=h.get("Fabric-Subject", ""),
            deliveries=int(h.get("Fabric-Deliveries", "0") or 0), error=h.get("Fabric-Error", ""),
            worker=h.get("Fabric-Worker", ""), dead_at=float(h.get("Fabric-Dead-At", "0") or 0),
            data=m.data or b""))
        seq = m.seq + 1
    return out


async def replay(js: JetStreamContext, topo: Topology, records: list[DeadLetterRecord],
                 keep: bool = False) -> list[str]:
    """Publish each record's payload to its original subject; returns one line per record."""
    lines = []
    for r in records:
        if not r.subject:
            lines.append(f"{r.seq}\t{r.job_id}\tskipped: no original subject recorded")
            continue
        ack = await js.publish(r.subject, r.data, headers={"Nats-Msg-Id": f"{r.job_id}/replay-{r.seq}"})
        if not keep:
            await js.delete_msg(topo.dlq_stream, r.seq)
        lines.append(f"{r.seq}\t{r.job_id}\treplayed to {r.subject} as {ack.stream}#{ack.seq}"
                     f"{' (duplicate, already replayed)' if ack.duplicate else ''}"
                     f"{'' if keep else '; dead letter deleted'}")
    return lines
