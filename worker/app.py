"""The worker process: builds the stages, wires their callbacks, runs until the way out.

A delivered job visits each stage once, in order: ingress -> held (`worker.admission`) ->
`features.cancels` -> `features.formats` -> `worker.admitter` -> the executor thread, its
tokens watched by `features.stops` -> `worker.answers` -> the publisher. The stages talk only
through the callbacks wired here; the way out is `worker.lifecycle`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time

import structlog
from nats.aio.msg import Msg

from worker.admission import Intake
from worker.admitter import Admitter
from worker.answers import Answers
from worker.broker.connection import Security, connect
from worker.broker.ingress import Ingress
from worker.broker.members import Membership
from worker.broker.publisher import Publisher, heartbeats
from worker.broker.topology import Topology, Verified, verify
from worker.broker.validate import Limits, Outcome, Ticket, Validator
from worker.config import EngineConfig, config_hash
from worker.engine.build import Engine
from worker.engine.executor import Executor, StepReport
from worker.engine.governor import ThreadGovernor
from worker.engine.sequence import Completion
from worker.features.cancels import Cancels
from worker.features.formats import Formats
from worker.features.stops import Stops
from worker.lifecycle import (FaultKind, Lifecycle, Stages, Watch, burst_watch, teardown_fatal,
                              teardown_graceful, ticks)
from worker.model.grammar import Grammars
from worker.options import Options
from worker.ops import failpoints, heap
from worker.ops.cpu import IdleCpus, Starvation, process_wait_s
from worker.ops.stats import WorkerStats
from worker.ops.view import KvLevels, WorkerInfo, WorkerView

log = structlog.get_logger("worker")

# A pull request lives this long; stopping waits one out before nak'ing (worker.lifecycle).
FETCH_TIMEOUT_S = 0.5


class Worker:
    def __init__(self, cfg: EngineConfig, opts: Options, engine: Engine, topo: Topology,
                 security: Security):
        self.cfg, self.opts, self.engine, self.topo, self.security = cfg, opts, engine, topo, security
        self.intake = Intake(engine.pool.blocks, cfg.token_budget, cfg.low_water,
                             cfg.max_seq_len, opts.fetch_batch, opts.solo_from_attempt)
        self.stats = WorkerStats()
        self.life = Lifecycle()
        self.info = WorkerInfo(worker_id=opts.worker_id, config_hash=config_hash(cfg),
                               model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                               token_budget=cfg.token_budget, low_water=cfg.low_water,
                               max_jobs=cfg.token_budget // engine.block_size)
        self.ready = False
        self.nc = None  # the broker connection, once made
        # The stages that need the broker or the running loop, built by `_build` (the view
        # reads None before that).
        self.executor: Executor | None = None
        self.ingress: Ingress | None = None
        self.publisher: Publisher | None = None
        self.admitter = self.answers = self.cancels = self.formats = self.stops = None
        self.members: Membership | None = None  # session partitions' owners, if provisioned
        self.last_step_at = 0.0  # monotonic end of the last executor step (executor thread)
        self.starvation = Starvation(cpus=opts.threads)
        self._trimmed_at = 0.0  # monotonic time of the last heap trim (`_sweep`)
        self._watch = Watch(opts.step_timeout_s, opts.broker_give_up_s)
        # Structured output is generation's (an embedding worker refuses such jobs by task).
        self._grammars = (Grammars(engine.loaded.tokenizer, engine.loaded.args.vocab_size,
                                   engine.loaded.eos_ids) if engine.task == "generate" else None)

    # -- building and wiring -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.life.bind(loop)
        self.nc = await connect(self.cfg.nats_url, self.opts.worker_id, self.security,
                                self.opts.connect_give_up_s)
        js = self.nc.jetstream(domain=self.topo.js_domain)
        verified = await verify(js, self.topo)
        log.info("topology_verified", ack_wait_s=verified.ack_wait_s,
                 max_deliver=verified.max_deliver, solo_from_attempt=self.opts.solo_from_attempt,
                 dead_letters=self.topo.dlq_subject, js_domain=self.topo.js_domain,
                 security=self.security.describe(), failpoints=failpoints.armed() or None)
        await self._build(loop, js, verified)
        # At once: from here /healthz sees an executor, and it must be a running one.
        self.executor.start()
        await self.cancels.listen(self.nc, js, self.topo, verified)
        await self.ingress.start()
        if self.members is not None and not await self.members.join():
            self.members = None  # owners known before the first pull, or none at all
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.life.stop, sig.name)
        self.life.watch_loop(self.opts.step_timeout_s)
        tasks = [self._supervised(c) for c in (
            self.publisher.run(), heartbeats(self.intake.held, verified.ack_wait_s),
            ticks(self.life, self._look, self._sweep, self._fault))]
        ingress_task = self._supervised(self.ingress.run())
        if self.opts.burst:
            tasks.append(self._supervised(burst_watch(self.life, js, self.topo, self.intake.held)))
        if self.members is not None:
            tasks.append(self._supervised(self.members.run()))
        self.ready = True
        log.info("worker_ready", worker=self.opts.worker_id)
        reason = await self.life.wait()
        self.ready = False
        if self.members is not None:
            await self.members.leave()  # our partitions move now, not after the TTL
        stages = Stages(self.nc, self.ingress, ingress_task, self.intake, self.executor,
                        self.publisher, self.stats)
        if self.life.fault is not None:
            code = await teardown_fatal(stages, self.life.fault)
        else:
            code = await teardown_graceful(stages, self.opts.grace_s,
                                           faulted=lambda: self.life.fault is not None)
        for t in tasks:
            t.cancel()
        # The KV pool's counters (hits and copies by tier) beside the stats: the bench reads them.
        log.info("worker_summary", worker=self.opts.worker_id, exit_reason=reason, exit_code=code,
                 **self.stats.summary(), kv=dataclasses.asdict(KvLevels.of(self.intake.pool)),
                 **(self.ingress.summary() if self.ingress else {}))
        return code

    async def _build(self, loop: asyncio.AbstractEventLoop, js, verified: Verified) -> None:
        eng, loaded, intake, stats, wid = (self.engine, self.engine.loaded, self.intake,
                                           self.stats, self.opts.worker_id)
        self.executor = ex = Executor(
            eng, on_complete=lambda c: loop.call_soon_threadsafe(self._on_completions, c),
            on_step=self._on_step,
            on_fatal=lambda e: self._fault(FaultKind.EXECUTOR_FAILED, f"executor failed: {e!r}"),
            backlog=lambda: len(intake.pending), failpoint=self._failpoint,
            governor=(ThreadGovernor(self.opts.threads, spare=IdleCpus(),
                                     start_spare=self.opts.start_spare)
                      if self.opts.adapt_threads else None),
            on_progress=lambda p: loop.call_soon_threadsafe(self.stops.progress, p))
        self.publisher = Publisher(self.nc, js, maxsize=intake.held_cap + 1024,
                                   publish_give_up_s=self.opts.publish_give_up_s,
                                   results_captured=verified.results_captured)
        await self.publisher.start()
        embed = eng.task == "embed"
        limits = Limits(vocab_size=loaded.args.vocab_size, max_seq_len=self.cfg.max_seq_len,
                        budget_tokens=self.cfg.token_budget, block_size=eng.block_size,
                        reply_prefix=self.topo.results_prefix, max_deliver=verified.max_deliver,
                        task=eng.task, embed_dim=loaded.info.dim if embed else 0)
        self.ingress = Ingress(self.nc, self.topo.jobs_stream,
                               verified.queues or self.topo.consumer,
                               Validator(limits, loaded.tokenizer, loaded.chat, self.opts.served),
                               intake.room, self._on_ticket, self._on_outcome,
                               fetch_timeout_s=FETCH_TIMEOUT_S, api_prefix=self.topo.api_prefix)
        # (each partition has a queue per class of priorities: count partitions, not queues)
        partitions = len({q.partition for q in verified.queues if q.partition is not None})
        if verified.members and partitions:
            self.members = Membership(self.nc, js, self.topo, wid, partitions,
                                      self.ingress.set_owned, self.ingress.loads.counts)
        room_changed = self.ingress.room_changed.set
        self.stops = Stops(loaded.tokenizer, end=ex.end)
        self.answers = Answers(intake, self.publisher, stats, wid, self.topo.dlq_subject,
                               loaded.tokenizer, normalize=loaded.info.normalize if embed else False,
                               release_stops=self.stops.release, room_changed=room_changed)
        self.cancels = Cancels(intake, stats, wid, answer=self.answers.cancelled, end=ex.end,
                               room_changed=room_changed, window_s=verified.results_window_s)
        self.admitter = Admitter(intake, stats, loop, submit=ex.submit,
                                 expired=self.answers.expired, watch_stops=self.stops.watch,
                                 room_changed=room_changed)
        self.formats = Formats(self._grammars, stats, then=self.admitter.offer,
                               refuse=self.answers.bad_schema, screen=self.cancels.screen)

    def _supervised(self, coro) -> asyncio.Task:
        """A stage task that ends with an exception takes the worker down: fatal, not silent."""
        task = asyncio.create_task(coro, name=coro.__qualname__)

        def check(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("stage_failed", stage=t.get_name(), error=repr(t.exception()))
                self._fault(FaultKind.STAGE_FAILED, f"{t.get_name()} failed: {t.exception()!r}")
        task.add_done_callback(check)
        return task

    def _fault(self, kind: FaultKind, detail: str) -> None:
        """Any thread."""
        self.life.declare(kind, detail, held=len(self.intake.held),
                          inflight=len(self.intake.inflight))

    def view(self) -> WorkerView:
        """What metrics and health read (any thread)."""
        return WorkerView.of(self, process_wait_s())

    # -- a job's path: each stage once, in order ---------------------------------------

    def _hold(self, msg: Msg, attempt: int, job_id: str) -> None:
        self.intake.hold(msg, attempt, self.ingress.last_fetch_len)
        if attempt > 1:
            self.stats.redelivered += 1
            log.info("job_redelivered", job=job_id, attempt=attempt)

    def _on_ticket(self, t: Ticket) -> None:
        if t.part == 0:  # a message of several jobs is held (and counted) once
            self._hold(t.msg, t.attempt, t.job.id)
        if not self.cancels.screen(t, "cancelled before it was delivered"):
            self.formats.prepare(t)  # then the admitter, now or once its schema compiled

    def _on_outcome(self, o: Outcome) -> None:
        self._hold(o.msg, o.attempt, o.job_id)
        self.answers.edge(o)

    def _on_completions(self, comps: list[Completion]) -> None:
        if self.life.fault is not None:
            return  # everything held has been nak'd; a late completion answers nothing
        self.answers.completions(comps)
        self.admitter.admit()
        self.ingress.room_changed.set()

    # -- the executor thread's callbacks -----------------------------------------------

    def _failpoint(self, name: str) -> None:
        # The ids of the jobs decoding this step, for job-specific failpoints (read only
        # when such a point is armed: hence a function).
        inflight = self.intake.inflight
        failpoints.hit(name, jobs=lambda: [t.job.id for k in self.executor.running_keys()
                                           if (t := inflight.get(k))])

    def _on_step(self, r: StepReport) -> None:
        # Executor thread: only this thread writes the step counters and the heartbeat.
        self.last_step_at = time.monotonic()
        self.stats.on_step(r)

    # -- the loop's own eyes -------------------------------------------------------------

    def _look(self, now: float) -> tuple[FaultKind, str] | None:
        return self._watch.check(now, self.executor.alive, len(self.intake.inflight),
                                 max(self.last_step_at, self.intake.busy_since),
                                 self.nc.is_connected)

    def _sweep(self, now: float) -> None:
        """Once a second: CPU starvation, cancelled ids, pending deadlines; the heap's trim."""
        self.starvation.report(now, process_wait_s(), bool(self.intake.inflight),
                               self.executor.threads)
        self.cancels.forget_expired(now)
        self.admitter.expire_pending()
        if now - self._trimmed_at >= heap.TRIM_EVERY_S:
            self._trimmed_at, _ = now, heap.trim()
