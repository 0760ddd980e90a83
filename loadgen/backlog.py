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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from loadgen.workload import JobSpec
from schemas import Result, decode_result, encode

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


async def read_results(url: str, subject: str,
                       results_stream: str = "FABRIC_RESULTS") -> list[tuple[Result, datetime]]:
    """Every Result the results stream holds on `subject`, with the time the stream stored it."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject, stream=results_stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
        out: list[tuple[Result, datetime]] = []
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                break
            for m in msgs:
                out.append((decode_result(m.data), m.metadata.timestamp))
                await m.ack()
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def result_counts(url: str, subject: str,
                        results_stream: str = "FABRIC_RESULTS") -> dict[str, int]:
    """How many Results the results stream holds per job id on `subject`."""
    return dict(Counter(res.id for res, _ in await read_results(url, subject, results_stream)))


async def collect(url: str, results_stream: str, reply_to: str, jobs: Sequence[JobSpec],
                  timeout_s: float) -> BacklogRun:
    """Wait until the results stream holds a Result per job (or the time runs out), then
    read them all back."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await js.stream_info(results_stream, subjects_filter=reply_to)
            if (info.state.subjects or {}).get(reply_to, 0) >= len(jobs):
                break
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    results = await read_results(url, reply_to, results_stream)
    ids = {res.id for res, _ in results}
    run = BacklogRun(results=len(results), unique=len(ids),
                     ok=sum(res.ok for res, _ in results),
                     missing=sorted({j.id for j in jobs} - ids))
    if results:
        stamps = [ts for _, ts in results]
        run.span_s = (max(stamps) - min(stamps)).total_seconds()
    return run
