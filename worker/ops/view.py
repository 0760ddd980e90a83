"""What metrics and health may know about a worker: one typed view, read at scrape time.

The worker builds a `WorkerView` on demand (`Worker.view()`, from the HTTP thread); the
collector and the probes are functions of it, never of the worker's attributes. Reads are
unlocked: a value torn by a concurrent update costs one sample, never correctness.
`WorkerInfo` is what does not change while the worker runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.ops.stats import WorkerStats


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    config_hash: str
    model: str
    device: str
    dtype: str
    token_budget: int
    low_water: int
    max_jobs: int  # the most jobs a stage can hold: every job reserves at least one KV block


@dataclass(frozen=True, slots=True)
class KvLevels:
    """The KV pool's blocks by state, and its host tier's, read off the block pool."""

    blocks: int  # the device pool
    in_flight: int  # held by admitted jobs (a block shared by several counts once)
    cached: int  # held by nobody, keeping a computed prefix (evictable)
    empty: int  # no content
    hits: int  # blocks reservations found on the device
    evictions: int  # device blocks whose content was dropped (or moved to the host tier)
    host_blocks: int = 0  # the host tier's capacity (0: none)
    host_used: int = 0
    host_hits: int = 0  # blocks found in the host tier and copied back
    host_evictions: int = 0  # host blocks overwritten by newer copies out
    # Device blocks copied to the host tier ahead of their eviction (off the step's path),
    # and those copied out when they were evicted (the step that reuses them waits).
    written_ahead: int = 0
    spilled_at_eviction: int = 0

    @classmethod
    def of(cls, pool) -> KvLevels:
        """Read a `worker.engine.blocks.BlockPool` (unlocked: one sample stale at worst)."""
        t = pool.tier
        host = ((t.num_blocks, t.used_blocks, t.hits, t.evictions, t.written_ahead, t.spills)
                if t is not None else (0,) * 6)
        return cls(pool.num_blocks, pool.used_blocks, pool.cached_blocks, pool.empty_blocks,
                   pool.hit_blocks, pool.evictions, *host)


@dataclass(frozen=True, slots=True)
class WorkerView:
    ready: bool  # serving: connected, topology verified, executor started
    draining: bool  # stopping (SIGTERM or a fault): fetching nothing new
    faulted: bool  # a fault was declared; the process is exiting
    started: bool  # the executor exists (the worker has connected)
    executor_alive: bool
    connected: bool | None  # to the broker; None before the first connection
    held: int  # messages held unacked (they count against the consumer's max_ack_pending)
    pending_jobs: int  # fetched, waiting for admission
    pending_tokens: int
    inflight_jobs: int  # admitted, not finished
    running_jobs: int  # of those, in the executor's running batch
    inflight_tokens: int
    occupancy: float  # in-flight padded tokens over the budget
    admission_holding: bool  # hit high water, waiting for low water
    kv: KvLevels  # the KV pool and its host tier
    publisher_depth: int  # Results queued or awaiting their PubAck
    publisher_capacity: int
    fetched: int  # messages pulled from the consumers
    published: int  # Results confirmed by the broker
    acked: int
    termed: int
    naked: int  # nak'd after a failed publish
    dead_lettered: int
    last_step_at: float  # monotonic end of the executor's last step (0: none yet)
    intra_op_threads: int  # the executor's thread count now
    thread_probes: int  # times the thread governor measured the counts (0: fixed count)
    cpu_wait_s: float | None  # the process's threads' time runnable but waiting for a CPU
    cpu_wait_ratio: float  # of that, per second per expected CPU, over the last second
    cpu_starved: bool  # that ratio stayed high while busy (worker.ops.cpu.Starvation)
    stats: WorkerStats  # the counters and histograms (live: read, never written)
    # Messages pulled, by the queue they came from ("p0".."p9", "session"): see
    # worker.broker.ingress; and those taken from session partitions another worker owns.
    fetched_by_queue: dict[str, int] = field(default_factory=dict)
    spilled: int = 0
    partitions_owned: int | None = None  # session partitions this worker owns (None: no owners)

    @classmethod
    def of(cls, w: Any, cpu_wait_s: float | None) -> WorkerView:
        """What the worker `w` (`worker.app.Worker`) shows now (any thread); `cpu_wait_s`
        read by the caller (`worker.ops.cpu.process_wait_s`: this module stays plain data)."""
        ex, pub, ing, intake = w.executor, w.publisher, w.ingress, w.intake
        return cls(
            ready=w.ready, draining=w.intake.draining, faulted=w.life.fault is not None,
            started=ex is not None, executor_alive=ex is not None and ex.alive,
            connected=None if w.nc is None else w.nc.is_connected,
            held=len(w.intake.held), pending_jobs=len(w.intake.pending),
            pending_tokens=w.intake.pending_tokens, inflight_jobs=len(w.intake.inflight),
            running_jobs=ex.running_jobs if ex else 0, inflight_tokens=intake.in_flight_tokens,
            occupancy=intake.occupancy, admission_holding=intake.admission.holding,
            kv=KvLevels.of(intake.pool),
            publisher_depth=pub.depth if pub else 0, publisher_capacity=pub.capacity if pub else 0,
            fetched=ing.fetched if ing else 0, published=pub.published if pub else 0,
            fetched_by_queue=ing.fetched_by_queue() if ing else {},
            spilled=ing.spilled if ing else 0,
            partitions_owned=len(w.members.owned) if w.members else None,
            acked=pub.acked if pub else 0, termed=pub.termed if pub else 0,
            naked=pub.naked if pub else 0, dead_lettered=pub.dead_lettered if pub else 0,
            last_step_at=w.last_step_at,
            intra_op_threads=ex.threads if ex else w.opts.threads,
            thread_probes=ex.governor.probes if ex and ex.governor else 0,
            cpu_wait_s=cpu_wait_s, cpu_wait_ratio=w.starvation.wait_ratio,
            cpu_starved=w.starvation.starved, stats=w.stats)
