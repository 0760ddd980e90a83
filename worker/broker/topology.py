"""The JetStream objects the fleet shares: jobs stream, durable consumer, results and dead letters.

`provision` creates or updates them idempotently (an operator runs it once per
deployment, or the compose/Kubernetes one-shot does); `verify` is what a worker runs at
start: it creates nothing, and refuses to start with a message that says what is missing
and how to create it. Workers must not create streams: with many workers on one broker
that is a race, and least-privilege credentials do not allow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

log = structlog.get_logger("topology")

RESULTS_STREAM = "FABRIC_RESULTS"
DLQ_STREAM = "FABRIC_DLQ"
CANCELS_STREAM = "FABRIC_CANCELS"


class TopologyError(RuntimeError):
    """A stream or the consumer is missing or wrongly shaped; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Topology:
    jobs_stream: str
    consumer: str
    jobs_subjects: str = "fabric.jobs.>"
    results_stream: str = RESULTS_STREAM
    results_prefix: str = "fabric.results."  # a job's reply_to must start with this
    dlq_stream: str = DLQ_STREAM
    dlq_prefix: str = "fabric.dlq."
    # Cancels are core messages every worker hears; this stream keeps them too (for the
    # duplicate window), so a worker that starts after a cancel still honours it.
    cancel_subject: str = "fabric.cancel"
    cancels_stream: str = CANCELS_STREAM
    ack_wait_s: float = 30.0  # in-progress heartbeats keep long jobs alive within it
    max_deliver: int = 5
    # Counts unacked messages across the whole fleet: size it for workers x per-worker
    # holding, or it silently caps the fleet.
    max_ack_pending: int = 20000
    replicas: int = 1
    duplicate_window_s: float = 120.0  # results published again after a replay are dropped
    # The JetStream domain that holds these streams, when it is not the one the server we
    # connect to answers for (a leaf node with its own JetStream, a hub's domain): every
    # API call and the pull requests go to `$JS.<domain>.API`. None: the local JetStream.
    js_domain: str | None = None

    @property
    def api_prefix(self) -> str:
        return f"$JS.{self.js_domain}.API" if self.js_domain else "$JS.API"

    @property
    def dlq_subject(self) -> str:
        """Where this stream's dead letters go: one subject per jobs stream, one DLQ stream."""
        return f"{self.dlq_prefix}{self.jobs_stream}"

    def stream_configs(self) -> list[StreamConfig]:
        def cfg(name: str, subjects: str) -> StreamConfig:
            return StreamConfig(name=name, subjects=[subjects], storage=StorageType.FILE,
                                num_replicas=self.replicas,
                                duplicate_window=self.duplicate_window_s)
        cancels = cfg(self.cancels_stream, self.cancel_subject)
        cancels.max_age = self.duplicate_window_s  # a cancel outlives no Result it could stop
        cancels.max_bytes = 256 << 20
        # No acknowledgement from the stream: a producer that sends a cancel as a request
        # gets the workers' replies (who held what), not the stream's.
        cancels.no_ack = True
        return [cfg(self.jobs_stream, self.jobs_subjects),
                cfg(self.results_stream, self.results_prefix + ">"),
                cfg(self.dlq_stream, self.dlq_prefix + ">"), cancels]

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(durable_name=self.consumer, ack_policy=AckPolicy.EXPLICIT,
                              deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait_s,
                              max_deliver=self.max_deliver,
                              max_ack_pending=self.max_ack_pending,
                              num_replicas=self.replicas)


async def provision(js: JetStreamContext, topo: Topology) -> list[str]:
    """Create or update every stream and the consumer; returns what was done, one line each."""
    done: list[str] = []
    for sc in topo.stream_configs():
        try:
            await js.stream_info(sc.name)
            await js.update_stream(sc)
            done.append(f"stream {sc.name}: updated")
        except nats.js.errors.NotFoundError:
            await js.add_stream(sc)
            done.append(f"stream {sc.name}: created ({sc.subjects[0]})")
    await js.add_consumer(topo.jobs_stream, topo.consumer_config())
    done.append(f"consumer {topo.jobs_stream}/{topo.consumer}: ready")
    return done


@dataclass(frozen=True, slots=True)
class Verified:
    """What the worker learns from the broker at start, rather than trusting its own flags."""

    ack_wait_s: float  # the consumer's: heartbeats are paced from it
    max_deliver: int  # the consumer's; <= 0 means unlimited (then nothing is dead-lettered)
    results_captured: bool  # the results stream captures every allowed reply subject
    results_window_s: float = 120.0  # the results stream's duplicate window
    cancels_kept: bool = False  # a stream keeps the cancel subject's messages (replayed at start)


def _covers(pattern: str, prefix: str) -> bool:
    """Does stream subject `pattern` capture every subject under `prefix` ("a.b.")?"""
    p, q = pattern.split("."), prefix.rstrip(".").split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return i <= len(q)
        if i >= len(q) or (tok != "*" and tok != q[i]):
            return False
    return False


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: does `pattern` (with * and >) match the literal `subject`?"""
    p, q = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return i < len(q)
        if i >= len(q) or (tok != "*" and tok != q[i]):
            return False
    return len(p) == len(q)


async def verify(js: JetStreamContext, topo: Topology) -> Verified:
    hint = "run `fabric-worker provision --config <engine.toml>` first"
    subjects: dict[str, list[str]] = {}
    windows: dict[str, float] = {}
    for name in (topo.jobs_stream, topo.results_stream, topo.dlq_stream):
        try:
            sc = (await js.stream_info(name)).config
        except nats.js.errors.NotFoundError:
            raise TopologyError(f"stream {name!r} does not exist; {hint}") from None
        subjects[name] = list(sc.subjects or [])
        windows[name] = float(sc.duplicate_window or 0)
    try:
        info = await js.consumer_info(topo.jobs_stream, topo.consumer)
    except nats.js.errors.NotFoundError:
        raise TopologyError(f"consumer {topo.consumer!r} on stream {topo.jobs_stream!r} "
                            f"does not exist; {hint}") from None
    cc = info.config
    if cc.ack_policy != AckPolicy.EXPLICIT or cc.deliver_subject:
        raise TopologyError(f"consumer {topo.consumer!r} must be a pull consumer with explicit "
                            f"acks (found ack_policy={cc.ack_policy}, push={bool(cc.deliver_subject)})")
    if not any(_matches(s, topo.dlq_subject) for s in subjects[topo.dlq_stream]):
        raise TopologyError(f"stream {topo.dlq_stream!r} does not capture {topo.dlq_subject!r}, "
                            f"so poison jobs could not be dead-lettered; {hint}")
    max_deliver = cc.max_deliver if cc.max_deliver is not None else -1
    if max_deliver <= 0:
        log.warning("no_max_deliver", consumer=topo.consumer,
                    hint="a job that kills every worker is retried forever; set max_deliver")
    try:
        kept = (await js.stream_info(topo.cancels_stream)).config.subjects or []
    except Exception:  # noqa: BLE001 - missing, or not readable with these credentials
        kept = []  # (cancels then work as before: heard while running)
    cancels_kept = any(_matches(s, topo.cancel_subject) for s in kept)
    if not cancels_kept:
        log.warning("cancels_not_kept", stream=topo.cancels_stream, subject=topo.cancel_subject,
                    hint=f"a cancel sent while no worker runs is missed; {hint}")
    return Verified(ack_wait_s=float(cc.ack_wait or topo.ack_wait_s), max_deliver=max_deliver,
                    results_captured=any(_covers(s, topo.results_prefix)
                                         for s in subjects[topo.results_stream]),
                    results_window_s=windows[topo.results_stream] or topo.duplicate_window_s,
                    cancels_kept=cancels_kept)
