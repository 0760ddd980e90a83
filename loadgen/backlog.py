"""Backlog runs: publish the whole workload first, then start the workers, and time them by
the results stream's own clock.

This is how the broker path (null model) is measured. With a producer publishing while the
worker consumes, a one-machine benchmark times three processes sharing the cores -- the
producer's publishing and its decoding of every Result included. Here the producer is done
before the worker starts, nobody subscribes to the Results while they are made, and the
figure is the worker's alone: (Results - 1) / (the last Result's stream timestamp - the
first one's). Afterwards every Result is read back from the results stream to check that
each job was answered exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from loadgen.workload import JobSpec
from schemas import decode_result, encode

_PUBLISH_WINDOW = 2000  # publishes awaiting their PubAck at once


@dataclass
class BacklogRun:
    results: int = 0  # messages on the run's reply subject in the results stream
    unique: int = 0  # distinct job ids among them
    ok: int = 0
    span_s: float = 0.0  # first to last Result, by the stream's timestamps
    missing: list[str] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return (self.unique - 1) / self.span_s if self.span_s > 0 and self.unique > 1 else 0.0


async def publish_backlog(url: str, jobs: Sequence[JobSpec], subject: str, reply_to: str) -> None:
    """Publish every job (JetStream, with Nats-Msg-Id) and wait for all their PubAcks."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        futs: list[asyncio.Future] = []
        for j in jobs:
            futs.append(await js.publish_async(subject, encode(j.to_job(reply_to)),
                                               headers={"Nats-Msg-Id": j.id}))
            if len(futs) >= _PUBLISH_WINDOW:
                await asyncio.gather(*futs)
                futs = []
        await asyncio.gather(*futs)
    finally:
        await nc.close()


async def collect(url: str, results_stream: str, reply_to: str, jobs: Sequence[JobSpec],
                  timeout_s: float) -> BacklogRun:
    """Wait until the results stream holds a Result per job (or the time runs out), then
    read them all back."""
    nc = await nats.connect(url)
    run = BacklogRun()
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await js.stream_info(results_stream, subjects_filter=reply_to)
            if (info.state.subjects or {}).get(reply_to, 0) >= len(jobs):
                break
            await asyncio.sleep(0.2)
        sub = await js.pull_subscribe(
            reply_to, stream=results_stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
        ids: set[str] = set()
        first = last = None
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                break
            for m in msgs:
                res = decode_result(m.data)
                run.results += 1
                run.ok += res.ok
                ids.add(res.id)
                ts = m.metadata.timestamp
                first = ts if first is None or ts < first else first
                last = ts if last is None or ts > last else last
                await m.ack()
        await sub.unsubscribe()
        run.unique = len(ids)
        run.missing = sorted({j.id for j in jobs} - ids)
        if first is not None and last is not None:
            run.span_s = (last - first).total_seconds()
    finally:
        await nc.close()
    return run
