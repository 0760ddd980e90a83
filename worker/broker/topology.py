"""The JetStream objects the fleet shares: jobs stream, its consumers, results and dead letters.

The jobs stream has one durable pull consumer per queue the fleet serves (`Queue`):
- priority 5, the default: `fabric.jobs.>` (every producer's subject before priorities
  existed) and `fabric.prio.5.>`, on the consumer named in the config;
- each other priority p: `fabric.prio.<p>.>`, on `<consumer>-p<p>`;
- each session partition k: the stream maps `fabric.session.<p>.<token>` to
  `fabric.session.<p>.<k>.<token>` (`partition()`, a hash of the token alone, so a
  session's turns share a partition whatever their priorities). Each partition has a
  consumer per priority class (`SESSION_CLASSES`): `<consumer>-s<k>` for priority 5,
  `<consumer>-s<k>p0` for 0-4, `<consumer>-s<k>p6` for 6-9, so the broker orders session
  jobs by class as it orders the others by priority (and the worker by the exact priority
  once pulled). They have the `overflow` priority group so that a worker other than the
  partition's owner pulls from them only past a backlog (`worker.broker.ingress`,
  `worker.broker.members`).
The filters do not overlap, so each job is delivered by exactly one consumer.

`provision` creates or updates them idempotently (an operator runs it once per
deployment, or the compose/Kubernetes one-shot does); `verify` is what a worker runs at
start: it creates nothing, and refuses to start with a message that says what is missing
and how to create it. Workers must not create streams: with many workers on one broker
that is a race, and least-privilege credentials do not allow it.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, replace

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig, SubjectTransform

from schemas.models import DEFAULT_PRIORITY
from schemas.subjects import JOBS_PREFIX, PRIO_PREFIX, SESSION_PREFIX

log = structlog.get_logger("topology")

RESULTS_STREAM = "FABRIC_RESULTS"
DLQ_STREAM = "FABRIC_DLQ"
CANCELS_STREAM = "FABRIC_CANCELS"
MEMBERS_BUCKET = "FABRIC_WORKERS"
PRIORITIES = range(10)  # 0 first, 9 last (the default: schemas.models.DEFAULT_PRIORITY)
GROUP = "fabric"  # the priority group of the session partitions' consumers (ADR-42)
# A session partition's queues: one per class, not per priority (10 x 16 consumers, each
# watched by every worker, would cost more than it orders). A class's queue ranks as its
# first priority among the priority queues.
SESSION_CLASSES: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (DEFAULT_PRIORITY,), (6, 7, 8, 9))


class TopologyError(RuntimeError):
    """A stream or the consumer is missing or wrongly shaped; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Topology:
    jobs_stream: str
    consumer: str
    jobs_subjects: str = JOBS_PREFIX + ">"
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
    prio_prefix: str = PRIO_PREFIX  # fabric.prio.<p>.<anything>: priority p
    session_prefix: str = SESSION_PREFIX  # fabric.session.<priority>.<token>: a session's jobs
    # Session partitions: each a consumer, each owned by one live worker. More partitions
    # than workers, or a fleet cannot split them evenly (rendezvous hashing; members.py).
    partitions: int = 16
    members_bucket: str = MEMBERS_BUCKET  # a KV bucket: who is alive, for partition owners
    member_ttl_s: float = 6.0  # a worker not heard from for this long owns nothing

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
        jobs = cfg(self.jobs_stream, self.jobs_subjects)
        jobs.subjects = [self.jobs_subjects, f"{self.prio_prefix}*.>", f"{self.session_prefix}*.*"]
        # The broker, not the producer, picks a session's partition: a hash of its token.
        jobs.subject_transform = SubjectTransform(
            src=f"{self.session_prefix}*.*",
            dest=f"{self.session_prefix}{{{{wildcard(1)}}}}.{{{{partition({self.partitions},2)}}}}"
                 f".{{{{wildcard(2)}}}}")
        return [jobs, cfg(self.results_stream, self.results_prefix + ">"),
                cfg(self.dlq_stream, self.dlq_prefix + ">"), cancels]

    def queues(self) -> list[Queue]:
        """Every consumer of the jobs stream, the default (priority 5) first."""
        out = [Queue(self.consumer, DEFAULT_PRIORITY, None,
                     (self.jobs_subjects, f"{self.prio_prefix}{DEFAULT_PRIORITY}.>"))]
        out += [Queue(f"{self.consumer}-p{p}", p, None, (f"{self.prio_prefix}{p}.>",))
                for p in PRIORITIES if p != DEFAULT_PRIORITY]
        for cls in SESSION_CLASSES:
            suffix = "" if DEFAULT_PRIORITY in cls else f"p{cls[0]}"
            out += [Queue(f"{self.consumer}-s{k}{suffix}", cls[0], k,
                          tuple(f"{self.session_prefix}{p}.{k}.*" for p in cls))
                    for k in range(self.partitions)]
        return out

    def consumer_config(self, q: Queue) -> dict:
        """The consumer's config as the JetStream API takes it (nats-py's ConsumerConfig
        has no priority groups)."""
        cc = {"durable_name": q.consumer, "ack_policy": "explicit", "deliver_policy": "all",
              "ack_wait": int(self.ack_wait_s * 1e9), "max_deliver": self.max_deliver,
              "max_ack_pending": self.max_ack_pending, "num_replicas": self.replicas,
              "filter_subjects": list(q.subjects)}
        if q.partition is not None:
            cc |= {"priority_groups": [GROUP], "priority_policy": "overflow"}
        return cc


@dataclass(frozen=True, slots=True)
class Queue:
    """One consumer of the jobs stream: the jobs of one priority, or of one session
    partition and priority class (`priority`: the class's first; the worker orders them
    by their own `priority` once pulled)."""

    consumer: str
    priority: int
    partition: int | None  # a session partition's number; None: a priority's queue
    subjects: tuple[str, ...]

    @property
    def group(self) -> str | None:
        return GROUP if self.partition is not None else None


async def provision(js: JetStreamContext, topo: Topology) -> list[str]:
    """Create or update every stream, every consumer and the members bucket; returns what
    was done, one line each."""
    done: list[str] = []
    for sc in topo.stream_configs():
        try:
            await js.stream_info(sc.name)
            await js.update_stream(sc)
            done.append(f"stream {sc.name}: updated")
        except nats.js.errors.NotFoundError:
            await js.add_stream(sc)
            done.append(f"stream {sc.name}: created ({sc.subjects[0]})")
    for q in topo.queues():
        await _create_consumer(js, topo, q)
    done.append(f"consumers {topo.jobs_stream}/{topo.consumer} (priority 5), "
                f"-p0..-p9 (the other priorities), -s0..-s{topo.partitions - 1} "
                f"(session partitions; -s<k>p0 and -s<k>p6 their urgent and bulk "
                f"classes): ready")
    try:
        await js.key_value(topo.members_bucket)
        done.append(f"bucket {topo.members_bucket}: exists")
    except nats.js.errors.BucketNotFoundError:
        await js.create_key_value(bucket=topo.members_bucket, ttl=topo.member_ttl_s,
                                  history=1, replicas=topo.replicas,
                                  storage=StorageType.MEMORY)
        done.append(f"bucket {topo.members_bucket}: created (members' ttl {topo.member_ttl_s} s)")
    return done


async def api_call(nc, subject: str, body: dict | None = None) -> dict:
    """One JetStream API request, raw (what nats-py's models do not carry: priority
    groups, a stream's subjects by count); the answer decoded, an "error" key included."""
    data = json.dumps(body).encode() if body is not None else b""
    return json.loads((await nc.request(subject, data, timeout=5)).data)


async def _create_consumer(js: JetStreamContext, topo: Topology, q: Queue) -> None:
    """Create or update one consumer through the raw API: a consumer made before
    priorities existed (no filter) is updated to its filter, so it stops delivering what
    the new consumers deliver."""
    resp = await api_call(js._nc, f"{topo.api_prefix}.CONSUMER.CREATE.{topo.jobs_stream}."
                          f"{q.consumer}", {"stream_name": topo.jobs_stream,
                                            "config": topo.consumer_config(q)})
    if "error" in resp:
        raise TopologyError(f"consumer {q.consumer!r}: {resp['error'].get('description')}")


@dataclass(frozen=True, slots=True)
class Verified:
    """What the worker learns from the broker at start, rather than trusting its own flags."""

    ack_wait_s: float  # the consumer's: heartbeats are paced from it
    max_deliver: int  # the consumer's; <= 0 means unlimited (then nothing is dead-lettered)
    results_captured: bool  # the results stream captures every allowed reply subject
    results_window_s: float = 120.0  # the results stream's duplicate window
    cancels_kept: bool = False  # a stream keeps the cancel subject's messages (replayed at start)
    # The consumers this worker pulls from: every queue provisioned, or the default alone
    # on a topology provisioned before priorities and sessions existed.
    queues: tuple[Queue, ...] = ()
    members: bool = False  # the members bucket exists: session partitions have owners


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
        if name == topo.jobs_stream:
            # The partitions are what the stream was provisioned with, not our default.
            m = re.search(r"partition\((\d+),", sc.subject_transform.dest
                          if sc.subject_transform else "")
            topo = replace(topo, partitions=int(m[1]) if m else 0)
    infos = await _consumer_infos(js, topo)
    cc = infos.get(topo.consumer)
    if cc is None:
        raise TopologyError(f"consumer {topo.consumer!r} on stream {topo.jobs_stream!r} "
                            f"does not exist; {hint}")
    if cc.get("ack_policy") != "explicit" or cc.get("deliver_subject"):
        raise TopologyError(f"consumer {topo.consumer!r} must be a pull consumer with explicit "
                            f"acks (found ack_policy={cc.get('ack_policy')}, "
                            f"push={bool(cc.get('deliver_subject'))})")
    queues = tuple(q for q in topo.queues() if q.consumer in infos)
    if len(queues) > 1 and not (cc.get("filter_subject") or cc.get("filter_subjects")):
        # An unfiltered default consumer delivers every job the other consumers deliver too.
        raise TopologyError(f"consumer {topo.consumer!r} has no filter while the priority and "
                            f"session consumers exist: every job would run twice; {hint}")
    if len(queues) < len(topo.queues()):
        log.warning("queues_not_provisioned", found=[q.consumer for q in queues],
                    hint=f"priorities and sessions need their consumers; {hint}")
    members = True
    try:
        await js.key_value(topo.members_bucket)
    except Exception:  # noqa: BLE001 - missing, or not readable with these credentials
        members = False
        if any(q.partition is not None for q in queues):
            log.warning("members_bucket_missing", bucket=topo.members_bucket,
                        hint=f"session partitions are served by all workers alike; {hint}")
    if not any(_matches(s, topo.dlq_subject) for s in subjects[topo.dlq_stream]):
        raise TopologyError(f"stream {topo.dlq_stream!r} does not capture {topo.dlq_subject!r}, "
                            f"so poison jobs could not be dead-lettered; {hint}")
    max_deliver = cc.get("max_deliver", -1)
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
    return Verified(ack_wait_s=cc.get("ack_wait", 0) / 1e9 or topo.ack_wait_s,
                    max_deliver=max_deliver,
                    results_captured=any(_covers(s, topo.results_prefix)
                                         for s in subjects[topo.results_stream]),
                    results_window_s=windows[topo.results_stream] or topo.duplicate_window_s,
                    cancels_kept=cancels_kept, queues=queues, members=members)


async def _consumer_infos(js: JetStreamContext, topo: Topology) -> dict[str, dict]:
    """Every consumer of the jobs stream that is one of our queues: name -> its config as
    the server reports it (raw: nats-py's ConsumerConfig drops the priority fields)."""
    names = sorted({q.consumer for q in topo.queues()})
    # All at once: with three queues per session partition a worker's start would otherwise
    # wait out 58 round trips one after another.
    resps = await asyncio.gather(*(
        api_call(js._nc, f"{topo.api_prefix}.CONSUMER.INFO.{topo.jobs_stream}.{name}")
        for name in names))
    return {name: resp["config"] for name, resp in zip(names, resps) if "error" not in resp}
