"""The worker process: wires the stages together and owns their lifecycle.

Ingress -> pending queue -> admission -> executor thread -> completion drain. This module
owns the state that crosses stages (what is pending, what is in flight, which messages
are held) on the event loop, and the two ways out:

- graceful (SIGTERM, SIGINT, burst mode done): stop fetching, nak what was never admitted
  so the fleet takes it at once, let in-flight jobs finish within the grace period, nak the
  rest, flush, exit 0;
- fatal (the executor raised or died, a step that never ends, the broker gone past a
  bound, a stage task that failed): the moment the fault is known an exit watchdog thread
  is armed (os._exit at FATAL_EXIT_S whatever hangs, the event loop included); stop
  fetching and let our last pull request expire (FETCH_TIMEOUT_S), collecting what it
  still delivered; nak every held message -- pending, in flight, Results not yet
  published, those late deliveries -- and flush, so the broker redelivers them now, not
  after the ack wait; close; exit 1. About a second from fault to exit.

Nothing reports a hung executor, so the loop watches it: when jobs are in flight and no
step has finished for `step_timeout_s`, that is a fault. The executor's per-step callback
is the heartbeat. A thread watches the loop the same way (a blocked loop is a fault too;
then nothing can be nak'd and the exit watchdog ends the process: the ack wait returns the
jobs).

Poison: a job delivered `solo_from_attempt` times or more runs in a batch of its own;
while it runs this worker fetches nothing new, and around suspects (and right after a
start, when a crash's redeliveries lead the queue) it fetches one message at a time. So a
job that kills the engine takes as few bystanders as possible with it: every message held
in a crash counts a delivery, and a bystander that reached max_deliver would be
dead-lettered too. On its last allowed delivery ingress turns a job into a dead letter
instead of running it (see ingress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg

from schemas import (ErrorCode, ErrorInfo, FinishReason, Result, Timing, Usage, encode,
                     encode_completion)
from worker import failpoints
from worker.admission import Admission
from worker.config import EngineConfig
from worker.connection import Security, connect
from worker.drain import DeadLetter, Delivery, Drain, Settle
from worker.engine import Engine
from worker.executor import Executor, StepReport
from worker.ingress import Ingress, Limits, Outcome, Ticket, Validator
from worker.sequence import Completion
from worker.stats import WorkerStats
from worker.topology import Topology, Verified, verify

log = structlog.get_logger("worker")

FATAL_EXIT_S = 4.5  # the watchdog's deadline from the fault; the contract is under 5 s
# A pull request lives this long; stopping waits one out before nak'ing (see _stop_ingress).
FETCH_TIMEOUT_S = 0.5
_TICK_S = 0.25  # how often the loop checks the executor, the broker and deadlines


@dataclass(frozen=True, slots=True)
class Options:
    """Everything that is not an engine field: identity, timing, policy knobs with defaults."""

    worker_id: str
    grace_s: float = 30.0  # SIGTERM: how long in-flight jobs may take to finish
    fetch_batch: int = 256  # most messages one pull asks for
    solo_from_attempt: int = 3  # a job delivered this often runs alone (suspected poison)
    connect_give_up_s: float = 30.0
    burst: bool = False  # exit once the consumer has nothing pending and nothing is held
    max_step_tokens: int | None = None
    step_timeout_s: float = 60.0  # jobs in flight and no step finished this long: a hang, fatal
    broker_give_up_s: float = 120.0  # disconnected this long: fatal (held jobs wait the ack wait)
    publish_give_up_s: float = 60.0  # a Result publish is retried this long, then the job is nak'd


@dataclass(frozen=True, slots=True)
class Fault:
    reason: str
    at: float  # time.monotonic()
    at_unix: float  # time.time(), for the log and for tests that time the exit


class Worker:
    def __init__(self, cfg: EngineConfig, opts: Options, engine: Engine, topo: Topology,
                 security: Security):
        self.cfg, self.opts, self.engine, self.topo, self.security = cfg, opts, engine, topo, security
        self.admission = Admission(cfg.token_budget, cfg.low_water)
        self.pending: deque[Ticket] = deque()
        self.pending_tokens = 0
        # The pending queue holds one admission group: what admission lets in at once when
        # it reopens at low water (and never less than one longest job).
        self.pending_cap_tokens = max(cfg.token_budget - cfg.low_water, cfg.max_seq_len)
        self._job_tokens_ewma = float(min(cfg.max_seq_len, 256))  # until jobs say otherwise
        self.inflight: dict[int, Ticket] = {}
        self.held: dict[int, Msg] = {}  # id(msg) -> msg for every message not yet settled
        self.stats = WorkerStats()
        self.limits = Limits(vocab_size=engine.loaded.args.vocab_size, max_seq_len=cfg.max_seq_len,
                             budget_tokens=cfg.token_budget, block_size=engine.block_size,
                             reply_prefix=topo.results_prefix)
        self._rng = random.Random()
        self._stop: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        self.draining = False
        self.fault: Fault | None = None
        self._fault_lock = threading.Lock()
        self.last_step_at = 0.0  # monotonic end of the last executor step (written by the executor)
        self._busy_since = 0.0  # monotonic time the executor last went from no work to some
        self.solo_inflight = 0  # suspected poison jobs admitted and not finished
        # Fetch one message at a time: at start (a restart after a crash finds the suspects at
        # the head of the redeliveries) and after a suspect, until one fetch brings a healthy job.
        self.cautious = True
        self._refused: list[Msg] = []  # fetched while draining: nak'd by the teardown
        self._disconnected_since: float | None = None
        self._admit_soon = False  # an _admit is scheduled for this loop pass

    # -- wiring ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self.nc = await connect(self.cfg.nats_url, self.opts.worker_id, self.security,
                                self.opts.connect_give_up_s)
        self.js = self.nc.jetstream(domain=self.topo.js_domain)
        self.verified: Verified = await verify(self.js, self.topo)
        self.limits = dataclasses.replace(self.limits, max_deliver=self.verified.max_deliver)
        log.info("topology_verified", ack_wait_s=self.verified.ack_wait_s,
                 max_deliver=self.verified.max_deliver, solo_from_attempt=self.opts.solo_from_attempt,
                 dead_letters=self.topo.dlq_subject, js_domain=self.topo.js_domain,
                 security=self.security.describe(),
                 failpoints=failpoints.armed() or None)
        self.executor = Executor(
            self.engine,
            on_complete=lambda c: loop.call_soon_threadsafe(self._on_completions, c),
            on_step=self._on_step,
            on_fatal=lambda e: self.declare_fault(f"fatal: executor failed: {e!r}"),
            backlog=lambda: len(self.pending),
            failpoint=self._failpoint,
        )
        in_flight_jobs = self.cfg.token_budget // self.engine.block_size
        self._held_cap = 2 * in_flight_jobs + 2 * self.opts.fetch_batch
        self.drain = Drain(self.nc, self.js, maxsize=self._held_cap + 1024,
                           publish_give_up_s=self.opts.publish_give_up_s,
                           results_captured=self.verified.results_captured)
        await self.drain.start()
        self.ingress = Ingress(self.nc, self.topo.jobs_stream, self.topo.consumer,
                               Validator(self.limits, self.engine.loaded.tokenizer),
                               self._room, self._on_ticket, self._on_outcome,
                               fetch_timeout_s=FETCH_TIMEOUT_S, api_prefix=self.topo.api_prefix)
        await self.ingress.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        self.executor.start()
        self._loop_tick = time.monotonic()
        threading.Thread(target=self._watch_loop, name="loop-watchdog", daemon=True).start()
        tasks = [self._supervised(c) for c in (self.drain.run(), self._heartbeats(), self._watch())]
        ingress_task = self._supervised(self.ingress.run())
        if self.opts.burst:
            tasks.append(self._supervised(self._burst_watch()))
        self.ready = True
        log.info("worker_ready", worker=self.opts.worker_id)
        reason = await self._stop
        self.ready = False
        if self.fault is not None:
            code = await self._teardown_fatal(ingress_task)
        else:
            code = await self._teardown_graceful(ingress_task)
        for t in tasks:
            t.cancel()
        log.info("worker_summary", worker=self.opts.worker_id, exit_reason=reason, exit_code=code,
                 **self.stats.summary())
        return code

    def _supervised(self, coro) -> asyncio.Task:
        """A stage task that ends with an exception takes the worker down: fatal, not silent."""
        task = asyncio.create_task(coro, name=coro.__qualname__)

        def check(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("stage_failed", stage=t.get_name(), error=repr(t.exception()))
                self.stop(f"fatal: {t.get_name()} failed: {t.exception()!r}")
        task.add_done_callback(check)
        return task

    def stop(self, reason: str) -> None:
        """Begin the way out (event loop thread). A reason starting with "fatal" is a fault."""
        if reason.startswith("fatal"):
            self.declare_fault(reason)
            return
        if self._stop is not None and not self._stop.done():
            log.info("worker_stopping", reason=reason)
            self._stop.set_result(reason)

    def declare_fault(self, reason: str) -> None:
        """Any thread. Arms the exit watchdog first, then asks the loop to tear down."""
        with self._fault_lock:
            if self.fault is not None:
                return
            self.fault = Fault(reason, time.monotonic(), time.time())
        threading.Thread(target=_exit_watchdog, args=(self.fault,), name="exit-watchdog",
                         daemon=True).start()
        log.error("worker_fault", reason=reason, fault_unix=self.fault.at_unix,
                  held=len(self.held), inflight=len(self.inflight))
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the watchdog ends it
            loop.call_soon_threadsafe(self._stop_for_fault, reason)

    def _stop_for_fault(self, reason: str) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(reason)

    # -- ingress and admission ---------------------------------------------------------

    def _room(self) -> int:
        if self.draining or self.solo_inflight:
            return 0  # a suspected poison job runs with as little else held as possible
        # Pull only what the next admission group can take: a worker that hoards a backlog
        # starves its neighbours on the same consumer. A job's size is known only once it
        # is decoded, so the pull is sized by the recent mean (the estimate errs by a batch).
        free = self.pending_cap_tokens - self.pending_tokens
        if free <= 0:
            return 0
        by_tokens = max(1, int(free / self._job_tokens_ewma))
        return max(0, min(1 if self.cautious else self.opts.fetch_batch, by_tokens,
                          self._held_cap - len(self.held)))

    def _hold(self, msg: Msg, attempt: int, job_id: str) -> None:
        self.held[id(msg)] = msg
        if attempt >= self.opts.solo_from_attempt:
            self.cautious = True
        elif self.ingress.last_fetch_len == 1:
            self.cautious = False
        if attempt > 1:
            self.stats.redelivered += 1
            log.info("job_redelivered", job=job_id, attempt=attempt)

    def _on_ticket(self, t: Ticket) -> None:
        self._hold(t.msg, t.attempt, t.job.id)
        if self.draining:
            self._refused.append(t.msg)
            return
        self.pending.append(t)
        self.pending_tokens += t.reserved_tokens
        self._job_tokens_ewma += 0.05 * (t.reserved_tokens - self._job_tokens_ewma)
        if not self._admit_soon:
            # Once per loop pass, not per message: a pull brings its deliveries in one read,
            # and they go to the executor as one submission (one wake-up, one bigger step).
            self._admit_soon = True
            self._loop.call_soon(self._admit)

    def _admit(self) -> None:
        self._admit_soon = False
        any_admitted = False
        while admitted := self.admission.admit(self.pending, lambda t: t.reserved_tokens):
            any_admitted = True
            now, now_unix = time.monotonic(), time.time()
            reqs, expired = [], 0
            for t in admitted:
                self.pending_tokens -= t.reserved_tokens
                if t.job.deadline_s is not None and t.job.deadline_s <= now_unix:
                    # Expired while it waited for admission: answer it without device time.
                    self.admission.release(t.reserved_tokens)
                    self._expire(t)
                    expired += 1
                    continue
                if not self.inflight:
                    self._busy_since = now
                t.admitted_at = now
                self.inflight[t.key] = t
                solo = t.attempt >= self.opts.solo_from_attempt
                if solo:
                    self.solo_inflight += 1
                    log.info("job_solo", job=t.job.id, attempt=t.attempt)
                seed = t.job.sampling.seed
                reqs.append(t.request(self._rng.getrandbits(63) if seed is None else seed, solo=solo))
            if reqs:
                self.executor.submit(reqs)
            if not expired:
                break  # released tokens may let more in: otherwise admission is done for now
        if any_admitted:
            self.ingress.room_changed.set()
        self.stats.occupancy(self.admission.occupancy, queued=bool(self.pending))

    def _expire(self, t: Ticket) -> None:
        self._answer(Outcome(t.msg, t.job.id, t.job.reply_to, t.attempt, t.arrived_at,
                             FinishReason.EXPIRED,
                             ErrorInfo(code=ErrorCode.EXPIRED,
                                       message="deadline passed while the job waited for admission"),
                             prompt_tokens=len(t.prompt)))

    def _expire_pending(self) -> None:
        now_unix = time.time()
        if not any(t.job.deadline_s is not None and t.job.deadline_s <= now_unix
                   for t in self.pending):
            return
        keep: list[Ticket] = []
        for t in self.pending:
            if t.job.deadline_s is not None and t.job.deadline_s <= now_unix:
                self.pending_tokens -= t.reserved_tokens
                self._expire(t)
            else:
                keep.append(t)
        self.pending.clear()
        self.pending.extend(keep)
        self.ingress.room_changed.set()

    def _on_outcome(self, o: Outcome) -> None:
        self._hold(o.msg, o.attempt, o.job_id)
        self._answer(o)

    def _answer(self, o: Outcome) -> None:
        now = time.monotonic()
        ok = o.error is None
        res = Result(id=o.job_id, ok=ok, finish_reason=o.finish_reason, error=o.error,
                     usage=Usage(prompt_tokens=o.prompt_tokens),
                     timing=Timing(total_ms=(now - o.arrived_at) * 1e3),
                     worker=self.opts.worker_id, attempt=o.attempt)
        self._count(res)
        dead = None
        if o.dead_letter is not None:
            dead = self._dead_letter(o)
            log.error("job_dead_lettered", job=o.job_id, attempt=o.attempt, subject=dead.subject,
                      reason=o.dead_letter)
        else:
            log.info("job_rejected" if not ok else "job_answered_at_edge", job=o.job_id,
                     attempt=o.attempt, code=o.error.code.value if o.error else None,
                     reason=o.error.message if o.error else None)
        self._deliver(o.msg, o.job_id, o.attempt, encode(res), o.reply_to,
                      Settle.TERM if o.terminate else Settle.ACK, dead)

    def _dead_letter(self, o: Outcome) -> DeadLetter:
        md = o.msg.metadata
        headers = {
            # One dead letter per stored job message, however often it is dead-lettered.
            "Nats-Msg-Id": f"{md.stream}:{md.sequence.stream}",
            "Fabric-Job-Id": o.job_id,
            "Fabric-Stream": md.stream,
            "Fabric-Stream-Seq": str(md.sequence.stream),
            "Fabric-Subject": o.msg.subject,
            "Fabric-Deliveries": str(o.attempt),
            "Fabric-Error": o.dead_letter or "",
            "Fabric-Worker": self.opts.worker_id,
            "Fabric-Dead-At": f"{time.time():.3f}",
        }
        return DeadLetter(self.topo.dlq_subject, o.msg.data, headers)

    # -- completions -------------------------------------------------------------------

    def _failpoint(self, name: str) -> None:
        # Executor thread. The ids of the jobs decoding this step, for job-specific failpoints
        # (a read of the scheduler's running list, only when such a point is armed).
        failpoints.hit(name, jobs=self._running_job_ids)

    def _running_job_ids(self) -> list[str]:
        ids = []
        for seq in list(self.executor.scheduler.running):
            t = self.inflight.get(seq.req.key)
            if t is not None:
                ids.append(t.job.id)
        return ids

    def _on_step(self, r: StepReport) -> None:
        # Executor thread: only this thread writes the step counters and the heartbeat.
        self.last_step_at = time.monotonic()
        self.stats.on_step(r)

    def _on_completions(self, comps: list[Completion]) -> None:
        if self.fault is not None:
            return  # everything held has been nak'd; a late completion answers nothing
        now = time.monotonic()
        tok = self.engine.loaded.tokenizer
        for c in comps:
            t = self.inflight.pop(c.key, None)
            if t is None:
                continue
            self.admission.release(t.reserved_tokens)
            if t.attempt >= self.opts.solo_from_attempt:
                self.solo_inflight -= 1
            if c.error is not None:
                # Not an answer: publishing it would make the results stream keep this error
                # over the good Result of the retry (same Nats-Msg-Id). Retry it instead.
                log.warning("job_failed", job=t.job.id, attempt=t.attempt, error=c.error)
                self._nak(t.msg)
                continue
            queued_ms = (t.admitted_at - t.arrived_at) * 1e3
            first_ms = (c.first_token_at - t.arrived_at) * 1e3
            total_ms = (now - t.arrived_at) * 1e3
            payload = encode_completion(
                id=t.job.id, tokens=c.tokens, text=tok.decode(c.tokens),
                finish_reason=FinishReason(c.finish_reason), prompt_tokens=len(t.prompt),
                completion_tokens=len(c.tokens), padded_tokens=c.computed_tokens,
                queued_ms=queued_ms, first_token_ms=first_ms, total_ms=total_ms,
                worker=self.opts.worker_id, attempt=t.attempt)
            self.stats.jobs_ok += 1
            self.stats.on_result(ok=True, prompt_tokens=len(t.prompt),
                                 completion_tokens=len(c.tokens), padded_tokens=c.computed_tokens,
                                 queued_ms=queued_ms, first_token_ms=first_ms, total_ms=total_ms)
            self._deliver(t.msg, t.job.id, t.attempt, payload, t.job.reply_to, Settle.ACK)
        self._admit()
        self.ingress.room_changed.set()

    def _count(self, res: Result) -> None:
        if res.ok:
            self.stats.jobs_ok += 1
        else:
            self.stats.jobs_error += 1
            self.stats.errors_by_code[res.error.code.value] += 1

    def _deliver(self, msg: Msg, job_id: str, attempt: int, payload: bytes, reply_to: str | None,
                 settle: Settle, dead: DeadLetter | None = None) -> None:
        if self.drain.aborted:
            self._refused.append(msg)  # the fatal teardown naks it with the rest
            return

        def done(_as_asked: bool) -> None:
            self.held.pop(id(msg), None)
            self.ingress.room_changed.set()
        self.drain.put(Delivery(msg, job_id, attempt, payload, reply_to, settle, on_done=done,
                                dead_letter=dead))

    def _nak(self, msg: Msg) -> None:
        self.held.pop(id(msg), None)
        self.stats.naked += 1
        asyncio.ensure_future(_quiet(msg.nak()))

    async def _nak_now(self, msgs: list[Msg]) -> int:
        """Nak and forget `msgs`; each nak is queued on the connection (flush to send)."""
        for m in msgs:
            self.held.pop(id(m), None)
            await _quiet(m.nak())
        self.stats.naked += len(msgs)
        return len(msgs)

    # -- background duties -------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Tell the broker held jobs are alive, so the ack wait can be short."""
        period = max(0.2, self.verified.ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            for msg in list(self.held.values()):
                await _quiet(msg.in_progress())

    async def _watch(self) -> None:
        """The loop's eye on what cannot report its own failure: a stuck executor, a lost broker."""
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            if self._stop.done():
                return  # the way out has begun: a stopped executor is expected now
            now = self._loop_tick = time.monotonic()
            if not self.executor.alive:
                self.stop("fatal: the executor thread is gone")
                return
            if self.inflight:
                quiet_s = now - max(self.last_step_at, self._busy_since)
                if quiet_s > self.opts.step_timeout_s:
                    self.stop(f"fatal: executor stalled: no step finished in {quiet_s:.1f}s "
                              f"with {len(self.inflight)} jobs in flight")
                    return
            if self.nc.is_connected:
                self._disconnected_since = None
            else:
                since = self._disconnected_since = self._disconnected_since or now
                if now - since > self.opts.broker_give_up_s:
                    self.stop(f"fatal: broker unreachable for {now - since:.0f}s")
                    return
            if now - last_sweep >= 1.0:
                last_sweep = now
                self._expire_pending()

    def _watch_loop(self) -> None:
        """A thread's eye on the loop itself: a blocked event loop can watch nothing else."""
        while True:
            time.sleep(1.0)
            if self.fault is not None or (self._stop is not None and self._stop.done()):
                return
            stalled_s = time.monotonic() - self._loop_tick
            if stalled_s > self.opts.step_timeout_s:
                self.declare_fault(f"fatal: event loop stalled for {stalled_s:.1f}s")
                return

    async def _burst_watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.held:
                continue
            info = await self.js.consumer_info(self.topo.jobs_stream, self.topo.consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0 and not self.held:
                self.stop("burst: queue empty")
                return

    # -- the ways out ------------------------------------------------------------------

    async def _stop_ingress(self, task: asyncio.Task, wait_s: float, until: float) -> None:
        """Stop fetching, and wait until no pull request of ours can take another message.

        Nak'ing before our last pull request expired would hand the message straight back
        to that request (one wasted delivery each, which counts towards max_deliver); so
        the fetch under way ends, its request expires, a round trip brings in whatever the
        server sent it (see ingress.py), and only then does the caller nak."""
        self.draining = True
        self.ingress.stop()
        done, _ = await asyncio.wait({task}, timeout=wait_s)
        if not done:
            task.cancel()
        wait_s = min(self.ingress.requests_expire_at + 0.05, until) - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        await self._flush(max(0.1, min(1.0, until - time.monotonic())))
        await self.ingress.settle_deliveries(max(0.05, until - time.monotonic()))
        if self._refused:
            log.info("late_deliveries", count=len(self._refused))

    def _unadmitted(self) -> list[Msg]:
        """Take every message fetched and never admitted: pending, and refused while stopping."""
        msgs = [t.msg for t in self.pending] + self._refused
        self.pending.clear()
        self._refused = []
        self.pending_tokens = 0
        return msgs

    async def _teardown_graceful(self, ingress_task: asyncio.Task) -> int:
        await self._stop_ingress(ingress_task, self.ingress.fetch_timeout_s + 1.0,
                                 until=time.monotonic() + self.ingress.fetch_timeout_s + 2.0)
        await self._nak_now(self._unadmitted())
        await self._flush(1.0)  # the fleet takes the never-admitted jobs now
        deadline = time.monotonic() + self.opts.grace_s
        while (self.inflight and time.monotonic() < deadline and self.executor.alive
               and self.fault is None):
            await asyncio.sleep(0.05)
        self.executor.stop(timeout_s=2.0)
        await self._nak_now([t.msg for t in self.inflight.values()])
        self.inflight.clear()
        await self.drain.flush(timeout_s=10.0)
        await self._close()
        return 1 if self.fault is not None else 0

    async def _teardown_fatal(self, ingress_task: asyncio.Task) -> int:
        fault = self.fault
        assert fault is not None
        with contextlib.suppress(Exception):  # only asks; a hung thread is left to the watchdog
            self.executor.stop(timeout_s=0)
        abort = asyncio.ensure_future(self.drain.abort(grace_s=0.25))
        await self._stop_ingress(ingress_task, self.ingress.fetch_timeout_s + 0.2,
                                 until=fault.at + 2.0)
        await abort
        held_ids = sorted({t.job.id for t in list(self.pending) + list(self.inflight.values())})
        self._unadmitted()
        self.inflight.clear()
        # Every held message: pending, in flight, Results not yet published, late deliveries.
        naked = await self._nak_now(list(self.held.values()))
        flushed = await self._flush(1.0)
        log.error("fatal_naked", naked=naked, flushed=flushed, jobs=held_ids,
                  since_fault_s=round(time.monotonic() - fault.at, 3))
        await self._close(timeout_s=1.0)
        log.error("worker_fatal", reason=fault.reason, teardown_s=round(time.monotonic() - fault.at, 3),
                  exit_unix=time.time())
        return 1

    async def _flush(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.nc.flush(), timeout_s)
            return True
        except Exception as e:  # noqa: BLE001 - we are leaving either way; unflushed = ack wait
            log.warning("flush_failed", error=repr(e))
            return False

    async def _close(self, timeout_s: float = 2.0) -> None:
        await self._flush(timeout_s)
        try:
            await asyncio.wait_for(self.nc.close(), timeout_s)
        except Exception as e:  # noqa: BLE001 - closing a broken connection may fail; unacked = redelivered
            log.warning("close_failed", error=repr(e))


async def _quiet(aw) -> None:
    try:
        await aw
    except Exception as e:  # noqa: BLE001 - the broker redelivers what we could not settle
        log.debug("settle_failed", error=repr(e))


def _exit_watchdog(fault: Fault) -> None:
    """Whatever hangs (a device call, the event loop, interpreter shutdown), exit in time."""
    time.sleep(max(0.0, FATAL_EXIT_S - (time.monotonic() - fault.at)))
    with contextlib.suppress(Exception):
        log.error("exit_watchdog", reason=fault.reason, since_fault_s=round(time.monotonic() - fault.at, 3))
        sys.stderr.flush()
    os._exit(1)
