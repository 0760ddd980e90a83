"""The worker process: builds the stages, wires them together, runs until the way out.

Ingress -> Intake (pending, admission) -> executor thread -> Result publisher. The stages
talk only through the callbacks wired here; the state that crosses stages (what is
pending, in flight, held) is `worker.admission.Intake`, the way out (faults, watchdogs,
teardowns) is `worker.lifecycle`, and what goes on the wire is `worker.broker.replies`.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
import signal
import time
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg

from schemas import ErrorCode, ErrorInfo, FinishReason, encode
from worker.admission import Intake
from worker.broker.cancels import CancelError, Cancelled, parse_cancel
from worker.broker.connection import Security, connect
from worker.broker.ingress import Ingress
from worker.broker.publisher import DeadLetter, Delivery, Publisher, Settle
from worker.broker.replies import (JobTimes, cancelled_result, completion_payload, dead_letter,
                                   edge_result, embedding_payload, failed_result, reply_json)
from worker.broker.topology import Topology, verify
from worker.broker.validate import Limits, Outcome, Ticket, Validator
from worker.config import EngineConfig, config_hash
from worker.engine.build import Engine
from worker.engine.executor import Executor, StepReport
from worker.engine.governor import ThreadGovernor
from worker.engine.sampling import fold_seed
from worker.engine.sequence import Completion, Request
from worker.model.grammar import COMPILE_TIMEOUT_S, GrammarError, Grammars
from worker.model.stops import StopMatcher
from worker.lifecycle import (FaultKind, Lifecycle, Stages, Watch, quiet, teardown_fatal,
                              teardown_graceful)
from worker.ops import failpoints
from worker.ops.cpu import IdleCpus, Starvation, process_wait_s
from worker.ops.stats import WorkerStats
from worker.ops.view import WorkerInfo, WorkerView

log = structlog.get_logger("worker")

# A pull request lives this long; stopping waits one out before nak'ing (worker.lifecycle).
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
    step_timeout_s: float = 60.0  # jobs in flight and no step finished this long: a hang, fatal
    broker_give_up_s: float = 120.0  # disconnected this long: fatal (held jobs wait the ack wait)
    publish_give_up_s: float = 60.0  # a Result publish is retried this long, then the job is nak'd
    threads: int = 1  # intra-op threads the worker may use (worker.ops.cpu.cpu_budget)
    adapt_threads: bool = False  # choose 1..threads by measured speed (engine.governor)
    start_spare: float = 0.0  # CPUs of ours left idle while the model loaded (its start count)
    cancel_subject: str = "fabric.cancel"  # core NATS subject of cancel messages


class _StopFailed(Exception):
    """A job's stop matcher raised while its Result was built."""


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
        self.executor: Executor | None = None
        self.ingress: Ingress | None = None
        self.publisher: Publisher | None = None
        self.last_step_at = 0.0  # monotonic end of the last executor step (executor thread)
        self.starvation = Starvation(cpus=opts.threads)
        self._rng = random.Random()
        self.cancelled = Cancelled(window_s=120.0)  # ids cancelled lately (broker.cancels)
        self._stops: dict[int, StopMatcher] = {}  # admitted jobs with stop strings, by key
        loaded = engine.loaded
        # Structured output is generation's (an embedding worker refuses such jobs by task).
        self.grammars = (Grammars(loaded.tokenizer, loaded.args.vocab_size, loaded.eos_ids)
                         if engine.task == "generate" else None)
        # Response formats compile here, never on the loop or the executor; one at a time.
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._compiling: set[asyncio.Task] = set()
        self._admit_soon = False  # an _admit is scheduled for this loop pass
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- wiring ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self.life.bind(loop)
        self.nc = await connect(self.cfg.nats_url, self.opts.worker_id, self.security,
                                self.opts.connect_give_up_s)
        js = self.nc.jetstream(domain=self.topo.js_domain)
        verified = await verify(js, self.topo)
        self.cancelled.window_s = verified.results_window_s
        log.info("topology_verified", ack_wait_s=verified.ack_wait_s,
                 max_deliver=verified.max_deliver, solo_from_attempt=self.opts.solo_from_attempt,
                 dead_letters=self.topo.dlq_subject, js_domain=self.topo.js_domain,
                 security=self.security.describe(), failpoints=failpoints.armed() or None)
        self.executor = Executor(
            self.engine,
            on_complete=lambda c: loop.call_soon_threadsafe(self._on_completions, c),
            on_step=self._on_step,
            on_fatal=lambda e: self._fault(FaultKind.EXECUTOR_FAILED, f"executor failed: {e!r}"),
            backlog=lambda: len(self.intake.pending),
            failpoint=self._failpoint,
            governor=(ThreadGovernor(self.opts.threads, spare=IdleCpus(),
                                     start_spare=self.opts.start_spare)
                      if self.opts.adapt_threads else None),
            on_progress=lambda p: loop.call_soon_threadsafe(self._on_progress, p),
        )
        self.publisher = Publisher(self.nc, js, maxsize=self.intake.held_cap + 1024,
                                   publish_give_up_s=self.opts.publish_give_up_s,
                                   results_captured=verified.results_captured)
        await self.publisher.start()
        embed = self.engine.task == "embed"
        limits = Limits(vocab_size=self.engine.loaded.args.vocab_size,
                        max_seq_len=self.cfg.max_seq_len, budget_tokens=self.cfg.token_budget,
                        block_size=self.engine.block_size, reply_prefix=self.topo.results_prefix,
                        max_deliver=verified.max_deliver, task=self.engine.task,
                        embed_dim=self.engine.loaded.info.dim if embed else 0)
        self.ingress = Ingress(self.nc, self.topo.jobs_stream, self.topo.consumer,
                               Validator(limits, self.engine.loaded.tokenizer,
                                         chat=self.engine.loaded.chat),
                               self.intake.room, self._on_ticket, self._on_outcome,
                               fetch_timeout_s=FETCH_TIMEOUT_S, api_prefix=self.topo.api_prefix)
        # Every worker hears every cancel (no queue group): any of them may hold the job.
        await self.nc.subscribe(self.opts.cancel_subject, cb=self._on_cancel)
        await self.ingress.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.life.stop, sig.name)
        self.executor.start()
        self.life.watch_loop(self.opts.step_timeout_s)
        tasks = [self._supervised(c) for c in (self.publisher.run(),
                                               self._heartbeats(verified.ack_wait_s),
                                               self._watch())]
        ingress_task = self._supervised(self.ingress.run())
        if self.opts.burst:
            tasks.append(self._supervised(self._burst_watch(js)))
        self.ready = True
        log.info("worker_ready", worker=self.opts.worker_id)
        reason = await self.life.wait()
        self.ready = False
        stages = Stages(self.nc, self.ingress, ingress_task, self.intake, self.executor,
                        self.publisher, self.stats)
        if self.life.fault is not None:
            code = await teardown_fatal(stages, self.life.fault)
        else:
            code = await teardown_graceful(stages, self.opts.grace_s,
                                           faulted=lambda: self.life.fault is not None)
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
                self._fault(FaultKind.STAGE_FAILED, f"{t.get_name()} failed: {t.exception()!r}")
        task.add_done_callback(check)
        return task

    def _fault(self, kind: FaultKind, detail: str) -> None:
        """Any thread."""
        self.life.declare(kind, detail, held=len(self.intake.held),
                          inflight=len(self.intake.inflight))

    def view(self) -> WorkerView:
        """What metrics and health read (any thread)."""
        ex, pub, ing, intake = self.executor, self.publisher, self.ingress, self.intake
        return WorkerView(
            ready=self.ready, draining=self.intake.draining, faulted=self.life.fault is not None,
            started=ex is not None, executor_alive=ex is not None and ex.alive,
            connected=None if self.nc is None else self.nc.is_connected,
            held=len(self.intake.held), pending_jobs=len(self.intake.pending),
            pending_tokens=self.intake.pending_tokens, inflight_jobs=len(self.intake.inflight),
            running_jobs=ex.running_jobs if ex else 0, inflight_tokens=intake.in_flight_tokens,
            occupancy=intake.occupancy, admission_holding=intake.admission.holding,
            kv_used_blocks=intake.pool.used_blocks, kv_blocks=intake.pool.num_blocks,
            kv_cached_blocks=intake.pool.cached_blocks, kv_evictions=intake.pool.evictions,
            publisher_depth=pub.depth if pub else 0, publisher_capacity=pub.capacity if pub else 0,
            fetched=ing.fetched if ing else 0, published=pub.published if pub else 0,
            acked=pub.acked if pub else 0, termed=pub.termed if pub else 0,
            naked=pub.naked if pub else 0, dead_lettered=pub.dead_lettered if pub else 0,
            last_step_at=self.last_step_at,
            intra_op_threads=ex.threads if ex else self.opts.threads,
            thread_probes=ex.governor.probes if ex and ex.governor else 0,
            cpu_wait_s=process_wait_s(), cpu_wait_ratio=self.starvation.wait_ratio,
            cpu_starved=self.starvation.starved, stats=self.stats)

    # -- ingress and admission ---------------------------------------------------------

    def _hold(self, msg: Msg, attempt: int, job_id: str) -> None:
        self.intake.hold(msg, attempt, self.ingress.last_fetch_len)
        if attempt > 1:
            self.stats.redelivered += 1
            log.info("job_redelivered", job=job_id, attempt=attempt)

    def _on_ticket(self, t: Ticket) -> None:
        self._hold(t.msg, t.attempt, t.job.id)
        if t.job.id in self.cancelled:
            self._cancel_unrun(t, "cancelled before it was delivered")
            return
        fmt = t.job.response_format
        if fmt is not None and t.grammar is None:
            t.grammar = self.grammars.cached(fmt.as_dict())
            if t.grammar is None:  # compiled off the loop; it waits outside admission
                task = asyncio.create_task(self._compile_then_offer(t))
                self._compiling.add(task)
                task.add_done_callback(self._compiling.discard)
                return
        self._offer(t)

    def _offer(self, t: Ticket) -> None:
        if self.intake.offer(t) and not self._admit_soon:
            # Once per loop pass, not per message: a pull brings its deliveries in one read,
            # and they go to the executor as one submission (one wake-up, one bigger step).
            self._admit_soon = True
            self._loop.call_soon(self._admit)

    def _admit(self) -> None:
        self._admit_soon = False
        got = self.intake.admit(time.monotonic(), time.time())
        for t in got.expired:
            self._expire(t, "deadline passed while the job waited for admission")
        if got.run:
            self.executor.submit([self._request(t) for t in got.run])
        if got:
            self.ingress.room_changed.set()
        self.stats.occupancy(self.intake.occupancy, queued=bool(self.intake.pending))

    def _request(self, t: Ticket) -> Request:
        solo = self.intake.is_solo(t)
        if solo:
            log.info("job_solo", job=t.job.id, attempt=t.attempt)
        s = t.job.sampling
        seed = self._rng.getrandbits(63) if s.seed is None else s.seed
        if s.stop:
            self._stops[t.key] = StopMatcher(self.engine.loaded.tokenizer, s.stop)
        return Request(key=t.key, prompt=t.prompt, max_new_tokens=t.job.max_new_tokens or 0,
                       reserved_tokens=t.reserved_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, seed=fold_seed(seed),
                       stop_ids=frozenset(s.stop_token_ids), solo=solo, hashes=t.hashes,
                       reservation=t.reservation, ignore_eos=s.ignore_eos,
                       logprobs=s.logprobs, watch=bool(s.stop), job_id=t.job.id,
                       grammar=None if t.grammar is None else t.grammar.matcher())

    def _expire(self, t: Ticket, why: str) -> None:
        self._answer(Outcome(t.msg, t.job.id, t.job.reply_to, t.attempt, t.arrived_at,
                             FinishReason.EXPIRED, ErrorInfo(code=ErrorCode.EXPIRED, message=why),
                             prompt_tokens=len(t.prompt), json=t.json))

    async def _compile_then_offer(self, t: Ticket) -> None:
        fmt = t.job.response_format.as_dict()
        try:
            t.grammar = await asyncio.wait_for(
                self._loop.run_in_executor(self._compiler, self.grammars.compile, fmt),
                COMPILE_TIMEOUT_S)
        except (GrammarError, asyncio.TimeoutError) as e:
            why = str(e) if isinstance(e, GrammarError) else (
                f"the schema did not compile within {COMPILE_TIMEOUT_S:g} s")
            self._answer(Outcome(t.msg, t.job.id, t.job.reply_to, t.attempt, t.arrived_at,
                                 FinishReason.ERROR, ErrorInfo(code=ErrorCode.BAD_SCHEMA,
                                                               message=why),
                                 prompt_tokens=len(t.prompt), json=t.json))
            return
        finally:
            self.stats.grammar_compiles = self.grammars.compiles
            self.stats.grammar_compile_s = self.grammars.compile_s
        if t.job.id in self.cancelled:
            self._cancel_unrun(t, "cancelled while its schema compiled")
        else:
            self._offer(t)

    def _cancel_unrun(self, t: Ticket, why: str) -> None:
        """Answer a job that never reached the executor as cancelled (acked: it is done)."""
        self._answer(Outcome(t.msg, t.job.id, t.job.reply_to, t.attempt, t.arrived_at,
                             FinishReason.CANCELLED,
                             ErrorInfo(code=ErrorCode.CANCELLED, message=why),
                             prompt_tokens=len(t.prompt), terminate=False, json=t.json))

    # -- cancellation and stop strings -------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            ids = parse_cancel(msg.data)
        except CancelError as e:
            self.stats.cancels_refused += 1
            log.warning("cancel_refused", subject=msg.subject, reason=str(e))
            if msg.reply:
                await quiet(msg.respond(reply_json({"ok": False, "error": str(e)})))
            return
        self.stats.cancels += 1
        self.cancelled.add(ids, time.monotonic())
        wanted = set(ids)
        unrun = self.intake.withdraw(wanted)
        for t in unrun:
            self._cancel_unrun(t, "cancelled while it waited for admission")
        running = [k for k, t in self.intake.inflight.items() if t.job.id in wanted]
        for key in running:
            self.executor.end(key, "cancelled")
        log.info("cancel", ids=len(ids), waiting=len(unrun), running=len(running))
        if unrun:
            self.ingress.room_changed.set()
        if msg.reply:
            await quiet(msg.respond(reply_json({
                "ok": True, "worker": self.opts.worker_id,
                "held": sorted({t.job.id for t in unrun}
                               | {self.intake.inflight[k].job.id for k in running
                                  if k in self.intake.inflight})})))

    def _on_progress(self, progress: list[tuple[int, int]]) -> None:
        """Tokens of jobs with stop strings, as the executor made them: a match ends the job."""
        for key, tok in progress:
            m = self._stops.get(key)
            if m is None or m.end is not None:
                continue
            try:
                failpoints.hit("stops.feed", jobs=lambda k=key: (
                    (t.job.id,) if (t := self.intake.inflight.get(k)) else ()))
                found = m.feed((tok,))
            except Exception as e:  # noqa: BLE001 - a matcher that fails is its job's alone
                del self._stops[key]
                self.executor.end(key, "error", (ErrorCode.STOP_FAILED.value,
                                                 f"matching its stop strings failed: {e!r}"))
                continue
            if found:
                self.executor.end(key, "stop")

    def _on_outcome(self, o: Outcome) -> None:
        self._hold(o.msg, o.attempt, o.job_id)
        self._answer(o)

    def _answer(self, o: Outcome) -> None:
        res = edge_result(o, self.opts.worker_id, time.monotonic())
        self.stats.on_edge_answer(res.ok, res.error.code.value if res.error else None)
        dead = None
        if o.dead_letter is not None:
            dead = dead_letter(o, self.topo.dlq_subject, self.opts.worker_id, time.time())
            log.error("job_dead_lettered", job=o.job_id, attempt=o.attempt, subject=dead.subject,
                      reason=o.dead_letter)
        else:
            log.info("job_rejected" if not res.ok else "job_answered_at_edge", job=o.job_id,
                     attempt=o.attempt, code=o.error.code.value if o.error else None,
                     reason=o.error.message if o.error else None)
        self._deliver(o.msg, o.job_id, o.attempt, encode(res, as_json=o.json), o.reply_to,
                      Settle.TERM if o.terminate else Settle.ACK, dead)

    # -- completions -------------------------------------------------------------------

    def _failpoint(self, name: str) -> None:
        # Executor thread. The ids of the jobs decoding this step, for job-specific failpoints
        # (read only when such a point is armed).
        failpoints.hit(name, jobs=self._running_job_ids)

    def _running_job_ids(self) -> list[str]:
        inflight = self.intake.inflight
        return [t.job.id for k in self.executor.running_keys() if (t := inflight.get(k))]

    def _on_step(self, r: StepReport) -> None:
        # Executor thread: only this thread writes the step counters and the heartbeat.
        self.last_step_at = time.monotonic()
        self.stats.on_step(r)

    def _on_completions(self, comps: list[Completion]) -> None:
        if self.life.fault is not None:
            return  # everything held has been nak'd; a late completion answers nothing
        now = time.monotonic()
        tok = self.engine.loaded.tokenizer
        for c in comps:
            t = self.intake.finished(c.key)
            stops = self._stops.pop(c.key, None)
            if t is None:
                continue
            times = JobTimes.of(t, c, now)
            try:
                payload, code = self._payload(t, c, stops, times, tok)
            except Exception as e:  # noqa: BLE001 - one job's Result must not cost the others
                stop = isinstance(e, _StopFailed)
                c.finish_reason, c.error = "error", (
                    (ErrorCode.STOP_FAILED if stop else ErrorCode.RESULT_FAILED).value,
                    f"{'matching its stop strings' if stop else 'building its Result'} "
                    f"failed: {e!r}"[:400])
                payload, code = self._payload(t, c, None, times, None)
            if code not in (None, ErrorCode.CANCELLED):
                log.warning("job_failed", job=t.job.id, attempt=t.attempt, code=code.value,
                            reason=c.error[1] if c.error else None, tokens=len(c.tokens))
            self.stats.on_result(ok=code is None, prompt_tokens=len(t.prompt),
                                 completion_tokens=len(c.tokens), padded_tokens=c.computed_tokens,
                                 cached_tokens=c.cached_tokens,
                                 queued_ms=times.queued_ms, first_token_ms=times.first_token_ms,
                                 total_ms=times.total_ms,
                                 error_code=None if code is None else code.value)
            self._deliver(t.msg, t.job.id, t.attempt, payload, t.job.reply_to, Settle.ACK)
        self._admit()
        self.ingress.room_changed.set()

    def _payload(self, t: Ticket, c: Completion, stops: StopMatcher | None, times: JobTimes,
                 tok) -> tuple[bytes, ErrorCode | None]:
        """The job's encoded Result and its error code (None: ok). `tok` None: the tokens
        are not decoded (the Result of a job whose decoding failed)."""
        wid = self.opts.worker_id
        if c.embedding is not None:
            return embedding_payload(t, c, wid, times, self.engine.loaded.info.normalize), None
        if c.finish_reason in ("cancelled", "error"):
            text = tok.decode(c.tokens) if c.tokens and tok is not None else None
            if c.finish_reason == "cancelled":
                log.info("job_cancelled", job=t.job.id, attempt=t.attempt, tokens=len(c.tokens))
                return encode(cancelled_result(t, c, text, wid, times), as_json=t.json), \
                    ErrorCode.CANCELLED
            code = ErrorCode(c.error[0]) if c.error else ErrorCode.RESULT_FAILED
            why = c.error[1] if c.error else "the executor ended it without a reason"
            return encode(failed_result(t, c, text, wid, times, code, why), as_json=t.json), code
        text = None
        if stops is not None:
            try:
                found = stops.feed(c.tokens[stops.fed:])
            except Exception as e:  # noqa: BLE001 - re-raised as its job's own failure
                raise _StopFailed(repr(e)) from e
            if found:
                # A stop string: keep through the token that completed it, text before it.
                c.tokens, c.finish_reason = c.tokens[:stops.end], "stop"
                text = stops.text[:stops.cut]
        return completion_payload(t, c, tok.decode(c.tokens) if text is None else text, wid,
                                  times), None

    def _deliver(self, msg: Msg, job_id: str, attempt: int, payload: bytes, reply_to: str | None,
                 settle: Settle, dead: DeadLetter | None = None) -> None:
        if self.publisher.aborted:
            self.intake.refused.append(msg)  # the fatal teardown naks it with the rest
            return

        def done(_as_asked: bool) -> None:
            self.intake.settled(msg)
            self.ingress.room_changed.set()
        self.publisher.put(Delivery(msg, job_id, attempt, payload, reply_to, settle, on_done=done,
                                    dead_letter=dead))

    # -- background duties -------------------------------------------------------------

    async def _heartbeats(self, ack_wait_s: float) -> None:
        """Tell the broker held jobs are alive, so the ack wait can be short."""
        period = max(0.2, ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            for msg in list(self.intake.held.values()):
                await quiet(msg.in_progress())

    async def _watch(self) -> None:
        """Every tick: the executor and the broker (`Watch`), and deadlines of pending jobs."""
        watch = Watch(self.opts.step_timeout_s, self.opts.broker_give_up_s)
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            if self.life.stopping:
                return  # the way out has begun: a stopped executor is expected now
            now = self.life.loop_tick = time.monotonic()
            found = watch.check(now, self.executor.alive, len(self.intake.inflight),
                                max(self.last_step_at, self.intake.busy_since),
                                self.nc.is_connected)
            if found is not None:
                self._fault(*found)
                return
            if now - last_sweep >= 1.0:
                last_sweep = now
                self._check_cpu(now)
                self.cancelled.forget_expired(now)
                expired = self.intake.expire_pending(time.time())
                for t in expired:
                    self._expire(t, "deadline passed while the job waited for admission")
                if expired:
                    self.ingress.room_changed.set()

    def _check_cpu(self, now: float) -> None:
        s = self.starvation
        changed = s.update(now, process_wait_s(), busy=bool(self.intake.inflight))
        if changed is True:
            log.warning("cpu_starved", wait_ratio=round(s.wait_ratio, 3),
                        threads=self.executor.threads,
                        why="this worker's threads wait for CPUs other processes hold: "
                            "give it its own cores (--cpus, a CPU limit) or fewer neighbours")
        elif changed is False:
            log.info("cpu_starvation_over", wait_ratio=round(s.wait_ratio, 3),
                     threads=self.executor.threads)

    async def _burst_watch(self, js) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.intake.held:
                continue
            info = await js.consumer_info(self.topo.jobs_stream, self.topo.consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0 and not self.intake.held:
                self.life.stop("burst: queue empty")
                return
