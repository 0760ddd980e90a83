"""How a worker ends: the fault, the watchdogs, and the two teardowns.

- graceful (SIGTERM, SIGINT, burst mode done): stop fetching, nak what was never admitted
  so the fleet takes it at once, let in-flight jobs finish within the grace period, nak the
  rest, flush, exit 0;
- fatal (the executor raised or died, a step that never ends, the broker gone past a
  bound, a stage task that failed): the moment the fault is known an exit watchdog thread
  is armed (os._exit at FATAL_EXIT_S whatever hangs, the event loop included); stop
  fetching and let our last pull request expire, collecting what it still delivered; nak
  every held message -- pending, in flight, Results not yet published, those late
  deliveries -- and flush, so the broker redelivers them now, not after the ack wait;
  close; exit 1. About a second from fault to exit.

Nothing reports a hung executor, so the loop watches it (`Watch`, every tick of `ticks`):
when jobs are in flight and no step has finished for `step_timeout_s`, that is a fault. A
thread watches the loop the same way (a blocked loop is a fault too; then nothing can be
nak'd and the exit watchdog ends the process: the ack wait returns the jobs). In burst mode
`burst_watch` begins the graceful way out once the consumer and the worker hold nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import structlog
from nats.aio.msg import Msg

from worker.admission import Intake
from worker.broker.ingress import Ingress
from worker.broker.publisher import Publisher, quiet
from worker.broker.topology import Topology
from worker.engine.executor import Executor
from worker.ops.stats import WorkerStats

log = structlog.get_logger("worker")

FATAL_EXIT_S = 4.5  # the watchdog's deadline from the fault; the contract is under 5 s


class FaultKind(Enum):
    EXECUTOR_FAILED = "executor_failed"  # the executor thread raised
    EXECUTOR_GONE = "executor_gone"  # the executor thread is not running
    EXECUTOR_STALLED = "executor_stalled"  # jobs in flight, no step finished in time
    LOOP_STALLED = "loop_stalled"  # the event loop did not tick in time
    BROKER_UNREACHABLE = "broker_unreachable"  # disconnected past the bound
    STAGE_FAILED = "stage_failed"  # a stage task (ingress, publisher, ...) raised


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    detail: str  # for humans: what was seen
    at: float  # time.monotonic()
    at_unix: float  # time.time(), for the log and for tests that time the exit

    @property
    def reason(self) -> str:
        return f"fatal: {self.detail}"


class Lifecycle:
    """The way out, once: a graceful stop or a fault, whichever comes first.

    `stop` and the loop's side are event-loop only; `fault` may come from any thread and
    arms the exit watchdog before anything else."""

    def __init__(self, exit_s: float = FATAL_EXIT_S,
                 exit_fn: Callable[[int], object] = os._exit) -> None:
        self.exit_s = exit_s  # the exit watchdog's deadline, from the fault
        self._exit_fn = exit_fn  # os._exit; a test's recorder
        self.fault: Fault | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[str] | None = None
        self.loop_tick = 0.0  # the loop's last sign of life (its watch ticks), monotonic

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._done = loop.create_future()

    @property
    def stopping(self) -> bool:
        return self._done is not None and self._done.done()

    async def wait(self) -> str:
        """The reason the way out began: a signal's name, "burst: ...", or a fault's reason."""
        assert self._done is not None
        return await self._done

    def stop(self, reason: str) -> None:
        """Begin the graceful way out (event loop thread)."""
        if self._done is not None and not self._done.done():
            log.info("worker_stopping", reason=reason)
            self._done.set_result(reason)

    def declare(self, kind: FaultKind, detail: str, **context: object) -> None:
        """Any thread. Arms the exit watchdog first, then asks the loop to tear down."""
        with self._lock:
            if self.fault is not None:
                return
            self.fault = Fault(kind, detail, time.monotonic(), time.time())
        threading.Thread(target=self._exit_watchdog, args=(self.fault,), name="exit-watchdog",
                         daemon=True).start()
        log.error("worker_fault", reason=self.fault.reason, kind=kind.value,
                  fault_unix=self.fault.at_unix, **context)
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the watchdog ends it
            self._loop.call_soon_threadsafe(self._stop_for_fault)

    def _stop_for_fault(self) -> None:
        if self._done is not None and not self._done.done() and self.fault is not None:
            self._done.set_result(self.fault.reason)

    def _exit_watchdog(self, fault: Fault) -> None:
        """Whatever hangs (a device call, the event loop, interpreter shutdown), exit in time."""
        time.sleep(max(0.0, self.exit_s - (time.monotonic() - fault.at)))
        with contextlib.suppress(Exception):
            log.error("exit_watchdog", reason=fault.reason,
                      since_fault_s=round(time.monotonic() - fault.at, 3))
            sys.stderr.flush()
        self._exit_fn(1)

    def watch_loop(self, stall_s: float) -> None:
        """Start a thread that declares a fault when the loop stops ticking for `stall_s`."""
        self.loop_tick = time.monotonic()

        def run() -> None:
            while True:
                time.sleep(1.0)
                if self.fault is not None or self.stopping:
                    return
                stalled_s = time.monotonic() - self.loop_tick
                if stalled_s > stall_s:
                    self.declare(FaultKind.LOOP_STALLED,
                                 f"event loop stalled for {stalled_s:.1f}s")
                    return
        threading.Thread(target=run, name="loop-watchdog", daemon=True).start()


@dataclass(slots=True)
class Watch:
    """The loop's eye on what cannot report its own failure: a stuck executor, a lost broker.

    `check` is called every tick with what the loop sees; it returns the fault, if any."""

    step_timeout_s: float
    broker_give_up_s: float
    _disconnected_since: float | None = None

    def check(self, now: float, executor_alive: bool, inflight_jobs: int,
              last_progress: float, connected: bool) -> tuple[FaultKind, str] | None:
        if not executor_alive:
            return FaultKind.EXECUTOR_GONE, "the executor thread is gone"
        if inflight_jobs:
            quiet_s = now - last_progress
            if quiet_s > self.step_timeout_s:
                return (FaultKind.EXECUTOR_STALLED, f"executor stalled: no step finished in "
                        f"{quiet_s:.1f}s with {inflight_jobs} jobs in flight")
        if connected:
            self._disconnected_since = None
        else:
            since = self._disconnected_since = self._disconnected_since or now
            if now - since > self.broker_give_up_s:
                return FaultKind.BROKER_UNREACHABLE, f"broker unreachable for {now - since:.0f}s"
        return None


_TICK_S = 0.25  # how often the loop checks the executor, the broker and deadlines


async def ticks(life: Lifecycle, look: Callable[[float], tuple[FaultKind, str] | None],
                sweep: Callable[[float], None], fault: Callable[[FaultKind, str], None]) -> None:
    """The loop's own watch, every tick until the way out begins: `look(now)` for what cannot
    report its own failure (`Watch`; a fault found is declared and the ticks end), and once
    a second `sweep(now)`. Each tick is also the loop's sign of life for `watch_loop`."""
    last_sweep = time.monotonic()
    while True:
        await asyncio.sleep(_TICK_S)
        if life.stopping:
            return  # the way out has begun: a stopped executor is expected now
        now = life.loop_tick = time.monotonic()
        found = look(now)
        if found is not None:
            fault(*found)
            return
        if now - last_sweep >= 1.0:
            last_sweep = now
            sweep(now)


async def burst_watch(life: Lifecycle, js, topo: Topology, held: Mapping[int, Msg]) -> None:
    """Burst mode's way out: the consumer has nothing pending or unacked, and nothing is held."""
    while True:
        await asyncio.sleep(0.5)
        if held:
            continue
        info = await js.consumer_info(topo.jobs_stream, topo.consumer)
        if info.num_pending == 0 and info.num_ack_pending == 0 and not held:
            life.stop("burst: queue empty")
            return


@dataclass(slots=True)
class Stages:
    """What a teardown stops, in order: the pull, the executor, the publisher, the connection."""

    nc: object  # nats.aio.client.Client
    ingress: Ingress
    ingress_task: asyncio.Task
    intake: Intake
    executor: Executor
    publisher: Publisher
    stats: WorkerStats


async def teardown_graceful(s: Stages, grace_s: float, faulted: Callable[[], bool]) -> int:
    fetch_s = s.ingress.fetch_timeout_s
    await _stop_ingress(s, fetch_s + 1.0, until=time.monotonic() + fetch_s + 2.0)
    await _nak_now(s, s.intake.take_unadmitted())
    await _flush(s.nc, 1.0)  # the fleet takes the never-admitted jobs now
    deadline = time.monotonic() + grace_s
    while (s.intake.inflight and time.monotonic() < deadline and s.executor.alive
           and not faulted()):
        await asyncio.sleep(0.05)
    s.executor.stop(timeout_s=2.0)
    await _nak_now(s, [t.msg for t in s.intake.inflight.values()])
    s.intake.inflight.clear()
    await s.publisher.flush(timeout_s=10.0)
    await _close(s.nc)
    return 1 if faulted() else 0


async def teardown_fatal(s: Stages, fault: Fault) -> int:
    with contextlib.suppress(Exception):  # only asks; a hung thread is left to the watchdog
        s.executor.stop(timeout_s=0)
    abort = asyncio.ensure_future(s.publisher.abort(grace_s=0.25))
    await _stop_ingress(s, s.ingress.fetch_timeout_s + 0.2, until=fault.at + 2.0)
    await abort
    held_ids = sorted({t.job.id for t in list(s.intake.pending) + list(s.intake.inflight.values())})
    s.intake.take_unadmitted()
    s.intake.inflight.clear()
    # Every held message: pending, in flight, Results not yet published, late deliveries.
    naked = await _nak_now(s, list(s.intake.held.values()))
    flushed = await _flush(s.nc, 1.0)
    log.error("fatal_naked", naked=naked, flushed=flushed, jobs=held_ids,
              since_fault_s=round(time.monotonic() - fault.at, 3))
    await _close(s.nc, timeout_s=1.0)
    log.error("worker_fatal", reason=fault.reason, teardown_s=round(time.monotonic() - fault.at, 3),
              exit_unix=time.time())
    return 1


async def _stop_ingress(s: Stages, wait_s: float, until: float) -> None:
    """Stop fetching, and wait until no pull request of ours can take another message.

    Nak'ing before our last pull request expired would hand the message straight back
    to that request (one wasted delivery each, which counts towards max_deliver); so
    the fetch under way ends, its request expires, a round trip brings in whatever the
    server sent it (see worker.broker.ingress), and only then does the caller nak."""
    s.intake.draining = True
    s.ingress.stop()
    done, _ = await asyncio.wait({s.ingress_task}, timeout=wait_s)
    if not done:
        s.ingress_task.cancel()
    wait_s = min(s.ingress.requests_expire_at + 0.05, until) - time.monotonic()
    if wait_s > 0:
        await asyncio.sleep(wait_s)
    await _flush(s.nc, max(0.1, min(1.0, until - time.monotonic())))
    await s.ingress.settle_deliveries(max(0.05, until - time.monotonic()))
    if s.intake.refused:
        log.info("late_deliveries", count=len(s.intake.refused))


async def _nak_now(s: Stages, msgs: list[Msg]) -> int:
    """Nak and forget `msgs`; each nak is queued on the connection (flush to send)."""
    for m in msgs:
        s.intake.settled(m)
        await quiet(m.nak())
    s.stats.naked += len(msgs)
    return len(msgs)


async def _flush(nc, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(nc.flush(), timeout_s)
        return True
    except Exception as e:  # noqa: BLE001 - we are leaving either way; unflushed = ack wait
        log.warning("flush_failed", error=repr(e))
        return False


async def _close(nc, timeout_s: float = 2.0) -> None:
    await _flush(nc, timeout_s)
    try:
        await asyncio.wait_for(nc.close(), timeout_s)
    except Exception as e:  # noqa: BLE001 - closing a broken connection may fail; unacked = redelivered
        log.warning("close_failed", error=repr(e))
